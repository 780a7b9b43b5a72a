"""kiln: host a causal language model behind HTTP, sized to the machine it runs on.

    python cli.py serve [--model M] [--port 8000]      run the server
    python cli.py plan [--model M] [--gpu T4:16GiB:7.5] what the server would do on a machine
    python cli.py bench --stream --users 10            throughput and TTFT under load
    python cli.py engine --gpu 1                       attach one more engine to a running server

Each command's options: python cli.py COMMAND --help.
"""

from __future__ import annotations

import os
import sys

import click

from planning.plan import PlanOverrides


def plan_overrides(compile_=None, **flags) -> PlanOverrides:
    """Flags beat env vars (QUANTIZATION, ENABLE_COMPILE), which beat the planner's heuristics."""
    import os

    from planning.overrides import resolve_overrides

    try:
        return resolve_overrides(os.environ, compile=compile_, **flags)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def plan_options(command):
    """The plan flags; their choices and bounds come from planning (one source for click and the checks there)."""
    from planning.dtypes import DTYPES
    from planning.overrides import BOUNDS, QUANTIZATIONS

    options = [
        click.option("--dtype", type=click.Choice(DTYPES), help="weight dtype"),
        click.option(
            "--quantization",
            type=click.Choice(QUANTIZATIONS),
            help="nf4/4bit: bitsandbytes NF4 + double quant; int8/int4: kiln's CPU weight-only formats (otherwise "
            "chosen by measurement); none: 16-bit (env QUANTIZATION)",
        ),
        click.option("--max-batch", type=click.IntRange(*BOUNDS["max_batch"]), help="cap on sequences running at once"),
        click.option(
            "--max-context",
            type=click.IntRange(*BOUNDS["max_context"]),
            help="longest sequence in tokens (default: the model's window, if the KV pool holds one)",
        ),
        click.option(
            "--kv-cache-tokens",
            type=click.IntRange(*BOUNDS["kv_cache_tokens"]),
            help="size of the shared paged KV pool in tokens (default: what memory holds; CPU: at most 16 contexts)",
        ),
        click.option(
            "--prefix-caching/--no-prefix-caching",
            default=None,
            help="reuse the KV blocks of prompt prefixes across requests (on by default)",
        ),
        click.option(
            "--gpu-memory-fraction",
            type=click.FloatRange(*BOUNDS["gpu_memory_fraction"]),
            help="share of GPU memory to use",
        ),
        click.option("--cpu-offload/--no-cpu-offload", default=None, help="force or forbid CPU offload"),
        click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile (env ENABLE_COMPILE=1)"),
        click.option(
            "--gpu-layers",
            type=click.IntRange(*BOUNDS["gpu_layers"]),
            default=None,
            help="decoder layers kept on the GPU (on CPU: in RAM), the rest offloaded (env GPU_LAYERS)",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


DEBUG_ENV = "KILN_DEBUG"
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def debug_wanted() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def keep_examples(doc: str) -> str:
    """Help text whose indented example lines click prints as written: each indented block becomes a `\\b`
    paragraph (click re-wraps every other paragraph into one)."""
    blocks = []
    for block in doc.strip("\n").split("\n\n"):
        if block.startswith((" ", "\t")):
            block = "\b\n" + block
        blocks.append(block)
    return "\n\n".join(blocks)


@click.group(help=keep_examples(__doc__))
@click.option("--debug", is_flag=True, help=f"show full tracebacks on errors (env {DEBUG_ENV}=1)")
def cli(debug: bool) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"  # read by main(), and inherited by engines and servers started from here


def main(args: list[str] | None = None) -> int:
    """Run the CLI; every error is one line on stderr and a non-zero exit, unless --debug / KILN_DEBUG=1
    asks for the traceback."""
    try:
        code = cli.main(args=args, standalone_mode=False)
    except NO_ARGS_IS_HELP as exc:  # no command given: the help, as click prints it
        print(exc.format_message(), file=sys.stderr)
        return exc.exit_code
    except click.UsageError as exc:  # bad flags: one line, with where to look
        command = exc.ctx.command_path if exc.ctx is not None else "cli.py"
        print(f"kiln: {command}: {exc.format_message()} (see `{command} --help`)", file=sys.stderr)
        return exc.exit_code
    except click.ClickException as exc:
        print(f"kiln: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except click.Abort:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug_wanted():
            raise
        message = " ".join(str(exc).split()) or "(no message)"
        print(f"kiln: {type(exc).__name__}: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


@cli.command(help="Run the HTTP server with one engine per device.")
@click.option(
    "--model",
    default=None,
    help="hub id, HF folder or .gguf file (env BASE_MODEL; default: embedded SmolLM2-135M-Instruct)",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--gpus", default=None, metavar="0,1", help="GPUs to start one engine each on (default: all visible)")
@click.option(
    "--engines",
    type=click.IntRange(1, 64),
    default=None,
    help="start this many CPU engines (machines without GPUs, tests)",
)
@click.option(
    "--engine-port",
    type=int,
    default=None,
    help="also accept engines from other machines on tcp PORT and PORT+1 of --host (needs --secret)",
)
@click.option("--secret", envvar="KILN_SECRET", default=None, help="shared secret for engines (env KILN_SECRET)")
@click.option(
    "--api-key",
    envvar="KILN_API_KEY",
    default=None,
    help="clients must send `Authorization: Bearer KEY` (env KILN_API_KEY); /health and /metrics stay open",
)
@click.option(
    "--max-restarts",
    type=click.IntRange(0),
    default=5,
    show_default=True,
    help="restarts of a lost engine in a row (with backoff) before the server exits non-zero",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[ADDRESS]",
    help="engines as Ray actors: on the cluster at ADDRESS (e.g. HEAD_IP:6379), or a local one started "
    "for this run when no ADDRESS is given (needs `pip install -e .[ray]`)",
)
@click.option(
    "--engines-per-node",
    type=click.IntRange(1, 64),
    default=None,
    help="with --ray: engines on every node, joining ones included (default: one per GPU; "
    "1 CPU engine per node on a cluster without GPUs)",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="on SIGTERM, seconds open streams may run on (new requests get 503 at once)",
)
@plan_options
def serve(
    model,
    host,
    port,
    gpus,
    engines,
    engine_port,
    secret,
    api_key,
    max_restarts,
    ray_address,
    engines_per_node,
    drain_timeout,
    **plan_flags,
) -> None:
    from frontend.server import ServeConfig
    from frontend.server import serve as run_server

    ray = None
    if ray_address is not None:
        ray, secret, devices = ray_options(ray_address, model, gpus, engines, engines_per_node, secret)
    elif engines_per_node is not None:
        raise click.UsageError("--engines-per-node places engines on a Ray cluster: it needs --ray")
    else:
        devices = engine_devices(gpus, engines)
    config = ServeConfig(
        model=model,
        host=host,
        port=port,
        overrides=plan_overrides(**plan_flags),
        ray=ray,
        devices=devices,
        engine_port=engine_port,
        secret=secret,
        api_key=api_key,
        max_restarts=max_restarts,
        drain_timeout=drain_timeout,
    )
    sys.exit(run_server(config))


def ray_options(address: str, model, gpus, engines, engines_per_node, secret):
    """(RayOptions, the secret, no local devices) for `serve --ray`: the engines are Ray actors, which dial
    the frontend over tcp with the secret (generated for this run when none is given)."""
    import secrets

    from frontend.ray_engines import RayOptions, RayUnavailable, import_ray

    if gpus:
        raise click.UsageError("--gpus chooses local GPUs; with --ray, Ray places one engine per GPU on each node")
    if engines is not None and engines_per_node is not None:
        raise click.UsageError(
            "--engines K spreads K CPU engines over the cluster, --engines-per-node N puts N on every node: choose one"
        )
    try:
        import_ray()
    except RayUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    options = RayOptions(
        address=address or None,
        engines=engines,
        engines_per_node=engines_per_node,
        model=model or os.environ.get("BASE_MODEL") or None,
    )
    return options, secret or secrets.token_urlsafe(24), []


def engine_devices(gpus: str | None, engines: int | None) -> list[int | None]:
    """One engine per chosen GPU; all visible GPUs by default; CPU engines where there is none."""
    from hardware.profile import missing_gpus, visible_gpu_indices

    if engines is not None:
        if gpus:
            raise click.UsageError("--gpus and --engines (CPU engines) exclude each other")
        return [None] * engines
    if gpus is None:
        return visible_gpu_indices() or [None]
    try:
        chosen = [int(g) for g in gpus.split(",") if g.strip()]
    except ValueError:
        raise click.BadParameter(f"{gpus!r}: expected GPU indices like 0,1", param_hint="--gpus") from None
    if (missing := missing_gpus(chosen)) is not None:
        raise click.BadParameter(missing, param_hint="--gpus")
    return chosen


@cli.command(help="Load-test a server: throughput, TTFT, ITL; optionally beside a naive baseline in the same run.")
@click.option(
    "--url", default=None, help="a running server; default: start one (same code path as serve), then stop it"
)
@click.option("--model", default=None, help="model for the started server (default: embedded)")
@click.option("--users", default=10, show_default=True, type=click.IntRange(1), help="concurrent users")
@click.option(
    "--requests", default=2, show_default=True, type=click.IntRange(1), help="requests per user, back to back"
)
@click.option("--duration", type=float, default=None, help="run for S seconds instead of --requests")
@click.option("--stream/--no-stream", default=True, show_default=True, help="/generate_stream (SSE) or /generate")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0))
@click.option(
    "--ignore-eos/--respect-eos",
    default=True,
    show_default=True,
    help="every request yields exactly --max-new-tokens (a fair comparison)",
)
@click.option(
    "--baseline",
    type=click.Choice(["naive", "llama.cpp"]),
    default=None,
    help="also measure, after ours stops (or alternating, with --pairs): naive = transformers' generate one "
    "request at a time; "
    "llama.cpp = llama-server on the same weights (needs `pip install -e .[peers]`)",
)
@click.option(
    "--baseline-url",
    default=None,
    metavar="URL",
    help="a running kiln as the baseline (e.g. the previous release, for a no-regression check), instead of --baseline",
)
@click.option(
    "--llama-cpp-quant",
    type=click.Choice(["F16", "Q8_0", "Q4_0", "Q4_1"]),
    default="F16",
    show_default=True,
    help="GGUF llama-server runs: for the embedded model F16 = the same dequantized values kiln "
    "serves (requantized once, cached), Q4_1 = the shipped file; a --model DIR (llama, qwen2) is exported "
    "once to F16 GGUF with its weights and tokenizer, others made by llama-quantize; a --model .gguf runs as it is",
)
@click.option("--json", "json_path", default=None, metavar="PATH", help="write the figures as JSON")
@click.option("--plot", "plot_path", default=None, metavar="PATH.png", help="write a latency/throughput picture")
@click.option("--seed", default=0, show_default=True, type=int, help="prompt order and sampling seeds")
@click.option("--port", default=None, type=int, help="port for the started server (default: a free one)")
@click.option(
    "--prefix-tokens",
    type=click.IntRange(8),
    default=None,
    help="every request = one shared system prompt of about N tokens (from bench/prompts/) + a distinct question",
)
@click.option(
    "--prefix-file", default=None, metavar="PATH", help="the shared prefix's text (cut to --prefix-tokens if given)"
)
@click.option(
    "--chat-turns",
    type=click.IntRange(1),
    default=None,
    help="each user holds a T-turn chat, every turn resending the history (replaces --requests); "
    "TTFT per turn is reported",
)
@click.option(
    "--prompt-tokens", type=click.IntRange(8), default=None, help="every request a distinct prompt of about N tokens"
)
@click.option(
    "--pairs",
    type=click.IntRange(1),
    default=None,
    help="both servers up, K alternating runs each (needs --baseline): every pair's ratios, median, worst",
)
@click.option(
    "--llama-cpp-parallel",
    type=click.IntRange(1),
    default=None,
    help="llama-server's slots (-np) [default: --users, at least 16]",
)
@click.option(
    "--serve-args",
    default=None,
    metavar="'ARGS'",
    help="extra `serve` arguments for the started kiln, e.g. '--no-prefix-caching --kv-cache-tokens 16384'",
)
@click.option(
    "--json-schema",
    default=None,
    metavar="PATH",
    type=click.Path(exists=True, dir_okay=False),
    help="put this JSON schema on every request (constrained decoding; the grammar ends answers, so compare "
    "tok/s); sent as `json_schema` to kiln and to llama-server, refused with --baseline naive",
)
def bench(**options) -> None:
    from bench.runner import run_benchmark

    sys.exit(run_benchmark(**options))


@cli.command(help="Attach one more engine to a running server (on this machine by default).")
@click.option("--gpu", type=int, default=None, help="CUDA device index for this engine")
@click.option("--cpu", is_flag=True, help="a CPU engine")
@click.option(
    "--frontend",
    default=None,
    metavar="ADDRESS",
    help="tcp://HOST:PORT of a server's --engine-port, or a local server's port (default: the local one)",
)
@click.option("--model", default=None, help="default: the model the local server serves (or BASE_MODEL / embedded)")
@click.option("--secret", envvar="KILN_SECRET", default=None, help="the server's shared secret (env KILN_SECRET)")
@click.option("--engine-id", default=None, help="name shown in /info (default: HOST-PID)")
@plan_options
def engine(gpu, cpu, frontend, model, secret, engine_id, **plan_flags) -> None:
    import os
    import socket

    from engine_core.main import configure_logging, run_engine
    from ipc.discovery import FrontendNotFound, find_frontend
    from model.source import ModelNotFound, resolve_model

    if cpu == (gpu is not None):
        raise click.UsageError("choose one device: --gpu N or --cpu")
    if gpu is not None:
        from hardware.profile import missing_gpus

        if (missing := missing_gpus([gpu])) is not None:
            raise click.BadParameter(missing, param_hint="--gpu")
    try:
        input_address, output_address, local = find_frontend(frontend)
    except FrontendNotFound as exc:
        raise click.ClickException(str(exc)) from None
    if model is None and local is not None:
        source_path, source_name = local.model_path, local.model
    else:
        try:
            source = resolve_model(model)
        except ModelNotFound as exc:
            raise click.ClickException(str(exc)) from None
        source_path, source_name = source.path, source.name
    engine_id = engine_id or f"{socket.gethostname()}-{os.getpid()}"
    configure_logging(engine_id)
    code = run_engine(
        input_address=input_address,
        output_address=output_address,
        model_path=source_path,
        model_name=source_name,
        engine_id=engine_id,
        gpu=gpu,
        overrides=plan_overrides(**plan_flags),
        watch_pid=local.pid if local else None,
        secret=secret,
    )
    sys.stdout.flush()
    os._exit(code)


@cli.command(help="Print the serving plan for this machine, or for a simulated one, without loading weights.")
@click.option("--model", default=None, help="folder with config.json, .gguf file or hub id (default: embedded model)")
@click.option(
    "--gpu", "gpus", multiple=True, metavar="NAME:MEMORY:CC", help="simulate a GPU, e.g. T4:16GiB:7.5 (repeatable)"
)
@click.option("--ram", default=None, metavar="SIZE", help="simulate this much system RAM, e.g. 16GiB")
@click.option("--cpu-only", is_flag=True, help="simulate a machine without GPUs")
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of the table")
@plan_options
def plan(model, gpus, ram, cpu_only, as_json, **plan_flags) -> None:
    from planning.report import run_plan_command

    sys.exit(run_plan_command(model, gpus, ram, cpu_only, as_json, plan_overrides(**plan_flags)))


if __name__ == "__main__":
    sys.exit(main())
