"""The real TGI client libraries against a real server: `huggingface_hub.InferenceClient.text_generation`
(plain, stream=True, details=True, both), `InferenceClient.chat_completion` (plain, streamed; its placeholder
model names taken as the served model) and `text_generation.Client` (generate, generate_stream).

The clients get the local server's URL as their base URL, so nothing resolves a model id on the Hub;
a guard refuses any connection or name lookup beyond loopback while these tests run.
"""

from __future__ import annotations

import os
import socket

import aiohttp
import pytest

from tests.http_client import generate, post_json, run

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # (HF_HUB_OFFLINE would refuse even loopback URLs)

import text_generation  # noqa: E402
from huggingface_hub import InferenceClient  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402
from huggingface_hub.errors import ValidationError as HubValidationError  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    # text_generation 0.7 calls pydantic's deprecated `.dict()`: its own warning, not ours
    pytest.mark.filterwarnings("ignore:The `dict` method is deprecated"),
]

PROMPT = "def fibonacci(n):"
MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
N = 12
TIMEOUT_S = 120  # text_generation's default is 10 s: too short for a loaded 2-core machine
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any attempt to reach another host (the Hub, telemetry) fails the test loudly."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            raise AssertionError(f"a client tried to reach {address!r}")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK and host is not None:
            raise AssertionError(f"a client tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(scope="module")
def native(server) -> dict:
    status, body = run(generate(server.url, {"prompt": PROMPT, "max_new_tokens": N, "temperature": 0}))
    assert status == 200, body
    return body


@pytest.fixture(scope="module")
def native_chat(server) -> dict:
    """The chat sent plainly over HTTP, with no `model`: what the client's answers must equal."""

    async def post() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session:
            body = {"messages": CHAT, "max_tokens": N, "temperature": 0}
            return await post_json(session, server.url + "/v1/chat/completions", body)

    status, body = run(post())
    assert status == 200, body
    assert body["model"] == MODEL
    return body


@pytest.fixture
def hub(server) -> InferenceClient:
    return InferenceClient(base_url=server.url, timeout=TIMEOUT_S)


@pytest.fixture
def tgi(server) -> text_generation.Client:
    return text_generation.Client(server.url, timeout=TIMEOUT_S)


# --- huggingface_hub.InferenceClient ---------------------------------------------------------------


def test_hub_plain(hub, native):
    assert hub.text_generation(PROMPT, max_new_tokens=N) == native["text"]


def test_hub_model_url_works_like_base_url(server, native):
    client = InferenceClient(model=server.url, timeout=TIMEOUT_S)
    assert client.text_generation(PROMPT, max_new_tokens=N, return_full_text=True) == PROMPT + native["text"]


def test_hub_stream(hub, native):
    pieces = list(hub.text_generation(PROMPT, max_new_tokens=N, stream=True))
    assert len(pieces) == N  # one per token
    assert "".join(pieces) == native["text"]


def test_hub_details(hub, native):
    output = hub.text_generation(PROMPT, max_new_tokens=N, details=True)
    assert output.generated_text == native["text"]
    details = output.details
    assert details.finish_reason == "length"
    assert details.generated_tokens == N
    assert [t.id for t in details.tokens] == native["token_ids"]
    assert all(t.logprob <= 0.0 and t.special is False for t in details.tokens)
    assert details.prefill == []


def test_hub_details_with_decoder_input_details_and_top_n(hub, native):
    output = hub.text_generation(PROMPT, max_new_tokens=N, details=True, decoder_input_details=True, top_n_tokens=2)
    prefill = output.details.prefill
    assert len(prefill) == native["usage"]["prompt_tokens"]
    assert prefill[0].logprob is None and all(t.logprob <= 0.0 for t in prefill[1:])
    assert len(output.details.top_tokens) == N
    # huggingface_hub leaves the nested lists of `top_tokens` as dicts
    assert all(top[0]["id"] == token.id for top, token in zip(output.details.top_tokens, output.details.tokens))


def test_hub_stream_with_details(hub, native):
    full = hub.text_generation(PROMPT, max_new_tokens=N, details=True)
    events = list(hub.text_generation(PROMPT, max_new_tokens=N, details=True, stream=True))
    assert [e.token.id for e in events] == native["token_ids"]
    assert [e.token.logprob for e in events] == pytest.approx([t.logprob for t in full.details.tokens], abs=1e-3)
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == native["text"]
    assert last.details.finish_reason == "length"
    assert last.details.generated_tokens == N
    assert last.details.input_length == native["usage"]["prompt_tokens"]


def test_hub_sampling_with_seed_is_reproducible(hub):
    kwargs = dict(
        max_new_tokens=N,
        do_sample=True,
        seed=11,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        repetition_penalty=1.1,
        frequency_penalty=0.3,
        stop=["\n\n\n"],
        details=True,
    )
    first, second = hub.text_generation(PROMPT, **kwargs), hub.text_generation(PROMPT, **kwargs)
    assert first.generated_text == second.generated_text
    assert first.details.seed == 11


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"best_of": 2, "do_sample": True}, "parameters.best_of"),
        ({"typical_p": 0.5}, "parameters.typical_p"),
        ({"watermark": True}, "parameters.watermark"),
        ({"truncate": 4}, "parameters.truncate"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_hub_unsupported_field_raises_naming_it(hub, kwargs, field, stream):
    with pytest.raises(HubValidationError, match=field.replace(".", r"\.")):
        result = hub.text_generation(PROMPT, max_new_tokens=N, stream=stream, **kwargs)
        if stream:
            list(result)


# huggingface_hub sends a placeholder model name when its caller names none ("dummy" now, "tgi" in older
# versions): answered by the served model, which names itself in `model`.


@pytest.mark.parametrize("model", [None, "tgi"])
def test_hub_chat_completion(hub, native_chat, model):
    output = hub.chat_completion(CHAT, model=model, max_tokens=N, temperature=0)
    assert output.model == MODEL
    assert output.choices[0].message.content == native_chat["choices"][0]["message"]["content"]
    assert output.usage.prompt_tokens == native_chat["usage"]["prompt_tokens"]
    assert output.usage.completion_tokens == native_chat["usage"]["completion_tokens"]
    assert output.choices[0].finish_reason == native_chat["choices"][0]["finish_reason"]


@pytest.mark.parametrize("model", [None, "tgi"])
def test_hub_chat_completion_stream(hub, native_chat, model):
    chunks = list(hub.chat_completion(CHAT, model=model, max_tokens=N, temperature=0, stream=True))
    assert chunks and all(chunk.model == MODEL for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == native_chat["choices"][0]["message"]["content"]
    assert chunks[-1].choices[0].finish_reason == native_chat["choices"][0]["finish_reason"]


def test_hub_chat_completion_other_model_is_not_found(hub):
    with pytest.raises(HfHubHTTPError) as refused:
        hub.chat_completion(CHAT, model="gpt-4", max_tokens=N)
    assert refused.value.response.status_code == 404


# --- text_generation.Client ----------------------------------------------------------------------


def test_text_generation_generate(tgi, native):
    response = tgi.generate(PROMPT, max_new_tokens=N)  # this client always asks for details
    assert response.generated_text == native["text"]
    assert response.details.finish_reason == text_generation.types.FinishReason.Length
    assert response.details.generated_tokens == N
    assert [t.id for t in response.details.tokens] == native["token_ids"]
    assert all(t.logprob <= 0.0 for t in response.details.tokens)


def test_text_generation_generate_stream(tgi, native):
    full = tgi.generate(PROMPT, max_new_tokens=N)
    events = list(tgi.generate_stream(PROMPT, max_new_tokens=N))
    assert "".join(e.token.text for e in events) == native["text"]
    assert [e.token.logprob for e in events] == pytest.approx([t.logprob for t in full.details.tokens], abs=1e-3)
    assert events[-1].generated_text == native["text"]
    assert events[-1].details.finish_reason == text_generation.types.FinishReason.Length
    assert events[-1].details.generated_tokens == N


def test_text_generation_every_supported_parameter(tgi):
    response = tgi.generate(
        PROMPT,
        max_new_tokens=N,
        do_sample=True,
        seed=3,
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        return_full_text=True,
        stop_sequences=["\n\n\n"],
        decoder_input_details=True,
        top_n_tokens=2,
        best_of=1,
    )
    assert response.generated_text.startswith(PROMPT)
    assert response.details.seed == 3
    assert len(response.details.prefill) > 1 and response.details.prefill[0].logprob is None
    assert len(response.details.top_tokens) == response.details.generated_tokens


def test_text_generation_unsupported_field_raises_naming_it(tgi):
    with pytest.raises(text_generation.errors.ValidationError, match=r"parameters\.watermark"):
        tgi.generate(PROMPT, max_new_tokens=N, watermark=True)
    with pytest.raises(text_generation.errors.ValidationError, match=r"parameters\.typical_p"):
        list(tgi.generate_stream(PROMPT, max_new_tokens=N, typical_p=0.5))
