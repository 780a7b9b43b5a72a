"""Slow clients (issue 10): a connection that trickles its headers or body is closed after a bounded
time, and the server keeps answering everybody else meanwhile. Raw sockets on loopback against a real
server started with short timeouts (KILN_HEADER_TIMEOUT_S, KILN_BODY_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import get_json, running_server
from tests.http_client import run

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 2
CLOSED_WITHIN_S = 30  # generous: the machine may be loaded; without the timeouts it would be an hour
TRICKLE_EVERY_S = 0.3


@pytest.fixture(scope="module")
def server(default_model_path):
    yield from running_server(
        "--max-context",
        "512",
        env={"KILN_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "KILN_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)},
    )


async def _trickle(writer: asyncio.StreamWriter, chunks) -> None:
    """Send one chunk every TRICKLE_EVERY_S until the server hangs up."""
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(TRICKLE_EVERY_S)
    except (ConnectionError, OSError):
        pass


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except (ConnectionError, OSError):
        pass
    return received


async def _slow_client(port: int, first: bytes, then):
    """Open a connection, send `first`, trickle `then`; return what came back before the server closed,
    and whether the server still answered /health on another connection meanwhile."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(first)
    trickle = asyncio.create_task(_trickle(writer, then))
    try:
        closed = asyncio.create_task(asyncio.wait_for(_until_closed(reader), CLOSED_WITHIN_S))
        await asyncio.sleep(HEADER_TIMEOUT_S / 2)
        others_served = await asyncio.to_thread(get_json, f"http://127.0.0.1:{port}/health")
        return await closed, others_served["status"] == "ok"
    finally:
        trickle.cancel()
        writer.close()


def _endless(chunk: bytes):
    while True:
        yield chunk


def test_a_client_trickling_headers_is_disconnected(server):
    received, others_served = run(
        _slow_client(server.port, b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n", _endless(b"X-Slow: 1\r\n"))
    )
    assert received == b"" and others_served


def test_a_connection_that_never_sends_a_request_is_disconnected(server):
    received, others_served = run(_slow_client(server.port, b"", iter(())))
    assert received == b"" and others_served


def test_a_client_trickling_its_body_gets_408_and_is_disconnected(server):
    headers = (
        b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    received, others_served = run(_slow_client(server.port, headers + b'{"prompt": "', _endless(b"a")))
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    error = json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["type"] == "request_timeout" and error["field"] == "body"
    assert others_served


def test_an_oversized_content_length_is_refused_before_the_body_is_sent(server):
    """413 at once from the header alone: nothing of the body is read, buffered or waited for."""

    async def scenario():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 50000000\r\n\r\n"
            )
            await writer.drain()
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSED_WITHIN_S)
        finally:
            writer.close()

    head = run(scenario())
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head, head
