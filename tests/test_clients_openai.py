"""The real client libraries against a real server: the `openai` SDK (sync, async, streaming), LangChain's
`ChatOpenAI` and `OpenAI` (langchain-openai) and LiteLLM, each pointed at the local server with a dummy key,
unchanged. Also: logprobs equal transformers' log_softmax of its own float32 forward within 1e-4.

Nothing here may reach another host: every connection and name lookup outside loopback is refused and
recorded, and the module fails if there was any (LiteLLM's cost map is read from its package, telemetry off).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket

import pytest

from tests.conftest import running_server

pytestmark = pytest.mark.slow

# found, not imported: they are imported inside the tests, once the guard and QUIET_ENV are in place
# (LiteLLM reads LITELLM_LOCAL_MODEL_COST_MAP when it is imported)
_missing = [name for name in ("openai", "langchain_openai", "litellm") if importlib.util.find_spec(name) is None]
if _missing:
    pytest.skip(
        f"{', '.join(_missing)} not installed: client libraries come with the `test` extra", allow_module_level=True
    )

MODEL = "SmolLM2-135M-Instruct"
API_KEY = "sk-dummy-not-a-real-key"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "def fibonacci(n):"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
QUIET_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else LiteLLM fetches its model-cost map from GitHub on import
    "LITELLM_TELEMETRY": "False",
    "LANGCHAIN_TRACING_V2": "false",
    "LANGSMITH_TRACING": "false",  # no LangSmith uploads
    "OPENAI_API_KEY": API_KEY,  # never a real key from the environment
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


@pytest.fixture(scope="module")
def outside_attempts():
    """Refuse (and record) every name lookup and connection that is not loopback, for the whole module."""
    attempts: list[str] = []
    real_getaddrinfo, real_connect, real_connect_ex = (
        socket.getaddrinfo,
        socket.socket.connect,
        socket.socket.connect_ex,
    )

    def local(host) -> bool:
        return host is None or str(host) in LOOPBACK or str(host).startswith("127.")

    def getaddrinfo(host, *args, **kwargs):
        if not local(host):
            attempts.append(f"lookup {host}")
            raise socket.gaierror(f"test guard: no lookups outside loopback ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded(real):
        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):
                attempts.append(f"connect {address}")
                raise ConnectionRefusedError(f"test guard: no connections outside loopback ({address})")
            return real(sock, address)

        return connect

    saved_env = {key: os.environ.get(key) for key in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    socket.getaddrinfo = getaddrinfo
    socket.socket.connect, socket.socket.connect_ex = guarded(real_connect), guarded(real_connect_ex)
    try:
        yield attempts
    finally:
        socket.getaddrinfo = real_getaddrinfo
        socket.socket.connect, socket.socket.connect_ex = real_connect, real_connect_ex
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert attempts == [], f"a client library tried to reach another host: {attempts}"


@pytest.fixture(scope="module")
def server(default_model_path, outside_attempts):
    """float32, so that logprobs can be compared with transformers' own float32 forward."""
    yield from running_server("--dtype", "float32", "--max-context", "512", "--max-batch", "4")


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return server.url + "/v1"


@pytest.fixture(scope="module")
def client(base_url):
    import openai

    with openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120) as sdk:
        yield sdk


# ---- openai SDK ----


def test_openai_sync_completions_and_chat(client):
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert completion.object == "text_completion" and completion.model == MODEL
    assert completion.choices[0].text and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens == 12

    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    message = chat.choices[0].message
    assert message.role == "assistant" and "Paris" in message.content
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_openai_async_client(base_url):
    import openai

    async def both():
        async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120) as sdk:
            return await asyncio.gather(
                sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0),
                sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0),
            )

    chat, completion = asyncio.run(both())
    assert "Paris" in chat.choices[0].message.content
    assert completion.usage.completion_tokens == 8


def test_openai_streaming_with_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens

    with client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True) as stream:
        text = "".join(chunk.choices[0].text for chunk in stream)
    assert text == client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text


def test_openai_logprobs_and_n(client):
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 and entry.logprob <= 0 for entry in content)

    # what lm-eval-harness sends for loglikelihood: the prompt scored, nothing generated
    scored = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    logprobs = scored.choices[0].logprobs
    assert scored.choices[0].text == PROMPT and logprobs.token_logprobs[0] is None
    assert len(logprobs.tokens) == scored.usage.prompt_tokens and all(lp < 0 for lp in logprobs.token_logprobs[1:])

    several = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=2, seed=5)
    assert [c.index for c in several.choices] == [0, 1]
    batch = client.completions.create(model=MODEL, prompt=["1, 2, 3,", "a, b, c,"], max_tokens=4, n=2, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text != batch.choices[2].text == batch.choices[3].text


def test_openai_refusals_name_the_field(client):
    import openai

    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=CHAT, tools=[tool], tool_choice={"type": "function", "function": {"name": "other"}}
        )
    assert refused.value.status_code == 400 and refused.value.body["param"] == "tool_choice.function.name"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=CHAT, response_format={"type": "json_schema", "json_schema": {"schema": []}}
        )
    assert refused.value.body["param"] == "response_format.json_schema.schema"


def test_openai_developer_message_is_the_system_turn(client):
    """OpenAI's `developer` role renders as the system turn: the same prompt as `system` (the same tokens and
    greedy answer), not the prompt without it (the template then adds its own default system turn)."""

    def ask(messages: list[dict]):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)

    instruction = "Answer in one word, in capital letters."
    developer = ask([{"role": "developer", "content": instruction}, *CHAT])
    system = ask([{"role": "system", "content": instruction}, *CHAT])
    without = ask(CHAT)
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens != without.usage.prompt_tokens
    assert developer.choices[0].message.content == system.choices[0].message.content
    assert developer.model == MODEL


# ---- logprobs equal transformers' ----


@pytest.fixture(scope="module")
def reference(default_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()

    def greedy_logprobs(prompt_ids: list[int], new_tokens: int):
        """transformers' greedy continuation and the log_softmax of its logits at every position."""
        with torch.inference_mode():
            ids = model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=new_tokens,
                do_sample=False,
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            )[0]
            logprobs = torch.log_softmax(model(ids[None]).logits[0].float(), dim=-1)
        return ids.tolist(), logprobs

    return tokenizer, greedy_logprobs


def _check_position(logprobs, position: int, token_id: int, got: float, top: dict[str, float], decode) -> None:
    row = logprobs[position - 1]  # the logits at position - 1 predict the token at position
    assert got == pytest.approx(row[token_id].item(), abs=1e-4)
    values = row.topk(len(top)).values
    assert sorted(top.values(), reverse=True) == pytest.approx(values.tolist(), abs=1e-4)
    assert set(top) <= {decode(i) for i in row.topk(len(top) + 1).indices.tolist()}


def test_logprobs_equal_transformers(client, reference):
    tokenizer, greedy_logprobs = reference

    def decode(i):
        return tokenizer.decode([i])

    prompt_ids = tokenizer(PROMPT).input_ids
    new_tokens = 8
    ids, logprobs = greedy_logprobs(prompt_ids, new_tokens)
    completion = client.completions.create(
        model=MODEL, prompt=prompt_ids, max_tokens=new_tokens, temperature=0, echo=True, logprobs=5
    )
    got = completion.choices[0].logprobs
    assert got.tokens == [decode(i) for i in ids]  # greedy in float32: transformers' own tokens
    assert got.token_logprobs[0] is None
    for position in range(1, len(ids)):  # the prompt's tokens (scored), then the generated ones (sampled)
        top = got.top_logprobs[position]
        if len(top) > 5:  # the sampled token outside the top 5 comes along, as OpenAI sends it
            top = dict(list(top.items())[:5])
        _check_position(logprobs, position, ids[position], got.token_logprobs[position], top, decode)

    prompt_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    ids, logprobs = greedy_logprobs(prompt_ids, new_tokens)
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=new_tokens, temperature=0, logprobs=True, top_logprobs=4
    )
    assert chat.usage.prompt_tokens == len(prompt_ids)
    content = chat.choices[0].logprobs.content
    assert [entry.token for entry in content] == [decode(i) for i in ids[len(prompt_ids) :]]
    for offset, entry in enumerate(content):
        position = len(prompt_ids) + offset
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        _check_position(
            logprobs, position, ids[position], entry.logprob, {t.token: t.logprob for t in entry.top_logprobs}, decode
        )


# ---- LangChain ----


def test_langchain_chat_openai(base_url):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL, base_url=base_url, api_key=API_KEY, temperature=0, max_tokens=24, max_retries=0, timeout=120
    )
    answer = llm.invoke("What is the capital of France?")
    assert "Paris" in answer.content
    assert answer.usage_metadata["output_tokens"] > 0
    pieces = list(llm.stream("What is the capital of France?"))
    assert "".join(p.content for p in pieces) == answer.content
    # tools and structured output: tests/test_clients_structured.py


def test_langchain_openai_completions(base_url, client):
    from langchain_openai import OpenAI

    llm = OpenAI(
        model=MODEL, base_url=base_url, api_key=API_KEY, temperature=0, max_tokens=12, max_retries=0, timeout=120
    )
    text = llm.invoke(PROMPT)
    assert text == client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert "".join(llm.stream(PROMPT)) == text


# ---- LiteLLM ----


def test_litellm_completion(base_url):
    import litellm

    response = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=base_url,
        api_key=API_KEY,
        messages=CHAT,
        max_tokens=24,
        temperature=0,
        num_retries=0,
        timeout=120,
    )
    assert "Paris" in response.choices[0].message.content
    assert response.usage.completion_tokens > 0
    streamed = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=base_url,
        api_key=API_KEY,
        messages=CHAT,
        max_tokens=24,
        temperature=0,
        stream=True,
        num_retries=0,
        timeout=120,
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == response.choices[0].message.content
