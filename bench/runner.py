"""`cli.py bench`: start (or reach) our server, run the workload, optionally a baseline (the naive
server, or llama.cpp's llama-server on the same weights), print the table, write JSON / PNG.

By default the servers run one after the other, never together. With `--pairs K` both are started
once and K runs of each alternate (bench/pairs.py): the report gives every pair's ratios, their median
and the worst pair, which survives a noisy machine better than one run each. An idle server costs
the other almost nothing; a busy one would, which is why the runs never overlap.

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
- Workloads (bench/scenarios.py): the short prompts above, a shared prefix (--prefix-tokens), chat
  conversations (--chat-turns), distinct long prompts (--prompt-tokens).
- --json-schema PATH puts that schema on every request (constrained decoding): the grammar ends each
  answer, so answers are shorter than --max-new-tokens and EOS is respected; compare output tokens/s
  with the same run without it. kiln and llama-server take the schema; the naive baseline cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import sys
import urllib.error
import urllib.request

import msgspec

from bench import llama_cpp, server_counters
from bench.dialects import NATIVE, OPENAI, Dialect
from bench.loadgen import auth_headers, run_load, warm_up
from bench.pairs import PairSummary, make_pair, ours_first, summarize
from bench.records import LoadConfig, RunResult
from bench.report import pair_lines, ratio_line, table, turn_table, write_json, write_plot
from bench.scenarios import WorkloadOptions, build_workload, problem
from bench.server_proc import ServerFailed, free_port, naive_command, ours_command, running_server
from bench.stats import Figures, figures
from bench.workload import DEFAULT_SET, ShortPrompts, Workload, load_prompts
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


def _measure(
    url: str, cfg: LoadConfig, name: str, dialect: Dialect = NATIVE, workload: Workload | None = None
) -> RunResult:
    """Warm up, run the load; for kiln, its engine counters (prefix cache, preemptions) over the run."""
    workload = workload or ShortPrompts(load_prompts(DEFAULT_SET))
    asyncio.run(warm_up(url, dialect=dialect))
    before = server_counters.read_counters(url) if dialect.polls_info else None
    run = asyncio.run(run_load(url, cfg, workload, desc=name, dialect=dialect))
    if before is not None:
        run.counters = server_counters.delta(before, server_counters.read_counters(url))
    return run


def llama_cpp_command(
    setup: llama_cpp.LlamaCppSetup,
    port: int,
    cfg: LoadConfig,
    workload: Workload | None = None,
    parallel: int | None = None,
) -> list[str]:
    """llama-server sized for this workload: `parallel` slots (default one per user, at least 16), each
    holding the longest prompt and the budget (llama-server splits -c evenly over its slots)."""
    workload = workload or ShortPrompts(load_prompts(DEFAULT_SET))
    slots = llama_cpp.parallel_slots(cfg.users, parallel)
    context = llama_cpp.context_size(slots, workload.longest_prompt(cfg.max_new_tokens), cfg.max_new_tokens)
    return llama_cpp.server_command(setup, port, users=slots, context=context, threads=llama_cpp.physical_cores())


@contextlib.contextmanager
def _baseline_server(cfg, workload, *, model, dtype, setup, parallel, url=None):
    """Yield (url, name, dialect) of the running baseline: the kiln at `url` (left running), llama-server
    when `setup` is given, else the naive server in our plan's dtype; those two stopped on exit."""
    if url is not None:
        yield url, "baseline", NATIVE
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if setup is not None:
        with running_server(llama_cpp_command(setup, port, cfg, workload, parallel), url, name="llama.cpp"):
            yield url, "llama.cpp", OPENAI
        return
    from model.source import resolve_model

    with running_server(naive_command(port, resolve_model(model).path, dtype), url, name="naive"):
        yield url, "naive", NATIVE


@contextlib.contextmanager
def _ours_server(url: str | None, port: int | None, model: str | None, serve_args: list[str]):
    """Yield the URL of our server: the one at --url, else one started here (stopped on exit)."""
    if url is not None:
        yield url
        return
    own = f"http://127.0.0.1:{port or free_port()}"
    # a first start compiles the CPU decode step: minutes on a small machine before the cache has it
    command = ours_command(int(own.rsplit(":", 1)[1]), model, serve_args)
    with running_server(command, own, name="kiln", timeout_s=KILN_START_TIMEOUT_S):
        yield own


def _run_pairs(
    cfg: LoadConfig,
    workload: Workload,
    pairs: int,
    *,
    url: str | None,
    port: int | None,
    model: str | None,
    serve_args: list[str],
    baseline_args: dict,
) -> tuple[dict | None, list[RunResult], list[RunResult]]:
    """Both servers up; pair k runs seed + k on each, ours first on even pairs, the baseline first on odd."""
    ours_runs: list[RunResult] = []
    base_runs: list[RunResult] = []
    with _ours_server(url, port, model, serve_args) as ours_url:
        info = fetch_info(ours_url)
        with _baseline_server(cfg, workload, dtype=plan_dtype(info), **baseline_args) as (base_url, name, dialect):
            for k in range(pairs):
                pair_cfg = msgspec.structs.replace(cfg, seed=cfg.seed + k)
                for ours in (True, False) if ours_first(k) else (False, True):
                    if ours:
                        ours_runs.append(_measure(ours_url, pair_cfg, f"ours {k + 1}", NATIVE, workload))
                    else:
                        base_runs.append(_measure(base_url, pair_cfg, f"{name} {k + 1}", dialect, workload))
    return info, ours_runs, base_runs


def load_json_schema(path: str) -> dict:
    """The schema file --json-schema names: a JSON object (ValueError or OSError saying why not)."""
    with open(path, encoding="utf-8") as f:
        schema = json.load(f)
    if not isinstance(schema, dict):
        raise ValueError(f"{path} holds a JSON {type(schema).__name__}, not a schema object")
    return schema


def _describe(cfg: LoadConfig, workload: Workload, duration, dtype, quantization, setup, pairs) -> str:
    what = workload.describe()
    kind = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in what.items() if k != "kind")
    per_user = f"{duration:g}s" if duration else f"{cfg.requests} {'turns' if what['kind'] == 'chat' else 'requests'}"
    return (
        f"\nkiln bench: {what['kind']} workload"
        + (f" ({kind})" if kind else "")
        + f", {cfg.users} users x {per_user}, {cfg.max_new_tokens} new tokens, "
        + f"{'stream' if cfg.stream else 'no stream'}, temperature {cfg.temperature}, dtype {dtype}"
        + (f" ({quantization} weights)" if quantization else "")
        + (f"; llama.cpp {setup.quant} {setup.gguf}" if setup is not None else "")
        + ("" if setup is None or setup.repack else " --no-repack (its AMX kernels fault here)")
        + (f"; {pairs} interleaved pairs" if pairs else "")
        + ("; a JSON schema on every request (EOS respected)" if cfg.json_schema is not None else "")
    )


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
    prefix_tokens: int | None = None,
    prefix_file: str | None = None,
    chat_turns: int | None = None,
    prompt_tokens: int | None = None,
    pairs: int | None = None,
    llama_cpp_parallel: int | None = None,
    serve_args: str | None = None,
    baseline_url: str | None = None,
    json_schema: str | None = None,
) -> int:
    """Run the benchmark; return the exit code (0 ok, 1 a server failed, some request failed or came back
    short, 2 bad arguments or a baseline that cannot run here, 130 interrupted). `url` benchmarks a running
    server instead of starting one; `port` picks the port of the one we start (default: a free one);
    `llama_cpp_quant` picks the GGUF llama-server runs for the embedded default model or a model folder;
    `serve_args` are extra `cli.py serve` arguments for the server we start (e.g. "--no-prefix-caching");
    `baseline_url` is a running kiln measured as the baseline (a previous release); `json_schema` is a schema
    file every request carries (kiln's native `json_schema` field, llama-server's own field of the same name)."""
    if users < 1 or requests < 1 or max_new_tokens < 1 or temperature < 0 or (duration is not None and duration <= 0):
        print("bench: users, requests, max_new_tokens and duration must be positive, temperature >= 0", file=sys.stderr)
        return 2
    if baseline is not None and baseline not in BASELINES:
        print(f"bench: unknown baseline {baseline!r} (choose from {', '.join(BASELINES)})", file=sys.stderr)
        return 2
    if baseline is not None and baseline_url is not None:
        print("bench: choose one of --baseline and --baseline-url", file=sys.stderr)
        return 2
    if baseline_url is not None:
        baseline_url = baseline_url.rstrip("/")
        if problem_text := unreachable(baseline_url):
            print(f"bench: {problem_text}", file=sys.stderr)
            return 1
        baseline = "kiln"
    if pairs is not None and (pairs < 1 or baseline is None):
        print("bench: --pairs needs a --baseline (or --baseline-url) and at least 1 pair", file=sys.stderr)
        return 2
    if llama_cpp_parallel is not None and llama_cpp_parallel < 1:
        print("bench: --llama-cpp-parallel must be at least 1", file=sys.stderr)
        return 2
    schema = None
    if json_schema is not None:
        if baseline == "naive":
            print("bench: --json-schema cannot run with --baseline naive (no constrained decoding)", file=sys.stderr)
            return 2
        try:
            schema = load_json_schema(json_schema)
        except (ValueError, OSError) as exc:
            print(f"bench: --json-schema: {exc}", file=sys.stderr)
            return 2
    options = WorkloadOptions(prefix_tokens, prefix_file, chat_turns, prompt_tokens)
    if why := problem(options):
        print(f"bench: {why}", file=sys.stderr)
        return 2
    setup = None
    if baseline == "llama.cpp":
        try:
            setup = llama_cpp.prepare(model, llama_cpp_quant)
        except llama_cpp.LlamaCppUnavailable as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
    try:
        workload = build_workload(options, users, model)
    except (ValueError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    cfg = LoadConfig(
        users=users,
        requests=chat_turns if chat_turns is not None else requests,  # a chat user's requests are its turns
        duration=duration,
        stream=stream,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        ignore_eos=ignore_eos,
        seed=seed,
        json_schema=schema,
    )
    extra = shlex.split(serve_args or "")
    baseline_args = dict(model=model, setup=setup, parallel=llama_cpp_parallel, url=baseline_url)
    ours_runs: list[RunResult] = []
    base_runs: list[RunResult] = []
    info = None
    try:
        if url is not None:
            url = url.rstrip("/")
            if problem_text := unreachable(url):
                print(f"bench: {problem_text}", file=sys.stderr)
                return 1
        if pairs is not None:
            info, ours_runs, base_runs = _run_pairs(
                cfg, workload, pairs, url=url, port=port, model=model, serve_args=extra, baseline_args=baseline_args
            )
        else:
            with _ours_server(url, port, model, extra) as ours_url:
                info = fetch_info(ours_url)
                ours_runs.append(_measure(ours_url, cfg, "ours", NATIVE, workload))
            if baseline is not None:
                if url is not None:
                    print("bench: note: the server at --url keeps running while the baseline runs", file=sys.stderr)
                with _baseline_server(cfg, workload, dtype=plan_dtype(info), **baseline_args) as (b_url, name, dia):
                    base_runs.append(_measure(b_url, cfg, name, dia, workload))
    except ServerFailed as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130
    return _report(
        cfg,
        workload,
        info,
        ours_runs,
        base_runs,
        baseline,
        setup,
        duration,
        pairs,
        json_path,
        plot_path,
        url,
        model,
        baseline_url,
    )


def _report(
    cfg,
    workload,
    info,
    ours_runs,
    base_runs,
    baseline,
    setup,
    duration,
    pairs,
    json_path,
    plot_path,
    url,
    model,
    baseline_url=None,
) -> int:
    # a fixed answer length only when EOS is ignored and no grammar ends answers early
    expected = cfg.max_new_tokens if cfg.ignore_eos and cfg.json_schema is None else None
    ours_all = [figures(run, expected) for run in ours_runs]
    base_all = [figures(run, expected) for run in base_runs]
    summary: PairSummary | None = None
    headline = 0
    if pairs is not None:
        seeds = [cfg.seed + k for k in range(len(ours_all))]
        summary = summarize([make_pair(s, o, b) for s, o, b in zip(seeds, ours_all, base_all)])
        headline = summary.median_pair
    ours = ours_all[headline]
    base: Figures | None = base_all[headline] if base_all else None
    dtype = plan_dtype(info)
    quantization = ((info or {}).get("plan") or {}).get("quantization")
    config = {
        **msgspec.to_builtins(cfg),
        "model": (info or {}).get("model") or model,
        "url": url,
        "dtype": dtype,
        "quantization": quantization,
        "baseline": baseline,
        "baseline_url": baseline_url,
        "prompt_set": DEFAULT_SET,
        "workload": workload.describe(),
        "pairs": pairs,
    }
    if setup is not None:
        config["llama_cpp"] = {
            "gguf": setup.gguf,
            "quant": setup.quant,
            "threads": llama_cpp.physical_cores(),
            "repack": setup.repack,
        }
    print(_describe(cfg, workload, duration, dtype, quantization, setup, pairs))
    name = baseline or "baseline"
    if summary is not None:
        print(f"(the table shows pair {headline + 1}, the median pair by throughput ratio)")
    print(table(ours, base, baseline_name=name))
    if turns := turn_table(ours, base, baseline_name=name):
        print("\n" + turns)
    if base is not None:
        print("\n" + ratio_line(ours, base, name))
    if summary is not None:
        print(pair_lines(summary, name))
    runs_by_name = {"ours": ours_runs, name: base_runs}
    for who, runs in runs_by_name.items():
        for rec in [r for run in runs for r in run.records if not r.ok][:5]:
            print(f"{who}: request user={rec.user} #{rec.index} failed: {rec.error}", file=sys.stderr)
    short = [(who, f.short) for who, figs in (("ours", ours_all), (name, base_all)) for f in figs if f.short]
    for who, n in short[:5]:
        print(f"{who}: {n} requests came back with fewer than {cfg.max_new_tokens} tokens", file=sys.stderr)
    if json_path:
        write_json(json_path, config, ours, base, summary)
        print(f"wrote {json_path}")
    if plot_path:
        write_plot(plot_path, {"ours": ours_runs[headline], **({name: base_runs[headline]} if base_runs else {})})
        print(f"wrote {plot_path}")
    every = ours_all + base_all
    return 0 if all(f.failed == 0 and f.completed > 0 and not f.short for f in every) else 1
