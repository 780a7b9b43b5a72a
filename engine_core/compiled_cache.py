"""Compiled decode graphs kept on disk, so a restart loads in a second or two what took minutes to trace.

torch.compile's own caches (inductor's generated code, AOTAutograd's graphs) do not keep dynamo's trace
of the Python code: every warm start traced the whole model again (measured on a 2-core VM: 77 s of an
88 s warm-up with both caches hit). torch's precompile API (`aot_compile`, experimental in torch 2.13)
saves the trace as well: dynamo's bytecode, the graph and a pointer to inductor's code, which stays in
inductor's own cache (`<kiln cache>/inductor`; without it a load rebuilds the C++, ~20 s).

A saved graph checks only its inputs' shapes and dtypes when called (the guard filter below), so what
it may be reused for is decided by its key: torch, transformers and Python versions, the CPU's vector
ISA, kiln's own engine and model code, the model's config, and the name, shape, stride and dtype of
every weight and buffer the step reads, K/V pool included (inductor's code bakes those in). Anything
else changed means another key, so a stale graph is never loaded: it is traced again and saved beside.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger("kiln.engine")

KILN_ROOT = Path(__file__).resolve().parent.parent
TRACED_SOURCES = ("engine_core", "model")  # kiln's code a decode step runs through, besides transformers'


def available() -> bool:
    """torch's precompile API: `torch.compile(...).aot_compile` and `torch.compiler.load_compiled_function`."""
    return hasattr(torch.compiler, "load_compiled_function")


def graph_key(step: torch.nn.Module, config_json: str) -> str:
    """What a saved graph of `step` is valid for, as a short hex digest (see the module docstring)."""
    import transformers

    digest = hashlib.sha256()
    for part in (
        torch.__version__,
        transformers.__version__,
        platform.python_version(),
        platform.machine(),
        torch.backends.cpu.get_cpu_capability(),
        config_json,
        kiln_source_digest(),
    ):
        digest.update(part.encode() + b"\0")
    for name, tensor in itertools.chain(step.named_parameters(), step.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.stride()}:{tensor.dtype}".encode())
    for name, module in step.named_modules():
        digest.update(f"{name}:{type(module).__qualname__}".encode())
    return digest.hexdigest()[:20]


@functools.cache
def kiln_source_digest() -> str:
    """kiln's traced code as this process first read it: the code it runs, even if the files change after."""
    digest = hashlib.sha256()
    for folder in TRACED_SOURCES:
        for path in sorted((KILN_ROOT / folder).glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def input_guards_only(guards) -> list[bool]:
    """Keep the guards on the step's own inputs (their dtypes, shapes and the shape symbols' ranges); drop
    those on the model's modules and weights (fixed by the key), and the global ones: the thread count
    (the thread policy changes it; inductor's CPU loops and library calls read it when they run) and the
    grad mode (every call runs under inference_mode). Dropped guards are also the ones torch cannot save."""
    return [
        guard.guard_type == "SHAPE_ENV"
        or (
            guard.guard_type == "TENSOR_MATCH"
            and not guard.is_global
            and not guard.orig_guard.source.is_unspecialized_nn_module()
        )
        for guard in guards
    ]


def trace(step: torch.nn.Module, example: tuple):
    """`step.forward` compiled for inputs shaped like `example` (dynamic sizes: any batch of the same kind).
    Floats are specialised: as symbols they made dynamo restart every trace once (half of the time)."""
    fn = torch.compile(step.forward, dynamic=True, fullgraph=True, options={"guard_filter_fn": input_guards_only})
    with torch._dynamo.config.patch(specialize_float=True):
        return fn.aot_compile((example, {}))


def save(graph, path: Path, step: torch.nn.Module) -> None:
    """Written atomically (torch writes a temporary file and renames it): a concurrent start reads whole files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    graph.save_compiled_function(str(path), external_data={"step": step})


def load(path: Path, step: torch.nn.Module):
    """The graph saved at `path`, bound to this process's `step`; None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as file:
            return torch.compiler.load_compiled_function(file, external_data={"step": step})
    except Exception as exc:  # a torch that cannot read it, a truncated file: trace again, overwrite
        log.warning(
            "cannot load the saved decode graph %s (%s: %.160s); tracing it again", path, type(exc).__name__, exc
        )
        return None
