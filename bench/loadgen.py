"""The load generator: `users` concurrent clients, each sending requests back to back.

Closed-loop on purpose: each user waits for its answer before the next request, like a
person (or an agent) in a chat, so latency under load and the batch the server reaches
are both visible. Every request ends in exactly one record: a failure (HTTP error,
connection error, error event, stream cut before the final event) is recorded, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time

import aiohttp
from tqdm import tqdm

from bench.dialects import DONE, NATIVE, Chunk, Dialect
from bench.records import LoadConfig, RequestRecord, RunResult
from bench.sse import StreamCut, iter_events
from bench.workload import Prompt, Workload, as_workload, request_seed

INFO_POLL_S = 0.25


def _error_text(payload: object, fallback: str) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        return str(err.get("message") or err)
    return fallback


async def _read_error(resp: aiohttp.ClientResponse) -> str:
    text = await resp.text(errors="replace")
    try:
        return f"HTTP {resp.status}: " + _error_text(json.loads(text), text[:200])
    except ValueError:
        return f"HTTP {resp.status}: {text[:200]}"


def progress_bar(total: int | None, desc: str, enabled: bool = True, file=None) -> tqdm:
    """The load's bar, counting output tokens as they arrive. Off a terminal (a CI log) it redraws every few
    seconds, as a line each time, instead of ten times a second."""
    file = file or sys.stderr
    tty = bool(getattr(file, "isatty", lambda: False)())
    return tqdm(
        total=total,
        desc=desc,
        unit="tok",
        file=file,
        disable=not enabled,
        leave=False,
        mininterval=0.1 if tty else 5.0,
        dynamic_ncols=tty,
    )


def count_tokens(bar: tqdm, k: int) -> None:
    """Advance the bar by the `k` tokens a stream event (or a whole answer) brought."""
    if k > 0:
        bar.update(k)


def _no_progress(k: int) -> None:
    pass


def _server_side(rec: RequestRecord, usage: dict | None, timings: dict | None) -> None:
    """What the server said about the prompt: its token count (usage), and llama-server's `timings`
    (tokens reused from its prompt cache, its own prefill speed) when it sends them."""
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        rec.prompt_tokens = usage["prompt_tokens"]
    if timings:
        if isinstance(timings.get("cache_n"), int):
            rec.cached_tokens = timings["cache_n"]
        if isinstance(timings.get("prompt_per_second"), (int, float)) and timings.get("prompt_n"):
            rec.server_prompt_per_s = float(timings["prompt_per_second"])


async def _stream_one(
    session: aiohttp.ClientSession,
    url: str,
    dialect: Dialect,
    body: dict,
    rec: RequestRecord,
    t_run: float,
    on_tokens=_no_progress,
) -> None:
    t0 = time.perf_counter()
    last: float | None = None
    counted = 0
    async with session.post(url + dialect.stream_path, json=body) as resp:
        rec.status = resp.status
        if resp.status != 200:
            rec.error = await _read_error(resp)
            return
        final: Chunk | None = None
        usage: dict | None = None
        timings: dict | None = None
        pieces: list[str] = []
        async for event in iter_events(resp.content):
            now = time.perf_counter()
            if event.data == DONE:
                continue  # read on to the body's end so the connection goes back to the pool clean
            try:
                msg = json.loads(event.data)
            except ValueError:
                rec.error = f"undecodable event: {event.data[:100]!r}"
                return
            if not isinstance(msg, dict):
                continue
            if "error" in msg:
                rec.error = "error event: " + _error_text(msg, str(msg["error"]))
                return
            chunk = dialect.chunk(msg)
            usage = chunk.usage or usage
            timings = chunk.timings or timings
            if chunk.text:
                pieces.append(chunk.text)
            k = chunk.tokens
            if k:
                # A chunk of k tokens counts k tokens; its gap is spread evenly over them.
                if last is None:
                    rec.ttft_s = now - t0
                    rec.itl_s.extend([0.0] * (k - 1))
                else:
                    rec.itl_s.extend([(now - last) / k] * k)
                rec.token_times_s.extend([now - t_run] * k)
                counted += k
                last = now
                on_tokens(k)
            if final is None and chunk.finish_reason is not None:
                final = chunk
                rec.e2e_s = now - t0
                if dialect.ends_at_finish():
                    break
        rec.text = "".join(pieces)
        if final is None:
            rec.error = "stream ended without a final event"
            return
        _server_side(rec, usage, timings)
        rec.finish_reason = final.finish_reason
        rec.output_tokens = int((usage or {}).get("completion_tokens", counted))
        rec.ok = True


async def _generate_one(
    session: aiohttp.ClientSession,
    url: str,
    dialect: Dialect,
    body: dict,
    rec: RequestRecord,
    t_run: float,
    on_tokens=_no_progress,
) -> None:
    t0 = time.perf_counter()
    async with session.post(url + dialect.plain_path, json=body) as resp:
        rec.status = resp.status
        if resp.status != 200:
            rec.error = await _read_error(resp)
            return
        msg = await resp.json(content_type=None)
    now = time.perf_counter()
    rec.e2e_s = now - t0
    rec.finish_reason, rec.output_tokens, server_ttft = dialect.plain(msg)
    whole = dialect.plain_chunk(msg)
    rec.text = whole.text
    _server_side(rec, whole.usage, whole.timings)
    # The server's own TTFT is the only one a non-streaming client can know; else the response time.
    rec.ttft_s = server_ttft if server_ttft is not None else rec.e2e_s
    rec.token_times_s = [now - t_run] * rec.output_tokens
    rec.ok = True
    on_tokens(rec.output_tokens)


async def _one(session, url, dialect, cfg, prompt, user, index, t_run, on_tokens=_no_progress) -> RequestRecord:
    rec = RequestRecord(
        user=user, index=index, prompt_id=prompt.id, start_s=time.perf_counter() - t_run, turn=prompt.turn
    )
    send = _stream_one if cfg.stream else _generate_one
    try:
        body = dialect.body(cfg, prompt.text, request_seed(cfg.seed, user, index))
        await send(session, url, dialect, body, rec, t_run, on_tokens)
    except StreamCut as e:
        rec.error = str(e)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError, TypeError) as e:
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if not rec.ok and rec.error is None:
        rec.error = "unknown failure"
    return rec


async def _poll_info(session: aiohttp.ClientSession, url: str, peak: dict[str, int | None]) -> None:
    """Peak running batch: per engine, `max_running_seen` if it rose during the run (polling
    can miss a short peak), else the largest sampled `running`; the largest engine wins."""
    base: dict[str, int] = {}
    seen: dict[str, int] = {}
    first = True
    while True:
        try:
            async with session.get(url + "/info", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status != 200:
                    if first:
                        return  # no /info (the naive baseline): peak stays None
                    info = None
                else:
                    info = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            if first:
                return
            info = None
        if isinstance(info, dict):
            for eng in info.get("engines") or []:
                key = str(eng.get("id", eng.get("pid")))
                mrs = int(eng.get("max_running_seen") or 0)
                run = int(eng.get("running") or 0)
                base.setdefault(key, mrs)
                best = max(seen.get(key, 0), run)
                if mrs > base[key]:
                    best = max(best, mrs)
                seen[key] = best
            peak["value"] = max(seen.values(), default=0)
        first = False
        await asyncio.sleep(INFO_POLL_S)


def auth_headers() -> dict[str, str]:
    """`Authorization` for a server started with --api-key: the same KILN_API_KEY env var `serve` reads."""
    key = os.environ.get("KILN_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def run_load(
    url: str,
    cfg: LoadConfig,
    prompts: list[Prompt] | Workload,
    *,
    progress: bool = True,
    desc: str = "bench",
    dialect: Dialect = NATIVE,
) -> RunResult:
    """Run the workload against `url` (e.g. http://127.0.0.1:8000) and return every request's record;
    `dialect` says whether the server speaks kiln's routes or OpenAI's /v1/completions; `prompts` is the
    shipped set (drawn per request) or a `Workload` (long prompts, a chat)."""
    workload = as_workload(prompts)
    if cfg.duration is None:
        workload.prepare(cfg.seed, cfg.users, cfg.requests)
    url = url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s, sock_connect=10)
    connector = aiohttp.TCPConnector(limit=0, force_close=not dialect.keep_alive)
    records: list[RequestRecord] = []
    peak: dict[str, int | None] = {"value": None}
    total = None if cfg.duration is not None else cfg.users * cfg.requests * cfg.max_new_tokens
    bar = progress_bar(total, desc, progress)
    done = 0

    def on_tokens(k: int) -> None:
        count_tokens(bar, k)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=auth_headers()) as session:
        t_run = time.perf_counter()
        deadline = None if cfg.duration is None else t_run + cfg.duration

        async def user(u: int) -> None:
            index = 0
            conversation = workload.session(cfg.seed, u)
            while (index < cfg.requests) if deadline is None else (time.perf_counter() < deadline):
                nonlocal done
                prompt = conversation.next_prompt(index)
                rec = await _one(session, url, dialect, cfg, prompt, u, index, t_run, on_tokens)
                conversation.answered(rec.text)
                records.append(rec)
                done += 1
                failed = sum(not r.ok for r in records)
                bar.set_postfix_str(f"{done} requests done" + (f", {failed} failed" if failed else ""), refresh=False)
                index += 1

        poller = asyncio.create_task(_poll_info(session, url, peak) if dialect.polls_info else asyncio.sleep(0))
        try:
            await asyncio.gather(*(user(u) for u in range(cfg.users)))
        finally:
            wall = time.perf_counter() - t_run
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            bar.close()
    records.sort(key=lambda r: (r.user, r.index))
    return RunResult(records=records, wall_s=wall, peak_running=peak["value"])


async def warm_up(url: str, timeout_s: float = 300.0, dialect: Dialect = NATIVE) -> None:
    """One short request, not measured, so one-time costs (first-call allocation, lazy
    compilation) do not land in the first user's TTFT; failures here show up in the run itself."""
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s), headers=auth_headers()
        ) as session:
            async with session.post(url.rstrip("/") + dialect.plain_path, json=dialect.warm_up_body()) as resp:
                await resp.read()
