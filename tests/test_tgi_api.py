"""TGI's dialect over raw HTTP: POST /, and TGI bodies on /generate and /generate_stream (real server,
default model on CPU). The real client libraries are driven in test_clients_tgi.py."""

from __future__ import annotations

import aiohttp
import pytest

from tests.http_client import generate, post_json, run, stream_events

pytestmark = pytest.mark.slow

PROMPT = "def fibonacci(n):"
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
N = 12


def _post(url: str, body) -> tuple[int, object]:
    async def send():
        async with aiohttp.ClientSession() as session:
            return await post_json(session, url, body)

    return run(send())


def _events(url: str, body: dict) -> list[dict]:
    async def read():
        async with aiohttp.ClientSession() as session:
            return await stream_events(session, url, body)

    return run(read())


def _tgi(parameters: dict | None = None, inputs: str = PROMPT, **extra) -> dict:
    return {"inputs": inputs, "parameters": {"max_new_tokens": N, **(parameters or {})}, **extra}


@pytest.fixture(scope="module")
def native(server) -> dict:
    """kiln's own greedy answer for PROMPT: what TGI's greedy default (`do_sample: false`) must give."""
    status, body = run(generate(server.url, {"prompt": PROMPT, "max_new_tokens": N, "temperature": 0}))
    assert status == 200, body
    return body


def test_generate_answers_generated_text_only(server, native):
    status, body = _post(server.url + "/generate", _tgi())
    assert status == 200, body
    assert body == {"generated_text": native["text"]}


def test_post_root_answers_a_list_as_tgi_does(server, native):
    status, body = _post(server.url + "/", _tgi())
    assert status == 200, body
    assert body == [{"generated_text": native["text"]}]
    status, body = _post(server.url + "/", _tgi(stream=False))
    assert status == 200 and body == [{"generated_text": native["text"]}], body


def test_details(server, native):
    status, body = _post(server.url + "/generate", _tgi({"details": True}))
    assert status == 200, body
    details = body["details"]
    assert set(details) == {"finish_reason", "generated_tokens", "seed", "prefill", "tokens"}
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == N
    assert details["seed"] is None  # greedy
    assert details["prefill"] == []
    tokens = details["tokens"]
    assert [t["id"] for t in tokens] == native["token_ids"]
    assert "".join(t["text"] for t in tokens) == body["generated_text"] == native["text"]
    for token in tokens:
        assert set(token) == {"id", "text", "logprob", "special"}
        assert token["special"] is False
        assert token["logprob"] <= 0.0


def test_top_n_tokens(server, native):
    status, body = _post(server.url + "/generate", _tgi({"details": True, "top_n_tokens": 3}))
    assert status == 200, body
    details = body["details"]
    assert len(details["top_tokens"]) == N
    for token, top in zip(details["tokens"], details["top_tokens"]):
        assert len(top) == 3
        logprobs = [t["logprob"] for t in top]
        assert logprobs == sorted(logprobs, reverse=True) and logprobs[0] <= 0.0
        assert top[0]["id"] == token["id"]  # greedy: the chosen token is the most likely one
        assert top[0]["logprob"] == pytest.approx(token["logprob"])
        assert all(isinstance(t["text"], str) and t["special"] in (True, False) for t in top)


def test_decoder_input_details_gives_the_prompt_tokens(server, native):
    status, body = _post(server.url + "/generate", _tgi({"decoder_input_details": True}))
    assert status == 200, body
    prefill = body["details"]["prefill"]  # decoder_input_details implies details, as in TGI
    assert len(prefill) == native["usage"]["prompt_tokens"]
    assert "".join(t["text"] for t in prefill) == PROMPT
    assert prefill[0]["logprob"] is None  # nothing comes before the first token
    assert all(t["logprob"] <= 0.0 for t in prefill[1:])
    assert len(body["details"]["tokens"]) == N


@pytest.mark.parametrize("route, extra", [("/generate_stream", {}), ("/", {"stream": True})])
def test_stream_events(server, native, route, extra):
    status, full = _post(server.url + "/generate", _tgi({"details": True}))
    assert status == 200, full
    events = _events(server.url + route, _tgi({"details": True}, **extra))
    assert [e["index"] for e in events] == list(range(1, N + 1))
    for event in events[:-1]:
        assert event["generated_text"] is None and event["details"] is None
        assert "top_tokens" not in event
    last = events[-1]
    assert last["generated_text"] == native["text"]
    assert last["details"] == {
        "finish_reason": "length",
        "generated_tokens": N,
        "seed": None,
        "input_length": native["usage"]["prompt_tokens"],
    }
    tokens = [e["token"] for e in events]
    assert [t["id"] for t in tokens] == native["token_ids"]
    assert "".join(t["text"] for t in tokens) == native["text"]
    assert [t["logprob"] for t in tokens] == pytest.approx([t["logprob"] for t in full["details"]["tokens"]], abs=1e-3)


def test_stream_without_details_still_ends_with_generated_text(server, native):
    events = _events(server.url + "/generate_stream", _tgi({"top_n_tokens": 2}))
    assert events[-1]["generated_text"] == native["text"]
    assert events[-1]["details"] is None
    assert all(e["token"]["logprob"] <= 0.0 and len(e["top_tokens"]) == 2 for e in events)


def test_end_of_sequence_is_a_special_token(server):
    status, body = _post(server.url + "/generate", _tgi({"details": True, "max_new_tokens": 60}, inputs=CHAT))
    assert status == 200, body
    details = body["details"]
    assert details["finish_reason"] == "eos_token"
    last = details["tokens"][-1]
    assert last["special"] is True and last["text"] == ""  # kiln's text never holds special tokens
    assert "Paris" in body["generated_text"]
    events = _events(server.url + "/generate_stream", _tgi({"details": True, "max_new_tokens": 60}, inputs=CHAT))
    assert events[-1]["token"]["special"] is True
    assert events[-1]["details"]["finish_reason"] == "eos_token"
    assert "".join(e["token"]["text"] for e in events) == body["generated_text"]


def test_stop_sequence(server, native):
    stop = native["text"][6:10]
    status, body = _post(server.url + "/generate", _tgi({"details": True, "stop": [stop]}))
    assert status == 200, body
    assert body["details"]["finish_reason"] == "stop_sequence"
    assert body["generated_text"] == native["text"][: native["text"].index(stop)]
    events = _events(server.url + "/generate_stream", _tgi({"details": True, "stop": [stop]}))
    assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"] == body["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"


def test_return_full_text(server, native):
    status, body = _post(server.url + "/generate", _tgi({"return_full_text": True}))
    assert status == 200, body
    assert body["generated_text"] == PROMPT + native["text"]
    events = _events(server.url + "/generate_stream", _tgi({"return_full_text": True}))
    assert events[-1]["generated_text"] == PROMPT + native["text"]
    assert "".join(e["token"]["text"] for e in events) == native["text"]  # tokens are the new text only


def test_sampling_is_seeded_and_reports_its_seed(server):
    body = _tgi(
        {
            "do_sample": True,
            "seed": 7,
            "temperature": 0.9,
            "top_p": 0.9,
            "top_k": 40,
            "repetition_penalty": 1.1,
            "frequency_penalty": 0.2,
            "details": True,
        }
    )
    (s1, first), (s2, second) = _post(server.url + "/generate", body), _post(server.url + "/generate", body)
    assert s1 == s2 == 200, (first, second)
    assert first == second
    assert first["details"]["seed"] == 7


def test_off_values_and_nulls_are_accepted(server, native):
    """What TGI's clients send when the caller set nothing: every parameter, mostly null or off."""
    parameters = {
        "best_of": 1,
        "typical_p": None,
        "truncate": None,
        "watermark": False,
        "grammar": None,
        "adapter_id": None,
        "do_sample": False,
        "repetition_penalty": None,
        "frequency_penalty": None,
        "return_full_text": False,
        "stop": [],
        "seed": None,
        "temperature": None,
        "top_k": None,
        "top_p": None,
        "details": False,
        "decoder_input_details": False,
        "top_n_tokens": None,
    }
    status, body = _post(server.url + "/generate", _tgi(parameters))
    assert status == 200, body
    assert body == {"generated_text": native["text"]}


@pytest.mark.parametrize(
    "route, payload, field",
    [
        ("/generate", _tgi({"best_of": 2}), "parameters.best_of"),
        ("/generate", _tgi({"typical_p": 0.5}), "parameters.typical_p"),
        ("/generate", _tgi({"truncate": 8}), "parameters.truncate"),
        ("/generate", _tgi({"watermark": True}), "parameters.watermark"),
        ("/generate", _tgi({"grammar": {"type": "regex", "value": "a("}}), "parameters.grammar.value"),
        ("/generate", _tgi({"adapter_id": "lora"}), "parameters.adapter_id"),
        ("/generate", _tgi({"temperature": 0}), "parameters.temperature"),
        ("/generate", _tgi({"top_p": 0}), "parameters.top_p"),
        ("/generate", _tgi({"top_k": 0}), "parameters.top_k"),
        ("/generate", _tgi({"max_new_tokens": 0}), "parameters.max_new_tokens"),
        ("/generate", _tgi({"top_n_tokens": 21}), "parameters.top_n_tokens"),
        ("/generate", _tgi({"repetition_penalty": 0}), "parameters.repetition_penalty"),
        ("/generate", _tgi({"stop": "x"}), "parameters.stop"),
        ("/generate", _tgi({"no_such_parameter": 1}), "parameters.no_such_parameter"),
        ("/generate", _tgi(no_such_field=1), "no_such_field"),
        ("/generate", _tgi(inputs=""), "inputs"),
        ("/generate", {"inputs": 42}, "inputs"),
        ("/generate", _tgi(stream=True), "stream"),
        ("/generate_stream", _tgi(stream=False), "stream"),
        ("/generate_stream", _tgi({"decoder_input_details": True}), "parameters.decoder_input_details"),
        ("/", _tgi({"decoder_input_details": True}, stream=True), "parameters.decoder_input_details"),
        ("/", _tgi({"best_of": 2}, stream=True), "parameters.best_of"),
        ("/", {"prompt": PROMPT}, "inputs"),
    ],
)
def test_refusals_are_400_naming_the_field_in_tgi_shape(server, route, payload, field):
    status, body = _post(server.url + route, payload)
    assert status == 400, body
    assert body["error_type"] == "validation", body
    assert body["field"] == field, body
    assert isinstance(body["error"], str) and field.split(".")[-1] in body["error"], body


def test_prompt_longer_than_context_is_refused_naming_inputs(server):
    context = server.info()["engines"][0]["max_context"]
    status, body = _post(server.url + "/generate", _tgi(inputs="word " * (context + 10)))
    assert status == 400, body
    assert body["field"] == "inputs" and body["error_type"] == "validation"
    assert str(context) in body["error"]


def test_native_body_is_still_answered_natively(server, native):
    status, body = run(generate(server.url, {"prompt": PROMPT, "max_new_tokens": N, "temperature": 0}))
    assert status == 200
    assert set(body) == {"text", "finish_reason", "usage", "timings", "token_ids", "engine"}
    events = _events(server.url + "/generate_stream", {"prompt": PROMPT, "max_new_tokens": N, "temperature": 0})
    assert "".join(e["text"] for e in events) == native["text"]
    assert events[-1]["finish_reason"] == "length" and "token" not in events[-1]
    status, body = _post(server.url + "/generate", {"max_new_tokens": 5})  # kiln's error shape too
    assert status == 400 and body["error"]["field"] == "prompt", body
    status, body = _post(server.url + "/generate", b"{not json")
    assert status == 400 and body["error"]["field"] == "body", body
