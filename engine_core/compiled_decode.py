"""The CPU decode step as one compiled graph: the whole model, from token ids to logits.

An eager CPU decode step of a small model spends as long dispatching its ~1,200 small ops
(transformers' wrappers, norms, rotary, residuals) as it does in its matmuls. torch.compile
(inductor) traces the decode-only step once, whole model included, fuses the elementwise work into a
few C++ loops and keeps the matmuls and attention as library calls, so the step's time is mostly its
matmuls. Shapes are dynamic (batch and key span are symbols), so three graphs cover every decode step:
one for a single sequence (torch specialises size 1), one for two or more, and one for two or more
after a prefix they all share (cascade attention, engine_core/attention.py).

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

from engine_core.attention import DecodeLayout
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
        self.shared_enabled = False  # the graph with cascade attention over a shared prefix, likewise
        self.up_to = self.shared_up_to = 0  # the largest batch each runs (measured faster up to there)
        # (batch, table width, shared prefix blocks) -> (eager ms, compiled ms)
        self.measured: dict[tuple[int, int, int], tuple[float, float]] = {}
        self.steps = 0  # decode steps run compiled

    def _decode_logits(self, ids, positions, cache_rows, lengths, tables, prefix=None) -> torch.Tensor:
        """What the compiler traces: the model over one decode token per row, all rows' logits. With a
        `prefix` (blocks every row starts with) `tables` and `lengths` describe what follows it."""
        runner = self.runner
        ctx = runner._context(cache_rows, positions, DecodeLayout(None, tables, lengths, prefix=prefix), [])
        out = runner.model(
            input_ids=ids[None], position_ids=positions[None], logits_to_keep=0, use_cache=False, kiln_step=ctx
        )
        return out.logits[0].float()

    def covers(self, chunks: list[ScheduledChunk]) -> bool:
        return self.enabled and is_decode_only(chunks, self.up_to)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        self.steps += 1
        n = len(chunks)
        bs = self.runner.block_size
        take_shared = self.shared_enabled and n <= self.shared_up_to
        shared = self.runner.shared_prefix([(c.seq, c.start + 1) for c in chunks]) if take_shared else []
        skip = len(shared)
        # at least 2 blocks wide: torch.compile specialises a size of 1, and a one-block table (a prompt of
        # under 16 tokens) would trace a new graph mid-serving (a minute of compile while streams wait)
        width = max(2, max(c.start for c in chunks) // bs + 1 - skip)
        packed = torch.tensor(
            [c.token_ids[0] for c in chunks]
            + [c.start for c in chunks]
            + [c.seq.cache_row(c.start, bs) for c in chunks]
            + [block for c in chunks for block in c.seq.block_table(c.start + 1, width, bs, skip)]
            + shared
        )
        ids, positions, rows = packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n]
        tables = packed[3 * n : 3 * n + n * width].view(n, width)
        if not skip:
            return self.fn(ids, positions, rows, positions + 1, tables)
        return self.fn(ids, positions, rows, positions + 1 - skip * bs, tables, packed[3 * n + n * width :])

    # ------------------------------------------------------------------ warmup

    @torch.inference_mode()
    def warm(self) -> str:
        """Compile the graphs and time each against eager, on the first blocks of the pool (call before any
        request is admitted: it writes K/V there), at a few batch sizes up to the cap, plain and after a
        shared prefix (cascade attention, where the runner takes it). Each graph then runs the batches up
        to the largest size where it measured faster at that size and every smaller one: at the top eager
        can win (an int8 plan's eager step dequantizes its weights for 64+ rows, which a graph cannot),
        and that must not cost the small batches their graph. Returns a line for the log."""
        runner = self.runner
        top = runner.max_batch
        sizes = sorted({1, *(b for b in (8, top // 2, top - 1) if 1 < b < top), top})
        # sizes of a first trace all distinct: torch.compile gives equal sizes one symbol ("duck sizing"), and
        # a graph traced with batch == width would be traced again the first time they differ
        width = next(w for w in (9, 10, 11, 12) if w not in sizes)
        prefix = next(p for p in (5, 6, 7, 13) if p not in sizes)
        plain = [(b, width, 0) for b in sizes]
        shared = [(b, width, prefix) for b in sizes if b > 1] if runner.shares_prefixes else []
        started = time.monotonic()
        try:  # the first call of each graph traces it: one row, the cap, the cap after a shared prefix
            for shape in dict.fromkeys([plain[0], plain[-1], *shared[-1:]]):
                self._time(self.fn, *shape, steps=1)
        except Exception as exc:  # no C++ compiler, an op inductor cannot take: eager still works
            return f"decode steps run eager: torch.compile failed ({type(exc).__name__}: {exc!s:.160})"
        compile_s = time.monotonic() - started
        for shape in plain + shared:
            self.measured[shape] = (
                self._time(self._decode_logits, *shape, TIMED_STEPS),
                self._time(self.fn, *shape, TIMED_STEPS),
            )
        self.up_to = self._faster_up_to(plain)
        self.shared_up_to = min(self.up_to, self._faster_up_to(shared))
        self.enabled = self.up_to > 0
        self.shared_enabled = self.shared_up_to > 1
        timings = ", ".join(
            f"batch {b}{' after a shared prefix' if p else ''}: {c:.1f} ms compiled vs {e:.1f} eager"
            for (b, _, p), (e, c) in self.measured.items()
        )
        if not self.enabled:
            verdict = "eager kept (the compiled graph measured slower)"
        else:
            verdict = f"compiled graph in use up to batch {self.up_to}" + (
                f" ({self.shared_up_to} after a shared prefix)" if self.shared_enabled else ""
            )
        return f"decode steps: {verdict}; compiled in {compile_s:.0f} s; {timings}"

    def _faster_up_to(self, shapes: list[tuple[int, int, int]]) -> int:
        """The largest batch of `shapes` (ascending) where compiled measured faster there and at every smaller one."""
        up_to = 0
        for shape in shapes:
            eager, compiled = self.measured[shape]
            if compiled >= eager:
                break
            up_to = shape[0]
        return up_to

    def _time(self, fn, batch: int, width: int, prefix: int, steps: int) -> float:
        """Median ms of `steps` decode steps for `batch` rows of `width` blocks each (blocks 0.., one run
        per row, as sequences admitted together get them), after `prefix` blocks all rows share."""
        bs = self.runner.block_size
        ids = torch.zeros(batch, dtype=torch.long)
        positions = torch.full((batch,), (prefix + width) * bs - 1, dtype=torch.long)
        tables = (prefix + torch.arange(batch * width).view(batch, width)) % self.runner.cache.num_blocks
        rows = tables[:, -1] * bs + bs - 1
        shared = (torch.arange(prefix),) if prefix else ()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn(ids, positions, rows, positions + 1 - prefix * bs, tables, *shared).argmax(dim=-1).tolist()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
