"""The frontend's transport to its engines: the two bound sockets, their codecs and CURVE auth.

One ROUTER socket talks with each engine's DEALER (hello and welcome, then requests and aborts,
addressed by engine id); one PULL socket receives step outputs and heartbeats. Both live on the
frontend's event loop through zmq.asyncio, so the loop never blocks. With a secret, both sockets
are CURVE servers and only engines holding the secret get in.

This module moves messages and nothing else: which engine gets a request, whether a hello is
welcome, and when an engine counts as lost are decided above it, in frontend/router.py.
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

from ipc.messages import EngineHello, engine_input_codec, engine_output_codec, hello_codec
from ipc.security import CurveKeys

log = logging.getLogger("kiln.frontend")


class EngineLink:
    def __init__(self, input_addresses: list[str], output_addresses: list[str], secret: str | None = None):
        self.input_addresses = input_addresses  # e.g. ipc:// for local engines, tcp:// for other machines
        self.output_addresses = output_addresses
        self.keys = CurveKeys(secret) if secret else None
        self._context = zmq.asyncio.Context()
        self._encoder, _ = engine_input_codec()
        _, self._hello_decoder = hello_codec()  # the ROUTER carries hellos only, in their own codec
        _, self._output_decoder = engine_output_codec()

    async def start(self) -> None:
        if self.keys is not None:
            from zmq.auth.asyncio import AsyncioAuthenticator

            self._auth = AsyncioAuthenticator(self._context)
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=self.keys)
        self._router = self._bind(zmq.ROUTER, self.input_addresses)
        self._pull = self._bind(zmq.PULL, self.output_addresses)

    def _bind(self, kind: int, addresses: list[str]) -> zmq.asyncio.Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished engine raises, never vanishes
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted engine takes its name back from the old route
        if self.keys is not None:
            self.keys.as_server(sock)
        for address in addresses:
            sock.bind(address)
        return sock

    def close(self) -> None:
        self._router.close()
        self._pull.close()
        if self.keys is not None:
            self._auth.stop()
        self._context.term()

    async def send(self, engine_id: str, message) -> bool:
        """Send to one engine; False when it cannot be reached. A message that cannot be encoded raises."""
        try:
            await self._router.send_multipart([engine_id.encode(), self._encoder.encode(message)])
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the engine's socket is gone
            log.warning("cannot reach engine %s: %s", engine_id, exc)
            return False

    async def next_hello(self) -> EngineHello:
        """The next engine's hello on the ROUTER (the answer goes back with `send` on the same route).
        Anything else on that socket, or a hello under another name than its route's, is dropped."""
        while True:
            identity, payload = await self._router.recv_multipart()
            try:
                hello = self._hello_decoder.decode(payload)
            except Exception as exc:  # not a hello (or not one of ours): dropped
                log.warning("dropping an undecodable or unexpected message on the request socket: %s", exc)
                continue
            if hello.engine_id.encode() != identity:
                log.warning("dropping a hello from %s under the route of another engine", hello.engine_id)
                continue
            return hello

    async def next_message(self):
        """The next message from any engine on the PULL socket: step outputs, heartbeats, ready, failed."""
        while True:
            frame = await self._pull.recv(copy=False)
            try:
                return self._output_decoder.decode(frame.buffer)
            except Exception as exc:
                log.warning("dropping undecodable engine message: %s", exc)
