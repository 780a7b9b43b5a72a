"""Structured output and tool calls through the HTTP app, against a scripted engine (no model; issue 22): the
exact `Guide` each dialect sends the engine, the 400s that never reach it, and tool calls read out of scripted
token outputs, whole and streamed in OpenAI's delta shape. The tokenizer and chat template are the default
model's, whose template takes no tools (kiln's fallback prompt and the `<tool_call>` reader).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import msgspec
import pytest
from tokenizers import Tokenizer

from frontend.chat_template import ChatTemplate
from ipc.messages import FinishReason, Guide, Request, RequestOutput
from tests.http_client import post_json, run, stream_events
from tests.test_app_scripted_engine import serving as scripted_serving
from tests.test_engine_client import PLAN

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "the weather in a city", "parameters": SCHEMA},
}
TIME = {"type": "function", "function": {"name": "get_time"}}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


ROOMY = msgspec.structs.replace(PLAN, max_context=4096)  # the fallback prompt lists the tools: longer prompts


def serving(model_files):
    return scripted_serving(model_files, ROOMY)


@pytest.fixture(scope="module")
def model_files(default_model_path) -> tuple[Tokenizer, ChatTemplate | None]:
    return Tokenizer.from_file(f"{default_model_path}/tokenizer.json"), ChatTemplate.from_folder(default_model_path)


def _chat(**extra) -> dict:
    return {"messages": CHAT, "max_tokens": 50, **extra}


def _tgi(grammar) -> dict:
    return {"inputs": "Hello", "parameters": {"max_new_tokens": 5, "grammar": grammar}}


async def _exchange(model_files, path: str, body: dict, texts: list[str], stream: bool = False):
    """POST body; the engine answers with `texts`, one step each (the last finishes): (Request, answer)."""
    tokenizer, _ = model_files
    async with serving(model_files) as (url, engine, _):
        async with aiohttp.ClientSession() as session:
            if stream:
                reply = asyncio.ensure_future(stream_events(session, url + path, body))
            else:
                reply = asyncio.ensure_future(post_json(session, url + path, body))
            request = await engine.next_input()
            assert isinstance(request, Request), request
            for i, text in enumerate(texts):
                ids = tokenizer.encode(text, add_special_tokens=False).ids
                finish = FinishReason.STOP if i == len(texts) - 1 else None
                await engine.step(RequestOutput(request.request_id, ids, finish), served=int(finish is not None))
            return request, await reply


def guide_sent(model_files, path: str, body: dict) -> Guide | None:
    if path.endswith("_stream"):  # an SSE answer (stream_events checks its status)
        return run(_exchange(model_files, path, body, ["{}"], stream=True))[0].params.guide
    request, (status, answer) = run(_exchange(model_files, path, body, ["{}"]))
    assert status == 200, answer
    return request.params.guide


REQUIRED_ONE = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": SCHEMA},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize(
    "path, body, kind, spec",
    [
        ("/generate", {"prompt": "Hi", "json_schema": SCHEMA}, "json_schema", SCHEMA),
        ("/generate", {"prompt": "Hi", "json_schema": {}}, "json", None),
        ("/generate", {"prompt": "Hi", "regex": r"\d{4}-\d{2}-\d{2}"}, "regex", r"\d{4}-\d{2}-\d{2}"),
        ("/generate", {"prompt": "Hi", "choice": ["yes", "no"]}, "choice", ["yes", "no"]),
        ("/generate_stream", {"prompt": "Hi", "grammar": 'start: "a"+'}, "grammar", 'start: "a"+'),
        ("/generate", _tgi({"type": "json", "value": SCHEMA}), "json_schema", SCHEMA),
        ("/generate", _tgi({"type": "json", "value": json.dumps(SCHEMA)}), "json_schema", SCHEMA),
        ("/generate_stream", _tgi({"type": "regex", "value": "[ab]+"}), "regex", "[ab]+"),
        ("/", _tgi({"type": "json_schema", "value": {"name": "x", "schema": SCHEMA}}), "json_schema", SCHEMA),
        ("/v1/chat/completions", _chat(response_format={"type": "json_object"}), "json_schema", {"type": "object"}),
        (
            "/v1/chat/completions",
            _chat(
                response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA, "strict": True}}
            ),
            "json_schema",
            SCHEMA,
        ),
        ("/v1/chat/completions", _chat(response_format={"type": "json", "value": SCHEMA}), "json_schema", SCHEMA),
        ("/v1/chat/completions", _chat(response_format={"type": "regex", "value": "a|b"}), "regex", "a|b"),
        (
            "/v1/completions",
            {
                "prompt": "Hi",
                "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}},
            },
            "json_schema",
            SCHEMA,
        ),
        (
            "/v1/chat/completions",
            _chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
            "json_schema",
            SCHEMA,
        ),
        ("/v1/chat/completions", _chat(tools=[WEATHER], tool_choice="required"), "json_schema", REQUIRED_ONE),
        (
            "/v1/chat/completions",
            _chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False),
            "json_schema",
            {**REQUIRED_ONE, "maxItems": 1},
        ),
    ],
)
def test_each_dialect_sends_the_guide(model_files, path, body, kind, spec):
    guide = guide_sent(model_files, path, body)
    assert guide is not None and guide.kind == kind
    if spec is None:
        assert guide.spec == ""
    elif kind in ("json_schema", "choice"):
        assert json.loads(guide.spec) == spec
    else:
        assert guide.spec == spec


def test_required_with_several_tools_is_a_union_of_calls(model_files):
    guide = guide_sent(model_files, "/v1/chat/completions", _chat(tools=[WEATHER, TIME], tool_choice="required"))
    items = json.loads(guide.spec)["items"]["anyOf"]
    assert [item["properties"]["name"] for item in items] == [{"const": "get_weather"}, {"const": "get_time"}]
    assert items[1]["properties"]["arguments"] == {"type": "object"}  # no parameters: any object


@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate", {"prompt": "Hi"}),
        ("/v1/chat/completions", _chat()),
        ("/v1/chat/completions", _chat(response_format={"type": "text"})),
        ("/v1/chat/completions", _chat(tools=[WEATHER])),  # auto: free generation, calls read from the text
        ("/v1/chat/completions", _chat(tools=[WEATHER], tool_choice="none")),
        ("/generate", {"inputs": "Hi", "parameters": {"grammar": None}}),
    ],
)
def test_no_guide_without_a_constraint(model_files, path, body):
    assert guide_sent(model_files, path, body) is None


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/generate", {"prompt": "Hi", "json_schema": {"type": "nonsense"}}, "json_schema"),
        ("/generate", {"prompt": "Hi", "json_schema": [1]}, "json_schema"),
        ("/generate", {"prompt": "Hi", "regex": "(unclosed"}, "regex"),
        ("/generate", {"prompt": "Hi", "regex": ""}, "regex"),
        ("/generate", {"prompt": "Hi", "regex": "(?=a)a"}, "regex"),  # Python takes it; the engine's library not
        ("/generate", {"prompt": "Hi", "grammar": "root ::= missing"}, "grammar"),
        ("/generate", {"prompt": "Hi", "choice": []}, "choice"),
        ("/generate", {"prompt": "Hi", "grammar": " "}, "grammar"),
        ("/generate", {"prompt": "Hi", "regex": "a", "choice": ["a"]}, "choice"),
        ("/generate", _tgi({"type": "json", "value": "{not json"}), "parameters.grammar.value"),
        ("/generate", _tgi({"type": "json", "value": {"minimum": "x"}}), "parameters.grammar.value"),
        ("/generate", _tgi({"type": "regex", "value": "[z-a]"}), "parameters.grammar.value"),
        ("/generate", _tgi({"type": "ebnf", "value": "x"}), "parameters.grammar.type"),
        ("/", _tgi({"type": "regex"}), "parameters.grammar.value"),
        ("/v1/chat/completions", _chat(response_format={"type": "yaml"}), "response_format.type"),
        (
            "/v1/chat/completions",
            _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}),
            "response_format.json_schema.schema",
        ),
        (
            "/v1/chat/completions",
            _chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": 7}}}),
            "response_format.json_schema.schema",
        ),
        ("/v1/chat/completions", _chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
        (
            "/v1/completions",
            {"prompt": "x", "response_format": {"type": "regex", "value": "("}},
            "response_format.value",
        ),
        ("/v1/chat/completions", _chat(tools=[{"type": "retrieval"}]), "tools[0].type"),
        ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {}}]), "tools[0].function.name"),
        (
            "/v1/chat/completions",
            _chat(tools=[{"type": "function", "function": {"name": "has space"}}]),
            "tools[0].function.name",
        ),
        (
            "/v1/chat/completions",
            _chat(tools=[WEATHER, {"type": "function", "function": {"name": "f", "parameters": {"type": "x"}}}]),
            "tools[1].function.parameters",
        ),
        ("/v1/chat/completions", _chat(tools=[WEATHER, WEATHER]), "tools"),
        ("/v1/chat/completions", _chat(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
        ("/v1/chat/completions", _chat(tool_choice="required"), "tool_choice"),
        (
            "/v1/chat/completions",
            _chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}),
            "tool_choice.function.name",
        ),
        (
            "/v1/chat/completions",
            _chat(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
            "response_format",
        ),
        ("/v1/chat/completions", _chat(functions=[WEATHER["function"]]), "functions"),
        (
            "/v1/chat/completions",
            {"messages": [*CHAT, {"role": "tool", "content": "sunny"}]},
            "messages[1].tool_call_id",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    *CHAT,
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c"}]}]},
            "messages[0].tool_calls",
        ),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(model_files, path, body, field):
    async def scenario():
        async with serving(model_files) as (url, engine, _):
            async with aiohttp.ClientSession() as session:
                status, answer = await post_json(session, url + path, body)
            return status, answer, await engine.has_input()

    status, answer, reached_engine = run(scenario())
    assert status == 400 and not reached_engine, answer
    error = answer["error"] if isinstance(answer.get("error"), dict) else answer  # TGI's shape is flat
    assert error["field"] == field, error


# ---- tool calls read from the output ----

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_auto_reads_a_tagged_call(model_files):
    request, (status, answer) = run(_exchange(model_files, "/v1/chat/completions", _chat(tools=[WEATHER]), [CALL]))
    assert status == 200, answer
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_auto_keeps_plain_answers_and_unknown_functions_as_content(model_files):
    texts = ["The weather ", "is fine. <tool_call>", '{"name": "other", "arguments": {}}</tool_call>']
    _, (status, answer) = run(_exchange(model_files, "/v1/chat/completions", _chat(tools=[WEATHER]), texts))
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == "".join(texts)


def _deltas(events: list) -> list[dict]:
    assert events[-1] == "[DONE]"
    return [event["choices"][0] for event in events[:-1]]


def test_streamed_calls_come_in_openais_delta_shape(model_files):
    texts = [
        "Let me look. ",
        "<tool",
        "_call>\n",
        '{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}\n</tool_call>',
    ]
    texts += ["\n<tool_call>", '{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>']
    _, events = run(_exchange(model_files, "/v1/chat/completions", _chat(tools=[WEATHER], stream=True), texts, True))
    deltas = _deltas(events)
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    assert content == "Let me look. "  # the tags never leak as content
    calls = [c for d in deltas for c in d["delta"].get("tool_calls", [])]
    headers = [c for c in calls if "id" in c]
    assert [h["index"] for h in headers] == [0, 1]
    for header in headers:
        assert header["type"] == "function" and header["function"] == {"name": "get_weather", "arguments": ""}
        assert header["id"].startswith("call_")
    arguments = {i: "".join(c["function"]["arguments"] for c in calls if c["index"] == i) for i in (0, 1)}
    assert [json.loads(a) for a in arguments.values()] == [{"city": "Paris"}, {"city": "Rome"}]
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls if "id" not in c)
    assert [d["finish_reason"] for d in deltas].count("tool_calls") == 1 and deltas[-1]["finish_reason"] == "tool_calls"
    assert all(len(d["delta"].get("tool_calls", [])) <= 1 for d in deltas)


def test_a_named_function_streams_its_arguments_as_generated(model_files):
    body = _chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
    texts = ['{"city": ', '"Par', 'is"}']
    _, events = run(_exchange(model_files, "/v1/chat/completions", body, texts, True))
    calls = [c for d in _deltas(events) for c in d["delta"].get("tool_calls", [])]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and calls[0]["index"] == 0
    assert len(calls) > 2  # the arguments came in several fragments
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert _deltas(events)[-1]["finish_reason"] == "tool_calls"

    _, (status, answer) = run(_exchange(model_files, "/v1/chat/completions", {**body, "stream": False}, texts))
    (call,) = answer["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_required_reads_a_list_of_calls(model_files):
    body = _chat(tools=[WEATHER, TIME], tool_choice="required")
    text = '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    for stream in (False, True):
        _, answer = run(_exchange(model_files, "/v1/chat/completions", {**body, "stream": stream}, [text], stream))
        if stream:
            calls = [c for d in _deltas(answer) for c in d["delta"].get("tool_calls", []) if "id" in c]
            names = [c["function"]["name"] for c in calls]
            assert _deltas(answer)[-1]["finish_reason"] == "tool_calls"
        else:
            names = [c["function"]["name"] for c in answer[1]["choices"][0]["message"]["tool_calls"]]
        assert names == ["get_time", "get_weather"]


def test_a_cut_short_call_is_not_reported_as_tool_calls(model_files):
    tokenizer, _ = model_files

    async def scenario():
        async with serving(model_files) as (url, engine, _):
            async with aiohttp.ClientSession() as session:
                reply = asyncio.ensure_future(
                    post_json(session, url + "/v1/chat/completions", _chat(tools=[WEATHER], tool_choice="required"))
                )
                request = await engine.next_input()
                ids = tokenizer.encode('[{"name": "get_weather", "argu', add_special_tokens=False).ids
                await engine.step(RequestOutput(request.request_id, ids, FinishReason.LENGTH), served=1)
                return await reply

    status, answer = run(scenario())
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]


# ---- what the prompt shows (the default template takes no tools: kiln's fallback prompt) ----


def prompt_sent(model_files, body: dict) -> str:
    tokenizer, _ = model_files
    request, (status, answer) = run(_exchange(model_files, "/v1/chat/completions", body, ["ok"]))
    assert status == 200, answer
    return tokenizer.decode(request.prompt_token_ids, skip_special_tokens=False)


def test_the_fallback_prompt_lists_the_tools_and_writes_the_history(model_files):
    history = [
        *CHAT,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    prompt = prompt_sent(model_files, {"messages": history, "tools": [WEATHER], "max_tokens": 5})
    assert prompt.startswith("<|im_start|>system\nYou can call functions.")
    assert json.dumps(WEATHER) in prompt and "<tool_call>" in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")

    plain = prompt_sent(model_files, {"messages": CHAT, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 5})
    assert "You can call functions" not in plain  # "none": the tools are not shown

    system = [{"role": "system", "content": "Be brief."}, *CHAT]
    named = prompt_sent(
        model_files,
        {
            "messages": system,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        },
    )
    assert named.startswith("<|im_start|>system\nBe brief.\n\nYou can call functions.")
    assert "You must call the function get_weather." in named
