"""One prepared run of every GPU check, time-boxed, that always leaves a report behind.

    python -m bench.gpu OUTDIR [--cpu] [--tokenizer DIR] [--only a,b] [--budget-s 420] [--workdir DIR]
    python -m bench.gpu prepare DIR       write the default model's tokenizer files into DIR

We get minutes on a borrowed GPU machine, one shell command, a handful of files back. So each
scenario runs in its own time box, a failure is recorded (traceback tail + server log tail) and the
next one runs, and OUTDIR/gpu_report.{json,md} are rewritten after every scenario: a run killed
at its time limit still reports what it finished. Server logs of failed scenarios are copied to
OUTDIR (at most 4, each cut to its last 200 KB).

This process never imports torch: models are built, served, measured and compared in child
processes, so it holds no GPU memory that would shrink the plans or blur nvidia-smi.

`--cpu` runs the same code paths at CPU scale (tiny and default models, a simulated H100 for the
planner searches) so CI keeps this script working between GPU runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.gpu_report import gib, write_report

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "configs"
PEAK_SLACK = 1.05  # measured peak may exceed the plan's weights + KV + reserve by 5%
LOG_KEEP_BYTES = 200_000
MAX_LOG_FILES = 4
SIMULATED_GPU = "H100:80GiB:9.0"  # --cpu: the planner searches run against this instead of a real GPU
OFFLOAD_FRACTIONS = (0.3, 0.27, 0.25, 0.22, 0.2, 0.18, 0.15, 0.12, 0.1)  # largest first: fewest layers offloaded
EMBED_CPU_FRACTIONS = (0.1, 0.09, 0.08, 0.075, 0.07, 0.065, 0.06, 0.055, 0.05)
TINY_PROMPTS = (
    "def fibonacci(n):",
    "The capital of France is",
    "Once upon a time, in a land far away,",
    "import numpy as np\nx = np.",
)
STEP_BATCHES = "1,4,10,16"
LLAMA8B = "llama-3.1-8b-bf16"
BENCH_MIN_S = 75  # two server starts and 10 x 128 tokens each: not worth starting with less


class OutOfTime(Exception):
    """A scenario's time box (or the whole run's budget) ran out."""


@dataclass
class Deadline:
    end: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def left(self) -> float:
        return self.end - time.monotonic()

    def box(self, seconds: float) -> float:
        """A timeout for one step: `seconds`, or less when the deadline comes first."""
        left = self.left()
        if left <= 1:
            raise OutOfTime("time box spent")
        return min(seconds, left)


@dataclass
class Result:
    """What one scenario found: checks against acceptance, the numbers behind them, notes."""

    name: str
    status: str = "PENDING"  # PASS, FAIL, ERROR (an exception), SKIP (budget or --only)
    checks: list[dict] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    log_tail: str | None = None
    seconds: float = 0.0
    logs: list[Path] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 1),
            "checks": self.checks,
            "numbers": self.numbers,
            "notes": self.notes,
            "error": self.error,
            "log_tail": self.log_tail,
        }


@dataclass
class Session:
    outdir: Path
    workdir: Path
    tokenizer_dir: Path
    cpu: bool
    budget: Deadline
    started: float = field(default_factory=time.time)
    results: dict[str, Result] = field(default_factory=dict)
    models: dict[str, Path] = field(default_factory=dict)
    background: dict[str, BackgroundBuild] = field(default_factory=dict)
    device: dict = field(default_factory=dict)
    copied_logs: list[str] = field(default_factory=list)


@dataclass
class Scenario:
    name: str
    run: Callable[[Session, Result, Deadline], None]
    box_s: float  # the most it may take
    min_s: float  # not started with less budget than this left
    cpu: bool = False  # part of --cpu mode
    gpu: bool = True  # part of GPU mode


# --- child processes ---------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def stop_group(proc: subprocess.Popen) -> None:
    from bench.server_proc import stop

    stop(proc, grace_s=10.0)


def run_logged(cmd: list[str], log_path: Path, timeout_s: float) -> int:
    """Run a child in its own process group, output appended to `log_path`; killed (group and all) at the timeout."""
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=child_env(),
        )
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise OutOfTime(f"{' '.join(cmd[1:4])} ... did not finish in {timeout_s:.0f} s") from None


def tail(path: Path, n_bytes: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return "(no log)"


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


# --- models --------------------------------------------------------------------------------------


@dataclass
class BackgroundBuild:
    proc: subprocess.Popen
    log: Path
    started: float


def model_dir(session: Session, key: str) -> Path:
    return session.workdir / "models" / key


def is_built(folder: Path) -> bool:
    """The tokenizer is copied after the weights are saved: its presence marks a finished build."""
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def build_command(
    session: Session, key: str, config_dir: Path, dtype: str, init_std: float | None, device: str
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "bench.random_model",
        str(config_dir),
        str(model_dir(session, key)),
        "--dtype",
        dtype,
        "--tokenizer",
        str(session.tokenizer_dir),
        "--device",
        device,
    ]
    return cmd + (["--init-std", str(init_std)] if init_std is not None else [])


def build_model(
    session: Session,
    res: Result,
    key: str,
    config_dir: Path,
    deadline: Deadline,
    *,
    dtype: str = "bfloat16",
    init_std: float | None = None,
    box_s: float = 120.0,
    on_cpu: bool = False,
) -> Path:
    """A random-weight model from `config_dir`, built once per run in a child: on the GPU when there is
    one (an 8B fill takes seconds there, a minute on CPU), on CPU for tiny models (no CUDA start-up).
    A build started in the background (start_background_build) is waited for instead."""
    out = model_dir(session, key)
    if key in session.models:
        return session.models[key]
    log = session.workdir / f"build-{key}.log"
    res.logs.append(log)
    if key in session.background:
        wait_background_build(session, res, key, deadline.box(box_s))
    elif not is_built(out):
        shutil.rmtree(out, ignore_errors=True)
        cmd = build_command(session, key, config_dir, dtype, init_std, "cpu" if session.cpu or on_cpu else "cuda")
        t0 = time.monotonic()
        code = run_logged(cmd, log, deadline.box(box_s))
        if code != 0 or not is_built(out):
            raise RuntimeError(f"building {key} failed (exit {code}):\n{tail(log, 1200)}")
        res.numbers[f"build_{key}_s"] = round(time.monotonic() - t0, 1)
    session.models[key] = out
    return out


def start_background_build(session: Session, key: str, config_dir: Path, dtype: str = "bfloat16") -> None:
    """Build on CPU while other scenarios use the GPU: the 8B model's fill and 16 GB write leave the critical path."""
    if key in session.background or is_built(model_dir(session, key)):
        return
    shutil.rmtree(model_dir(session, key), ignore_errors=True)
    log = session.workdir / f"build-{key}.log"
    with open(log, "ab") as out:
        cmd = build_command(session, key, config_dir, dtype, None, "cpu")
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=child_env(),
        )
    session.background[key] = BackgroundBuild(proc, log, time.monotonic())
    print(f"[bench.gpu] building {key} in the background (CPU)", flush=True)


def wait_background_build(session: Session, res: Result, key: str, timeout_s: float) -> None:
    build = session.background[key]
    try:
        code = build.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise OutOfTime(f"background build of {key} still running after {timeout_s:.0f} s more") from None
    res.numbers[f"build_{key}_s"] = round(time.monotonic() - build.started, 1)
    del session.background[key]
    if code != 0 or not is_built(model_dir(session, key)):
        raise RuntimeError(f"background build of {key} failed (exit {code}):\n{tail(build.log, 1200)}")


def settle_background_builds(session: Session, res: Result, deadline: Deadline) -> None:
    """Before timing anything: let background builds finish, so their CPU and disk use blur no figure."""
    for key in list(session.background):
        t0 = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            session.background[key].proc.wait(deadline.box(90))
        res.notes.append(f"waited {time.monotonic() - t0:.0f} s for the background build of {key}")


def stop_background_builds(session: Session) -> None:
    for build in session.background.values():
        stop_group(build.proc)
    session.background.clear()


def config_with(session: Session, name: str, fixture: str, **changes) -> Path:
    """A fixture config with some fields changed, as its own folder (the planner and builder read folders)."""
    from bench.random_model import write_config_dir

    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    return write_config_dir({**config, **changes}, session.workdir / "configs" / name)


def tiny_model(session: Session, res: Result, deadline: Deadline) -> Path:
    """Tiny llama in float32; init std 0.3 so greedy argmaxes are clear-cut and exactness tests the
    computation (positions, KV cache, batching), not the rounding of near-ties."""
    from bench.random_model import tiny_config, write_config_dir

    config = write_config_dir(tiny_config("llama"), session.workdir / "configs" / "tiny-llama")
    return build_model(session, res, "tiny-llama-fp32", config, deadline, dtype="float32", init_std=0.3, on_cpu=True)


# --- the planner ---------------------------------------------------------------------------------


def plan_json(session: Session, model: Path, flags: list[str], deadline: Deadline) -> dict | str:
    """`cli.py plan --json` on the real GPU (a simulated H100 with --cpu); the plan, or its error text."""
    cmd = [sys.executable, str(REPO / "cli.py"), "plan", "--json", "--model", str(model), *flags]
    if session.cpu:
        cmd += ["--gpu", SIMULATED_GPU]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=deadline.box(60), env=child_env())
    if done.returncode != 0:
        return (done.stderr or done.stdout).strip()[-500:]
    return json.loads(done.stdout)


def search_fraction(
    session: Session,
    res: Result,
    model: Path,
    fractions: tuple[float, ...],
    wanted: Callable[[dict], bool],
    flags: list[str],
    deadline: Deadline,
) -> tuple[float, dict] | None:
    """The first (largest) --gpu-memory-fraction whose plan satisfies `wanted`; every try is recorded."""
    tried = []
    for fraction in fractions:
        plan = plan_json(session, model, ["--gpu-memory-fraction", str(fraction), *flags], deadline)
        if isinstance(plan, str):
            tried.append({"fraction": fraction, "error": plan[-200:]})
            continue
        tried.append(
            {
                "fraction": fraction,
                "offload": plan["offload"],
                "quantization": plan["quantization"],
                "embed": (plan.get("device_map") or {}).get("model.embed_tokens"),
                "offload_bytes": plan.get("offload_bytes"),
            }
        )
        if wanted(plan):
            res.numbers["fraction_search"] = tried
            return fraction, plan
    res.numbers["fraction_search"] = tried
    return None


def plans_offload(plan: dict) -> bool:
    return bool(plan.get("offload"))


def plans_embeddings_on_cpu(plan: dict) -> bool:
    return (plan.get("device_map") or {}).get("model.embed_tokens") == "cpu"


# --- serving ---------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def info(self) -> dict:
        return get_json(self.url + "/info")


@contextlib.contextmanager
def serving(session: Session, res: Result, args: list[str], ready_timeout_s: float) -> Iterator[Server]:
    """`cli.py serve ARGS` in its own process group, yielded once healthy, always stopped."""
    from bench.server_proc import free_port, health_ok

    port = free_port()
    log = session.workdir / f"{res.name}-server-{port}.log"
    res.logs.append(log)
    cmd = [sys.executable, str(REPO / "cli.py"), "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "wb") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=child_env(),
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        t0 = time.monotonic()
        while not health_ok(server.url):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before it was healthy")
            if time.monotonic() - t0 > ready_timeout_s:
                raise OutOfTime(f"server not healthy after {ready_timeout_s:.0f} s")
            time.sleep(0.25)
        res.numbers["server_ready_s"] = round(time.monotonic() - t0, 1)
        yield server
    finally:
        stop_group(proc)


class GpuMemorySampler:
    """nvidia-smi memory.used, sampled every half second while serving; keeps the maximum (MiB)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.max_mib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            used = nvidia_smi(["memory.used"])
            if used:
                mib = max(int(float(row[0])) for row in used)
                self.max_mib = max(self.max_mib or 0, mib)
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemorySampler:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(5)


def nvidia_smi(fields: list[str]) -> list[list[str]]:
    """Rows of nvidia-smi's CSV for `fields`, one per GPU; [] without nvidia-smi."""
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [[c.strip() for c in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def stream_load(url: str, users: int, max_new_tokens: int, timeout_s: float):
    """`users` concurrent streaming requests (greedy, ignore_eos) through the benchmark's own client."""
    from bench.loadgen import run_load
    from bench.records import LoadConfig
    from bench.workload import DEFAULT_SET, load_prompts

    cfg = LoadConfig(
        users=users,
        requests=1,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        ignore_eos=True,
        request_timeout_s=timeout_s,
    )
    coroutine = run_load(url, cfg, load_prompts(DEFAULT_SET), progress=False)
    try:
        return asyncio.run(asyncio.wait_for(coroutine, timeout_s))
    except asyncio.TimeoutError:
        raise OutOfTime(f"{users} requests x {max_new_tokens} tokens did not finish in {timeout_s:.0f} s") from None


def plan_numbers(plan: dict) -> dict:
    keys = (
        "device",
        "dtype",
        "quantization",
        "offload",
        "max_batch",
        "max_context",
        "weights_bytes",
        "kv_cache_bytes",
        "reserve_bytes",
        "budget_bytes",
        "offload_bytes",
        "max_memory",
    )
    numbers = {k: plan.get(k) for k in keys}
    device_map = plan.get("device_map") or {}
    numbers["device_map"] = (
        device_map
        if len(device_map) <= 8
        else {
            "entries": len(device_map),
            "cpu": sorted(k for k, v in device_map.items() if v == "cpu")[:12],
            "model.embed_tokens": device_map.get("model.embed_tokens"),
            "lm_head": device_map.get("lm_head"),
        }
    )
    return numbers


def gpu_side_plan_bytes(plan: dict) -> int | None:
    """Weights on the GPU (the device's max_memory share when offloading) + KV + reserve; None on CPU."""
    device = str(plan.get("device") or "")
    if not device.startswith("cuda"):
        return None
    index = device.split(":", 1)[1] if ":" in device else "0"
    weights = plan["weights_bytes"]
    if plan.get("offload") and (plan.get("max_memory") or {}).get(index) is not None:
        weights = plan["max_memory"][index]
    return weights + plan.get("kv_cache_bytes", 0) + plan.get("reserve_bytes", 0)


def check_requests(res: Result, run, users: int, max_new_tokens: int) -> None:
    from bench.stats import figures

    figs = figures(run)
    res.numbers["load"] = {
        "completed": figs.completed,
        "failed": figs.failed,
        "wall_s": round(figs.wall_s, 2),
        "output_tokens_per_s": figs.output_tokens_per_s,
        "ttft_p50_s": figs.ttft_p50,
        "itl_p50_s": figs.itl_p50,
        "peak_running": run.peak_running,
    }
    errors = [r.error for r in run.records if not r.ok]
    res.check(
        "all requests completed",
        figs.completed == users and not errors,
        f"{figs.completed}/{users} ok" + (f"; first error: {errors[0]}" if errors else ""),
    )
    short = [r.output_tokens for r in run.records if r.ok and r.output_tokens != max_new_tokens]
    res.check(f"each request gave {max_new_tokens} tokens", not short, f"short: {short[:5]}" if short else "")


def check_memory(session: Session, res: Result, info: dict, smi_mib: int | None) -> None:
    """Engine-measured peak against the plan's GPU-side bytes (5% slack); on CPU, the engine's RSS instead."""
    plan, engine = info.get("plan") or {}, (info.get("engines") or [{}])[0]
    peak, allocated = engine.get("gpu_peak_bytes", 0), engine.get("gpu_allocated_bytes", 0)
    res.numbers.update(gpu_peak_bytes=peak, gpu_allocated_bytes=allocated, nvidia_smi_used_mib=smi_mib)
    expected = gpu_side_plan_bytes(plan)
    if expected is None:
        res.check("no GPU figures on a CPU engine", peak == 0 and allocated == 0, f"peak {peak}, allocated {allocated}")
        res.notes.append("CPU engine: GPU peak check not applicable; engine RSS recorded instead")
        return
    res.numbers["plan_gpu_bytes"] = expected
    res.numbers["peak_over_plan"] = round(peak / expected, 3) if expected else None
    res.numbers["weights_measured_bytes"] = allocated - plan.get("kv_cache_bytes", 0) if allocated else None
    res.check("engine reports GPU memory", peak > 0, f"peak {gib(peak)}")
    res.check(
        "peak <= plan (weights on GPU + KV + reserve) x 1.05",
        0 < peak <= expected * PEAK_SLACK,
        f"peak {gib(peak)} vs plan {gib(expected)} ({peak / expected:.2f}x)",
    )


def process_rss(pid) -> int | None:
    try:
        import psutil

        return psutil.Process(int(pid)).memory_info().rss
    except Exception:  # gone already, or no pid
        return None


def serve_and_check(
    session: Session,
    res: Result,
    deadline: Deadline,
    args: list[str],
    *,
    users: int,
    max_new_tokens: int,
    ready_s: float = 150.0,
    load_s: float = 90.0,
) -> dict:
    """Serve, send `users` concurrent streams, read /info: the checks every serve scenario shares."""
    with GpuMemorySampler(not session.cpu) as smi, serving(session, res, args, deadline.box(ready_s)) as server:
        run = stream_load(server.url, users, max_new_tokens, deadline.box(load_s))
        check_requests(res, run, users, max_new_tokens)  # recorded even if the server is gone by now
        time.sleep(1.5)  # engine stats ride on heartbeats (1 s): let the last step's figures arrive
        info = server.info()
        res.numbers["engine_rss_bytes"] = process_rss((info.get("engines") or [{}])[0].get("pid"))
    res.numbers["plan"] = plan_numbers(info.get("plan") or {})
    res.numbers["engine"] = {k: v for k, v in (info.get("engines") or [{}])[0].items() if k != "plan"}
    check_memory(session, res, info, smi.max_mib)
    return info


# --- scenarios ------------------------------------------------------------------------------------


def sc2_3b(session: Session, res: Result, deadline: Deadline) -> Path:
    return build_model(session, res, "starcoder2-3b-bf16", FIXTURES / "starcoder2-3b", deadline)


def scenario_sc2_bf16(session: Session, res: Result, deadline: Deadline) -> None:
    model = sc2_3b(session, res, deadline)
    info = serve_and_check(session, res, deadline, ["--model", str(model)], users=10, max_new_tokens=128)
    res.check(
        "plan is bf16, not quantized",
        info["plan"]["dtype"] == "bfloat16" and not info["plan"]["quantization"],
        f"{info['plan']['dtype']}, quantization {info['plan']['quantization']}",
    )


def scenario_sc2_nf4(session: Session, res: Result, deadline: Deadline) -> None:
    model = sc2_3b(session, res, deadline)
    info = serve_and_check(
        session, res, deadline, ["--model", str(model), "--quantization", "nf4"], users=10, max_new_tokens=128
    )
    res.check("plan is NF4", info["plan"]["quantization"] == "nf4", str(info["plan"]["quantization"]))


def scenario_llama8b_offload(session: Session, res: Result, deadline: Deadline) -> None:
    config = FIXTURES / "llama-3.1-8b"
    found = search_fraction(
        session, res, config, OFFLOAD_FRACTIONS, plans_offload, ["--quantization", "none"], deadline
    )
    if not res.check(
        "some --gpu-memory-fraction plans an offload", found is not None, "tried " + str(OFFLOAD_FRACTIONS)
    ):
        return
    fraction, _ = found
    res.numbers["gpu_memory_fraction"] = fraction
    model = build_model(session, res, LLAMA8B, config, deadline, box_s=180)
    info = serve_and_check(
        session,
        res,
        deadline,
        ["--model", str(model), "--gpu-memory-fraction", str(fraction), "--quantization", "none"],
        users=4,
        max_new_tokens=16,
        ready_s=200,
        load_s=120,
    )
    res.check("served plan offloads", bool(info["plan"]["offload"]), str(info["plan"]["reasons"].get("offload")))


def scenario_small_gpu(session: Session, res: Result, deadline: Deadline) -> None:
    """llama-3.1-8b shapes with 4 layers: a 128256 x 4096 embedding the planner should move to RAM."""
    config = config_with(session, "llama-3.1-8b-4l", "llama-3.1-8b", num_hidden_layers=4)
    found = search_fraction(
        session, res, config, EMBED_CPU_FRACTIONS, plans_embeddings_on_cpu, ["--quantization", "none"], deadline
    )
    if not res.check(
        "planned: some fraction puts model.embed_tokens on CPU", found is not None, "" if found else "not planned"
    ):
        res.notes.append("not planned: no --gpu-memory-fraction gave device_map['model.embed_tokens'] == 'cpu'")
        return
    fraction, _ = found
    res.numbers["gpu_memory_fraction"] = fraction
    if session.cpu:
        res.notes.append(f"--cpu: planned against a simulated {SIMULATED_GPU}; not served")
        return
    model = build_model(session, res, "llama-3.1-8b-4l-bf16", config, deadline)
    info = serve_and_check(
        session,
        res,
        deadline,
        ["--model", str(model), "--gpu-memory-fraction", str(fraction), "--quantization", "none"],
        users=3,
        max_new_tokens=16,
        ready_s=150,
        load_s=90,
    )
    res.check(
        "served plan has the embeddings on CPU",
        plans_embeddings_on_cpu(info["plan"]),
        str((info["plan"].get("device_map") or {}).get("model.embed_tokens")),
    )


async def generate_all(url: str, bodies: list[dict], timeout_s: float) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:

        async def one(body: dict) -> dict:
            async with http.post(url + "/generate", json=body) as resp:
                return {"status": resp.status, **(await resp.json(content_type=None))}

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def scenario_tiny_exact(session: Session, res: Result, deadline: Deadline) -> None:
    """Greedy fp32 outputs of concurrent (batched) requests equal transformers' own generate, token for token."""
    model = tiny_model(session, res, deadline)
    bodies = [{"prompt": p, "max_new_tokens": 32, "temperature": 0} for p in TINY_PROMPTS]
    args = ["--model", str(model), "--dtype", "float32", "--max-context", "256", "--max-batch", "4"]
    with serving(session, res, args, deadline.box(120)) as server:
        answers = asyncio.run(generate_all(server.url, bodies, deadline.box(60)))
        res.numbers["plan"] = plan_numbers(server.info().get("plan") or {})
    reference = reference_generate(session, res, model, deadline)
    res.check("plan dtype float32", res.numbers["plan"]["dtype"] == "float32", str(res.numbers["plan"]["dtype"]))
    compare_with_reference(res, answers, reference)


def reference_generate(session: Session, res: Result, model: Path, deadline: Deadline) -> list[dict]:
    """transformers' greedy generate in float32, one prompt at a time, in a child (on cuda when there is one)."""
    prompts_path, out_path = session.workdir / "tiny-prompts.json", session.workdir / "tiny-reference.json"
    prompts_path.write_text(json.dumps(list(TINY_PROMPTS)))
    log = session.workdir / "tiny-reference.log"
    res.logs.append(log)
    code = run_logged(
        [
            sys.executable,
            "-m",
            "bench.gpu",
            "reference",
            str(model),
            str(prompts_path),
            str(out_path),
            "--max-new-tokens",
            "32",
        ],
        log,
        deadline.box(120),
    )
    if code != 0:
        raise RuntimeError(f"reference generate failed (exit {code}):\n{tail(log)}")
    return json.loads(out_path.read_text())


def compare_with_reference(res: Result, answers: list[dict], reference: list[dict]) -> None:
    rows = []
    for prompt, answer, ref in zip(TINY_PROMPTS, answers, reference):
        ours = answer.get("token_ids") or []
        first_diff = next(
            (i for i, (a, b) in enumerate(zip(ours, ref["token_ids"])) if a != b),
            None if len(ours) == len(ref["token_ids"]) else min(len(ours), len(ref["token_ids"])),
        )
        rows.append(
            {
                "prompt": prompt,
                "status": answer["status"],
                "tokens": len(ours),
                "first_mismatch": first_diff,
                "device": ref["device"],
            }
        )
    res.numbers["prompts"] = rows
    res.check("HTTP 200 for every prompt", all(r["status"] == 200 for r in rows), str([r["status"] for r in rows]))
    bad = [r for r in rows if r["first_mismatch"] is not None]
    res.check(
        "greedy tokens equal transformers generate (fp32)",
        not bad and bool(rows),
        "; ".join(f"{r['prompt'][:20]!r} differs at token {r['first_mismatch']}" for r in bad),
    )


def scenario_serve_default(session: Session, res: Result, deadline: Deadline) -> None:
    """--cpu: the embedded default model, a few concurrent streams, /info fields present."""
    info = serve_and_check(
        session, res, deadline, ["--max-context", "512"], users=4, max_new_tokens=24, ready_s=150, load_s=90
    )
    missing = [
        k
        for k in (
            "dtype",
            "max_batch",
            "max_context",
            "weights_bytes",
            "kv_cache_bytes",
            "reserve_bytes",
            "budget_bytes",
        )
        if k not in (info.get("plan") or {})
    ]
    res.check("/info plan has the sizing fields", not missing, f"missing {missing}" if missing else "")
    engine = (info.get("engines") or [{}])[0]
    res.check("/info engine has GPU memory fields", "gpu_peak_bytes" in engine and "gpu_allocated_bytes" in engine)


def scenario_speed(session: Session, res: Result, deadline: Deadline) -> None:
    """Decode ms/step beside the roofline (bench.step_time), then `cli.py bench` beside the naive baseline."""
    if session.cpu:
        model, dtype_runs = tiny_model(session, res, deadline), [("float32", None)]
        users, tokens = 4, 16
    else:
        model, dtype_runs = sc2_3b(session, res, deadline), [("bfloat16", None), ("bfloat16", "nf4")]
        users, tokens = 10, 128
    settle_background_builds(session, res, deadline)
    for dtype, quantization in dtype_runs:
        run_step_time(session, res, model, dtype, quantization, deadline)
    run_bench(session, res, model, users, tokens, deadline)


def run_step_time(
    session: Session, res: Result, model: Path, dtype: str, quantization: str | None, deadline: Deadline
) -> None:
    key = f"step_time_{quantization or dtype}"
    if importlib.util.find_spec("bench.step_time") is None:
        res.numbers[key] = None
        res.notes.append("bench.step_time is not in this tree: no step-time table")
        return
    out = session.workdir / f"{key}.json"
    log = session.workdir / f"{key}.log"
    res.logs.append(log)
    cmd = [
        sys.executable,
        "-m",
        "bench.step_time",
        "--model",
        str(model),
        "--dtype",
        dtype,
        "--batches",
        STEP_BATCHES if not session.cpu else "1,4",
        "--json",
        str(out),
    ]
    if quantization:
        cmd += ["--quantization", quantization]
    try:
        code = run_logged(cmd, log, deadline.box(120))
    except OutOfTime as exc:
        res.check(f"{key} finished", False, str(exc))
        return
    ok = res.check(
        f"{key} finished", code == 0 and out.is_file(), f"exit {code}" + ("" if code == 0 else f": {tail(log, 400)}")
    )
    res.numbers[key] = json.loads(out.read_text()) if ok else None


def run_bench(session: Session, res: Result, model: Path, users: int, tokens: int, deadline: Deadline) -> None:
    out, log = session.workdir / "bench.json", session.workdir / "bench.log"
    if deadline.left() < BENCH_MIN_S:
        res.check("cli.py bench with naive baseline finished", False, f"not run: {deadline.left():.0f} s left")
        return
    res.logs.append(log)
    cmd = [
        sys.executable,
        str(REPO / "cli.py"),
        "bench",
        "--model",
        str(model),
        "--users",
        str(users),
        "--requests",
        "1",
        "--max-new-tokens",
        str(tokens),
        "--baseline",
        "naive",
        "--json",
        str(out),
    ]
    code = run_logged(cmd, log, deadline.box(240))
    if not res.check(
        "cli.py bench with naive baseline finished",
        code == 0 and out.is_file(),
        f"exit {code}" + ("" if code == 0 else f": {tail(log, 600)}"),
    ):
        return
    report = json.loads(out.read_text())
    res.numbers["bench"] = {side: pick_figures(report.get(side)) for side in ("ours", "baseline")}
    res.numbers["bench"]["ratios"] = report.get("ratios")
    res.numbers["bench"]["dtype"] = (report.get("config") or {}).get("dtype")


def pick_figures(figs: dict | None) -> dict | None:
    if not figs:
        return None
    keys = ("completed", "failed", "output_tokens_per_s", "ttft_p50", "itl_p50", "tpot_mean", "peak_running")
    return {k: figs.get(k) for k in keys}


def scenario_plan_search(session: Session, res: Result, deadline: Deadline) -> None:
    """--cpu: the fraction searches the GPU run relies on, against a simulated H100."""
    found = search_fraction(
        session, res, FIXTURES / "llama-3.1-8b", OFFLOAD_FRACTIONS, plans_offload, ["--quantization", "none"], deadline
    )
    res.numbers["offload_search"] = res.numbers.pop("fraction_search")
    res.check("llama-3.1-8b: some fraction plans an offload", found is not None, str(found and found[0]))
    scenario_small_gpu(session, res, deadline)


SCENARIOS = (
    Scenario("sc2-3b-bf16", scenario_sc2_bf16, box_s=240, min_s=60),
    Scenario("sc2-3b-nf4", scenario_sc2_nf4, box_s=180, min_s=45),
    Scenario("tiny-fp32-exact", scenario_tiny_exact, box_s=150, min_s=30, cpu=True),
    Scenario("small-gpu", scenario_small_gpu, box_s=180, min_s=60),
    Scenario("serve-default", scenario_serve_default, box_s=200, min_s=30, cpu=True, gpu=False),
    Scenario("plan-search", scenario_plan_search, box_s=60, min_s=5, cpu=True, gpu=False),
    Scenario("speed", scenario_speed, box_s=360, min_s=60, cpu=True),
    # last: the costliest (16 GB of random weights to write, PCIe-bound decode); `--only` reruns it alone
    Scenario("llama8b-offload", scenario_llama8b_offload, box_s=300, min_s=90),
)


# --- the run --------------------------------------------------------------------------------------


def run_scenario(session: Session, scenario: Scenario) -> None:
    res = session.results[scenario.name]
    if session.budget.left() < scenario.min_s:
        res.status = "SKIP"
        res.notes.append(f"out of budget: {session.budget.left():.0f} s left, needs {scenario.min_s:.0f} s")
        return
    print(f"[bench.gpu] {scenario.name}: start ({session.budget.left():.0f} s of budget left)", flush=True)
    deadline = Deadline(min(session.budget.end, time.monotonic() + scenario.box_s))
    t0 = time.monotonic()
    try:
        scenario.run(session, res, deadline)
        res.status = "PASS" if res.checks and all(c["ok"] for c in res.checks) else "FAIL"
    except Exception as exc:
        res.status = "ERROR"
        res.error = "".join(traceback.format_exception(exc)[-3:])[-2500:]
    res.seconds = time.monotonic() - t0
    if res.status != "PASS":
        res.log_tail = tail(res.logs[-1]) if res.logs else None
        keep_logs(session, res)
    print(f"[bench.gpu] {scenario.name}: {res.status} in {res.seconds:.0f} s", flush=True)


def keep_logs(session: Session, res: Result) -> None:
    """A failed scenario's logs, joined into OUTDIR/<name>.log (last 200 KB); at most 4 such files."""
    logs = [p for p in res.logs if p.is_file()]
    if not logs or len(session.copied_logs) >= MAX_LOG_FILES:
        return
    share = LOG_KEEP_BYTES // len(logs)
    text = "".join(f"===== {p.name} =====\n{tail(p, share)}\n" for p in logs)
    name = f"{res.name}.log"
    (session.outdir / name).write_text(text[-LOG_KEEP_BYTES:])
    session.copied_logs.append(name)


def device_description(cpu: bool) -> dict:
    versions = {}
    for package in ("torch", "transformers", "accelerate", "bitsandbytes"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    gpus = nvidia_smi(["name", "memory.total", "driver_version"]) if not cpu else []
    return {
        "mode": "cpu" if cpu else "gpu",
        "gpus": [{"name": g[0], "memory_total_mib": g[1], "driver": g[2]} for g in gpus if len(g) == 3],
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


def run_all(
    outdir: Path, *, cpu: bool, tokenizer: str | None, only: list[str] | None, budget_s: float, workdir: str | None
) -> int:
    from bench.random_model import default_tokenizer_dir
    from model.source import ModelNotFound

    outdir.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer_dir = Path(tokenizer) if tokenizer else default_tokenizer_dir()
    except ModelNotFound as exc:
        print(f"bench.gpu: no tokenizer for the random models: {exc} (pass --tokenizer DIR)", file=sys.stderr)
        return 2
    own_workdir = workdir is None
    work = Path(workdir or tempfile.mkdtemp(prefix="kiln-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    session = Session(
        outdir=outdir, workdir=work, cpu=cpu, budget=Deadline.after(budget_s), tokenizer_dir=tokenizer_dir
    )
    session.device = device_description(cpu)
    chosen = [s for s in SCENARIOS if (s.cpu if cpu else s.gpu) and (not only or s.name in only)]
    unknown = sorted(set(only or []) - {s.name for s in SCENARIOS})
    if unknown:
        print(f"bench.gpu: unknown scenarios {unknown}; known: {[s.name for s in SCENARIOS]}", file=sys.stderr)
        return 2
    session.results = {s.name: Result(s.name) for s in chosen}
    try:
        for scenario in chosen:
            session.results[scenario.name].status = "RUNNING"  # what a kill mid-scenario interrupted
            write_report(session)
            run_scenario(session, scenario)
            write_report(session)
            if not cpu and scenario is chosen[0] and "llama8b-offload" in session.results and len(chosen) > 1:
                start_background_build(session, LLAMA8B, FIXTURES / "llama-3.1-8b")
    finally:
        stop_background_builds(session)
        if own_workdir and cpu:
            shutil.rmtree(work, ignore_errors=True)
    print(f"[bench.gpu] report: {outdir / 'gpu_report.md'}", flush=True)
    return 0 if all(r.status == "PASS" for r in session.results.values()) else 1


# --- helpers run as children ----------------------------------------------------------------------


def reference_main(argv: list[str]) -> None:
    """Greedy float32 `generate` per prompt; writes [{"prompt", "token_ids", "device"}] as JSON."""
    parser = argparse.ArgumentParser(prog="bench.gpu reference")
    parser.add_argument("model")
    parser.add_argument("prompts")
    parser.add_argument("out")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    rows = []
    for prompt in json.loads(Path(args.prompts).read_text()):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=False
            )
        rows.append({"prompt": prompt, "token_ids": out[0, ids.shape[1] :].tolist(), "device": device})
    Path(args.out).write_text(json.dumps(rows))


def prepare_main(argv: list[str]) -> None:
    """Write the default model's tokenizer files into DIR (carried to a GPU machine without the default model)."""
    from bench.random_model import copy_tokenizer, default_tokenizer_dir

    parser = argparse.ArgumentParser(prog="bench.gpu prepare")
    parser.add_argument("dir")
    target = Path(parser.parse_args(argv).dir)
    target.mkdir(parents=True, exist_ok=True)
    print(f"copied {copy_tokenizer(default_tokenizer_dir(), target)} into {target}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        prepare_main(argv[1:])
        return 0
    if argv[:1] == ["reference"]:
        reference_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--cpu", action="store_true", help="CPU-scale scenarios (CI)")
    parser.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: the embedded model's)")
    parser.add_argument("--only", default=None, help="comma-separated scenario names")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole run's time budget")
    parser.add_argument("--workdir", default=None, help="where random models go (default: a fresh temp dir)")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    return run_all(
        args.outdir, cpu=args.cpu, tokenizer=args.tokenizer, only=only, budget_s=args.budget_s, workdir=args.workdir
    )


if __name__ == "__main__":
    sys.exit(main())
