"""The engine's two socket threads and its handshake with the frontend.

The input thread owns a DEALER socket (identity = engine id): it first says hello, so the
frontend's ROUTER knows the route back before it answers, then decodes every frame into `inbox`.
The output thread owns a PUSH socket: it encodes and sends what the busy loop puts in `outbox`,
and a heartbeat whenever it has been quiet for a second. Both are daemon threads; a crash in
either kills the process, because an engine that cannot talk must be noticed at once.

A third thread watches the frontend's process when it runs on this machine, whatever the busy
loop is doing (a long step, a send blocked on a full queue): once the frontend is gone, nobody
will read what this engine produces, so it removes the frontend's runtime folder (the frontend
had no chance to) and exits at once.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path

import msgspec
import zmq

from ipc.discovery import RUNTIME_PREFIX, FrontendInfo
from ipc.messages import (
    EngineHello,
    EngineStats,
    Heartbeat,
    Welcome,
    engine_input_codec,
    engine_output_codec,
    hello_codec,
)
from ipc.security import CurveKeys

log = logging.getLogger("kiln.engine")

HEARTBEAT_SECONDS = 1.0
FRONTEND_CHECK_SECONDS = 0.25
FRONTEND_GONE_EXIT_CODE = 1


def pid_alive(pid: int) -> bool:
    """True while the process runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): the kill check is all there is
        return True


def runtime_dir_of(address: str, frontend_pid: int) -> Path | None:
    """The local frontend's private socket folder, if `address` is one of its ipc:// sockets."""
    if not address.startswith("ipc://"):
        return None
    folder = Path(address[len("ipc://") :]).parent
    if not folder.name.startswith(RUNTIME_PREFIX):
        return None
    try:
        info = msgspec.json.decode((folder / "frontend.json").read_bytes(), type=FrontendInfo)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    return folder if info.pid == frontend_pid else None


class EngineIO:
    def __init__(
        self,
        engine_id: str,
        input_address: str,
        output_address: str,
        watch_pid: int | None = None,
        keys: CurveKeys | None = None,
    ):
        self.engine_id = engine_id
        self.input_address = input_address
        self.output_address = output_address
        self.watch_pid = watch_pid  # the frontend's pid when it runs on this machine
        self.keys = keys
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.stats = EngineStats()
        self.context = zmq.Context()
        self.stopped = threading.Event()
        self.welcomed = threading.Event()
        self.welcome: Welcome | None = None

    def start(self, hello: EngineHello | None) -> None:
        """Start the output thread; with a hello, also the input thread, which sends it first; and
        the frontend watchdog when the frontend runs here."""
        self._thread(self._output_loop, "engine-output")
        if hello is not None:
            self._thread(lambda: self._input_loop(hello), "engine-input")
        if self.watch_pid is not None:
            self._thread(self._watch_frontend, "engine-watchdog")

    def wait_welcome(self, timeout: float) -> Welcome | None:
        return self.welcome if self.welcomed.wait(timeout) else None

    def send(self, message) -> None:
        self.outbox.put(message)

    def close(self, timeout: float = 2.0) -> None:
        """Let queued outputs go out, then stop both threads."""
        deadline = time.monotonic() + timeout
        while not self.outbox.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        self.stopped.set()

    def _thread(self, loop, name: str) -> None:
        def guarded() -> None:
            try:
                loop()
            except Exception:
                log.exception("%s crashed; engine exits", name)
                os._exit(70)

        threading.Thread(target=guarded, name=name, daemon=True).start()

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        if self.keys is not None:
            self.keys.as_client(sock)
        return sock

    def _output_loop(self) -> None:
        encoder, _ = engine_output_codec()
        sock = self._socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(self.output_address)
        last_sent = 0.0
        while not self.stopped.is_set():
            try:
                message = self.outbox.get(timeout=HEARTBEAT_SECONDS / 2)
            except queue.Empty:
                message = None
            if message is None:
                if time.monotonic() - last_sent < HEARTBEAT_SECONDS:
                    continue
                message = Heartbeat(self.engine_id, self.stats)
            sock.send(encoder.encode(message), copy=False)
            last_sent = time.monotonic()
        sock.close()

    def _watch_frontend(self) -> None:
        runtime_dir = runtime_dir_of(self.input_address, self.watch_pid)
        is_parent = os.getppid() == self.watch_pid  # then a changed parent means it died, reaped or not
        while not self.stopped.wait(FRONTEND_CHECK_SECONDS):
            if (is_parent and os.getppid() != self.watch_pid) or not pid_alive(self.watch_pid):
                log.error("frontend process %d is gone; engine exits", self.watch_pid)
                if runtime_dir is not None:
                    shutil.rmtree(runtime_dir, ignore_errors=True)
                os._exit(FRONTEND_GONE_EXIT_CODE)

    def _input_loop(self, hello: EngineHello) -> None:
        hello_encoder, _ = hello_codec()
        _, decoder = engine_input_codec()
        sock = self._socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.engine_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.input_address)
        sock.send(hello_encoder.encode(hello))
        while not self.stopped.is_set():
            frame = sock.recv(copy=False)
            try:
                message = decoder.decode(frame.buffer)
            except Exception as exc:  # a malformed frame must not kill the engine
                log.warning("dropping undecodable input message: %s", exc)
                continue
            if isinstance(message, Welcome):
                self.welcome = message
                self.welcomed.set()
                if not message.accepted:
                    log.error("the frontend refused this engine: %s", message.reason)
                    os._exit(4)
            else:
                self.inbox.put(message)
