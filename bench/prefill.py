"""Prompt processing (prefill) speed of a model in-process, per CPU weight format, beside llama.cpp's server.

`python -m bench.prefill [--model DIR] [--tokens 2000] [--chunk 256] [--rounds 3] [--threads 2]
 [--formats int8,int8-kernel,bfloat16,float32] [--llama-cpp] [--profile FORMAT]`

Each format is loaded as engine_core/loader.py loads it (transformers at the plan's dtype; "int8" with
its linears swapped for Int8Linear and the probe's timings saying from how many rows a call is
dequantized to bf16; "int8-kernel" is int8 with every call through the int8 kernel, as before the
probe timed prompt chunks), with transformers' own SDPA attention and a DynamicCache, not the engine:
this times the model's prefill, chunk by chunk with the last row's logits only, as the engine's
steps compute it. llama.cpp's server (F16 from the same embedded weights, bench/llama_cpp.py) gets
the same token ids through /completion with its prompt cache off and reports its own
`timings.prompt_per_second`. Rounds interleave every run; median and worst per run.
`--profile FORMAT` splits one prefill's time between linears, attention and the rest (torch profiler).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

FORMATS = ("int8", "int8-kernel", "bfloat16", "float32")
PROMPT_FILE = Path(__file__).resolve().parent / "prompts" / "pep-0008.txt"  # the long-prompt benches' document
LINEAR_OPS = ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::bmm")
DEQUANT_OPS = ("aten::_to_copy", "aten::copy_", "aten::mul_", "aten::cat")  # also other casts: an upper bound
ATTENTION_MARK = "scaled_dot_product"


def prompt_ids(tokenizer, tokens: int) -> list[int]:
    """The first `tokens` token ids of PEP 8 (repeated if it is shorter)."""
    ids = tokenizer(PROMPT_FILE.read_text()).input_ids
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


def format_timings(shape) -> dict[str, float]:
    """This machine's cached probe timings for `shape`, measured now when none are cached."""
    from engine_core.cpu_formats import measure_cpu_formats
    from hardware.profile import read_cpu_format_ms

    return read_cpu_format_ms(shape) or measure_cpu_formats(shape)


def load(path: str, fmt: str, timings: dict[str, float]):
    """The model as the loader would hold it in `fmt`, with SDPA attention."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine_core.int8_weights import quantize_linears

    dtype = torch.float32 if fmt == "float32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, low_cpu_mem_usage=True, attn_implementation="sdpa")
    model.eval()
    if fmt.startswith("int8"):
        print(f"{fmt}: {quantize_linears(model, timings if fmt == 'int8' else None)}", file=sys.stderr)
    return model


def prefill_seconds(model, ids: list[int], chunk: int) -> float:
    """Wall time of one prefill of `ids` in `chunk`-token steps, the last row's logits per step."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    start = time.perf_counter()
    with torch.inference_mode():
        for begin in range(0, len(ids), chunk):
            piece = torch.tensor([ids[begin : begin + chunk]])
            positions = torch.arange(begin, begin + piece.shape[1])[None]
            model(input_ids=piece, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def llama_prompt_per_second(url: str, ids: list[int]) -> float:
    """llama-server's own prompt tokens/s for `ids`, its prompt cache off so every token is computed."""
    body = json.dumps({"prompt": ids, "n_predict": 1, "cache_prompt": False, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        timings = json.loads(response.read())["timings"]
    if timings["prompt_n"] != len(ids):
        raise RuntimeError(f"llama-server computed {timings['prompt_n']} prompt tokens, not {len(ids)}")
    return float(timings["prompt_per_second"])


def profile_split(model, ids: list[int], chunk: int) -> dict[str, float]:
    """Seconds of one prefill by kind of op (self CPU time): linears, attention, casts/scales, the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = prefill_seconds(model, ids, chunk)
    split = {"linears": 0.0, "attention": 0.0, "casts, scales, copies": 0.0, "rest": 0.0}
    top = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        top.append((seconds, event.key))
        if event.key in LINEAR_OPS:
            split["linears"] += seconds
        elif ATTENTION_MARK in event.key or "flash_attention" in event.key:
            split["attention"] += seconds
        elif event.key in DEQUANT_OPS:
            split["casts, scales, copies"] += seconds
        else:
            split["rest"] += seconds
    for seconds, key in sorted(top, reverse=True)[:12]:
        print(f"  {seconds * 1e3:8.1f} ms  {key}", file=sys.stderr)
    split["wall (profiled)"] = wall
    return split


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "worst": min(values), "runs": values}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.prefill", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a model folder (default: kiln's default model)")
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--chunk", type=int, default=256, help="prompt tokens per step, as the plan's prefill_chunk")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--llama-cpp", action="store_true", help="also llama.cpp's server, F16 (pip install -e .[peers])")
    p.add_argument("--profile", default=None, metavar="FORMAT", help="split one prefill of FORMAT by kind of op")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from model.shape import shape_from_config
    from model.source import resolve_model

    torch.set_num_threads(args.threads)
    path = args.model or resolve_model(None).path
    ids = prompt_ids(AutoTokenizer.from_pretrained(path), args.tokens)
    formats = [f for f in args.formats.split(",") if f]
    timings = format_timings(shape_from_config(json.loads((Path(path) / "config.json").read_text())))
    models = {fmt: load(path, fmt, timings) for fmt in formats}
    for model in models.values():  # warm-up: oneDNN and MKL prepare their kernels on first use
        prefill_seconds(model, ids[: args.chunk * 2], args.chunk)
    rates: dict[str, list[float]] = {fmt: [] for fmt in formats}
    with llama_server(args) as url:
        if url:
            rates["llama.cpp F16"] = []
            llama_prompt_per_second(url, ids[:64])  # warm-up
        for round_ in range(args.rounds):
            for fmt, model in models.items():
                rates[fmt].append(len(ids) / prefill_seconds(model, ids, args.chunk))
            if url:
                rates["llama.cpp F16"].append(llama_prompt_per_second(url, ids))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), file=sys.stderr)
    result = {
        "prompt_tokens": len(ids),
        "chunk": args.chunk,
        "threads": args.threads,
        "probe_ms": timings,
        "tokens_per_s": {k: summary(v) for k, v in rates.items()},
    }
    for name, stats in result["tokens_per_s"].items():
        print(f"{name:>14}: {stats['median']:7.1f} prompt tok/s median, {stats['worst']:7.1f} worst")
    if args.profile:
        model = models.get(args.profile) or load(path, args.profile, timings)
        split = profile_split(model, ids, args.chunk)
        result["profile"] = {"format": args.profile, "seconds": split}
        print(f"profile of one {args.profile} prefill: " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def llama_server(args):
    """A context yielding llama-server's URL (one slot, prompt-sized context), or None without --llama-cpp."""
    import contextlib

    if not args.llama_cpp:
        return contextlib.nullcontext(None)
    from bench import llama_cpp
    from bench.server_proc import free_port, running_server

    setup = llama_cpp.prepare(None, llama_cpp.DEFAULT_QUANT)
    port = free_port()
    context = llama_cpp.context_size(1, args.tokens + 8, 8)  # room for the ids and the one token it generates
    cmd = llama_cpp.server_command(setup, port, users=1, context=context, threads=args.threads)
    return running_server(cmd, f"http://127.0.0.1:{port}", name="llama.cpp")


if __name__ == "__main__":
    sys.exit(main())
