"""Constrained decoding through a real engine process (`python -m engine_core.main`, the default model on
CPU, eager), spoken to over ZeroMQ the way the frontend speaks to it: hello, welcome, ready, requests in,
step outputs back. Guided output (greedy and sampled) is valid by construction; unguided requests in the
same batch are untouched; a guide that does not compile fails its own request only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import msgspec
import pytest
import zmq

from ipc.messages import (
    EngineReady,
    FinishReason,
    Guide,
    Request,
    SamplingParams,
    StepOutputs,
    TokenLogprobs,
    Welcome,
    engine_input_codec,
    engine_output_codec,
    hello_codec,
)
from planning.plan import PlanOverrides
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(900)
SCHEMAS = sorted((Path(__file__).parent / "fixtures" / "json_schemas").glob("*.json"))
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
READY_TIMEOUT_S = 300  # planning, loading and warm-up on a loaded 2-core machine
OUTPUT_TIMEOUT_S = 120


@dataclass
class Finished:
    tokens: list[int] = field(default_factory=list)
    reason: FinishReason | None = None
    error: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)


class EngineProcess:
    """One engine process and the frontend's two sockets: a ROUTER it says hello on, a PULL for outputs."""

    def __init__(self, model_path: str, folder: str):
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.bind(f"ipc://{folder}/input")
        self.pull = self.context.socket(zmq.PULL)
        self.pull.bind(f"ipc://{folder}/output")
        self.encoder, _ = engine_input_codec()
        _, self.decoder = engine_output_codec()
        overrides = PlanOverrides(dtype="float32", quantization="none", compile=False, max_batch=4, max_context=1024)
        self.log = open(Path(folder) / "engine.log", "w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine_core.main",
                *("--input", f"ipc://{folder}/input", "--output", f"ipc://{folder}/output"),
                *("--model", model_path, "--model-name", "smol", "--engine-id", "guided-0"),
                *("--overrides", msgspec.json.encode(overrides).decode(), "--watch-pid", str(os.getpid())),
            ],
            cwd=REPO_ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.identity = self._welcome()
        self._wait_ready()

    def _welcome(self) -> bytes:
        _, hello = hello_codec()
        if not self.router.poll(READY_TIMEOUT_S * 1000):
            raise TimeoutError(f"no hello from the engine:\n{self.tail()}")
        identity, frame = self.router.recv_multipart()
        hello.decode(frame)
        self.router.send_multipart([identity, self.encoder.encode(Welcome(accepted=True))])
        return identity

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.pull.poll(1000) and isinstance(self.decoder.decode(self.pull.recv()), EngineReady):
                return
            if self.process.poll() is not None:
                break
        raise TimeoutError(f"the engine did not get ready:\n{self.tail()}")

    def submit(self, request_id: str, prompt: list[int], **params) -> None:
        request = Request(request_id, prompt, SamplingParams(**params))
        self.router.send_multipart([self.identity, self.encoder.encode(request)])

    def collect(self, request_ids: set[str]) -> dict[str, Finished]:
        """What each request produced, once all have finished."""
        results = {rid: Finished() for rid in request_ids}
        deadline = time.monotonic() + OUTPUT_TIMEOUT_S
        while any(r.reason is None for r in results.values()):
            assert time.monotonic() < deadline and self.process.poll() is None, f"no outputs:\n{self.tail()}"
            if not self.pull.poll(1000):
                continue
            message = self.decoder.decode(self.pull.recv())
            if not isinstance(message, StepOutputs):
                continue
            for output in message.outputs:
                result = results[output.request_id]
                result.tokens += output.new_token_ids
                result.logprobs += output.logprobs or []
                result.reason, result.error = output.finish_reason, output.error
        return results

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.router.close(0)
        self.pull.close(0)
        self.context.term()
        self.log.close()


@pytest.fixture(scope="module")
def engine(default_model_path):
    with tempfile.TemporaryDirectory(prefix="kiln-guided-") as folder:
        engine = EngineProcess(default_model_path, folder)
        try:
            yield engine
        finally:
            engine.stop()


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def chat(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def text_of(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def json_guide(path: Path) -> Guide:
    return Guide("json_schema", path.read_text())


def test_guided_requests_share_a_batch_with_an_untouched_unguided_one(engine, tokenizer):
    plain = {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    story = chat(tokenizer, "Tell me a short story about a cat.")
    engine.submit("alone", story, **plain)
    alone = engine.collect({"alone"})["alone"]

    person = SCHEMAS[0]
    engine.submit("plain", story, **plain)
    engine.submit(
        "greedy",
        chat(tokenizer, "Describe a person as JSON."),
        max_new_tokens=120,
        temperature=0.0,
        guide=json_guide(person),
    )
    engine.submit(
        "sampled",
        chat(tokenizer, "When did the moon landing happen?"),
        max_new_tokens=40,
        temperature=0.9,
        top_p=0.95,
        seed=7,
        guide=Guide("regex", DATE),
    )
    engine.submit(
        "same-seed",
        chat(tokenizer, "When did the moon landing happen?"),
        max_new_tokens=40,
        temperature=0.9,
        top_p=0.95,
        seed=7,
        guide=Guide("regex", DATE),
    )
    out = engine.collect({"plain", "greedy", "sampled", "same-seed"})

    assert out["plain"] == alone and alone.reason == FinishReason.LENGTH and len(alone.tokens) == 24
    greedy = out["greedy"]
    assert greedy.reason == FinishReason.STOP and greedy.error is None
    jsonschema.validate(json.loads(text_of(tokenizer, greedy.tokens)), json.loads(person.read_text()))
    sampled = out["sampled"]
    assert sampled.reason == FinishReason.STOP and re.fullmatch(DATE, text_of(tokenizer, sampled.tokens))
    assert out["same-seed"].tokens == sampled.tokens  # its own generator: the seed alone decides


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_twenty_schemas_give_valid_json(engine, tokenizer, temperature):
    for batch in range(0, len(SCHEMAS), 4):
        paths = SCHEMAS[batch : batch + 4]
        for path in paths:
            prompt = chat(tokenizer, f"Give one example of JSON that follows this schema:\n{path.read_text()}")
            engine.submit(
                path.stem, prompt, max_new_tokens=250, temperature=temperature, seed=1, guide=json_guide(path)
            )
        out = engine.collect({p.stem for p in paths})
        for path in paths:
            result = out[path.stem]
            text = text_of(tokenizer, result.tokens)
            assert result.reason == FinishReason.STOP, (path.stem, result, text)
            jsonschema.validate(json.loads(text), json.loads(path.read_text()))


def test_an_invalid_guide_fails_only_its_own_request(engine, tokenizer):
    prompt = chat(tokenizer, "Say hello.")
    engine.submit("bad-regex", prompt, max_new_tokens=8, guide=Guide("regex", "([0-9]"))
    engine.submit("bad-schema", prompt, max_new_tokens=8, guide=Guide("json_schema", '{"type": "nonsense"}'))
    engine.submit("fine", prompt, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    out = engine.collect({"bad-regex", "bad-schema", "fine"})
    bad_regex, bad_schema, fine = out["bad-regex"], out["bad-schema"], out["fine"]
    assert bad_regex.reason == FinishReason.REFUSED and "regex" in bad_regex.error and not bad_regex.tokens
    assert bad_schema.reason == FinishReason.REFUSED and "nonsense" in bad_schema.error and not bad_schema.tokens
    assert fine.reason == FinishReason.LENGTH and len(fine.tokens) == 8 and fine.error is None


def test_a_complete_grammar_ends_the_request_whatever_ignore_eos_and_min_tokens_say(engine, tokenizer):
    """Also: a guided request's logprobs are the model's own (its first position's equal an unguided one's)."""
    prompt = chat(tokenizer, "Is the sky blue? Answer yes or no.")
    choices = ["yes", "no"]
    engine.submit(
        "choice",
        prompt,
        max_new_tokens=30,
        temperature=0.0,
        ignore_eos=True,
        min_tokens=10,
        logprobs=3,
        guide=Guide("choice", json.dumps(choices)),
    )
    engine.submit("free", prompt, max_new_tokens=1, temperature=0.0, logprobs=3)
    engine.submit("short", prompt, max_new_tokens=3, temperature=0.0, guide=json_guide(SCHEMAS[0]))
    out = engine.collect({"choice", "short", "free"})
    choice, free = out["choice"], out["free"]
    assert choice.reason == FinishReason.STOP and text_of(tokenizer, choice.tokens) in choices
    assert out["short"].reason == FinishReason.LENGTH and len(out["short"].tokens) == 3  # truncated: out of budget
    assert [lp.token_id for lp in choice.logprobs] == choice.tokens
    assert free.logprobs and choice.logprobs, (free, choice)
    assert choice.logprobs[0].top_ids == free.logprobs[0].top_ids
    assert choice.logprobs[0].top_logprobs == pytest.approx(free.logprobs[0].top_logprobs, abs=1e-4)
