"""The paged KV pool in tokens, the longest sequence, and the most sequences running at once.

The pool is shared: a sequence takes `KV_BLOCK_SIZE`-token blocks as it grows and returns them when it
ends, so the pool is sized in tokens, not in batch × context slots. Then:
- context: the model's own window (or `--max-context`) while one such sequence fits the pool, else the pool;
- batch: a cap on running sequences from measured compute (CPU) or a large default (GPU), never a way
  to divide memory (admission is by free blocks).
"""

from __future__ import annotations

from typing import NamedTuple

from hardware.profile import format_bytes as fb
from model.shape import ModelShape
from planning.overrides import describe
from planning.plan import PlanError, PlanOverrides

KV_BLOCK_SIZE = 16
MIN_CONTEXT = 2048  # a plan must hold one sequence this long (or the model's window, if shorter)
PREFERRED_BATCH = 4  # a weight format "has headroom" when it leaves KV room for this many MIN_CONTEXT sequences
CPU_POOL_SEQUENCES = 16  # the CPU pool holds at most this many full-context sequences (the old slot pool's size)
GPU_BATCH = 256  # running sequences on a GPU: a small model's decode step costs about the same at any batch
CPU_BATCH_DEFAULT = 64  # on CPU until the decode step is measured
# At least 64 running: past the cap a request waits in the queue until a running one finishes (seconds with
# no token), under it every request progresses and a step grows by only its per-row cost (c below)
CPU_BATCH_RANGE = (64, 256)
SHORT_SEQUENCE = 256  # the batch is capped at pool // 256 (or // the context, if shorter): a full batch of short
# requests fits the pool
STEP_GAIN = 0.10  # grow the batch while doubling it cuts the per-token time by at least 10%
MAX_PLANNED_BATCH = max(GPU_BATCH, CPU_BATCH_RANGE[1])  # what the planner may choose (a flag may force more)


def min_context(shape: ModelShape) -> int:
    """The shortest context a plan accepts without being told to: 2048, or the model's window if shorter."""
    return min(MIN_CONTEXT, shape.max_position_embeddings)


def context_bound(shape: ModelShape, overrides: PlanOverrides) -> int:
    """The longest context a plan may choose: the model's window, or `--max-context` below it."""
    window = shape.max_position_embeddings
    return min(window, overrides.max_context) if overrides.max_context is not None else window


def batch_bound(overrides: PlanOverrides) -> int:
    """The most sequences a plan may run at once: `--max-batch`, else the planner's own ceiling."""
    return overrides.max_batch if overrides.max_batch is not None else MAX_PLANNED_BATCH


class Pool(NamedTuple):
    tokens: int  # the paged pool, a multiple of KV_BLOCK_SIZE
    context: int  # the longest sequence
    why_tokens: str
    why_context: str


def _round_up(tokens: int) -> int:
    return -(-tokens // KV_BLOCK_SIZE) * KV_BLOCK_SIZE


def size_pool(kv_room: int, kv_per_token: int, shape: ModelShape, overrides: PlanOverrides, on_cpu: bool) -> Pool:
    """The pool (tokens) and the context for `kv_room` bytes left after weights and reserve.

    GPU: everything the room holds (vLLM's gpu_memory_utilization). CPU: what memory holds, capped at
    16 × the context. `--kv-cache-tokens` forces the pool (it must still fit memory)."""
    held = max(0, kv_room) // kv_per_token // KV_BLOCK_SIZE * KV_BLOCK_SIZE
    room = f"the {fb(max(0, kv_room))} left after weights and reserve holds {held} tokens at {kv_per_token} B/token"
    bound = context_bound(shape, overrides)
    forced = overrides.kv_cache_tokens
    if forced is not None:
        tokens = forced // KV_BLOCK_SIZE * KV_BLOCK_SIZE
        if tokens > held:
            raise PlanError(
                f"a pool of {tokens} KV tokens ({describe(overrides, 'kv_cache_tokens')}) needs "
                f"{fb(tokens * kv_per_token)}, but {room}: use --kv-cache-tokens {held} or less"
            )
        rounded = f", rounded down to a multiple of the {KV_BLOCK_SIZE}-token block" if tokens != forced else ""
        why = f"{describe(overrides, 'kv_cache_tokens')}{rounded}; {room}"
    elif on_cpu:
        cap = CPU_POOL_SEQUENCES * _round_up(bound)
        tokens = min(held, cap)
        mmap = (
            "the pool is an mmap committed only as blocks are first written, and cached prefixes keep blocks "
            f"warm, so engine RSS grows toward the whole pool; {CPU_POOL_SEQUENCES} × the context keeps it at or "
            f"below the old slot pool's worst case ({CPU_POOL_SEQUENCES} full-context sequences)"
        )
        if tokens == cap:
            why = f"capped at {CPU_POOL_SEQUENCES} × the {bound}-token context: {mmap}, though {room}"
        else:
            why = f"all that memory holds: {room}, under the cap of {CPU_POOL_SEQUENCES} × {bound} = {cap} ({mmap})"
    else:
        tokens = held
        why = f"everything the KV room holds, as vLLM's gpu_memory_utilization does: {room}"
    shared = f"{tokens} tokens ({fb(tokens * kv_per_token)}), shared by all sequences in {KV_BLOCK_SIZE}-token blocks"
    why = f"{shared}: {why}"
    context, why_context = _choose_context(tokens, held, bound, shape, overrides)
    return Pool(tokens, context, why, why_context)


def _choose_context(tokens: int, held: int, bound: int, shape: ModelShape, o: PlanOverrides) -> tuple[int, str]:
    """(context, why): the bound while one sequence of it fits the pool, else the pool (unless forced)."""
    window = f"the model's window (max_position_embeddings {shape.max_position_embeddings})"
    if tokens >= bound:
        if o.max_context is not None:
            return bound, describe(o, "max_context")
        return bound, f"{window}: one sequence that long fits the {tokens}-token pool"
    if o.max_context is not None:
        need = _round_up(bound)
        if o.kv_cache_tokens is not None:
            fix = f"use --kv-cache-tokens {need} or more (memory holds {held})"
        else:
            fix = f"memory holds {held} tokens"
        raise PlanError(
            f"one {bound}-token sequence ({describe(o, 'max_context')}) does not fit the {tokens}-token KV pool: "
            f"{fix}, or lower --max-context to {tokens} or less"
        )
    lo = min_context(shape)
    if o.kv_cache_tokens is None and tokens < lo:
        raise PlanError(f"the KV pool holds {tokens} tokens ({held} fit in memory), less than one {lo}-token sequence")
    why = describe(o, "kv_cache_tokens") if o.kv_cache_tokens is not None else "what memory holds"
    return tokens, f"the whole pool ({why}): one sequence of {window} does not fit it"


def choose_batch(pool: Pool, on_cpu: bool, fmt: str, format_ms: dict[str, float], o: PlanOverrides):
    """(batch, reason): `--max-batch`, else CPU from the measured decode step of `fmt` and GPU 256, at most
    pool // 256 (never below 1). A cap on running sequences: the pool's free blocks admit them."""
    if o.max_batch is not None:
        return o.max_batch, f"{o.max_batch}, {describe(o, 'max_batch')}; {ADMISSION}"
    batch, why = cpu_batch(fmt, format_ms) if on_cpu else (GPU_BATCH, GPU_BATCH_REASON)
    short = min(SHORT_SEQUENCE, pool.context)
    cap = max(1, pool.tokens // short)
    if batch > cap:
        why += f"; capped at pool // {short} = {cap}, so a full batch of {short}-token sequences fits the pool"
        batch = cap
    return batch, f"{batch}: {why}; {ADMISSION}"


ADMISSION = "a cap on running sequences (admission is by the pool's free blocks, not by slots)"
GPU_BATCH_REASON = (
    f"the GPU default, {GPU_BATCH}: a decode step reads every weight once whatever the batch, so its time barely "
    "grows with the batch (flat for small models); memory, not compute, is the limit"
)


def cpu_batch(fmt: str, format_ms: dict[str, float]) -> tuple[int, str]:
    """The smallest power of two b where doubling the batch cuts the per-token step time by less than 10%.

    A decode step is modelled as t(b) = a + c·b from the measured steps at batch 1 and 8 (a: reading the
    weights, paid once per step; c: each row's own work). Per token: a/b + c. Doubling b saves a/(2b),
    under 10% of a/b + c once b ≥ 4a/c. Clamped to [64, 256] (CPU_BATCH_RANGE says why); 64 until measured."""
    t1, t8 = format_ms.get(f"{fmt}@1"), format_ms.get(f"{fmt}@8")
    lo, hi = CPU_BATCH_RANGE
    if t1 is None or t8 is None:
        return CPU_BATCH_DEFAULT, (
            f"the CPU default until the {fmt} decode step is measured on this machine (an engine measures it at "
            "its first start; the batch then follows from how a step's time grows with the batch)"
        )
    c = (t8 - t1) / 7
    a = t1 - c
    measured = f"the measured {fmt} decode step takes {t1:.1f} ms at batch 1, {t8:.1f} ms at batch 8"
    if c <= 0:
        return hi, f"{measured}, no longer at 8 rows than at 1, so the per-token time keeps falling (at most {hi})"
    target = a * (1 - 2 * STEP_GAIN) / (2 * STEP_GAIN * c)  # 4a/c at 10%
    batch = 1
    while batch < target:
        batch *= 2
    clamped = min(hi, max(lo, batch))
    return clamped, (
        f"{measured}, so t(b) ≈ {a:.2f} + {c:.3f}·b ms; past b = 4a/c = {max(target, 0):.1f} doubling the batch "
        f"cuts the per-token time (a/b + c) by less than {STEP_GAIN:.0%}: the smallest power of two there is {batch}"
        + (f", kept within [{lo}, {hi}]" if clamped != batch else "")
    )
