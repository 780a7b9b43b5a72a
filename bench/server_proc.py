"""Start a server under test as a child process, wait until it is healthy, always stop it.

The child gets its own process group so stopping it also stops anything it spawned
(kiln's engine processes), and its output goes to a log file that is shown on failure
instead of interleaving with the progress bar.

While a server runs, SIGTERM and SIGHUP raise SystemExit in the bench (their default action would
end it at once, skipping the `finally` that stops the server), so a bench stopped by an orchestrator
or a closed terminal leaves no server behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ipc.ports import free_port  # noqa: F401  (re-exported: the benches take it from here)

REPO = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 15.0
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class ServerFailed(RuntimeError):
    """The server exited or never became healthy; the message carries its log tail."""


def ours_command(port: int, model: str | None, extra: list[str] | None = None) -> list[str]:
    """`cli.py serve` on loopback; `extra`: more serve arguments (bench's --serve-args)."""
    return (
        [sys.executable, str(REPO / "cli.py"), "serve", "--host", "127.0.0.1", "--port", str(port)]
        + (["--model", model] if model else [])
        + list(extra or [])
    )


def naive_command(port: int, model_path: str, dtype: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.naive_server",
        "--model-path",
        model_path,
        "--dtype",
        dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def health_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the child's process group, SIGKILL it after `grace_s`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def termination_raises() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise SystemExit(128 + signal) instead of killing the process
    outright, so `finally` blocks run. Only from the main thread (where Python runs signal handlers),
    and only for signals left at their default action (a caller's own handler is kept)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in TERMINATING_SIGNALS}

    def raise_exit(signum, frame):
        raise SystemExit(128 + signum)

    for sig, handler in previous.items():
        if handler == signal.SIG_DFL:
            signal.signal(sig, raise_exit)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGTERM/SIGHUP until the block ends, so that stopping a server is not cut short; a signal
    that came meanwhile is delivered (and raises) right after."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


@contextlib.contextmanager
def running_server(cmd: list[str], url: str, *, name: str, timeout_s: float = 180.0) -> Iterator[str]:
    """Yield `url` once `GET /health` answers 200; stop the server on exit, whatever happens
    (SIGTERM and SIGHUP included)."""
    with termination_raises():
        yield from _run_server(cmd, url, name=name, timeout_s=timeout_s)


def _run_server(cmd: list[str], url: str, *, name: str, timeout_s: float) -> Iterator[str]:
    with tempfile.NamedTemporaryFile(prefix=f"kiln-bench-{name}-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
    print(f"starting {name} server: {' '.join(cmd)} (log: {log_path})", file=sys.stderr, flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not health_ok(url):
            if proc.poll() is not None:
                raise ServerFailed(
                    f"{name} server exited with code {proc.returncode} before it was ready:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise ServerFailed(f"{name} server not healthy after {timeout_s:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.25)
        yield url
        if proc.poll() is not None:  # it died under load: the run's failures need its log
            print(
                f"{name} server exited during the run with code {proc.returncode}; log {log_path}:\n{_tail(log_path)}",
                file=sys.stderr,
                flush=True,
            )
            return
    finally:
        with signals_held():
            stop(proc)
    with contextlib.suppress(OSError):
        log_path.unlink()
