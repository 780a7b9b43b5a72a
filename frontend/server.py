"""`cli.py serve`: start the engines, run the HTTP frontend on uvloop, stop everything cleanly.

The frontend runs in this process; each engine is a child process started with the same Python.
The IPC sockets live in a private temporary folder removed at exit, next to `frontend.json`,
which lets `cli.py engine` find this server without the user copying socket paths. Engines also
watch this process and exit if it disappears, so even a `kill -9` of the server leaves no orphans.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from aiohttp import web
from tokenizers import Tokenizer

from frontend.app import build_app
from frontend.chat_template import ChatTemplate
from hardware.model_source import ModelSource, resolve_model
from hardware.plan import PlanOverrides
from ipc.discovery import RUNTIME_PREFIX, FrontendInfo
from ipc.engine_client import EngineClient

log = logging.getLogger("kiln.frontend")

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINE_STOP_TIMEOUT_S = 10.0


@dataclass
class ServeConfig:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    devices: list[int | None] = field(default_factory=lambda: [None])  # one engine each; None = CPU
    overrides: PlanOverrides = field(default_factory=PlanOverrides)
    engine_port: int | None = None  # also accept engines over tcp on this port and the next
    engine_host: str = "0.0.0.0"
    secret: str | None = None
    api_key: str | None = None  # clients must send `Authorization: Bearer <key>`


def load_tokenizer(source: ModelSource) -> Tokenizer:
    if source.is_hub:
        return Tokenizer.from_pretrained(source.path)
    return Tokenizer.from_file(str(Path(source.path) / "tokenizer.json"))


class Server:
    def __init__(self, config: ServeConfig, source: ModelSource):
        self.config = config
        self.source = source
        self.runtime_dir = Path(tempfile.mkdtemp(prefix=RUNTIME_PREFIX))
        self.processes: dict[str, subprocess.Popen] = {}
        self.stopping = asyncio.Event()
        self.ever_ready = False
        self.info = FrontendInfo(
            input=f"ipc://{self.runtime_dir}/input", output=f"ipc://{self.runtime_dir}/output",
            model=source.name, model_path=source.path, pid=os.getpid(), url=f"http://{config.host}:{config.port}")
        inputs, outputs = [self.info.input], [self.info.output]
        if config.engine_port is not None:
            self.info.tcp_input = f"tcp://{config.engine_host}:{config.engine_port}"
            self.info.tcp_output = f"tcp://{config.engine_host}:{config.engine_port + 1}"
            inputs.append(self.info.tcp_input)
            outputs.append(self.info.tcp_output)
        self.client = EngineClient(inputs, outputs, source.name, config.secret)

    def start_engine(self, engine_id: str, gpu: int | None) -> None:
        cmd = [
            sys.executable, "-m", "engine_core.main",
            "--input", self.info.input, "--output", self.info.output,
            "--model", self.source.path, "--model-name", self.source.name,
            "--engine-id", engine_id, "--watch-pid", str(os.getpid()),
            "--overrides", msgspec.json.encode(self.config.overrides).decode(),
        ]
        if gpu is not None:
            cmd += ["--gpu", str(gpu)]
        env = dict(os.environ)
        if self.config.secret:
            env["KILN_SECRET"] = self.config.secret  # env, not argv: other users can read argv in ps
        self.processes[engine_id] = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, start_new_session=True)

    async def watch_engines(self) -> None:
        """Turn a child engine's exit into `engine_lost` at once (attached engines are caught by
        their missing heartbeats); give up if no engine ever became ready."""
        while not self.stopping.is_set():
            for engine_id, process in list(self.processes.items()):
                code = process.poll()
                if code is not None:
                    del self.processes[engine_id]
                    self.client.engine_lost(engine_id, f"process {process.pid} exited with code {code}")
            if not self.processes and not self.ever_ready and not self.client.engine_ready.is_set():
                log.error("no engine could start: %s", "; ".join(self.client.failures) or "all engines exited")
                self.stopping.set()
            await asyncio.sleep(0.2)

    async def run(self) -> int:
        await self.client.start()
        (self.runtime_dir / "frontend.json").write_bytes(msgspec.json.encode(self.info))
        for index, gpu in enumerate(self.config.devices):
            self.start_engine(f"engine-{index}", gpu)
        template = None if self.source.is_hub else ChatTemplate.from_folder(self.source.path)
        app = build_app(self.client, load_tokenizer(self.source), self.source.name, template, self.config.api_key)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        await site.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        watcher = asyncio.create_task(self.watch_engines())
        ready = asyncio.create_task(self.client.engine_ready.wait())
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait([ready, stop], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if ready.done():
            self.ever_ready = True
            print(f"kiln: serving {self.source.name} on http://{self.config.host}:{self.config.port}", flush=True)
            await stop
        else:
            code = 1
            print("kiln: could not start: " + ("; ".join(self.client.failures) or "engine exited"),
                  file=sys.stderr, flush=True)
        ready.cancel()
        watcher.cancel()
        await runner.cleanup()
        await self.client.close()
        self.stop_engines()
        return code

    def stop_engines(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(ENGINE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def cleanup(self) -> None:
        self.stop_engines()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def serve(config: ServeConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s frontend %(levelname)s %(message)s")
    if config.engine_port is not None and not config.secret:
        print("kiln: --engine-port accepts engines from other machines; it needs --secret (or KILN_SECRET) "
              "so that strangers cannot attach or inject requests", file=sys.stderr)
        return 2
    source = resolve_model(config.model)
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


def run_on_uvloop(coroutine):
    try:
        import uvloop
    except ImportError:  # Windows: the default loop works, just slower
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
