"""Progress where a person waits: the conversion heartbeat, bench's token bar, the help examples, the
frontend's "waiting for engine" lines. Cheap: nothing here converts or loads a model."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time

from aiohttp import web
from click.testing import CliRunner

from bench.dialects import NATIVE
from bench.loadgen import _stream_one, count_tokens, progress_bar
from bench.records import RequestRecord
from model.source import Heartbeat


def test_heartbeat_prints_every_interval_with_elapsed_time():
    out = io.StringIO()
    with Heartbeat("converting x.gguf: reading", interval=0.05, stream=out):
        time.sleep(0.4)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3
    assert all(re.fullmatch(r"kiln: converting x\.gguf: reading \(\d+ s\)", line) for line in lines)
    count = len(lines)
    time.sleep(0.15)
    assert len(out.getvalue().splitlines()) == count  # stopped with the block


def test_heartbeat_follows_the_current_stage_and_skips_none():
    out, stage = io.StringIO(), ["a"]
    with Heartbeat(lambda: stage[0], interval=0.05, stream=out):
        time.sleep(0.15)
        stage[0] = None
        time.sleep(0.15)
        stage[0] = "b"
        time.sleep(0.15)
    text = out.getvalue()
    assert "kiln: a (" in text and "kiln: b (" in text and "None" not in text


def test_bench_bar_counts_tokens_and_redraws_rarely_off_a_terminal():
    out = io.StringIO()  # not a TTY: a CI log
    bar = progress_bar(3 * 2 * 8, "ours", file=out)
    assert bar.total == 48 and bar.unit == "tok" and bar.mininterval >= 5
    count_tokens(bar, 1)
    count_tokens(bar, 3)
    count_tokens(bar, 0)
    assert bar.n == 4
    bar.close()


def test_stream_advances_the_bar_per_token_event():
    events = [
        {"text": "a", "token_ids": [1]},
        {"text": "bc", "token_ids": [2, 3]},
        {"text": "d", "token_ids": [4], "finish_reason": "length"},
    ]
    seen: list[int] = []

    async def generate_stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        return resp

    async def main() -> RequestRecord:
        import aiohttp

        app = web.Application()
        app.router.add_post("/generate_stream", generate_stream)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        rec = RequestRecord(user=0, index=0, prompt_id="p", start_s=0.0)
        try:
            async with aiohttp.ClientSession() as session:
                await _stream_one(
                    session, f"http://127.0.0.1:{port}", NATIVE, {}, rec, time.perf_counter(), seen.append
                )
        finally:
            await runner.cleanup()
        return rec

    rec = asyncio.run(main())
    assert rec.ok, rec.error
    assert seen == [1, 2, 1]


EXAMPLES = [
    "    python cli.py serve [--model M] [--port 8000]      run the server",
    "    python cli.py plan [--model M] [--gpu T4:16GiB:7.5] what the server would do on a machine",
    "    python cli.py bench --stream --users 10            throughput and TTFT under load",
    "    python cli.py engine --gpu 1                       attach one more engine to a running server",
]


def test_help_keeps_the_examples_as_written():
    import cli

    for line in EXAMPLES:
        assert line in cli.__doc__  # the examples the test guards are the docstring's own
    result = CliRunner().invoke(cli.cli, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    for line in EXAMPLES:
        assert "  " + line in result.output.splitlines(), result.output


def test_waiting_lines_say_what_each_engine_is_doing():
    from types import SimpleNamespace

    from frontend.server import Server
    from frontend.supervisor import ChildEngine

    now = time.monotonic()
    server = Server.__new__(Server)
    server.supervisor = SimpleNamespace(
        children={
            "engine-0": ChildEngine("engine-0", None, process=object(), started_at=now - 12),
            "engine-1": ChildEngine("engine-1", None, process=object(), started_at=now - 3),
            "engine-2": ChildEngine("engine-2", None, process=object(), started_at=now - 30),
        }
    )
    server.client = SimpleNamespace(
        engines={"engine-0": SimpleNamespace(ready=False), "engine-2": SimpleNamespace(ready=True)}
    )
    lines = server.waiting_lines()
    assert lines == [
        "kiln: waiting for engine engine-0: loading the model and warming up (12 s)",
        "kiln: waiting for engine engine-1: starting (planning, connecting) (3 s)",
    ]
