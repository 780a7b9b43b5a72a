"""Every refusal is JSON in one shape (aiohttp's own 404, 405 and 413 included), OpenAI's error types on
/v1 routes, and an `X-Request-Id` on every answer: the client's, echoed, or a fresh one."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

from tests.http_client import run

pytestmark = pytest.mark.slow


async def _request(method: str, url: str, headers: dict | None = None, data=None):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers, data=data) as response:
            text = await response.text()
            json_body = response.headers.get("Content-Type", "").startswith("application/json")
            return response.status, response.headers.copy(), json.loads(text) if json_body else text


@pytest.mark.parametrize("path, openai", [("/nope", False), ("/v1/nope", True), ("/v2/nope", False)])
def test_unknown_route_is_a_json_404(server, path, openai):
    status, headers, body = run(_request("POST", server.url + path, data=b"{}"))
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    error = body["error"]
    assert path in error["message"] and "POST" in error["message"]
    if openai:
        assert error["type"] == "invalid_request_error" and error["code"] == "not_found" and error["param"] is None
    else:
        assert error["type"] == "not_found" and "code" not in error


def test_a_very_long_unknown_path_is_not_echoed_whole(server):
    path = "/x" * 2000  # within aiohttp's 8 KiB request line (beyond it the HTTP parser answers)
    status, _, body = run(_request("GET", server.url + path))
    assert status == 404 and len(body["error"]["message"]) < 300


@pytest.mark.parametrize(
    "method, path, allowed, openai",
    [
        ("GET", "/generate", "POST", False),
        ("DELETE", "/health", "GET", False),
        ("GET", "/v1/chat/completions", "POST", True),
    ],
)
def test_wrong_method_is_a_json_405_with_allow(server, method, path, allowed, openai):
    status, headers, body = run(_request(method, server.url + path))
    assert status == 405 and headers["Content-Type"].startswith("application/json")
    assert allowed in headers["Allow"]
    error = body["error"]
    assert allowed in error["message"]
    assert error["type"] == ("invalid_request_error" if openai else "method_not_allowed")


def test_body_too_large_is_a_json_413(server):
    big = b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    status, _, body = run(_request("POST", server.url + "/generate", data=big))
    assert status == 413 and body["error"]["type"] == "request_too_large" and body["error"]["field"] == "body"
    status, _, body = run(_request("POST", server.url + "/v1/completions", data=big))
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "request_too_large" and body["error"]["param"] == "body"


def test_chunked_body_too_large_is_a_json_413(server):
    """No Content-Length: refused by aiohttp's own limit once 4 MiB have arrived, still as JSON."""

    async def chunks():
        yield b'{"prompt": "'
        for _ in range(6):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    status, _, body = run(_request("POST", server.url + "/v1/completions", data=chunks()))
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_openai_routes_use_openai_error_types(server):
    status, _, body = run(_request("POST", server.url + "/v1/completions", data=b'{"prompt": "x", "n": 17}'))
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "n"
    assert body["error"]["code"] == "invalid_request"
    status, _, body = run(_request("POST", server.url + "/v1/completions", data=b'{"prompt": "x", "model": "gpt-4"}'))
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    # native routes keep kiln's own names
    status, _, body = run(_request("POST", server.url + "/generate", data=b'{"prompt": ""}'))
    assert status == 400 and body["error"]["type"] == "invalid_request" and body["error"]["field"] == "prompt"


@pytest.mark.parametrize(
    "method, path, data",
    [
        ("POST", "/generate", b'{"prompt": "Hi", "max_new_tokens": 1}'),
        ("POST", "/v1/completions", b'{"prompt": "Hi", "max_tokens": 1, "stream": true}'),
        ("GET", "/health", None),
        ("GET", "/nope", None),
        ("POST", "/generate", b"{not json"),
    ],
)
def test_request_id_is_echoed_or_generated(server, method, path, data):
    status, headers, _ = run(_request(method, server.url + path, headers={"X-Request-Id": "trace-42.abc"}, data=data))
    assert headers["X-Request-Id"] == "trace-42.abc", (status, headers)
    _, first, _ = run(_request(method, server.url + path, data=data))
    _, second, _ = run(_request(method, server.url + path, data=data))
    assert re.fullmatch(r"[0-9a-f]{32}", first["X-Request-Id"])
    assert first["X-Request-Id"] != second["X-Request-Id"]


@pytest.mark.parametrize("given", ["x" * 129, "has space", "tab\there", "é"])
def test_an_unusable_request_id_is_replaced(server, given):
    _, headers, _ = run(_request("GET", server.url + "/health", headers={"X-Request-Id": given}))
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-Id"])
