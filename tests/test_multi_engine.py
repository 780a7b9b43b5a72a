"""Several engines behind one frontend: routing, an attached engine, engine loss, the tcp secret."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from tests.conftest import REPO_ROOT, ServerProcess, free_port_pair
from tests.http_client import generate, post_json, run, stream_events
from tests.polling import wait_for

pytestmark = pytest.mark.slow

SMALL = ("--max-context", "384", "--max-batch", "8")
GREEDY = {"prompt": "def quicksort(items):", "max_new_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def two_engines(default_model_path):
    proc = ServerProcess("--engines", "2", *SMALL)
    try:
        proc.wait_ready()
        wait_for(lambda: len([e for e in proc.info()["engines"] if e["ready"]]) == 2, 120, "both engines ready")
        yield proc
    finally:
        proc.stop()


def attach_engine(*args: str, env: dict | None = None, stdout=subprocess.PIPE) -> subprocess.Popen:
    """`cli.py engine ...`; its output on a pipe (read it with communicate) or in the file given as stdout."""
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "cli.py"), "engine", *args],
        cwd=REPO_ROOT,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_burst_spreads_over_engines(two_engines):
    async def burst():
        async with aiohttp.ClientSession() as session:
            bodies = [{"prompt": f"Item {i}:", "max_new_tokens": 12, "temperature": 0.8, "seed": i} for i in range(20)]
            return await asyncio.gather(*(post_json(session, two_engines.url + "/generate", b) for b in bodies))

    before = {e["id"]: e["served"] for e in two_engines.info()["engines"]}
    results = run(burst())
    assert all(status == 200 for status, _ in results), results
    served = {e["id"]: e["served"] - before[e["id"]] for e in two_engines.info()["engines"]}
    assert sum(served.values()) == 20 and all(n > 0 for n in served.values()), served


def test_greedy_output_alone_is_the_same_on_every_engine(two_engines):
    first = run(generate(two_engines.url, GREEDY))[1]
    wait_for(lambda: all(e["running"] == 0 for e in two_engines.info()["engines"]), 10, "idle engines")
    second = run(generate(two_engines.url, GREEDY))[1]
    assert first["engine"] != second["engine"], "sequential requests should alternate between idle engines"
    assert first["token_ids"] == second["token_ids"]


# An attached engine is a third model process on the module's server: on a loaded 2-core machine its
# start (torch import, weights, warm-up) and every step share the cores with two more engines and the
# frontend. So it gets the smallest plan that serves (a short warm-up), the burst is one short request
# per engine, its log goes to a file (a pipe nobody reads could fill and block it) and the test gets
# room beyond the default per-test timeout.
ATTACHED_PLAN = ("--max-context", "128", "--max-batch", "2")


@pytest.mark.timeout(600)
def test_attached_engine_joins_and_serves(two_engines, tmp_path):
    port = two_engines.url.rpartition(":")[2]
    log_path = tmp_path / "attached-engine.log"
    with open(log_path, "w") as log:
        engine = attach_engine("--cpu", "--frontend", port, "--engine-id", "attached-1", *ATTACHED_PLAN, stdout=log)
    try:
        wait_for(
            lambda: (
                any(e["id"] == "attached-1" and e["ready"] for e in two_engines.info()["engines"])
                or engine.poll() is not None
            ),
            300,
            "the attached engine to be ready",
        )
        assert engine.poll() is None, log_path.read_text()
        wait_for(lambda: all(e["running"] == 0 for e in two_engines.info()["engines"]), 60, "idle engines")

        async def burst():  # three idle engines, three requests: each engine gets one (least outstanding work)
            async with aiohttp.ClientSession() as session:
                body = {**GREEDY, "max_new_tokens": 4}
                return await asyncio.gather(
                    *(post_json(session, two_engines.url + "/generate", body) for _ in range(3))
                )

        results = run(burst())
        assert all(status == 200 for status, _ in results), results
        assert "attached-1" in {body["engine"] for _, body in results}, (results, log_path.read_text())
    finally:
        engine.send_signal(signal.SIGTERM)
        try:
            engine.wait(60)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
    wait_for(
        lambda: all(e["id"] != "attached-1" for e in two_engines.info()["engines"]),
        60,
        "the stopped engine to leave /info",
    )


def test_engine_with_another_model_is_refused(two_engines, tmp_path):
    from model.source import resolve_model

    other = tmp_path / "other-model"  # the same files under another name: another model as far as names go
    shutil.copytree(resolve_model(None).path, other)
    engine = attach_engine("--cpu", "--frontend", two_engines.url.rpartition(":")[2], "--model", str(other), *SMALL)
    output, _ = engine.communicate(timeout=120)
    assert engine.returncode != 0
    assert "refused" in output and "other-model" in output, output
    assert all(e["id"].startswith("engine-") for e in two_engines.info()["engines"])


def test_killed_engine_ends_its_streams_survivor_serves_and_it_comes_back(default_model_path):
    proc = ServerProcess("--engines", "2", *SMALL)
    try:
        proc.wait_ready()
        wait_for(lambda: len([e for e in proc.info()["engines"] if e["ready"]]) == 2, 120, "both engines ready")
        victim = proc.info()["engines"][0]

        async def timed_stream(session, body):
            events = await stream_events(session, proc.url + "/generate_stream", body)
            return events, time.monotonic()

        async def streams_with_kill():
            async with aiohttp.ClientSession() as session:
                body = {"prompt": "Count to one hundred:", "max_new_tokens": 300, "ignore_eos": True}
                tasks = [asyncio.create_task(timed_stream(session, body)) for _ in range(10)]
                await asyncio.sleep(4)
                os.kill(victim["pid"], signal.SIGKILL)
                killed_at = time.monotonic()
                return [(events, ended - killed_at) for events, ended in await asyncio.gather(*tasks)]

        outcome = run(streams_with_kill())
        results = [events for events, _ in outcome]
        assert all(delay < 10 for events, delay in outcome if "error" in events[-1])
        errors = [events[-1] for events in results if "error" in events[-1]]
        finished = [events[-1] for events in results if "finish_reason" in events[-1]]
        assert len(errors) + len(finished) == 10
        assert errors, "the killed engine's streams should end with an explicit error event"
        assert all("lost" in e["error"]["message"] for e in errors)
        status, body = run(generate(proc.url, GREEDY))  # the survivor, or the victim if already back
        assert status == 200, body
        # serve started the victim, so it restarts it under the same name
        wait_for(
            lambda: any(
                e["id"] == victim["id"] and e["ready"] and e["pid"] != victim["pid"] for e in proc.info()["engines"]
            ),
            120,
            "the killed engine to be restarted",
        )
    finally:
        proc.stop()


def test_error_events_arrive_within_ten_seconds_of_engine_loss(default_model_path):
    """Timing of the explicit errors, measured on the client side."""
    proc = ServerProcess("--engines", "2", *SMALL)
    try:
        proc.wait_ready()
        wait_for(lambda: len([e for e in proc.info()["engines"] if e["ready"]]) == 2, 120, "both engines ready")

        async def scenario():
            async with aiohttp.ClientSession() as session:
                body = {"prompt": "List prime numbers:", "max_new_tokens": 300, "ignore_eos": True}
                tasks = [
                    asyncio.create_task(stream_events(session, proc.url + "/generate_stream", body)) for _ in range(6)
                ]
                await asyncio.sleep(4)
                for engine in proc.info()["engines"]:
                    os.kill(engine["pid"], signal.SIGKILL)
                killed_at = time.monotonic()
                results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
                return results, time.monotonic() - killed_at

        results, elapsed = run(scenario())
        assert elapsed < 10
        assert all("error" in events[-1] for events in results)
    finally:
        proc.stop()


def test_tcp_engine_needs_the_secret(default_model_path):
    engine_port = free_port_pair()  # serve binds it and the next one; its HTTP port must be neither
    proc = ServerProcess(
        "--engines",
        "1",
        "--engine-port",
        str(engine_port),
        *SMALL,
        env={"KILN_SECRET": "right"},
        avoid_ports=(engine_port, engine_port + 1),
    )
    try:
        proc.wait_ready()
        stranger = attach_engine(
            "--cpu", "--frontend", f"tcp://127.0.0.1:{engine_port}", *SMALL, env={"KILN_SECRET": "wrong"}
        )
        output, _ = stranger.communicate(timeout=120)
        assert stranger.returncode != 0
        assert "secret" in output, output
        assert len(proc.info()["engines"]) == 1
        friend = attach_engine(
            "--cpu",
            "--frontend",
            f"tcp://127.0.0.1:{engine_port}",
            "--engine-id",
            "friend",
            *SMALL,
            env={"KILN_SECRET": "right"},
        )
        try:
            wait_for(
                lambda: any(e["id"] == "friend" and e["ready"] for e in proc.info()["engines"]),
                180,
                "the engine with the right secret to attach",
            )
        finally:
            friend.send_signal(signal.SIGTERM)
            friend.wait(30)
    finally:
        proc.stop()
