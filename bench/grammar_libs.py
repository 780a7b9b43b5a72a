"""xgrammar vs llguidance on this machine, with the served model's tokenizer: the measurement behind
the choice of grammar library for constrained decoding (issue 22; bench/RESULTS.md has the numbers).

`python -m bench.grammar_libs [--model DIR] [--threads 2] [--steps 64]`

For each JSON schema in tests/fixtures/json_schemas/: a seeded random walk through its language
(random allowed tokens until end-of-sequence is allowed, or `--steps` tokens) fixes one token path.
Then each installed library compiles every schema (timed) and replays the same paths, timing every
mask fill. Both are held to the same JSON layout (json.dumps' separators, no free whitespace). A
schema that is slow to compile is timed while another thread ticks every millisecond (does the
library hold the GIL meanwhile?), and applying a packed mask to a batch of logits is timed last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMAS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "json_schemas"
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # llguidance
# slow to compile somewhere: 200 required string properties, each with its own pattern
HEAVY_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {f"k{i}": {"type": "string", "pattern": f"^[a-z0-9]{{3,{20 + i}}}$"} for i in range(200)},
        "required": [f"k{i}" for i in range(200)],
    }
)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int, threads: int):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, schema: str):
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(schema, any_whitespace=False))

    def fill(self, matcher) -> None:
        matcher.fill_next_token_bitmask(self.bitmask, 0)

    def advance(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int, threads: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def compile(self, schema: str):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT_JSON)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def fill(self, matcher) -> None:
        self.llg.torch.fill_next_token_bitmask(matcher, self.bitmask, 0)

    def advance(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


LIBRARIES = {"xgrammar": XGrammar, "llguidance": LLGuidance}


@dataclass
class LibResult:
    name: str
    setup_s: float = 0.0  # tokenizer wrapped for the library (once per engine)
    compile_ms: list[float] = field(default_factory=list)  # per schema
    first_mask_ms: list[float] = field(default_factory=list)  # per schema: a lazy library works here
    mask_us: list[float] = field(default_factory=list)  # every later mask fill, all schemas
    rejected: int = 0  # walked tokens this library refused (the paths come from the first library)
    heavy: dict = field(default_factory=dict)


def allowed_ids(bitmask_row, vocab: int) -> list[int]:
    import torch

    bits = (bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].nonzero().flatten().tolist()


def random_path(lib, schema: str, eos: int, vocab: int, steps: int, rng: random.Random) -> list[int]:
    matcher, path = lib.compile(schema), []
    for _ in range(steps):
        lib.fill(matcher)
        ids = allowed_ids(lib.bitmask[0], vocab)
        if not ids or eos in ids:
            break
        path.append(rng.choice(ids))
        lib.advance(matcher, path[-1])
    return path


def measure(lib, schemas: list[str], paths: list[list[int]], setup_s: float) -> LibResult:
    result = LibResult(lib.name, setup_s)
    for schema, path in zip(schemas, paths):
        start = time.perf_counter()
        matcher = lib.compile(schema)
        result.compile_ms.append((time.perf_counter() - start) * 1e3)
        for step, token in enumerate(path):
            start = time.perf_counter()
            lib.fill(matcher)
            elapsed = time.perf_counter() - start
            if step == 0:
                result.first_mask_ms.append(elapsed * 1e3)
            else:
                result.mask_us.append(elapsed * 1e6)
            if not lib.advance(matcher, token):
                result.rejected += 1
                break
    result.heavy = heavy_compile(lambda: lib.fill(lib.compile(HEAVY_SCHEMA)))
    return result


def heavy_compile(compile_and_first_mask) -> dict[str, float]:
    """Compile HEAVY_SCHEMA and fill its first mask on a worker thread while this thread ticks every
    millisecond: the longest tick gap says whether the library holds the GIL while it works (the engine's
    busy loop would stall that long)."""
    done = threading.Event()

    def work():
        compile_and_first_mask()
        done.set()

    start = last = time.perf_counter()
    threading.Thread(target=work, daemon=True).start()
    gap = 0.0
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    return {"seconds": round(time.perf_counter() - start, 3), "longest_tick_gap_ms": round(gap * 1e3, 1)}


def apply_mask_us(vocab: int, batch: int, repeats: int = 50) -> dict[str, float]:
    """A packed bitmask applied to float32 logits on CPU, best of `repeats`: the engine's way (numpy unpacks
    the bits, torch masks the rows; engine_core/sampler.py) and xgrammar's CPU kernel when installed
    (llguidance's own helper is torch.compile'd: an inductor compile at first use, not timed). The masks
    look like real ones: half the rows allow one token (JSON structure), half all but a few (a string)."""
    import numpy as np
    import torch

    logits = torch.randn(batch, vocab)
    bitmask = torch.zeros((batch, (vocab + 31) // 32), dtype=torch.int32)
    bitmask[: batch // 2, 0] = 1
    bitmask[batch // 2 :] = -1
    bitmask[batch // 2 :, :4] = 0x7FFF7FFF
    rows = torch.arange(batch)

    def engine_way():
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        masked = logits.clone()
        masked[rows] = masked[rows].masked_fill_(~torch.from_numpy(bits.view(np.bool_)), float("-inf"))

    timings = {f"numpy unpack + torch masked_fill, {batch} rows": engine_way}
    if importlib.util.find_spec("xgrammar"):
        import xgrammar as xgr

        timings[f"xgrammar cpu kernel, {batch} rows"] = lambda: xgr.apply_token_bitmask_inplace(logits.clone(), bitmask)
    out = {}
    for name, fn in timings.items():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        out[name] = round(best * 1e6, 1)
    return out


def summary(result: LibResult, tokens: int) -> dict:
    masks = sorted(result.mask_us)
    return {
        "setup_s": round(result.setup_s, 2),
        "compile_ms_total": round(sum(result.compile_ms), 1),
        "compile_ms_median": round(statistics.median(result.compile_ms), 2),
        "compile_ms_max": round(max(result.compile_ms), 1),
        "first_mask_ms_median": round(statistics.median(result.first_mask_ms), 2),
        "first_mask_ms_max": round(max(result.first_mask_ms), 2),
        "mask_us_median": round(statistics.median(masks), 1),
        "mask_us_p99": round(masks[int(0.99 * (len(masks) - 1))], 1),
        "mask_us_max": round(masks[-1], 1),
        "tokens_replayed": f"{len(masks) + len(result.first_mask_ms)} of {tokens}",
        "rejected_paths": result.rejected,
        "heavy_schema": result.heavy,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.grammar_libs", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    parser.add_argument("--threads", type=int, default=2, help="torch's and xgrammar's compile threads")
    parser.add_argument("--steps", type=int, default=64, help="most tokens walked per schema")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from model.source import resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = len(tokenizer)
    schemas = [p.read_text() for p in sorted(SCHEMAS.glob("*.json"))]
    libs, setup = [], {}
    for name, cls in LIBRARIES.items():
        if importlib.util.find_spec(name):
            start = time.perf_counter()
            libs.append(cls(tokenizer, vocab, args.threads))
            setup[name] = time.perf_counter() - start
    rng = random.Random(args.seed)
    paths = [random_path(libs[0], s, tokenizer.eos_token_id, vocab, args.steps, rng) for s in schemas]
    tokens = sum(len(p) for p in paths)
    report = {"model": path, "vocab": vocab, "schemas": len(schemas), "paths_from": libs[0].name, "libraries": {}}
    for lib in libs:
        report["libraries"][lib.name] = summary(measure(lib, schemas, paths, setup[lib.name]), tokens)
    report["apply_mask_us"] = apply_mask_us(vocab, 16)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
