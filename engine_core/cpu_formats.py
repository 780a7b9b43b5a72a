"""Time each CPU weight format (fp32, bf16, int8 weight-only) on the model's own linear shapes, so the
plan picks by measurement.

CPU flags do not say which format is fastest: bf16 halves the bytes a decode step streams but is
emulated without avx512_bf16/AMX, and the balance moves with the shapes, the cores and the memory.
So an engine's first start times one decode step's linears (q/k/v/o + MLP of one layer × layers,
plus lm_head) in each format at batch 1 and 8, and one prompt chunk's (the layers' linears, no
lm_head) at 64 and 256 rows, where int8 is also timed dequantized to bf16 per call (its path for
many rows, see engine_core/int8_weights.py), on one thread, with random weights, and caches the
result per machine and model (hardware/profile.py reads it back without torch for `cli.py plan`).

Weights are views into one pool larger than the last-level cache, taken in turn, so every matmul
reads its weights from DRAM as a real step over the whole model does. Matrices larger than half
the pool are timed on a slice of their rows and scaled (time is linear in output rows). Formats
are interleaved round by round and each linear keeps its fastest call: a noisy neighbour slows a
call, never speeds one up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import msgspec
import torch

from engine_core.int8_weights import ACTIVATION_DTYPE, dequantized_linear, int8_kernel_linear, kernel_available
from hardware.profile import HardwareProfile, decoder_linear_shapes, write_cpu_format_ms
from model.shape import ModelShape
from planning.cpu_dtype import CPU_WEIGHT_FORMATS, DECODE_BATCHES, INT8_DEQUANT, PROMPT_CHUNKS, is_prompt_chunk
from planning.plan import PlanOverrides

log = logging.getLogger("kiln.engine")

PROBE_BATCHES, PROBE_CHUNKS = DECODE_BATCHES, PROMPT_CHUNKS
# One thread: the choice rests on the ratio between formats (bytes moved, per-core kernels), and
# multi-threaded timings turn into scheduling noise when a neighbour holds a core (measured here with
# 2 threads beside a niced build: ~50 ms per matmul call after the first parallel one, steady with 1).
PROBE_THREADS = 1
PROBE_ROUNDS, MIN_ROUNDS = 6, 3  # up to 6 rounds, at least 3 however long they take
TIME_BUDGET_S = 0.5  # no round starts past this (after the minimum): a few hundred ms at first start
DEFAULT_LLC_BYTES = 32 << 20
MAX_SCALE_ROWS = 1 << 20  # more output rows than any linear is timed on at once
MAX_POOL_ELEMENTS = 64 << 20  # 256 MiB in fp32: enough to exceed any LLC this runs on
RANDOM_TILE = 1 << 20  # random values generated once and tiled: torch.rand of the whole pool costs ~0.1 s
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
INT8_RANGE = 127  # the pool's random values in [-0.5, 0.5) scaled to int8 weights


def last_level_cache_bytes() -> int:
    """Size of cpu0's largest cache from sysfs ("32768K"), or 32 MiB when unreadable."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=DEFAULT_LLC_BYTES)


class WeightPool:
    """Flat random weights handed out as consecutive (rows, in) views, wrapping around, so none is cache-warm.
    An int8 pool also holds one bf16 scale per row, as engine_core/int8_weights.py stores them."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat, self.offset = flat, 0
        self.scales = torch.full((MAX_SCALE_ROWS,), 1 / INT8_RANGE, dtype=ACTIVATION_DTYPE) if self.int8 else None

    @property
    def int8(self) -> bool:
        return self.flat.dtype == torch.int8

    @property
    def activation_dtype(self) -> torch.dtype:
        return ACTIVATION_DTYPE if self.int8 else self.flat.dtype

    def take(self, rows: int, in_features: int) -> torch.Tensor:
        n = rows * in_features
        if self.offset + n > self.flat.numel():
            self.offset = 0
        view = self.flat[self.offset : self.offset + n].view(rows, in_features)
        self.offset += n
        return view


def pool_elements(llc_bytes: int) -> int:
    """Elements so that even the 2-byte format's pool is twice the last-level cache."""
    return min(MAX_POOL_ELEMENTS, max(RANDOM_TILE, llc_bytes))


def random_flat(elements: int) -> torch.Tensor:
    tile = torch.rand(RANDOM_TILE, generator=torch.Generator().manual_seed(0)) - 0.5
    return tile.repeat(math.ceil(elements / RANDOM_TILE))[:elements].contiguous()


def time_linear(pool: WeightPool, x: torch.Tensor, in_features: int, out_features: int, dequant: bool = False) -> float:
    """Seconds for y = x @ W.T with W (out, in) read cold; a slice of rows when W would not fit half the pool.
    `dequant`: an int8 W dequantized to bf16 for the call, as Int8Linear computes many rows."""
    rows = min(out_features, max(1, pool.flat.numel() // (2 * in_features)))
    weight = pool.take(rows, in_features)
    start = time.perf_counter()
    if pool.int8:
        (dequantized_linear if dequant else int8_kernel_linear)(x, weight, pool.scales[:rows])
    else:
        torch.nn.functional.linear(x, weight)
    return (time.perf_counter() - start) * out_features / rows


def step_linears(shape: ModelShape) -> list[tuple[int, int]]:
    """(in, out) of each distinct linear in a decode step: one decoder layer's, then lm_head."""
    return [*decoder_linear_shapes(shape), (shape.hidden_size, shape.vocab_size)]


class Timing(msgspec.Struct, frozen=True):
    """One "<key>" the probe reports: `rows` through `linears` of the `fmt` pool, the int8 one `dequant`ed or not."""

    key: str
    fmt: str
    rows: int
    dequant: bool = False

    def linears(self, shape: ModelShape) -> list[tuple[int, int]]:
        """A prompt chunk's: the decoder layer's (its logits are its last row's); a decode step's: with lm_head."""
        return decoder_linear_shapes(shape) if is_prompt_chunk(self.rows) else step_linears(shape)

    def ms(self, shape: ModelShape, seconds: list[float]) -> float:
        """The layer's linears × layers, plus lm_head for a decode step."""
        layer = seconds[: len(decoder_linear_shapes(shape))]
        return (sum(layer) * shape.num_layers + sum(seconds[len(layer) :])) * 1e3


def timings_to_take(formats, batches, chunks) -> list[Timing]:
    """Every format at each decode batch and prompt chunk, and int8 dequantized at each prompt chunk."""
    taken = [Timing(f"{fmt}@{rows}", fmt, rows) for fmt in formats for rows in (*batches, *chunks)]
    if "int8" in formats:
        taken += [Timing(f"{INT8_DEQUANT}@{rows}", "int8", rows, dequant=True) for rows in chunks]
    return taken


def time_linears(pool: WeightPool, shape: ModelShape, timing: Timing, inputs: dict) -> list[float]:
    """Seconds for each of timing.linears(shape), in order; `inputs` caches the activations by (rows, in)."""
    seconds = []
    for i, o in timing.linears(shape):
        if (timing.rows, i) not in inputs:
            inputs[timing.rows, i] = torch.rand(timing.rows, i).to(pool.activation_dtype)
        seconds.append(time_linear(pool, inputs[timing.rows, i], i, o, timing.dequant))
    return seconds


def measure_cpu_formats(
    shape: ModelShape,
    formats=CPU_WEIGHT_FORMATS,
    batches=PROBE_BATCHES,
    chunks=PROBE_CHUNKS,
    rounds: int = PROBE_ROUNDS,
    budget_s: float = TIME_BUDGET_S,
    threads: int = PROBE_THREADS,
) -> dict[str, float]:
    """{"<format>@<batch>": ms per decode step, "<format>@<chunk rows>": ms per prompt chunk, and
    "int8-dequant@<chunk rows>"}, each linear at its fastest of the interleaved rounds.

    The first round doubles as warm-up (oneDNN/MKL prepare kernels on first use); keeping each
    linear's fastest call drops it, and drops calls a busy neighbour slowed down."""
    started = time.perf_counter()
    flat = random_flat(pool_elements(last_level_cache_bytes()))
    formats = [f for f in formats if f != "int8" or kernel_available()]
    pools = {
        fmt: WeightPool((flat * INT8_RANGE).to(torch.int8) if fmt == "int8" else flat.to(DTYPES[fmt]))
        for fmt in formats
    }
    taken = timings_to_take(formats, batches, chunks)
    fastest: dict[str, list[float]] = {}
    inputs: dict[torch.dtype, dict] = {}
    with torch_threads(threads):
        for done in range(rounds):
            if done >= MIN_ROUNDS and time.perf_counter() - started > budget_s:
                break
            for timing in taken:
                pool = pools[timing.fmt]
                seconds = time_linears(pool, shape, timing, inputs.setdefault(pool.activation_dtype, {}))
                fastest[timing.key] = [min(pair) for pair in zip(fastest.get(timing.key, seconds), seconds)]
    return {t.key: round(t.ms(shape, fastest[t.key]), 3) for t in taken}


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to `count` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def needs_measurement(profile: HardwareProfile, overrides: PlanOverrides) -> bool:
    """A CPU plan whose dtype is the planner's to choose and no cached timing decides it."""
    chosen_by_user = overrides.dtype is not None or overrides.quantization == "nf4"
    return not profile.gpus and not profile.cpu_format_ms and not chosen_by_user


def with_measured_cpu_formats(
    profile: HardwareProfile, shape: ModelShape, overrides: PlanOverrides, cache_root: Path | None = None
) -> HardwareProfile:
    """`profile` with this machine's format timings, measured and cached now if needed.

    A failed probe is logged and leaves the profile as it was: the planner then falls back to
    the CPU-flags guess and says so, which is better than an engine that will not start."""
    if not needs_measurement(profile, overrides):
        return profile
    started = time.perf_counter()
    try:
        timings = measure_cpu_formats(shape)
    except Exception:
        log.warning("timing CPU weight formats failed; the dtype falls back to the CPU-flags guess", exc_info=True)
        return profile
    log.info(
        "CPU weight formats timed in %.2f s: %s",
        time.perf_counter() - started,
        ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items()),
    )
    try:
        log.info("format timings cached in %s", write_cpu_format_ms(shape, timings, cache_root))
    except OSError as exc:
        log.warning("cannot cache the format timings (%s): the next start measures again", exc)
    return msgspec.structs.replace(profile, cpu_format_ms=timings)
