"""Entry point of one engine process: plan, say hello, load, warm up, serve until told to stop.

Started by `cli.py serve` (one per device) or `cli.py engine` (attach one more). Usage:
python -m engine_core.main --input ADDR --output ADDR --model PATH --model-name NAME --engine-id ID
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import msgspec

from hardware.plan import PlanOverrides, ServingPlan

log = logging.getLogger("kiln.engine")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engine_core.main")
    p.add_argument("--input", required=True, help="frontend's request socket (ROUTER)")
    p.add_argument("--output", required=True, help="frontend's output socket (PULL)")
    p.add_argument("--model", required=True, help="local HF folder or hub id")
    p.add_argument("--model-name", required=True)
    p.add_argument("--engine-id", required=True)
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index; none = CPU")
    p.add_argument("--overrides", default="{}", help="PlanOverrides as JSON")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process goes away")
    return p.parse_args(argv)


def build_plan(model_path: str, gpu: int | None, overrides: PlanOverrides) -> ServingPlan:
    from hardware.model_config import load_model_shape
    from hardware.planner import make_plan
    from hardware.profile import detect_hardware

    profile = detect_hardware()
    if gpu is None:
        profile = msgspec.structs.replace(profile, gpus=[])
    return make_plan(load_model_shape(model_path), profile, overrides, gpu_index=gpu)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s engine {args.engine_id} %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the whole group; the frontend stops us
    if args.gpu is not None:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    from engine_core import engine as core

    io = core.EngineIO(args.engine_id, args.input, args.output, args.parent_pid)
    io.start_output()
    try:
        plan = build_plan(args.model, args.gpu, msgspec.json.decode(args.overrides, type=PlanOverrides))
    except Exception as exc:
        core.failed(io, f"cannot plan for {args.model_name}: {exc}")
        time.sleep(0.5)
        return 2
    core.announce(io, plan.device, args.model_name, plan)
    try:
        started = time.monotonic()
        engine = load_engine(io, args.model, plan)
        load_seconds = time.monotonic() - started
    except Exception as exc:
        log.exception("loading failed")
        core.failed(io, f"loading {args.model_name} failed: {exc}")
        time.sleep(0.5)
        return 3
    log.info("ready in %.1f s: %s, batch %d x context %d", load_seconds, plan.dtype, plan.max_batch, plan.max_context)
    io.start_input()
    core.ready(io, load_seconds)
    signal.signal(signal.SIGTERM, lambda *_: setattr(engine, "running", False))
    engine.run()
    io.close()
    return 0


def load_engine(io, model_path: str, plan: ServingPlan):
    import torch

    from engine_core.engine import Engine
    from engine_core.loader import compile_model, load_model

    model = load_model(model_path, plan)
    if plan.compile:
        log.info(compile_model(model))
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    device = torch.device(plan.device if not plan.offload else "cuda:0" if plan.device.startswith("cuda") else "cpu")
    engine = Engine(io, model, plan, eos_ids, device)
    engine.warmup()
    return engine


if __name__ == "__main__":
    sys.exit(main())
