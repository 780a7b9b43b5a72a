"""The CPU decode step as one compiled graph: the whole model, from token ids to logits.

An eager CPU decode step of a small model spends as long dispatching its ~1,200 small ops
(transformers' wrappers, norms, rotary, residuals) as it does in its matmuls. torch.compile
(inductor) traces the decode-only step once, whole model included, fuses the elementwise work into a
few C++ loops and keeps the matmuls and attention as library calls, so the step's time is mostly its
matmuls. Shapes are dynamic (batch and key span are symbols), so two graphs cover every decode step:
one for a single sequence (torch specialises size 1) and one for two or more.

Prefill and mixed steps stay eager: their layout (how many chunks, where) would make a graph per
shape. Compiling takes a minute or two on a small CPU at first start; inductor caches it on disk
(`<kiln cache>/inductor`, see model.source.use_kiln_inductor_cache), so later starts take a fraction
of that. After compiling, the engine times a few decode steps both ways and keeps the compiled graph
only where it measured faster, so a platform where inductor's code loses never pays for it.
"""

from __future__ import annotations

import statistics
import time

import torch

from engine_core.attention import DecodeLayout, StepContext
from engine_core.scheduler import ScheduledChunk

TIMED_STEPS = 6  # decode steps timed each way per batch size at warmup (after one untimed)


def is_decode_only(chunks: list[ScheduledChunk], max_rows: int) -> bool:
    """Every chunk is one sampled token (no prompt scoring), at most `max_rows`."""
    return 0 < len(chunks) <= max_rows and all(c.length == 1 and c.sample and not c.scores_prompt for c in chunks)


def _guards_worth_checking(guards) -> list[bool]:
    """The guards on the step's inputs only. Dropped: those on the model's modules (thousands of weight
    and buffer checks, 1.5 ms a step; the loaded model never changes) and dynamo's global-state guard,
    which would recompile the graph (tens of seconds) each time the thread policy changes torch's thread
    count. Both are safe here: the step always runs under inference_mode with the default dtype, and
    inductor's CPU kernels (OpenMP loops with no fixed thread count) and the library calls read the
    thread count when they run, not when compiled."""
    return [
        guard.guard_type != "GLOBAL_STATE" and not guard.orig_guard.source.is_unspecialized_nn_module()
        for guard in guards
    ]


class CompiledDecode:
    """The runner's decode-only steps through `torch.compile`; `warm()` compiles and measures first."""

    def __init__(self, runner):
        self.runner = runner
        self.fn = torch.compile(self._decode_logits, dynamic=True, options={"guard_filter_fn": _guards_worth_checking})
        self.enabled = False  # until warm() has compiled and measured
        self.measured: dict[int, tuple[float, float]] = {}  # batch -> (eager ms, compiled ms)
        self.steps = 0  # decode steps run compiled

    def _decode_logits(self, ids, positions, cache_rows, lengths, tables) -> torch.Tensor:
        """What the compiler traces: the model over one decode token per row, all rows' logits."""
        runner = self.runner
        layout = DecodeLayout(None, tables, lengths)
        ctx = StepContext(cache_rows, positions, layout, [], runner.positions_range, runner.block_size)
        out = runner.model(
            input_ids=ids[None], position_ids=positions[None], logits_to_keep=0, use_cache=False, kiln_step=ctx
        )
        return out.logits[0].float()

    def covers(self, chunks: list[ScheduledChunk]) -> bool:
        return self.enabled and is_decode_only(chunks, self.runner.max_batch)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        self.steps += 1
        n = len(chunks)
        bs = self.runner.block_size
        # at least 2 blocks wide: torch.compile specialises a size of 1, and a one-block table (a prompt of
        # under 16 tokens) would trace a new graph mid-serving (a minute of compile while streams wait)
        width = max(2, max(c.start for c in chunks) // bs + 1)
        packed = torch.tensor(
            [c.token_ids[0] for c in chunks]
            + [c.start for c in chunks]
            + [c.seq.cache_row(c.start, bs) for c in chunks]
            + [block for c in chunks for block in c.seq.block_table(c.start + 1, width, bs)]
        )
        ids, positions, rows = packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n]
        return self.fn(ids, positions, rows, positions + 1, packed[3 * n :].view(n, width))

    # ------------------------------------------------------------------ warmup

    @torch.inference_mode()
    def warm(self) -> str:
        """Compile both graphs and time them against eager, on the first blocks of the pool (call before
        any request is admitted: it writes K/V there). Returns a line for the log."""
        runner = self.runner
        sizes = [1] if runner.max_batch == 1 else [1, runner.max_batch]
        length = min(runner.max_context, 128)
        started = time.monotonic()
        try:
            for batch in sizes:
                self._time(self.fn, batch, length, steps=1)
        except Exception as exc:  # no C++ compiler, an op inductor cannot take: eager still works
            return f"decode steps run eager: torch.compile failed ({type(exc).__name__}: {exc!s:.160})"
        compile_s = time.monotonic() - started
        for batch in sizes:
            eager = self._time(self._decode_logits, batch, length, TIMED_STEPS)
            compiled = self._time(self.fn, batch, length, TIMED_STEPS)
            self.measured[batch] = (eager, compiled)
        self.enabled = all(compiled < eager for eager, compiled in self.measured.values())
        timings = ", ".join(f"batch {b}: {c:.1f} ms compiled vs {e:.1f} eager" for b, (e, c) in self.measured.items())
        verdict = "compiled graph in use" if self.enabled else "eager kept (the compiled graph measured slower)"
        return f"decode steps: {verdict}; compiled in {compile_s:.0f} s; {timings}"

    def _time(self, fn, batch: int, length: int, steps: int) -> float:
        """Median ms of `steps` decode steps for `batch` rows at `length` cached positions (blocks 0..,
        one run per row, as sequences admitted together get them)."""
        bs = self.runner.block_size
        width = -(-length // bs)
        ids = torch.zeros(batch, dtype=torch.long)
        positions = torch.full((batch,), length - 1, dtype=torch.long)
        tables = torch.arange(batch * width).view(batch, width) % self.runner.cache.num_blocks
        rows = tables[:, -1] * bs + (length - 1) % bs
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn(ids, positions, rows, positions + 1, tables).argmax(dim=-1).tolist()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
