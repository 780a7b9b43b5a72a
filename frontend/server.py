"""`cli.py serve`: start the engines, run the HTTP frontend on uvloop, stop everything cleanly.

The frontend runs in this process; each engine is a child process started with the same Python,
kept alive by the supervisor (restarted with backoff when lost). The IPC sockets live in a private
temporary folder removed at exit, next to `frontend.json`, which lets `cli.py engine` find this
server without the user copying socket paths. Engines also watch this process and exit within a
second if it disappears (removing that folder), so even a `kill -9` of the server leaves nothing.

SIGTERM drains: new requests get a 503 at once, open streams may finish until the drain deadline,
then end with an error event, and the process exits.

Slow clients are bounded: a connection must deliver a request's headers within the header timeout
(also how long an idle keep-alive connection stays open) and its body within the body timeout;
`KILN_HEADER_TIMEOUT_S` and `KILN_BODY_TIMEOUT_S` override them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from aiohttp import web
from tokenizers import Tokenizer

from frontend.app import DEFAULT_BODY_TIMEOUT_S, DRAINING, build_app
from frontend.chat_template import ChatTemplate
from frontend.router import EngineClient
from frontend.supervisor import EngineSupervisor
from ipc.discovery import RUNTIME_PREFIX, FrontendInfo
from model.source import ModelNotFound, ModelSource, resolve_model
from planning.plan import PlanOverrides

log = logging.getLogger("kiln.frontend")

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINE_STOP_TIMEOUT_S = 10.0
CONNECTION_CLOSE_TIMEOUT_S = 5.0  # after the drain, for handlers to send their last event
DEFAULT_HEADER_TIMEOUT_S = 15.0
UNREAD_BODY_DISCARD_S = 2.0  # after refusing a body unread: read and drop the rest, then close
WAITING_FIRST_S = 1.5  # the first "waiting for engine" line comes this soon after the start ...
WAITING_EVERY_S = 5.0  # ... and then this often until an engine is ready


def seconds_from_env(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


@dataclass
class ServeConfig:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    devices: list[int | None] = field(default_factory=lambda: [None])  # one engine each; None = CPU
    overrides: PlanOverrides = field(default_factory=PlanOverrides)
    engine_port: int | None = None  # also accept engines over tcp on this port and the next, on `host`
    engine_host: str | None = None  # where the tcp engine sockets listen, when not `host` (--ray: this node's IP)
    ray: object | None = None  # frontend.ray_engines.RayOptions: engines are Ray actors (serve --ray)
    secret: str | None = None
    api_key: str | None = None  # clients must send `Authorization: Bearer <key>`
    max_restarts: int = 5  # restarts of one engine in a row before the frontend gives up (exits non-zero)
    drain_timeout: float = 30.0  # seconds open streams may run on after SIGTERM
    # a connection's headers must arrive within this many seconds of its start (or of its last answer)
    header_timeout: float = field(
        default_factory=lambda: seconds_from_env("KILN_HEADER_TIMEOUT_S", DEFAULT_HEADER_TIMEOUT_S)
    )
    body_timeout: float = field(default_factory=lambda: seconds_from_env("KILN_BODY_TIMEOUT_S", DEFAULT_BODY_TIMEOUT_S))


def load_tokenizer(source: ModelSource) -> Tokenizer:
    if source.is_hub:
        return Tokenizer.from_pretrained(source.path)
    return Tokenizer.from_file(str(Path(source.path) / "tokenizer.json"))


class Server:
    def __init__(self, config: ServeConfig, source: ModelSource):
        self.config = config
        self.source = source
        self.runtime_dir = Path(tempfile.mkdtemp(prefix=RUNTIME_PREFIX))
        self.stopping = asyncio.Event()
        self.info = FrontendInfo(
            input=f"ipc://{self.runtime_dir}/input",
            output=f"ipc://{self.runtime_dir}/output",
            model=source.name,
            model_path=source.path,
            pid=os.getpid(),
            url=f"http://{config.host}:{config.port}",
        )
        inputs, outputs = [self.info.input], [self.info.output]
        if config.engine_port is not None:
            engine_host = config.engine_host or config.host
            self.info.tcp_input = f"tcp://{engine_host}:{config.engine_port}"
            self.info.tcp_output = f"tcp://{engine_host}:{config.engine_port + 1}"
            inputs.append(self.info.tcp_input)
            outputs.append(self.info.tcp_output)
        self.client = EngineClient(inputs, outputs, source.name, config.secret)
        if config.ray is not None:  # engines as Ray actors; its watch() places them
            from frontend.ray_engines import RaySupervisor

            self.supervisor = RaySupervisor(self.client, config, config.overrides)
        else:
            self.supervisor = EngineSupervisor(self.client, self.launch_engine, config.max_restarts)
        self.client.on_engine_lost = self.supervisor.on_engine_lost

    def launch_engine(self, engine_id: str, gpu: int | None) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "engine_core.main",
            "--input",
            self.info.input,
            "--output",
            self.info.output,
            "--model",
            self.source.path,
            "--model-name",
            self.source.name,
            "--engine-id",
            engine_id,
            "--watch-pid",
            str(os.getpid()),
            "--overrides",
            msgspec.json.encode(self.config.overrides).decode(),
        ]
        if gpu is not None:
            cmd += ["--gpu", str(gpu)]
        env = dict(os.environ)
        if self.config.secret:
            env["KILN_SECRET"] = self.config.secret  # env, not argv: other users can read argv in ps
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, start_new_session=True)

    async def run(self) -> int:
        await self.client.start()
        (self.runtime_dir / "frontend.json").write_bytes(msgspec.json.encode(self.info))
        for index, gpu in enumerate(self.config.devices):
            self.supervisor.start(f"engine-{index}", gpu)
        template = None if self.source.is_hub else ChatTemplate.from_folder(self.source.path)
        app = build_app(
            self.client,
            load_tokenizer(self.source),
            self.source.name,
            template,
            self.config.api_key,
            self.supervisor,
            self.config.body_timeout,
        )
        # aiohttp's keep-alive timer runs from a connection's start until a request's headers are
        # complete, so it is also the header timeout that stops a slowloris
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=CONNECTION_CLOSE_TIMEOUT_S,
            keepalive_timeout=self.config.header_timeout,
            lingering_time=UNREAD_BODY_DISCARD_S,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        await site.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        watcher = asyncio.create_task(self.supervisor.watch())
        code = await self.serve_until_stopped()
        if code == 0:
            await self.drain(app)
        watcher.cancel()
        await runner.cleanup()
        await self.client.close()
        self.supervisor.stop_all(ENGINE_STOP_TIMEOUT_S)
        return code

    def waiting_lines(self) -> list[str]:
        """What the start waits for, one line per engine not ready yet: starting, loading, restarting."""
        now = time.monotonic()
        lines = []
        for engine_id, child in self.supervisor.children.items():
            handle = self.client.engines.get(engine_id)
            if handle is not None and handle.ready:
                continue
            if child.restart_at is not None:
                what = f"restarting in {max(0.0, child.restart_at - now):.0f} s ({child.last_loss or 'lost'})"
            elif child.process is None:
                what = "exited"
            elif handle is None:
                what = "starting (planning, connecting)"
            else:
                what = "loading the model and warming up"
            lines.append(f"kiln: waiting for engine {engine_id}: {what} ({now - child.started_at:.0f} s)")
        return lines

    async def report_waiting(self) -> None:
        """Until the first engine is ready: a line soon after the start, then every few seconds (stderr)."""
        await asyncio.sleep(WAITING_FIRST_S)
        while not self.client.engine_ready.is_set():
            for line in self.waiting_lines():
                print(line, file=sys.stderr, flush=True)
            await asyncio.sleep(WAITING_EVERY_S)

    async def serve_until_stopped(self) -> int:
        """0 after a stop signal; 1 when no engine could start, or the supervisor gave up."""
        ready = asyncio.create_task(self.client.engine_ready.wait())
        stop = asyncio.create_task(self.stopping.wait())
        trouble = asyncio.create_task(self.supervisor.changed.wait())
        waiting = asyncio.create_task(self.report_waiting())
        try:
            await asyncio.wait([ready, stop, trouble], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if ready.done():
                print(f"kiln: serving {self.source.name} on http://{self.config.host}:{self.config.port}", flush=True)
                await asyncio.wait([stop, trouble], return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                return 0
            if self.supervisor.gave_up:
                print(f"kiln: giving up: {self.supervisor.gave_up}", file=sys.stderr, flush=True)
            else:
                print(
                    "kiln: could not start: " + ("; ".join(self.client.failures) or "engine exited"),
                    file=sys.stderr,
                    flush=True,
                )
            return 1
        finally:
            for task in (ready, stop, trouble, waiting):
                task.cancel()

    async def drain(self, app: web.Application) -> None:
        """Refuse new requests at once; let open streams finish until the deadline, then end them."""
        app[DRAINING].set()
        deadline = asyncio.get_running_loop().time() + self.config.drain_timeout
        if self.client.streams:
            log.info("draining %d open requests (at most %.0f s)", len(self.client.streams), self.config.drain_timeout)
        while self.client.streams and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        if self.client.streams:
            log.warning("drain deadline: ending %d open requests", len(self.client.streams))
            await self.client.end_all(f"the server is shutting down (drain timeout {self.config.drain_timeout:.0f} s)")
            await asyncio.sleep(0.2)  # let the handlers send their error events

    def cleanup(self) -> None:
        self.supervisor.stop_all(ENGINE_STOP_TIMEOUT_S)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def serve(config: ServeConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s frontend %(levelname)s %(message)s")
    if config.ray is not None:
        from frontend.ray_engines import connect

        if problem := connect(config):  # joins (or starts) the cluster; chooses the engine socket
            print(f"kiln: {problem}", file=sys.stderr)
            return 2
    if config.engine_port is not None and not config.secret:
        print(
            "kiln: --engine-port accepts engines from other machines; it needs --secret (or KILN_SECRET) "
            "so that strangers cannot attach or inject requests",
            file=sys.stderr,
        )
        return 2
    engine_host = config.engine_host or config.host
    for host, port, what in [(config.host, config.port, "--port")] + (
        [(engine_host, config.engine_port, "--engine-port"), (engine_host, config.engine_port + 1, "--engine-port")]
        if config.engine_port is not None
        else []
    ):
        if problem := port_problem(host, port, what):
            print(f"kiln: {problem}", file=sys.stderr)
            return 2
    try:
        source = resolve_model(config.model)
    except ModelNotFound as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        return 2
    if not source.is_hub and not (Path(source.path) / "tokenizer.json").is_file():
        print(
            f"kiln: {source.path} has no tokenizer.json; the frontend tokenizes with it (save one there with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(folder))",
            file=sys.stderr,
        )
        return 2
    server = None

    async def main() -> int:
        nonlocal server
        server = Server(config, source)
        return await server.run()

    try:
        return run_on_uvloop(main())
    finally:
        if server is not None:
            server.cleanup()


def port_problem(host: str, port: int, flag: str = "--port") -> str | None:
    """Why the server could not listen on host:port (with what to do), or None. Binds and releases at once, with the
    SO_REUSEADDR that aiohttp uses, so a port in TIME_WAIT counts as free, as it does for aiohttp."""
    if not 0 <= port <= 65535:
        return f"port {port} is not a TCP port: pass {flag} between 0 and 65535"
    if port == 0:
        return None
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"host {host} cannot be resolved ({exc.strerror}); pass --host an address of this machine"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            if os.name != "nt":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} on {host} is in use (choose another {flag}, or stop what listens there)"
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"cannot listen on {host}: not an address of this machine (pass --host one that is)"
                if exc.errno == errno.EACCES:
                    return f"port {port} on {host} needs privileges (choose {flag} 1024 or above)"
                return f"cannot listen on {host}:{port}: {exc.strerror} (choose another {flag} or --host)"
    return None


def run_on_uvloop(coroutine):
    try:
        import uvloop
    except ImportError:  # Windows: the default loop works, just slower
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
