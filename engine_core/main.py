"""Entry point of one engine process: plan, say hello, load, warm up, serve until told to stop.

Started by `cli.py serve` (one per device, as children) or by `cli.py engine` (one more engine
attaching to a running frontend, possibly from another machine). Usage:
python -m engine_core.main --input ADDR --output ADDR --model PATH --model-name NAME --engine-id ID
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time

import msgspec

from model.source import use_kiln_inductor_cache
from planning.plan import PlanOverrides, ServingPlan

log = logging.getLogger("kiln.engine")

HANDSHAKE_TIMEOUT_S = 15.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engine_core.main")
    p.add_argument("--input", required=True, help="frontend's request socket (ROUTER)")
    p.add_argument("--output", required=True, help="frontend's output socket (PULL)")
    p.add_argument("--model", required=True, help="local HF folder or hub id")
    p.add_argument("--model-name", required=True)
    p.add_argument("--engine-id", required=True)
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index; none = CPU")
    p.add_argument("--overrides", default="{}", help="PlanOverrides as JSON")
    p.add_argument("--watch-pid", type=int, default=None, help="exit when this process (the frontend) goes away")
    return p.parse_args(argv)


def build_plan(model_path: str, gpu: int | None, overrides: PlanOverrides) -> ServingPlan:
    """The plan for this engine; a CPU engine first times the weight formats unless the cache has them."""
    from hardware.profile import detect_hardware
    from model.shape import load_model_shape
    from planning.planner import make_plan

    shape = load_model_shape(model_path)
    profile = detect_hardware(shape)
    if gpu is None:
        from engine_core.cpu_formats import with_measured_cpu_formats

        profile = with_measured_cpu_formats(msgspec.structs.replace(profile, gpus=[]), shape, overrides)
    return make_plan(shape, profile, overrides, gpu_index=gpu)


def run_engine(
    *,
    input_address: str,
    output_address: str,
    model_path: str,
    model_name: str,
    engine_id: str,
    gpu: int | None = None,
    overrides: PlanOverrides = PlanOverrides(),
    watch_pid: int | None = None,
    secret: str | None = None,
) -> int:
    """The whole life of an engine; returns the process exit code."""
    from engine_core.engine_io import EngineIO
    from ipc.messages import EngineFailed, EngineHello, EngineReady
    from ipc.security import CurveKeys

    if gpu is not None:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    io = EngineIO(engine_id, input_address, output_address, watch_pid, CurveKeys(secret) if secret else None)
    try:
        plan = build_plan(model_path, gpu, overrides)
    except Exception as exc:
        io.start(None)
        io.send(EngineFailed(engine_id=engine_id, message=f"cannot plan {model_name} on this machine: {exc}"))
        io.close()
        log.error("cannot plan: %s", exc)
        return 2
    io.start(
        EngineHello(
            engine_id=engine_id,
            pid=os.getpid(),
            device=plan.device,
            model=model_name,
            plan=plan,
            node=os.environ.get("KILN_NODE") or socket.gethostname(),
        )
    )
    if io.wait_welcome(HANDSHAKE_TIMEOUT_S) is None:
        log.error(
            "no answer from a frontend at %s within %.0f s: is it running there, and is the secret the "
            "same on both sides?",
            input_address,
            HANDSHAKE_TIMEOUT_S,
        )
        return 5
    from planning.report import format_plan_table

    log.info("serving plan for %s:\n%s", model_name, format_plan_table(plan))
    try:
        started = time.monotonic()
        engine = load_engine(io, model_path, plan)
        load_seconds = time.monotonic() - started
    except Exception as exc:
        log.exception("loading failed")
        io.send(EngineFailed(engine_id=engine_id, message=f"loading {model_name} failed: {exc}"))
        io.close()
        return 3
    log.info("ready in %.1f s", load_seconds)
    io.send(EngineReady(engine_id=engine_id, load_seconds=load_seconds))
    signal.signal(signal.SIGTERM, lambda *_: setattr(engine, "running", False))
    engine.run()
    io.close()
    return 0


def load_engine(io, model_path: str, plan: ServingPlan):
    import torch

    from engine_core.engine import Engine
    from engine_core.fault_injection import inject_faults
    from engine_core.guided import GuideCompiler
    from engine_core.loader import compile_model, load_model

    model = load_model(model_path, plan)
    if plan.compile:
        use_kiln_inductor_cache()
    if plan.compile and plan.device != "cpu":  # on CPU the runner compiles its decode step whole
        log.info(compile_model(model))
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    # constrained decoding needs the model's tokenizer: loaded on the grammar worker, not delaying readiness
    guides = GuideCompiler.for_model(model_path, model.config.get_text_config().vocab_size, eos_ids)
    engine = Engine(io, model, plan, eos_ids, torch.device(plan.device), guides)
    engine.warmup()
    inject_faults(engine)  # tests only: KILN_FAULT_INJECTION
    return engine


def configure_logging(engine_id: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s engine {engine_id} %(levelname)s %(message)s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.engine_id)
    use_kiln_inductor_cache()  # before anything in torch asks inductor for its cache folder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend stops its engines itself
    return run_engine(
        input_address=args.input,
        output_address=args.output,
        model_path=args.model,
        model_name=args.model_name,
        engine_id=args.engine_id,
        gpu=args.gpu,
        watch_pid=args.watch_pid,
        overrides=msgspec.json.decode(args.overrides, type=PlanOverrides),
        secret=os.environ.get("KILN_SECRET"),
    )


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # daemon socket threads may sit in recv(); nothing is left to flush
