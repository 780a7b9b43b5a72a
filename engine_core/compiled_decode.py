"""The CPU decode step as one compiled graph: the whole model, from token ids to logits.

An eager CPU decode step of a small model spends as long dispatching its ~1,200 small ops
(transformers' wrappers, norms, rotary, residuals) as it does in its matmuls. torch.compile
(inductor) traces the decode-only step once, whole model included, fuses the elementwise work into a
few C++ loops and keeps the matmuls and attention as library calls, so the step's time is mostly its
matmuls. Shapes are dynamic (batch and key span are symbols), so three graphs cover every decode step:
one for a single sequence (torch specialises size 1), one for two or more, and one for two or more
after a prefix they all share (cascade attention, engine_core/attention.py); `run` picks the graph.

Prefill and mixed steps stay eager: their layout (how many chunks, where) would make a graph per
shape. Tracing takes a minute or two on a small CPU at first start; the traced graphs are saved under
`<kiln cache>/compiled/<key>` (engine_core/compiled_cache.py), so a later start or a restarted engine
loads them in seconds. After tracing, the engine times a few decode steps both ways and keeps the
compiled graphs only where they measured faster, so a platform where inductor's code loses never pays
for it; that verdict is saved with the graphs and read back with them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from engine_core import compiled_cache
from engine_core.attention import DecodeLayout, StepContext
from engine_core.scheduler import ScheduledChunk

log = logging.getLogger("kiln.engine")

TIMED_STEPS = 6  # decode steps timed each way per batch size at warmup (after one untimed)
VERDICT_FILE = "measured.json"


def is_decode_only(chunks: list[ScheduledChunk], max_rows: int) -> bool:
    """Every chunk is one sampled token (no prompt scoring), at most `max_rows`."""
    return 0 < len(chunks) <= max_rows and all(c.length == 1 and c.sample and not c.scores_prompt for c in chunks)


def graph_name(batch: int, prefix_blocks: int) -> str:
    """Which of the three graphs runs a decode step: after a shared prefix, a single row, or two or more."""
    return "shared" if prefix_blocks else "one" if batch == 1 else "many"


class DecodeStep(nn.Module):
    """What is traced: the model over one decode token per row, all rows' logits. A module whose state is
    tensors and constants only (the runner's is not: sockets, an mmap), so its trace can be saved and bound
    again to another process's model. With a `prefix` (blocks every row starts with) `tables` and
    `lengths` describe what follows it."""

    def __init__(self, model: nn.Module, positions_range: torch.Tensor, block_size: int, kv_dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.register_buffer("positions_range", positions_range, persistent=False)
        self.block_size, self.kv_dtype = block_size, kv_dtype

    def forward(self, ids, positions, cache_rows, lengths, tables, prefix=None) -> torch.Tensor:
        layout = DecodeLayout(None, tables, lengths, prefix=prefix)
        ctx = StepContext(cache_rows, positions, layout, [], self.positions_range, self.block_size, self.kv_dtype)
        out = self.model(
            input_ids=ids[None], position_ids=positions[None], logits_to_keep=0, use_cache=False, kiln_step=ctx
        )
        return out.logits[0].float()


class CompiledDecode:
    """The runner's decode-only steps through compiled graphs; `warm()` loads or traces them and measures."""

    def __init__(self, runner, cache_root: Path | None = None):
        from model.source import cache_dir

        self.runner = runner
        self.step = DecodeStep(runner.model, runner.positions_range, runner.block_size, runner.cache.k[0].dtype)
        self.folder = (cache_root or cache_dir() / "compiled") / compiled_cache.graph_key(
            self.step, runner.model.config.to_json_string()
        )
        self.graphs: dict[str, object] = {}  # graph_name() -> compiled function of (step, *inputs)
        self.loaded = False  # the graphs came from the folder (not traced by this process)
        self.enabled = False  # until warm() has compiled and measured
        self.shared_enabled = False  # the graph with cascade attention over a shared prefix, likewise
        self.up_to = self.shared_up_to = 0  # the largest batch each runs (measured faster up to there)
        # (batch, table width, shared prefix blocks) -> (eager ms, compiled ms)
        self.measured: dict[tuple[int, int, int], tuple[float, float]] = {}
        self.steps = 0  # decode steps run compiled
        self.guard_misses = 0  # steps whose inputs a graph was not traced for: run eager instead

    def covers(self, chunks: list[ScheduledChunk]) -> bool:
        return self.enabled and is_decode_only(chunks, self.up_to)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        n = len(chunks)
        bs = self.runner.block_size
        take_shared = self.shared_enabled and n <= self.shared_up_to
        shared = self.runner.shared_prefix([(c.seq, c.start + 1) for c in chunks]) if take_shared else []
        skip = len(shared)
        # at least 2 blocks wide: the graphs were traced for a dynamic width, which torch specialises at 1
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
        if skip:
            inputs = (ids, positions, rows, positions + 1 - skip * bs, tables, packed[3 * n + n * width :])
        else:
            inputs = (ids, positions, rows, positions + 1, tables)
        return self._call(self.graphs[graph_name(n, skip)], inputs)

    def _call(self, graph, inputs: tuple) -> torch.Tensor:
        """The graph's step, or the eager one where its guards refuse these inputs (never traced again
        mid-serving: that took minutes while every stream waited)."""
        if graph.guard_check(self.step, *inputs):
            self.steps += 1
            return graph(self.step, *inputs)
        self.guard_misses += 1
        if self.guard_misses == 1:
            log.warning("a decode step the compiled graphs were not traced for ran eager: %s", _shapes(inputs))
        return self.step(*inputs)

    # ------------------------------------------------------------------ warmup

    @torch.inference_mode()
    def warm(self) -> str:
        """Load the saved graphs and their verdict, or trace, save and time them (call before any request
        is admitted: timing writes K/V into the pool's first blocks). Timing runs a few batch sizes up to
        the cap, plain and after a shared prefix (cascade attention, where the runner takes it); each graph
        then runs the batches up to the largest size where it measured faster at that size and every
        smaller one: at the top eager can win (an int8 plan's eager step dequantizes its weights for 64+
        rows, which a graph cannot), and that must not cost the small batches their graph. Returns a line
        for the log."""
        if not compiled_cache.available():
            return f"decode steps run eager: torch {torch.__version__} cannot save compiled graphs (2.10+ can)"
        plain, shared = self._timed_shapes()
        started = time.monotonic()
        try:
            how = self._load_or_trace(plain, shared)
        except Exception as exc:  # no C++ compiler, an op inductor cannot take: eager still works
            log.debug("tracing the decode step failed", exc_info=True)
            return f"decode steps run eager: torch.compile failed ({type(exc).__name__}: {exc!s:.160})"
        how = f"{how} in {time.monotonic() - started:.1f} s"
        if not self._read_verdict(plain + shared):
            for shape in plain + shared:
                self.measured[shape] = self._time(shape, TIMED_STEPS)
            self._write_verdict()
            how += ", timed now"
        else:
            how += f", timings read back from {VERDICT_FILE} (delete the folder to time again)"
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
        return f"decode steps: {verdict}; graphs {how}; {timings}"

    def _timed_shapes(self) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """(batch, width, prefix) timed without and with a shared prefix; the first of each kind traces its graph.
        Sizes of a trace all distinct: torch gives equal sizes one symbol ("duck sizing"), and a graph traced
        with batch == width would refuse the first step where they differ."""
        top = self.runner.max_batch
        sizes = sorted({1, *(b for b in (8, top // 2, top - 1) if 1 < b < top), top})
        width = next(w for w in (9, 10, 11, 12) if w not in sizes)
        prefix = next(p for p in (5, 6, 7, 13) if p not in sizes)
        plain = [(b, width, 0) for b in sizes]
        shared = [(b, width, prefix) for b in sizes if b > 1] if self.runner.shares_prefixes else []
        return plain, shared

    def _load_or_trace(self, plain, shared) -> str:
        """Every graph this runner uses, from the folder where saved there, else traced (on the cap's shape:
        one row; the cap; the cap after a shared prefix) and saved. Says which happened."""
        examples = {graph_name(b, p): (b, w, p) for b, w, p in dict.fromkeys([plain[0], plain[-1], *shared[-1:]])}
        traced = []
        for name, shape in examples.items():
            path = self.folder / f"{name}.bin"
            graph = compiled_cache.load(path, self.step)
            if graph is None:
                graph = compiled_cache.trace(self.step, self._inputs(*shape))
                compiled_cache.save(graph, path, self.step)
                traced.append(name)
            graph.disable_guard_check()  # _call checks once, and runs eager where the check fails
            self.graphs[name] = graph
        self.loaded = not traced
        if self.loaded:
            return f"loaded from {self.folder}"
        return f"traced ({', '.join(traced)}) and saved to {self.folder}"

    def _graph_for(self, shape: tuple[int, int, int]):
        batch, _, prefix = shape
        return self.graphs[graph_name(batch, prefix)]

    def _read_verdict(self, shapes) -> bool:
        """The timings saved with these graphs, when they cover `shapes` (a restart measures nothing: a
        neighbour busy at that moment would flip the verdict); only for graphs this process did not trace."""
        if not self.loaded:
            return False
        try:
            saved = json.loads((self.folder / VERDICT_FILE).read_text())
            measured = {tuple(row[:3]): (float(row[3]), float(row[4])) for row in saved}
        except (OSError, ValueError, TypeError, IndexError):
            return False
        if not all(shape in measured for shape in shapes):
            return False
        self.measured = {shape: measured[shape] for shape in shapes}
        return True

    def _write_verdict(self) -> None:
        rows = [[*shape, eager, compiled] for shape, (eager, compiled) in self.measured.items()]
        try:
            tmp = self.folder / f"{VERDICT_FILE}.tmp"
            tmp.write_text(json.dumps(rows))
            tmp.replace(self.folder / VERDICT_FILE)
        except OSError as exc:
            log.warning("cannot save the decode timings (%s): the next start times them again", exc)

    def _faster_up_to(self, shapes: list[tuple[int, int, int]]) -> int:
        """The largest batch of `shapes` (ascending) where compiled measured faster there and at every smaller one."""
        up_to = 0
        for shape in shapes:
            eager, compiled = self.measured[shape]
            if compiled >= eager:
                break
            up_to = shape[0]
        return up_to

    def _inputs(self, batch: int, width: int, prefix: int) -> tuple:
        """A decode step's inputs for `batch` rows of `width` blocks each (blocks 0.., one run per row, as
        sequences admitted together get them), after `prefix` blocks all rows share."""
        bs = self.runner.block_size
        ids = torch.zeros(batch, dtype=torch.long)
        positions = torch.full((batch,), (prefix + width) * bs - 1, dtype=torch.long)
        tables = (prefix + torch.arange(batch * width).view(batch, width)) % self.runner.cache.num_blocks
        rows = tables[:, -1] * bs + bs - 1
        shared = (torch.arange(prefix),) if prefix else ()
        return (ids, positions, rows, positions + 1 - prefix * bs, tables, *shared)

    def _time(self, shape: tuple[int, int, int], steps: int) -> tuple[float, float]:
        """(eager, compiled) ms of a decode step of `shape`, each the fastest of `steps` taken in turn, after
        one untimed: a busy neighbour slows a step, never speeds one up, and slows both ways alike."""
        inputs, graph = self._inputs(*shape), self._graph_for(shape)
        runs = (lambda: self.step(*inputs), lambda: graph(self.step, *inputs))
        fastest = [math.inf, math.inf]
        for i in range(2 * steps + 2):
            start = time.perf_counter()
            runs[i % 2]().argmax(dim=-1).tolist()
            if i >= 2:
                fastest[i % 2] = min(fastest[i % 2], (time.perf_counter() - start) * 1000)
        return fastest[0], fastest[1]


def _shapes(inputs: tuple) -> str:
    return ", ".join(f"{tuple(t.shape)}" for t in inputs)
