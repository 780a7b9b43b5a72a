"""Decode step time of the engine's own runner, beside the memory-bandwidth roofline.

`python -m bench.step_time --model DIR [--dtype bfloat16] [--quantization nf4|none] --batches 1,4,10,16`

The model is planned and loaded exactly as `serve` would (planner + loader), then the engine's
`ModelRunner` (with CUDA graphs where the engine would use them) runs decode steps for B
sequences of `--prompt` cached tokens each, sampling greedily on the device as the engine does.
The roofline is the time to read every weight byte once per step at the copy bandwidth measured
on this device just before: a decode step cannot be faster than that. This benchmark imports the
engine's internals on purpose: it measures the step, not the server (`cli.py bench` does that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def copy_bandwidth(device) -> float:
    """Bytes moved per second (read + written) by a large device-to-device copy; 0 on CPU."""
    import torch

    if device.type != "cuda":
        return 0.0
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    del src, dst
    return 2 * (1 << 30) / seconds


def load(model: str, overrides, max_batch: int, context: int):
    import torch

    from engine_core.loader import load_model, torch_dtype
    from engine_core.main import build_plan
    from engine_core.model_runner import ModelRunner

    gpu = 0 if torch.cuda.is_available() else None
    plan = build_plan(model, gpu, overrides)
    device = torch.device(plan.device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context first: peak statistics need it
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    loaded = load_model(model, plan)
    if plan.compile and device.type != "cpu":  # on CPU the runner compiles its decode step whole
        from engine_core.loader import compile_model

        print(compile_model(loaded), flush=True)
    weights = (
        (torch.cuda.memory_allocated(device) - before)
        if device.type == "cuda"
        else sum(t.numel() * t.element_size() for t in (*loaded.parameters(), *loaded.buffers()))
    )  # int8 weights are buffers
    kv_dtype = torch_dtype(plan.kv_dtype or plan.dtype)
    runner = ModelRunner(
        loaded, max_batch, context, device, kv_dtype, cuda_graphs=plan.cuda_graphs, compiled_decode=plan.compile
    )
    return plan, runner, weights


def time_decode(runner, batch: int, prompt: int, steps: int) -> list[float]:
    """Milliseconds per decode step for `batch` sequences with `prompt` cached tokens."""
    import torch

    from engine_core.scheduler import Scheduler
    from ipc.messages import Request, SamplingParams

    sched = Scheduler(runner.max_batch, max(prompt, 1) * batch, runner.max_context, eos_token_ids=set())
    params = SamplingParams(max_new_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        sched.add(Request(f"b{i}", [(7 * i + j) % 1000 + 1 for j in range(prompt)], params))
    times: list[float] = []
    for step in range(steps + 3):  # the first step is the prefill, two more warm up
        chunks = sched.schedule()
        start = time.perf_counter()
        logits = runner.forward(chunks).sample
        tokens = torch.argmax(logits, dim=-1).tolist()  # the engine's one device-to-host copy
        elapsed = time.perf_counter() - start
        if step >= 3:
            times.append(elapsed * 1000)
        sched.update(chunks, tokens)
    for seq in list(sched.by_id.values()):
        sched.finish(seq.request_id)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.step_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quantization", default=None, choices=["nf4", "none"])
    p.add_argument("--batches", default="1,4,10,16")
    p.add_argument("--prompt", type=int, default=128, help="cached tokens per sequence")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force compile on or off (default: the plan's choice, as serve makes it)",
    )
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)

    import torch

    from model.source import use_kiln_inductor_cache
    from planning.plan import PlanOverrides

    use_kiln_inductor_cache()
    batches = [int(b) for b in args.batches.split(",")]
    forced = {"dtype": args.dtype, "quantization": args.quantization}
    overrides = PlanOverrides(
        **{k: v for k, v in forced.items() if v is not None},
        compile=args.compile,
        max_batch=max(batches),
        max_context=args.context,
    )
    plan, runner, weights = load(args.model, overrides, max(batches), args.context)
    if runner.compiled is not None:  # CPU: compile (and measure against eager) as the engine's warmup does
        print(runner.compiled.warm(), flush=True)
    elif plan.compile:  # compile every decode shape before timing (capture needs it done outside the graph)
        for batch in batches:
            time_decode(runner, batch, args.prompt, 1)
    graphs = runner.graphs.capture_all() if runner.graphs is not None else "eager (no CUDA graphs on this plan)"
    bandwidth = copy_bandwidth(runner.device)
    roofline_ms = weights / bandwidth * 1000 if bandwidth else None
    result = {
        "model": args.model,
        "device": plan.device,
        "dtype": plan.dtype,
        "quantization": plan.quantization,
        "weights_bytes_measured": weights,
        "weights_bytes_planned": plan.weights_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "roofline_ms": roofline_ms,
        "graphs": graphs,
        "prompt_tokens": args.prompt,
        "steps": {},
    }
    if runner.device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(runner.device)
    for batch in batches:
        times = time_decode(runner, batch, args.prompt, args.steps)
        median = statistics.median(times)
        result["steps"][str(batch)] = {
            "ms_p50": median,
            "ms_min": min(times),
            "tokens_per_s": batch * 1000 / median,
            "roofline_fraction": roofline_ms / median if roofline_ms else None,
        }
        print(
            f"batch {batch:>2}: {median:7.2f} ms/step (min {min(times):.2f})"
            + (f", {roofline_ms / median:.0%} of the roofline {roofline_ms:.2f} ms" if roofline_ms else ""),
            flush=True,
        )
    print(f"{graphs}; weights {weights / 2**30:.2f} GiB measured, {plan.weights_bytes / 2**30:.2f} GiB planned")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
