"""kiln: host a causal language model behind HTTP, sized to the machine it runs on.

    python cli.py serve [--model M] [--port 8000]      run the server
    python cli.py plan [--model M] [--gpu T4:16GiB:7.5] what the server would do on a machine
    python cli.py bench --stream --users 10            throughput and TTFT under load
    python cli.py engine --gpu 1                       attach one more engine to a running server
"""
from __future__ import annotations

import sys

import click

from hardware.plan import PlanOverrides


def plan_overrides(compile_=None, **flags) -> PlanOverrides:
    """Flags beat env vars (QUANTIZATION, ENABLE_COMPILE), which beat the planner's heuristics."""
    import os

    from hardware.overrides import resolve_overrides

    try:
        return resolve_overrides(os.environ, compile=compile_, **flags)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def plan_options(command):
    options = [
        click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="weight dtype"),
        click.option("--quantization", type=click.Choice(["nf4", "4bit", "none"]),
                     help="nf4/4bit: bitsandbytes NF4 + double quant; none: 16-bit (env QUANTIZATION)"),
        click.option("--max-batch", type=click.IntRange(1, 256), help="concurrent sequences"),
        click.option("--max-context", type=click.IntRange(16), help="context window in tokens"),
        click.option("--gpu-memory-fraction", type=click.FloatRange(0.05, 1.0), help="share of GPU memory to use"),
        click.option("--cpu-offload/--no-cpu-offload", default=None, help="force or forbid CPU offload"),
        click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile (env ENABLE_COMPILE=1)"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(help=__doc__)
def cli() -> None:
    pass


@cli.command(help="Run the HTTP server with one engine per device.")
@click.option("--model", default=None, help="hub id, HF folder or .gguf file (env BASE_MODEL; default: embedded SmolLM2-135M-Instruct)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@plan_options
def serve(model, host, port, **plan_flags) -> None:
    from frontend.server import ServeConfig, serve as run_server

    config = ServeConfig(model=model, host=host, port=port, overrides=plan_overrides(**plan_flags))
    sys.exit(run_server(config))


@cli.command(help="Print the serving plan for this machine, or for a simulated one, without loading weights.")
@click.option("--model", default=None, help="folder with config.json, .gguf file or hub id (default: embedded model)")
@click.option("--gpu", "gpus", multiple=True, metavar="NAME:MEMORY:CC", help="simulate a GPU, e.g. T4:16GiB:7.5 (repeatable)")
@click.option("--ram", default=None, metavar="SIZE", help="simulate this much system RAM, e.g. 16GiB")
@click.option("--cpu-only", is_flag=True, help="simulate a machine without GPUs")
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of the table")
@plan_options
def plan(model, gpus, ram, cpu_only, as_json, **plan_flags) -> None:
    from hardware.report import run_plan_command

    sys.exit(run_plan_command(model, gpus, ram, cpu_only, as_json, plan_overrides(**plan_flags)))


if __name__ == "__main__":
    cli()
