"""CurveZMQ for engines on other machines: a shared secret becomes two key pairs.

Both sides derive the frontend's (server) and the engines' (client) Curve25519 key pairs from the
secret, so a user only has to pass one string (`--secret` or `KILN_SECRET`). An engine with a wrong
secret does not even know the frontend's public key: its handshake fails and it never reaches
the request socket; the frontend's ZAP check also admits only the engine key of its own secret.
"""

from __future__ import annotations

import hashlib
import logging

import zmq
from zmq.utils import z85

log = logging.getLogger("kiln.security")


class CurveKeys:
    def __init__(self, secret: str):
        self.server_secret, self.server_public = self._pair(b"kiln-frontend:", secret)
        self.client_secret, self.client_public = self._pair(b"kiln-engine:", secret)

    @staticmethod
    def _pair(label: bytes, secret: str) -> tuple[bytes, bytes]:
        private = z85.encode(hashlib.sha256(label + secret.encode()).digest())
        return private, zmq.curve_public(private)

    def as_server(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.server_secret
        socket.curve_publickey = self.server_public
        socket.curve_server = True

    def as_client(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_secretkey = self.client_secret
        socket.curve_publickey = self.client_public

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP credentials provider: only engines holding the same secret get in."""
        allowed = client_key == self.client_public
        if not allowed:
            log.warning("refused an engine connection: its key does not match this server's secret")
        return allowed
