"""`serve --ray`: engines as Ray actors on a local Ray cluster (CPU engines, the default model).

Real processes throughout: the server starts its own Ray cluster (or joins one started here with
`ray start`, a second `ray start --address` on this machine standing in for a second node), Ray
places the engine actors, each actor runs `cli.py engine` over tcp with the run's secret. Skipped,
with the reason, where Ray (the `ray` extra) is not installed; `.ci/run` installs it and runs them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e .[ray]")

from tests.conftest import REPO_ROOT, ServerProcess, free_port, pid_alive  # noqa: E402
from tests.http_client import generate, post_json, run  # noqa: E402
from tests.polling import wait_for  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SMALL = ("--max-context", "384", "--max-batch", "8")
LONG = {"prompt": "Once upon a time", "max_new_tokens": 300, "temperature": 0, "ignore_eos": True}


def ready_engines(server: ServerProcess) -> list[dict]:
    return [e for e in server.info()["engines"] if e["ready"]]


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def all_gone(processes: list[psutil.Process]) -> bool:
    return not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def stop_and_check_nothing_left(server: ServerProcess, extra_pids: list[int] = ()) -> None:
    """SIGTERM the server; its Ray cluster, actors and engine processes must all go."""
    left_behind = descendants(server.process.pid)
    server.stop(timeout=90)
    wait_for(lambda: all_gone(left_behind), 60, "the server's Ray processes and engines to exit")
    wait_for(lambda: not any(pid_alive(pid) for pid in extra_pids), 30, "the engine processes to exit")


@pytest.fixture(scope="module")
def ray_server(default_model_path):
    server = ServerProcess("--ray", "--engines", "2", *SMALL)
    try:
        server.wait_ready(timeout=300)
        wait_for(lambda: len(ready_engines(server)) == 2, 240, "both engine actors ready")
        yield server
    finally:
        if server.process.poll() is None:
            stop_and_check_nothing_left(server)
        else:
            server.stop()


def test_two_engine_actors_serve(ray_server):
    engines = ready_engines(ray_server)
    assert sorted(e["id"] for e in engines) == ["ray-engine-0", "ray-engine-1"]
    assert all("ray node" in e["node"] for e in engines), engines  # /info: where each engine runs

    async def burst():
        async with aiohttp.ClientSession() as session:
            bodies = [{"prompt": f"Item {i}:", "max_new_tokens": 8, "temperature": 0.8, "seed": i} for i in range(12)]
            return await asyncio.gather(*(post_json(session, ray_server.url + "/generate", b) for b in bodies))

    results = run(burst())
    assert all(status == 200 for status, _ in results), results
    assert {body["engine"] for _, body in results} == {"ray-engine-0", "ray-engine-1"}


def test_killed_engine_is_restarted_by_ray_and_its_stream_ends_with_an_error(ray_server):
    async def stream_and_kill():
        async with aiohttp.ClientSession() as session:
            async with session.post(ray_server.url + "/generate_stream", json=LONG) as response:
                assert response.status == 200
                victim, events = None, []
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    events.append(line)
                    if victim is None:  # a token arrived: the request is running on one engine; kill that one
                        busy = [e for e in ray_server.info()["engines"] if e["running"]]
                        assert len(busy) == 1, busy
                        victim = busy[0]
                        os.kill(victim["pid"], signal.SIGKILL)
                        killed_at = time.monotonic()
                return victim, killed_at, events

    victim, killed_at, events = run(stream_and_kill())
    last = events[-1].decode()
    assert '"error"' in last and victim["id"] in last, last  # explicit, names the engine; never a silent end

    def healed():
        return [e for e in ready_engines(ray_server) if e["id"] == victim["id"] and e["pid"] != victim["pid"]]

    new = wait_for(healed, 120, "Ray to restart the killed engine's actor and the new engine to be ready")[0]
    print(
        f"\nheal time after kill -9: {time.monotonic() - killed_at:.1f} s "
        f"(engine {victim['id']}: pid {victim['pid']} -> {new['pid']})"
    )
    assert new["node"] == victim["node"]

    def served_by_new_engine():
        status, body = run(generate(ray_server.url, {"prompt": "Hello", "max_new_tokens": 4, "temperature": 0}))
        assert status == 200, body
        return body["engine"] == victim["id"]

    wait_for(served_by_new_engine, 60, "the restarted engine to serve a request")
    assert not pid_alive(victim["pid"])


# ---- a second Ray node (a second `ray start --address` on this machine) ------------------------------


# recent Ray turns token authentication on for `ray start` clusters; every process then needs it on
# (the token is ~/.ray/auth_token, shared here; across machines it must be copied, see README)
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": ""}


def ray_start(*args: str, log: Path) -> subprocess.Popen:
    """`ray start --block ...`: stays in the foreground, and stops the node's processes when terminated."""
    ray_cli = Path(sys.executable).parent / "ray"
    process = subprocess.Popen(
        [
            str(ray_cli),
            "start",
            "--block",
            "--num-cpus",
            "1",
            "--disable-usage-stats",
            "--object-store-memory",
            str(100 * 1024 * 1024),
            *args,
        ],
        cwd=REPO_ROOT,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **RAY_ENV},
    )
    wait_for(lambda: "Ray runtime started" in log.read_text() or process.poll() is not None, 120, f"ray start {args}")
    assert process.poll() is None, log.read_text()[-3000:]
    return process


def stop_node(node: subprocess.Popen) -> None:
    processes = descendants(node.pid)
    if node.poll() is None:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    for process in processes:  # anything `ray start` left (it should leave nothing)
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def test_engines_attach_from_a_second_node_and_a_lost_node_takes_only_its_engine(default_model_path, tmp_path):
    port = free_port()
    nodes = [ray_start("--head", "--port", str(port), "--include-dashboard=false", log=tmp_path / "head.log")]
    server = None
    try:
        address = f"127.0.0.1:{port}"
        nodes.append(ray_start("--address", address, log=tmp_path / "node2.log"))
        server = ServerProcess("--ray", address, "--engines-per-node", "1", *SMALL, env=RAY_ENV)
        server.wait_ready(timeout=300)
        engines = wait_for(
            lambda: len(ready_engines(server)) == 2 and ready_engines(server),
            300,
            "one engine ready on each of the two nodes",
        )
        assert len({e["node"] for e in engines}) == 2, engines  # two nodes, one engine each
        for _ in range(4):
            status, body = run(generate(server.url, {"prompt": "Hi", "max_new_tokens": 4, "temperature": 0}))
            assert status == 200, body

        # lose the second node: its engine goes, the other one keeps serving
        head_node_ids = {e["id"] for e in engines}
        stop_node(nodes.pop())
        survivors = wait_for(
            lambda: len(server.info()["engines"]) == 1 and server.info()["engines"],
            120,
            "the lost node's engine to be dropped",
        )
        assert survivors[0]["id"] in head_node_ids
        status, body = run(generate(server.url, {"prompt": "Hi", "max_new_tokens": 4, "temperature": 0}))
        assert status == 200 and body["engine"] == survivors[0]["id"], body
        stop_and_check_nothing_left(server, [e["pid"] for e in engines])
        server = None
    finally:
        if server is not None:
            server.stop(timeout=90)
        for node in reversed(nodes):
            stop_node(node)
