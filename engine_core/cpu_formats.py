"""Time each CPU weight format (fp32, bf16, int8 and int4 weight-only) on the model's own linear shapes, so
the plan picks by measurement.

CPU flags do not say which format is fastest: bf16 halves the bytes a decode step streams but is
emulated without avx512_bf16/AMX, and the balance moves with the shapes, the cores and the memory.
So an engine's first start times one decode step's linears (q/k/v/o + MLP of one layer × layers,
plus lm_head) in each format at batch 1 and 8, and one prompt chunk's (the layers' linears, no
lm_head) at 64 and 256 rows, where int8 and int4 are also timed dequantized to bf16 per call (their
path for many rows, see engine_core/int8_weights.py and int4_weights.py), on one thread, with random
weights, and caches the result per machine and model (hardware/profile.py reads it back without torch
for `cli.py plan`). int4 is timed only where torch has its kernel and every decoder linear has its
shape (whole groups of 32 inputs, outputs in 16s), its dequantized path only where kiln can read the
kernel's packed layout; its decode steps time the LM head in int8, as an int4 plan holds it.

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

from engine_core import int4_weights
from engine_core.int8_weights import ACTIVATION_DTYPE, dequantized_linear, int8_kernel_linear, kernel_available
from hardware.profile import HardwareProfile, decoder_linear_shapes, write_cpu_format_ms
from model.shape import ModelShape
from planning.cpu_dtype import (
    CPU_WEIGHT_FORMATS,
    DECODE_BATCHES,
    PROMPT_CHUNKS,
    QUANTIZED_FORMATS,
    dequant_key,
    is_prompt_chunk,
)
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}
INT8_RANGE = 127  # the pool's random values in [-0.5, 0.5) scaled to int8 weights
INT4_ROWS = 64  # int4 weights are timed on whole packed row blocks (the kernel's largest)


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
    An int8 pool also holds one bf16 scale per row, as engine_core/int8_weights.py stores them; an int4 pool
    (uint8, two weights a byte) a pool of bf16 scales and zeros taken alongside, as int4_weights.py packs them."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat, self.offset = flat, 0
        self.head: WeightPool | None = None  # where the LM head comes from when its format differs (int4: int8)
        self.scales = torch.full((MAX_SCALE_ROWS,), 1 / INT8_RANGE, dtype=ACTIVATION_DTYPE) if self.int8 else None
        self.scales_and_zeros = None
        if self.int4:  # 2 bf16 values per 32 weights = per 16 bytes, small and near zero as real ones are
            count = 2 * flat.numel() // (int4_weights.GROUP_SIZE // 2)
            self.scales_and_zeros = (random_flat(count) * 0.01).to(ACTIVATION_DTYPE)
            self.scale_offset = 0

    @property
    def int8(self) -> bool:
        return self.flat.dtype == torch.int8

    @property
    def int4(self) -> bool:
        return self.flat.dtype == torch.uint8

    @property
    def activation_dtype(self) -> torch.dtype:
        return ACTIVATION_DTYPE if self.int8 or self.int4 else self.flat.dtype

    def max_rows(self, in_features: int) -> int:
        """The most rows of `in_features` weights one matrix may take: half the pool (int4: in whole blocks)."""
        if self.int4:
            return max(INT4_ROWS, self.flat.numel() // in_features // INT4_ROWS * INT4_ROWS)
        return max(1, self.flat.numel() // (2 * in_features))

    def take(self, rows: int, in_features: int) -> torch.Tensor:
        width = in_features // 2 if self.int4 else in_features
        n = rows * width
        if self.offset + n > self.flat.numel():
            self.offset = 0
        view = self.flat[self.offset : self.offset + n].view(rows, width)
        self.offset += n
        return view

    def take_scales_and_zeros(self, rows: int, in_features: int) -> torch.Tensor:
        """(in / 32, rows, 2) bf16 for an int4 matrix, the next ones in the pool (read cold, as the weights)."""
        n = 2 * rows * (in_features // int4_weights.GROUP_SIZE)
        if self.scale_offset + n > self.scales_and_zeros.numel():
            self.scale_offset = 0
        view = self.scales_and_zeros[self.scale_offset : self.scale_offset + n]
        self.scale_offset += n
        return view.view(in_features // int4_weights.GROUP_SIZE, rows, 2)


def pool_elements(llc_bytes: int) -> int:
    """Elements so that even the 2-byte format's pool is twice the last-level cache."""
    return min(MAX_POOL_ELEMENTS, max(RANDOM_TILE, llc_bytes))


def random_flat(elements: int) -> torch.Tensor:
    tile = torch.rand(RANDOM_TILE, generator=torch.Generator().manual_seed(0)) - 0.5
    return tile.repeat(math.ceil(elements / RANDOM_TILE))[:elements].contiguous()


def time_linear(pool: WeightPool, x: torch.Tensor, in_features: int, out_features: int, dequant: bool = False) -> float:
    """Seconds for y = x @ W.T with W (out, in) read cold; a slice of rows when W would not fit half the pool.
    `dequant`: an int8 or int4 W dequantized to bf16 for the call, as Int8Linear / Int4Linear compute many rows."""
    rows = min(out_features, pool.max_rows(in_features))
    weight = pool.take(rows, in_features)
    if pool.int4:
        scales_and_zeros = pool.take_scales_and_zeros(rows, in_features)
        linear = int4_weights.dequantized_linear if dequant else int4_weights.int4_kernel_linear
        start = time.perf_counter()
        linear(x, weight, scales_and_zeros)
    elif pool.int8:
        start = time.perf_counter()
        (dequantized_linear if dequant else int8_kernel_linear)(x, weight, pool.scales[:rows])
    else:
        start = time.perf_counter()
        torch.nn.functional.linear(x, weight)
    return (time.perf_counter() - start) * out_features / rows


def step_linears(shape: ModelShape) -> list[tuple[int, int]]:
    """(in, out) of each distinct linear in a decode step: one decoder layer's, then lm_head."""
    return [*decoder_linear_shapes(shape), (shape.hidden_size, shape.vocab_size)]


class Timing(msgspec.Struct, frozen=True):
    """One "<key>" the probe reports: `rows` through `linears` of the `fmt` pool, int8 / int4 `dequant`ed or not."""

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


def timings_to_take(formats, batches, chunks, dequantized=QUANTIZED_FORMATS) -> list[Timing]:
    """Every format at each decode batch and prompt chunk, and int8 / int4 (those of them in `dequantized`)
    dequantized at each prompt chunk."""
    taken = [Timing(f"{fmt}@{rows}", fmt, rows) for fmt in formats for rows in (*batches, *chunks)]
    for fmt in (f for f in QUANTIZED_FORMATS if f in formats and f in dequantized):
        taken += [Timing(f"{dequant_key(fmt)}@{rows}", fmt, rows, dequant=True) for rows in chunks]
    return taken


def loadable_formats(formats, shape: ModelShape) -> list[str]:
    """`formats` less those this torch (or this model's shapes) cannot run: int8 and int4 need their kernels
    (int4 both: its LM head is int8), int4 every decoder linear in whole groups and row blocks."""
    linears = decoder_linear_shapes(shape)
    int4 = kernel_available() and int4_weights.kernel_available() and all(int4_weights.fits(i, o) for i, o in linears)
    return [f for f in formats if (f != "int8" or kernel_available()) and (f != "int4" or int4)]


def pool_flat(flat: torch.Tensor, fmt: str) -> torch.Tensor:
    """The pool of `fmt` weights from random values in [-0.5, 0.5)."""
    if fmt == "int8":
        return (flat * INT8_RANGE).to(torch.int8)
    if fmt == "int4":
        return ((flat + 0.5) * 255).to(torch.uint8)  # random bytes: two random 4-bit codes each
    return flat.to(DTYPES[fmt])


def time_linears(pool: WeightPool, shape: ModelShape, timing: Timing, inputs: dict) -> list[float]:
    """Seconds for each of timing.linears(shape), in order, the LM head from `pool.head` where set (an int4 plan
    holds its LM head in int8); `inputs` caches the activations by (rows, in)."""
    seconds = []
    layer = len(decoder_linear_shapes(shape))
    for n, (i, o) in enumerate(timing.linears(shape)):
        if (timing.rows, i) not in inputs:
            inputs[timing.rows, i] = torch.rand(timing.rows, i).to(pool.activation_dtype)
        source = pool.head if n >= layer and pool.head is not None else pool
        seconds.append(time_linear(source, inputs[timing.rows, i], i, o, timing.dequant and source is pool))
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
    "int8-dequant@<chunk rows>", "int4-dequant@<chunk rows>"}, each linear at its fastest of the interleaved
    rounds.

    The first round doubles as warm-up (oneDNN/MKL prepare kernels on first use); keeping each
    linear's fastest call drops it, and drops calls a busy neighbour slowed down."""
    started = time.perf_counter()
    flat = random_flat(pool_elements(last_level_cache_bytes()))
    formats = loadable_formats(formats, shape)
    pools = {fmt: WeightPool(pool_flat(flat, fmt)) for fmt in formats}
    if "int4" in pools:
        pools["int4"].head = pools.get("int8") or WeightPool(pool_flat(flat, "int8"))
    dequantized = [f for f in QUANTIZED_FORMATS if f != "int4" or int4_weights.packed_layout() is not None]
    taken = timings_to_take(formats, batches, chunks, dequantized)
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
