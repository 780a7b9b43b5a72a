"""How a KV-cache budget of N tokens is split into concurrent sequences (batch) × context length."""

from __future__ import annotations

from model.shape import ModelShape
from planning.overrides import describe
from planning.plan import PlanError, PlanOverrides

MIN_CONTEXT, MAX_CONTEXT, CONTEXT_STEP = 2048, 8192, 256
MAX_BATCH, PREFERRED_BATCH = 16, 4


def context_limits(shape: ModelShape) -> tuple[int, int]:
    """(min, max) context the planner chooses from: 2048..8192, never above the model's maximum."""
    top = shape.max_position_embeddings
    return min(MIN_CONTEXT, top), min(MAX_CONTEXT, top)


def choose_batch_context(tokens: int, shape: ModelShape, overrides: PlanOverrides) -> tuple[int, int, str, str]:
    """Split a KV budget of `tokens` into (batch, context, batch reason, context reason).

    Longer context first until batch would drop below 4, then more batch, up to 16 × 8192.
    """
    lo, hi = context_limits(shape)
    fb_, fc = overrides.max_batch, overrides.max_context
    if fb_ is not None and fc is not None:
        if fb_ * fc > tokens:
            raise PlanError(f"{fb_} sequences × {fc} tokens = {fb_ * fc} KV tokens, but the KV budget holds {tokens}")
        return fb_, fc, describe(overrides, "max_batch"), describe(overrides, "max_context")
    if fc is not None:
        batch = min(MAX_BATCH, tokens // fc)
        if batch < 1:
            raise PlanError(f"one {fc}-token sequence does not fit: the KV budget holds {tokens} tokens")
        return (
            batch,
            fc,
            f"{batch} sequences of the forced context fill the KV budget (cap {MAX_BATCH})",
            describe(overrides, "max_context"),
        )
    if fb_ is not None:
        ctx = min(hi, tokens // fb_)
        if ctx < lo:
            raise PlanError(
                f"{fb_} sequences × {lo} tokens (the smallest context) = {fb_ * lo} KV tokens, "
                f"but the KV budget holds {tokens}"
            )
        if ctx < hi:
            ctx -= ctx % CONTEXT_STEP
        return fb_, ctx, describe(overrides, "max_batch"), f"longest context (≤ {hi}) the forced batch leaves room for"
    return _heuristic_batch_context(tokens, shape)


def _heuristic_batch_context(tokens: int, shape: ModelShape) -> tuple[int, int, str, str]:
    """Nothing forced: the full context with as many sequences as fit, or fewer tokens each to keep 4 sequences."""
    lo, hi = context_limits(shape)
    if tokens >= PREFERRED_BATCH * hi:
        batch = min(MAX_BATCH, tokens // hi)
        why_ctx = f"the ceiling: min(8192, the model's max_position_embeddings {shape.max_position_embeddings})"
        why_batch = (
            f"capped at {MAX_BATCH}" if batch == MAX_BATCH else f"{batch} sequences of {hi} tokens fill the KV budget"
        )
        return batch, hi, why_batch, why_ctx
    if tokens >= PREFERRED_BATCH * lo:
        ctx = (tokens // PREFERRED_BATCH) // CONTEXT_STEP * CONTEXT_STEP
        batch = min(MAX_BATCH, tokens // ctx)
        return (
            batch,
            ctx,
            f"kept at {PREFERRED_BATCH}+ concurrent sequences before growing context further",
            f"longest context (multiple of {CONTEXT_STEP}) that keeps {PREFERRED_BATCH} sequences in the KV budget",
        )
    if tokens >= lo:
        batch = tokens // lo
        return batch, lo, f"only {batch} sequence(s) of {lo} tokens fit the KV budget", "the minimum context"
    raise PlanError(f"the KV budget holds {tokens} tokens, less than one {lo}-token sequence")
