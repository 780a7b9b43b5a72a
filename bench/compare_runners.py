"""Decode step time of two ModelRunner implementations on the same model object, interleaved.

    git show bb7c616:engine_core/model_runner.py > /tmp/old_model_runner.py
    python -m bench.compare_runners /tmp/old_model_runner.py --dtype bfloat16 --threads 2

Used to show a runner rewrite does not regress (bench/RESULTS.md). Both runners get the same loaded
model, the same prompts and the same step driver (bench.step_time.time_decode); rounds alternate so a
noisy machine slows both alike. Imports engine internals on purpose: it measures the step.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics


def load_runner_class(path: str):
    spec = importlib.util.spec_from_file_location("other_model_runner", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ModelRunner


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other_runner", help="a model_runner.py file to compare against the current one")
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    from bench.step_time import time_decode
    from engine_core.loader import load_model
    from engine_core.main import build_plan
    from engine_core.model_runner import ModelRunner
    from model.source import resolve_model
    from planning.plan import PlanOverrides

    torch.set_num_threads(args.threads)
    path = args.model or resolve_model(None).path
    plan = build_plan(path, None, PlanOverrides(dtype=args.dtype, max_batch=10, max_context=1024))
    model = load_model(path, plan)
    cpu = torch.device("cpu")
    other = load_runner_class(args.other_runner)(model, 10, 1024, cpu, torch.float32)
    other.max_batch = 10  # older runners did not keep it; the step driver sizes its scheduler by it
    runners = {"other": other, "current": ModelRunner(model, 10, 1024, cpu, torch.float32)}
    times: dict[tuple[str, int], list[float]] = {(name, b): [] for name in runners for b in (1, 10)}
    for _ in range(args.rounds):
        for batch in (1, 10):
            for name, runner in runners.items():
                times[(name, batch)] += time_decode(runner, batch, 128, 15)
    for batch in (1, 10):
        o, c = statistics.median(times[("other", batch)]), statistics.median(times[("current", batch)])
        print(
            f"{args.dtype} threads={args.threads} batch {batch:>2}: other {o:6.1f} ms  current {c:6.1f} ms  "
            f"(current/other {c / o:.2f})"
        )


if __name__ == "__main__":
    main()
