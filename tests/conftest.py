"""Shared fixtures: a real `cli.py serve` process on a free loopback port, the default model's folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine_core.engine_io import pid_alive  # noqa: F401  (the tests' process checks: one definition)
from ipc.ports import free_port, free_port_pair  # noqa: F401  (one definition, shared with bench and serve --ray)

REPO_ROOT = Path(__file__).resolve().parent.parent
# A CPU plan compiles its decode step by default: a minute or more per engine start on a small machine.
# Servers the suite starts run eager unless a test asks (test_engine_loop and test_compiled_serving
# compile, and check the compiled step token for token); an explicit ENABLE_COMPILE wins.
os.environ.setdefault("ENABLE_COMPILE", "0")
# The default model's shape (SmolLM2-135M) as a config.json, and CPU format timings measured with it once
SMOL_LIKE = {
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
TIMINGS = {"float32@1": 31.4, "float32@8": 60.5, "bfloat16@1": 22.8, "bfloat16@8": 22.8}


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class ServerProcess:
    """`python cli.py serve ...` as a child process; `stop()` is SIGTERM and a wait, as a user's Ctrl-C."""

    def __init__(self, *args: str, env: dict | None = None, avoid_ports: tuple[int, ...] = ()):
        self.port = free_port(avoid_ports)  # avoid: ports the test hands the server for other uses
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            str(REPO_ROOT / "cli.py"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kiln-test-server-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if get_json(self.url + "/health", timeout=2)["status"] == "ok":
                    return
            except Exception:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def info(self) -> dict:
        return get_json(self.url + "/info")

    def engine_pids(self) -> list[int]:
        return [engine["pid"] for engine in self.info()["engines"]]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from model.source import resolve_model

    return resolve_model(None).path


COMPILE_READY_TIMEOUT_S = 900.0  # a first compile of the decode step on a loaded 2-core machine, plus loading


def running_server(*args: str, env: dict | None = None):
    """Generator for module fixtures: a started server, always stopped afterwards."""
    proc = ServerProcess(*args, env=env)
    try:
        proc.wait_ready(COMPILE_READY_TIMEOUT_S if (env or {}).get("ENABLE_COMPILE") == "1" else 240.0)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def server(default_model_path):
    """One started server (default model, CPU) shared by a test module."""
    yield from running_server("--max-context", "512")
