"""`cli.py bench`: start (or reach) our server, run the workload, optionally a baseline (the naive
server, or llama.cpp's llama-server on the same weights), print the table, write JSON / PNG.

The servers run one after the other, never together: on a 2-core machine two servers
would steal cores from each other and both figures would be wrong.

Defaults (what `python cli.py bench --stream --users 10` does with nothing else):
- 10 users x 2 requests x 64 new tokens = 1280 output tokens, greedy (temperature 0),
  EOS ignored. About a minute on a 2-core CPU with the 135M default model (a fifth of
  that with batching; the naive baseline, one request at a time at ~12 tok/s in fp32,
  needs about two). Two requests per user means each user's second request arrives while
  others are mid-decode, which is what continuous batching is for.
- temperature 0: deterministic text, so ours and the baseline do the same work.
- ignore_eos: every request yields exactly max_new_tokens, so throughput compares
  equal work instead of whichever server happened to stop early.
- One load generator for every server: kiln and the naive server are spoken to on their
  native routes, llama-server on OpenAI's /v1/completions (bench/dialects.py); same prompts,
  same budgets, same sampling.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.error
import urllib.request

import msgspec

from bench import llama_cpp
from bench.dialects import NATIVE, OPENAI, Dialect
from bench.loadgen import auth_headers, run_load, warm_up
from bench.records import LoadConfig, RunResult
from bench.report import ratio_line, table, write_json, write_plot
from bench.server_proc import ServerFailed, free_port, naive_command, ours_command, running_server
from bench.stats import figures
from bench.workload import DEFAULT_SET, load_prompts
from planning.dtypes import DTYPE_ALIASES as _DTYPE_ALIASES

BASELINES = ("naive", "llama.cpp")
KILN_START_TIMEOUT_S = 900.0  # loading, the format probe and a first compile of the decode step (cached after)


def fetch_info(url: str) -> dict | None:
    """GET /info, or None when the server has none (the naive baseline)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/info", headers=auth_headers()), timeout=10) as resp:
            info = json.loads(resp.read())
            return info if isinstance(info, dict) else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def unreachable(url: str) -> str | None:
    """Why nothing answers HTTP at `url` (with what to do), or None when something does (any status)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/health", headers=auth_headers()), timeout=10):
            return None
    except urllib.error.HTTPError:
        return None  # a server answered (the naive baseline has no /health)
    except ValueError as exc:
        return f"--url {url!r} is not a URL ({exc}); pass one like http://127.0.0.1:8000"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return (
            f"nothing answers at {url} ({reason}): start a server there (`python cli.py serve`), "
            "or leave out --url to have bench start one"
        )


def plan_dtype(info: dict | None) -> str:
    """The dtype our server chose, so the baseline runs the same precision; float32 if unknown."""
    raw = str(((info or {}).get("plan") or {}).get("dtype") or "float32").removeprefix("torch.")
    dtype = _DTYPE_ALIASES.get(raw, raw)
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def _measure(url: str, cfg: LoadConfig, name: str, dialect: Dialect = NATIVE) -> RunResult:
    prompts = load_prompts(DEFAULT_SET)
    asyncio.run(warm_up(url, dialect=dialect))
    return asyncio.run(run_load(url, cfg, prompts, desc=name, dialect=dialect))


def llama_cpp_command(setup: llama_cpp.LlamaCppSetup, port: int, cfg: LoadConfig) -> list[str]:
    """llama-server sized for this workload: a slot per user, each holding the longest prompt and the budget."""
    context = llama_cpp.context_size(
        cfg.users, llama_cpp.prompt_token_bound(load_prompts(DEFAULT_SET)), cfg.max_new_tokens
    )
    return llama_cpp.server_command(setup, port, users=cfg.users, context=context, threads=llama_cpp.physical_cores())


def _run_baseline(
    cfg: LoadConfig, *, model: str | None, dtype: str, setup: llama_cpp.LlamaCppSetup | None
) -> RunResult:
    """Start the baseline alone (ours has stopped), measure it with the same load, stop it:
    llama-server when `setup` is given, else the naive server in our plan's dtype."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if setup is not None:
        with running_server(llama_cpp_command(setup, port, cfg), url, name="llama.cpp"):
            return _measure(url, cfg, "llama.cpp", OPENAI)
    from model.source import resolve_model

    with running_server(naive_command(port, resolve_model(model).path, dtype), url, name="naive"):
        return _measure(url, cfg, "naive")


def run_benchmark(
    *,
    url: str | None = None,
    model: str | None = None,
    users: int = 10,
    requests: int = 2,
    duration: float | None = None,
    stream: bool = True,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    ignore_eos: bool = True,
    baseline: str | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    seed: int = 0,
    port: int | None = None,
    llama_cpp_quant: str = llama_cpp.DEFAULT_QUANT,
) -> int:
    """Run the benchmark; return the exit code (0 ok, 1 a server failed or some request failed,
    2 bad arguments or a baseline that cannot run here, 130 interrupted). `url` benchmarks a running
    server instead of starting one; `port` picks the port of the one we start (default: a free one);
    `llama_cpp_quant` picks the GGUF llama-server runs for the embedded default model."""
    if users < 1 or requests < 1 or max_new_tokens < 1 or temperature < 0 or (duration is not None and duration <= 0):
        print("bench: users, requests, max_new_tokens and duration must be positive, temperature >= 0", file=sys.stderr)
        return 2
    if baseline is not None and baseline not in BASELINES:
        print(f"bench: unknown baseline {baseline!r} (choose from {', '.join(BASELINES)})", file=sys.stderr)
        return 2
    setup = None
    if baseline == "llama.cpp":
        try:
            setup = llama_cpp.prepare(model, llama_cpp_quant)
        except llama_cpp.LlamaCppUnavailable as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
    cfg = LoadConfig(
        users=users,
        requests=requests,
        duration=duration,
        stream=stream,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        ignore_eos=ignore_eos,
        seed=seed,
    )
    runs: dict[str, RunResult] = {}
    try:
        if url is not None:
            url = url.rstrip("/")
            if problem := unreachable(url):
                print(f"bench: {problem}", file=sys.stderr)
                return 1
            info = fetch_info(url)
            runs["ours"] = _measure(url, cfg, "ours")
        else:
            own = f"http://127.0.0.1:{port or free_port()}"
            # a first start compiles the CPU decode step: minutes on a small machine before the cache has it
            command = ours_command(int(own.rsplit(":", 1)[1]), model)
            with running_server(command, own, name="kiln", timeout_s=KILN_START_TIMEOUT_S):
                info = fetch_info(own)
                runs["ours"] = _measure(own, cfg, "ours")
        dtype = plan_dtype(info)
        if baseline is not None:
            if url is not None:
                print("bench: note: the server at --url keeps running while the baseline runs", file=sys.stderr)
            runs[baseline] = _run_baseline(cfg, model=model, dtype=dtype, setup=setup)
    except ServerFailed as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130

    ours = figures(runs["ours"])
    base = figures(runs[baseline]) if baseline in runs else None
    quantization = ((info or {}).get("plan") or {}).get("quantization")
    config = {
        **msgspec.to_builtins(cfg),
        "model": (info or {}).get("model") or model,
        "url": url,
        "dtype": dtype,
        "quantization": quantization,
        "baseline": baseline,
        "prompt_set": DEFAULT_SET,
    }
    if setup is not None:
        config["llama_cpp"] = {"gguf": setup.gguf, "quant": setup.quant, "threads": llama_cpp.physical_cores()}
    print(
        f"\nkiln bench: {users} users x {f'{duration:g}s' if duration else f'{requests} requests'}, "
        f"{max_new_tokens} new tokens, {'stream' if stream else 'no stream'}, temperature {temperature}, "
        f"dtype {dtype}"
        + (f" ({quantization} weights)" if quantization else "")
        + (f"; llama.cpp {setup.quant} {setup.gguf}" if setup is not None else "")
    )
    print(table(ours, base, baseline_name=baseline or "baseline"))
    if base is not None:
        print("\n" + ratio_line(ours, base, baseline))
    for name, run in runs.items():
        for rec in [r for r in run.records if not r.ok][:5]:
            print(f"{name}: request user={rec.user} #{rec.index} failed: {rec.error}", file=sys.stderr)
    if json_path:
        write_json(json_path, config, ours, base)
        print(f"wrote {json_path}")
    if plot_path:
        write_plot(plot_path, runs)
        print(f"wrote {plot_path}")
    return 0 if all(f.failed == 0 and f.completed > 0 for f in (ours, base) if f is not None) else 1
