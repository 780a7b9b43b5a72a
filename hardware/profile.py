"""What the machine has: RAM, CPU cores, NVIDIA GPUs (memory, compute capability).

Torch-free on the common paths: NVML (the `nvidia-ml-py` package, imported as `pynvml`)
answers in milliseconds, and importing torch costs 1-2 s, which `cli.py plan` cannot
afford. torch.cuda is only asked when NVML fails although an NVIDIA device node exists.
`simulated_profile` builds a profile for a machine we are not on (`plan --gpu T4:16GiB:7.5`).
Given a model shape, both also read this machine's cached CPU weight-format timings (measured
by engine_core/cpu_formats.py at an engine's first start; read here as plain JSON, no torch).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from model.shape import ModelShape

GiB = 1 << 30
MiB = 1 << 20

# Compute capability of common cards, so `--gpu T4:16GiB` may leave it out.
KNOWN_CC: dict[str, tuple[int, int]] = {
    "P100": (6, 0),
    "V100": (7, 0),
    "T4": (7, 5),
    "RTX2080": (7, 5),
    "A100": (8, 0),
    "A10": (8, 6),
    "A10G": (8, 6),
    "RTX3060": (8, 6),
    "RTX3090": (8, 6),
    "A6000": (8, 6),
    "L4": (8, 9),
    "L40S": (8, 9),
    "RTX4090": (8, 9),
    "H100": (9, 0),
    "H200": (9, 0),
    "B200": (10, 0),
}


class GpuInfo(msgspec.Struct, frozen=True):
    index: int  # the CUDA ordinal the engine will use ("cuda:<index>")
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]  # (major, minor); JSON: [major, minor]


class HardwareProfile(msgspec.Struct, frozen=True):
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_cores: int
    gpus: list[GpuInfo] = msgspec.field(default_factory=list)
    source: str = "none"  # where the GPU list came from: "nvml", "torch.cuda", "simulated", "none (...)"
    cpu_bf16: bool = False  # native bf16 dot products (avx512_bf16 or AMX amx_bf16): bf16 matmuls beat fp32
    # Measured ms per decode step (every linear of the model + lm_head) by "<format>@<batch rows>", e.g.
    # {"float32@1": 34.0, "bfloat16@1": 20.7, ...}, and per prompt chunk (the layers' linears) by
    # "<format>@<chunk rows>" (planning/cpu_dtype.py: PROMPT_CHUNKS, "int8-dequant@256", "int4-dequant@256");
    # empty until an engine has measured this machine and model.
    cpu_format_ms: dict[str, float] = msgspec.field(default_factory=dict)


# ---------------------------------------------------------------- sizes

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'16GiB', '16GB', '12G', '8000MiB', '512M', '1073741824' -> bytes.

    GiB/MiB are binary; GB/MB are decimal; a bare 'G'/'M' is binary, as in docker and
    most tools that size memory (a '16G' card is 16 GiB).
    """
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"cannot read size {text!r}: use e.g. 16GiB, 16GB, 12G or 8000MiB")
    number, unit, binary, b = float(m.group(1)), m.group(2).lower(), m.group(3), m.group(4)
    if not unit:
        if binary:
            raise ValueError(f"cannot read size {text!r}")
        return int(number)
    power = "kmgt".index(unit) + 1
    base = 1000 if (b and not binary) else 1024
    return int(number * base**power)


def format_bytes(n: int | float) -> str:
    """Human-readable binary size, e.g. '14.4 GiB', '312.0 MiB'."""
    n = float(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------- RAM and CPU


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2, unlimited) -> None


def cgroup_memory() -> tuple[int | None, int | None]:
    """(limit, usage) of this process's memory cgroup, v2 then v1; None where unlimited or absent.

    In containers psutil reports the host's RAM; the cgroup limit is what the OOM killer uses.
    """
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit = _read_int(limit_path)
        if limit is not None and limit < (1 << 60):  # v1 "unlimited" is about 2^63
            return limit, _read_int(usage_path)
    return None, None


def detect_ram() -> tuple[int, int]:
    """(total, available) bytes, each capped by the cgroup limit."""
    import psutil

    vm = psutil.virtual_memory()
    total, available = int(vm.total), int(vm.available)
    limit, usage = cgroup_memory()
    if limit is not None:
        total = min(total, limit)
        available = min(available, max(0, limit - (usage or 0)))
    return total, available


def detect_cpu_cores() -> int:
    """Cores this process may run on (affinity), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """("AMD EPYC", [flags]) from /proc/cpuinfo's first processor; ("unknown", []) where it cannot be read."""
    model, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    return model, flags


def detect_cpu_bf16() -> bool:
    """True when /proc/cpuinfo lists avx512_bf16 or amx_bf16 (Cooper Lake, Sapphire Rapids, Zen 4 and later)."""
    return not {"avx512_bf16", "amx_bf16"}.isdisjoint(cpu_model_and_flags()[1])


# ---------------------------------------------------------------- CPU weight-format timings (cached)

# Bump when the probe's method changes, so timings measured the old way are not reused.
# 2: int8 weight-only joined the formats; 3: prompt chunks and int8-dequant timed; 4: int4 and int4-dequant timed
CPU_FORMAT_PROBE_VERSION = 4


def decoder_linear_shapes(shape: ModelShape) -> list[tuple[int, int]]:
    """(in, out) features of one decoder layer's linears: q, k, v, o, then the MLP (2 or 3 matrices)."""
    from model.shape import TWO_MATRIX_MLP

    h, hd, inter = shape.hidden_size, shape.head_dim, shape.intermediate_size
    q, kv = shape.num_attention_heads * hd, shape.num_kv_heads * hd
    mlp = [(h, inter), (inter, h)] if shape.architecture in TWO_MATRIX_MLP else [(h, inter), (h, inter), (inter, h)]
    return [(h, q), (h, kv), (h, kv), (q, h), *mlp]


def _torch_version() -> str:
    """torch's version from its package metadata: importing torch would cost `cli.py plan` 1-2 s."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cpu_format_cache_key(shape: ModelShape) -> dict:
    """What the timings depend on: the CPU (model, flags, cores), torch, the probe and the model's linear shapes."""
    model, flags = cpu_model_and_flags()
    return {
        "cpu": model,
        "flags_sha": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
        "cores": detect_cpu_cores(),
        "torch": _torch_version(),
        "probe": CPU_FORMAT_PROBE_VERSION,
        "layers": shape.num_layers,
        "layer_linears": decoder_linear_shapes(shape),
        "lm_head": [shape.hidden_size, shape.vocab_size],
    }


def cpu_format_cache_path(shape: ModelShape, cache_root: Path | None = None) -> Path:
    """<cache>/cpu-formats/<hash of the key>.json; `cache_root` defaults to model.source.cache_dir()."""
    from model.source import cache_dir

    key = json.dumps(cpu_format_cache_key(shape), sort_keys=True)
    return (cache_root or cache_dir()) / "cpu-formats" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _valid_timings(ms: object) -> bool:
    return (
        isinstance(ms, dict)
        and bool(ms)
        and all(isinstance(k, str) and "@" in k and isinstance(v, (int, float)) and v > 0 for k, v in ms.items())
    )


def read_cpu_format_ms(shape: ModelShape, cache_root: Path | None = None) -> dict[str, float]:
    """The cached timings for `shape` on this machine, or {} when absent or unreadable (then re-measured)."""
    try:
        ms = json.loads(cpu_format_cache_path(shape, cache_root).read_text()).get("ms")
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: float(v) for k, v in ms.items()} if _valid_timings(ms) else {}


def write_cpu_format_ms(shape: ModelShape, ms: dict[str, float], cache_root: Path | None = None) -> Path:
    """Store `ms` with the key it was measured under (readable by hand); atomic, so readers never see half a file."""
    if not _valid_timings(ms):
        raise ValueError(f"not timings: {ms!r}")
    path = cpu_format_cache_path(shape, cache_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": cpu_format_cache_key(shape), "ms": ms}, indent=1))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- GPUs


def _visible_ordinals(count: int) -> list[int] | None:
    """NVML indices in CUDA order when CUDA_VISIBLE_DEVICES is a list of ints; None = all."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return None
    parts = [p.strip() for p in env.split(",") if p.strip()]
    if not all(p.lstrip("-").isdigit() for p in parts):
        return None  # UUIDs / MIG names: NVML order is our best guess
    ordinals = []
    for p in parts:
        i = int(p)
        if i < 0 or i >= count:
            break  # CUDA stops at the first invalid entry
        ordinals.append(i)
    return ordinals


def _gpus_from_nvml() -> list[GpuInfo]:
    """Raises ImportError or pynvml.NVMLError (LibraryNotFound on machines without a driver)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        ordinals = _visible_ordinals(count)
        nvml_indices = list(range(count)) if ordinals is None else ordinals
        gpus = []
        for cuda_index, nvml_index in enumerate(nvml_indices):
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode()
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(GpuInfo(cuda_index, name, int(mem.total), int(mem.free), (int(major), int(minor))))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _gpus_from_torch() -> list[GpuInfo]:
    import torch  # costs 1-2 s: only reached when NVML failed on a machine with NVIDIA device nodes

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(GpuInfo(i, props.name, int(total), int(free), (props.major, props.minor)))
    return gpus


def nvidia_device_nodes() -> list[str]:
    return sorted(glob.glob("/dev/nvidia[0-9]*"))


def detect_gpus() -> tuple[list[GpuInfo], str]:
    """(gpus, source). Never raises and never prints: a CPU-only machine is a normal answer."""
    try:
        return _gpus_from_nvml(), "nvml"
    except ImportError:
        why = "nvidia-ml-py is not installed"
    except Exception as e:  # pynvml.NVMLError and subclasses, e.g. NVMLError_LibraryNotFound
        why = f"NVML: {e}"
    if not nvidia_device_nodes():
        return [], f"none ({why}; no /dev/nvidia* device)"
    try:
        return _gpus_from_torch(), "torch.cuda"
    except Exception as e:  # torch missing or CUDA init failure: report, don't crash the planner
        return [], f"none ({why}; torch.cuda failed: {e})"


def visible_gpu_indices() -> list[int]:
    """Indices of the GPUs this process can use (CUDA order)."""
    return [gpu.index for gpu in detect_gpus()[0]]


def missing_gpus(chosen: Sequence[int]) -> str | None:
    """None when every index in `chosen` is a visible GPU, else 'no GPU [2] on this machine (visible: [0, 1])'."""
    visible = visible_gpu_indices()
    missing = sorted(set(chosen) - set(visible))
    if not missing:
        return None
    return f"no GPU {missing[0] if len(missing) == 1 else missing} on this machine (visible: {visible or 'none'})"


def detect_hardware(shape: ModelShape | None = None) -> HardwareProfile:
    """The machine we are on; with `shape`, also its cached CPU format timings for that model."""
    total, available = detect_ram()
    gpus, source = detect_gpus()
    timings = read_cpu_format_ms(shape) if shape is not None else {}
    return HardwareProfile(total, available, detect_cpu_cores(), gpus, source, detect_cpu_bf16(), timings)


# ---------------------------------------------------------------- simulated machines


def parse_gpu_spec(spec: str, index: int) -> GpuInfo:
    """'NAME:MEMORY[:CC]', e.g. 'T4:16GiB:7.5', 'RTX4090:24GiB' (CC looked up), 'A100:80GB:8.0'."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise ValueError(f"bad --gpu {spec!r}: expected NAME:MEMORY[:CC], e.g. T4:16GiB:7.5")
    name, memory = parts[0], parse_size(parts[1])
    if len(parts) == 3:
        m = re.fullmatch(r"(\d+)\.(\d+)", parts[2].strip())
        if not m:
            raise ValueError(f"bad compute capability {parts[2]!r} in --gpu {spec!r}: expected e.g. 8.6")
        cc = (int(m.group(1)), int(m.group(2)))
    else:
        key = name.upper().replace(" ", "").replace("-", "")
        if key not in KNOWN_CC:
            raise ValueError(f"unknown GPU {name!r}: give its compute capability, e.g. {name}:{parts[1]}:8.6")
        cc = KNOWN_CC[key]
    if memory <= 0:
        raise ValueError(f"bad --gpu {spec!r}: memory must be positive")
    return GpuInfo(index, name, memory, memory, cc)


def simulated_profile(
    gpus: Sequence[str] = (), ram: str | None = None, cpu_only: bool = False, shape: ModelShape | None = None
) -> HardwareProfile:
    """A machine described on the command line; what is not described comes from this one.

    `ram` is taken as both total and available (the user says what the model may use);
    `cpu_only` drops the GPUs (and conflicts with `gpus`); a simulated GPU is entirely free.
    The CPU is this one, so with `shape` its cached format timings come along.
    """
    if cpu_only and gpus:
        raise ValueError("--cpu-only and --gpu contradict each other")
    if ram is not None:
        total = available = parse_size(ram)
    else:
        total, available = detect_ram()
    if gpus:
        gpu_list, source = [parse_gpu_spec(s, i) for i, s in enumerate(gpus)], "simulated"
    elif cpu_only:
        gpu_list, source = [], "none (--cpu-only)"
    else:
        gpu_list, source = detect_gpus()
    timings = read_cpu_format_ms(shape) if shape is not None else {}
    return HardwareProfile(total, available, detect_cpu_cores(), gpu_list, source, detect_cpu_bf16(), timings)
