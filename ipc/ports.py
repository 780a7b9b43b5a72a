"""Free TCP ports, found by binding port 0: for servers that benches and tests start, and for the engine
socket pair (`serve --engine-port P` binds P for requests and P + 1 for outputs)."""

from __future__ import annotations

import socket


def free_port(avoid: tuple[int, ...] = (), host: str = "127.0.0.1") -> int:
    """A port free on `host` right now, not one of `avoid` (it may be taken again before it is used)."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P on `host` with P + 1 free too."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind((host, 0))
            port = first.getsockname()[1]
            try:
                second.bind((host, port + 1))
            except OSError:
                continue
            return port
