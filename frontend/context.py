"""What every handler shares: the app's keys, the JSON encoder, body reading with its limits, the
request id, and the middleware that turns every refusal into the JSON error shape (and counts it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import uuid

import msgspec
from aiohttp import web
from tokenizers import Tokenizer

from frontend.api import ApiError
from frontend.guide_checks import GuideChecks
from frontend.metrics import Metrics
from frontend.prompt_encoder import PromptEncoder
from frontend.router import EngineClient
from hardware.heap import TrimAfterBursts

log = logging.getLogger("kiln.frontend")

CLIENT = web.AppKey("client", EngineClient)
TOKENIZER = web.AppKey("tokenizer", Tokenizer)
PROMPT_ENCODER = web.AppKey("prompt_encoder", PromptEncoder)
MODEL_NAME = web.AppKey("model_name", str)
METRICS = web.AppKey("metrics", Metrics)
BODY_TIMEOUT_S = web.AppKey("body_timeout_s", float)
REQUEST_IDS = web.AppKey("request_ids", itertools.count)
GUIDE_CHECKS = web.AppKey("guide_checks", GuideChecks)  # structured-output checks, off the loop
HEAP_TRIM = web.AppKey("heap_trim", TrimAfterBursts)  # large bodies' memory back to the OS once freed
JSON = msgspec.json.Encoder()
# Bounds the work and memory one request can cost before validation; any prompt that fits a context
# window of 8192 tokens (and far more, for most text) fits, and prompt length is checked after.
MAX_BODY_BYTES = 4 * 1024 * 1024
LARGE_BODY_BYTES = 256 * 1024  # a body this large (and its tokenization) leaves glibc's arenas fuller: trim after


def too_large() -> ApiError:
    return ApiError(
        413,
        f"request body is larger than the {MAX_BODY_BYTES // 1024} KiB limit; a prompt "
        "must fit the context window anyway",
        "body",
        kind="request_too_large",
    )


async def read_body(request: web.Request) -> bytes:
    """The whole body, refused unread when its Content-Length is over the limit, and within a deadline,
    so that a client trickling bytes (slowloris) holds its connection for a bounded time only."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large()
    deadline = request.app[BODY_TIMEOUT_S]
    try:
        async with asyncio.timeout(deadline):
            body = await request.read()
    except TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {deadline:g} s", "body", kind="request_timeout"
        ) from None
    if len(body) >= LARGE_BODY_BYTES:
        request.app[HEAP_TRIM].note()
    return body


def json_response(payload, status: int = 200) -> web.Response:
    return web.Response(body=JSON.encode(payload), status=status, content_type="application/json")


REQUEST_ID_HEADER = "X-Request-Id"
# A client's id is echoed when it is 1 to 128 printable ASCII characters without spaces; else one is made.
_CLIENT_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_PREPARED = "kiln_response_prepared"
MAX_SHOWN_PATH_CHARS = 100


def request_id(request: web.Request) -> str:
    """This request's id: the client's `X-Request-Id` if it sent a sane one, else a fresh uuid4 hex."""
    rid = request.get(REQUEST_ID_HEADER)
    if rid is None:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        rid = request[REQUEST_ID_HEADER] = given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    return rid


async def tag_response(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer (errors, SSE streams, aiohttp's own) carries the request id."""
    response.headers[REQUEST_ID_HEADER] = request_id(request)
    request[_PREPARED] = True


def is_openai_route(request: web.Request) -> bool:
    return request.path == "/v1" or request.path.startswith("/v1/")


def http_error(request: web.Request, exc: web.HTTPException) -> ApiError:
    """aiohttp's own refusals (no such route, wrong method, ...) as an ApiError."""
    path = request.path
    shown = f"{request.method} {path[:MAX_SHOWN_PATH_CHARS]}{'…' if len(path) > MAX_SHOWN_PATH_CHARS else ''}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return ApiError(
            405,
            f"method not allowed ({shown}); this route takes {allowed}",
            kind="method_not_allowed",
            headers={"Allow": exc.headers.get("Allow", allowed)},
        )
    if exc.status == 404:
        return ApiError(404, f"no such route ({shown})", kind="not_found")
    return ApiError(exc.status, f"{exc.reason} ({shown})", kind=exc.reason.lower().replace(" ", "_"))


@web.middleware
async def api_errors(request: web.Request, handler):
    """ApiError → its JSON; an oversized body → a JSON 413 naming the limit; aiohttp's 404, 405 and other
    refusals, and an unexpected exception (a 500), → the same JSON shape. On /v1 routes `type` is
    OpenAI's name for it. Every refusal is counted. A body left unread (too large, too slow) ends the
    connection after the answer. Nothing is converted once a response (a stream) has started."""
    try:
        return await handler(request)
    except ApiError as exc:
        error = exc
    except web.HTTPRequestEntityTooLarge:
        error = too_large()
    except web.HTTPException as exc:
        if exc.status < 400 or request.get(_PREPARED):
            raise
        error = http_error(request, exc)
    except ConnectionError:  # the client is gone: nobody to answer
        raise
    except Exception:
        if request.get(_PREPARED):
            raise
        log.exception("unexpected error in %s %s (request id %s)", request.method, request.path, request_id(request))
        error = ApiError(500, "internal server error", kind="internal_error")
    request.app[METRICS].refuse(error.status, error.kind)
    response = json_response(error.body(openai=is_openai_route(request)), error.status)
    response.headers.update(error.headers)
    if error.status in (408, 413):
        response.force_close()
    return response
