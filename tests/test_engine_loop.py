"""The engine's busy loop in-process: the real default model, plan, warm-up and `Engine.run`, with the
sockets replaced by two queues (what EngineIO hands the loop): no server start. Decode steps run the
compiled graph, as `serve` runs them on CPU (its first compile takes a minute or two; cached after)."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from ipc.messages import (
    Abort,
    EngineStats,
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    Shutdown,
    StepOutputs,
)
from planning.plan import PlanOverrides

TIMEOUT_S = 120  # a loaded 2-core machine
# the module fixture compiles the decode step: on a fresh machine (cold inductor cache) that alone takes a few
# minutes on 2 cores, and pytest counts a fixture's setup against its first test
pytestmark = pytest.mark.timeout(900)


class QueueIO:
    """The loop's side of EngineIO: an inbox it reads, and what it sends, collected."""

    def __init__(self):
        self.engine_id = "in-process"
        self.inbox: queue.Queue = queue.Queue()
        self.sent: queue.Queue = queue.Queue()
        self.stats = EngineStats()

    def send(self, message) -> None:
        self.sent.put(message)


@pytest.fixture(scope="module")
def engine(default_model_path):
    """The default CPU plan's engine in float32, decode steps compiled (as `serve` runs them by default)."""
    from engine_core.main import build_plan, load_engine

    overrides = PlanOverrides(dtype="float32", max_batch=3, max_context=512, compile=True)
    engine = load_engine(QueueIO(), default_model_path, build_plan(default_model_path, None, overrides))
    assert engine.runner.compiled is not None and engine.runner.compiled.measured  # compiled and timed
    compiled = engine.runner.compiled
    compiled.enabled, compiled.up_to = True, engine.runner.max_batch  # the path under test, whichever way this
    # busy machine's timing went
    return engine


@pytest.fixture(scope="module")
def reference(default_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()


class Loop:
    """`Engine.run` on a thread, fed and drained by the test; always stopped."""

    def __init__(self, engine):
        self.engine, self.io = engine, engine.io
        engine.running = True
        self.thread = threading.Thread(target=engine.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.io.inbox.put(Shutdown())
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive(), "the engine loop did not stop"

    def submit(self, request_id: str, prompt: list[int], **params) -> None:
        self.io.inbox.put(Request(request_id, prompt, SamplingParams(**params)))

    def collect(self, request_ids: set[str]) -> dict[str, list[RequestOutput]]:
        """Every output of these requests until each has finished."""
        outputs: dict[str, list[RequestOutput]] = {rid: [] for rid in request_ids}
        open_ = set(request_ids)
        while open_:
            message = self.io.sent.get(timeout=TIMEOUT_S)
            assert isinstance(message, StepOutputs)
            for output in message.outputs:
                outputs.setdefault(output.request_id, []).append(output)
                if output.finish_reason is not None:
                    open_.discard(output.request_id)
        return outputs


PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 3458, 282, 4649]


def test_greedy_logprobs_equal_transformers(engine, reference):
    with Loop(engine) as loop:
        loop.submit("a", PROMPT, max_new_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
        loop.submit("b", PROMPT[:5], max_new_tokens=3, temperature=0.0, ignore_eos=True)  # shares the steps
        outputs = loop.collect({"a", "b"})
    tokens = [t for o in outputs["a"] for t in o.new_token_ids]
    logprobs = [lp for o in outputs["a"] for lp in o.logprobs]
    assert outputs["a"][-1].finish_reason == FinishReason.LENGTH and len(tokens) == 6
    assert all(o.logprobs is None for o in outputs["b"])
    with torch.inference_mode():
        logits = reference(torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1 : -1]
    expected = torch.log_softmax(logits, dim=-1)
    assert tokens == expected.argmax(-1).tolist()
    for row, lp in zip(expected, logprobs):
        assert lp.token_id == lp.top_ids[0] and len(lp.top_ids) == 3
        assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
        top = torch.topk(row, 3)
        assert lp.top_ids == top.indices.tolist()
        assert max(abs(a - b) for a, b in zip(lp.top_logprobs, top.values.tolist())) < 1e-4
    first = outputs["a"][0]
    assert first.timing is not None and first.timing.queued_s >= 0 and first.timing.prefill_s > 0
    assert all(o.timing is None for o in outputs["a"][1:])
    assert engine.runner.compiled.steps > 0  # the decode steps above ran the compiled graph


def test_thread_count_changes_do_not_recompile_the_decode_graph(engine):
    """The thread policy switches torch between one thread and all cores as it measures; each switch once
    recompiled the whole graph (tens of seconds, and the frontend declared the engine hung)."""
    from torch._dynamo.utils import counters

    from engine_core.thread_policy import ThreadTuner

    engine.threads = ThreadTuner()  # a fresh policy tries every count at once, within this test's steps
    graphs, steps = counters["stats"]["unique_graphs"], engine.runner.compiled.steps
    with Loop(engine) as loop:
        for n in range(3):  # long enough for the tuner to try every thread count on decode steps
            loop.submit(f"t{n}", PROMPT, max_new_tokens=24, temperature=0.0, ignore_eos=True)
        loop.collect({"t0", "t1", "t2"})
    tried = {threads for (_, threads) in engine.threads.average}
    assert len(tried) == len(engine.threads.candidates)  # both counts ran (a 1-core machine has one)
    assert engine.runner.compiled.steps > steps and counters["stats"]["unique_graphs"] == graphs


def test_prompt_scoring_without_generating(engine, reference):
    """lm-eval's loglikelihood request: max_new_tokens 0 with prompt logprobs, over several prefill chunks."""
    prompt = PROMPT * 22  # longer than one prefill chunk of this plan
    assert len(prompt) > engine.plan.prefill_chunk
    with Loop(engine) as loop:
        loop.submit("score", prompt, max_new_tokens=0, temperature=0.0, prompt_logprobs=1)
        (output,) = loop.collect({"score"})["score"]
    assert output.finish_reason == FinishReason.LENGTH and output.new_token_ids == []
    with torch.inference_mode():
        expected = torch.log_softmax(reference(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    got = output.prompt_logprobs
    assert [lp.token_id for lp in got] == prompt[1:]
    want = expected.gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor([lp.logprob for lp in got]), want, atol=1e-4)
    assert engine.scheduler.slots_used == 0


def test_logit_bias_and_min_tokens_steer_decoding(engine):
    eos_bias = {t: 100.0 for t in engine.eos_token_ids}
    with Loop(engine) as loop:
        loop.submit("bias", PROMPT, max_new_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={42: 100.0})
        loop.submit("eos", PROMPT, max_new_tokens=8, temperature=0.0, min_tokens=3, logit_bias=eos_bias)
        outputs = loop.collect({"bias", "eos"})
    tokens = {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in outputs.items()}
    assert tokens["bias"] == [42] * 4
    # end of sequence is masked for the first 3 tokens, then the bias makes it the 4th
    assert len(tokens["eos"]) == 4 and not set(tokens["eos"][:3]) & engine.eos_token_ids
    assert tokens["eos"][3] in engine.eos_token_ids and outputs["eos"][-1].finish_reason == FinishReason.STOP


def test_bad_requests_fail_alone_and_the_loop_serves_on(engine):
    with Loop(engine) as loop:
        loop.submit("ok", PROMPT, max_new_tokens=8, temperature=0.0, ignore_eos=True)
        loop.submit("ok", PROMPT, max_new_tokens=2, temperature=0.0)  # duplicate id
        loop.submit("empty", [], max_new_tokens=2)
        loop.submit("zero", PROMPT, max_new_tokens=0)  # nothing to generate, nothing to score
        loop.submit("long", [1] * engine.plan.max_context, max_new_tokens=2)
        outputs = loop.collect({"ok", "empty", "zero", "long"})  # "ok" ends here with the duplicate's error
        refused = outputs.pop("ok")
        served = loop.collect({"ok"})["ok"]  # admitted at once, so it is still running
    errors = {rid: o[-1].error for rid, o in outputs.items() if o[-1].finish_reason == FinishReason.REFUSED}
    assert set(errors) == {"empty", "zero", "long"}
    assert refused[-1].finish_reason == FinishReason.REFUSED and "duplicate request id ok" in refused[-1].error
    tokens = [t for o in refused[:-1] + served for t in o.new_token_ids]
    assert len(tokens) == 8 and (refused[:-1] + served)[-1].finish_reason == FinishReason.LENGTH
    assert engine.scheduler.slots_used == 0


def test_abort_during_a_step_emits_nothing_more_and_frees_the_slot(engine):
    """The abort arrives while the model step runs (put in the inbox from inside it): that step's token
    for the request is dropped, its slot is free, and the request beside it finishes normally."""
    forward = engine.runner.forward
    steps = {"n": 0}

    def forward_with_abort_inside(chunks):
        steps["n"] += 1
        if steps["n"] == 3:
            engine.io.inbox.put(Abort(["gone"]))
        return forward(chunks)

    engine.runner.forward = forward_with_abort_inside
    try:
        with Loop(engine) as loop:
            loop.submit("gone", PROMPT, max_new_tokens=50, temperature=0.0, ignore_eos=True)
            loop.submit("stays", PROMPT, max_new_tokens=10, temperature=0.0, ignore_eos=True)
            outputs = loop.collect({"stays"})
    finally:
        engine.runner.forward = forward
    gone = [t for o in outputs.get("gone", []) for t in o.new_token_ids]
    assert len(gone) == 2  # steps 1 and 2 only; step 3's token was dropped
    assert all(o.finish_reason is None for o in outputs.get("gone", []))
    assert sum(len(o.new_token_ids) for o in outputs["stays"]) == 10
    assert "gone" not in engine.scheduler.by_id and engine.scheduler.slots_used == 0


def test_a_failing_step_fails_its_requests_only(engine):
    from engine_core.fault_injection import InjectedFault

    forward = engine.runner.forward
    steps = {"n": 0}

    def fails_once(chunks):
        steps["n"] += 1
        if steps["n"] == 2:
            raise InjectedFault("injected step failure")
        return forward(chunks)

    engine.runner.forward = fails_once
    try:
        with Loop(engine) as loop:
            loop.submit("hit", PROMPT, max_new_tokens=5, temperature=0.0, ignore_eos=True)
            hit = loop.collect({"hit"})["hit"]
            loop.submit("after", PROMPT, max_new_tokens=5, temperature=0.0, ignore_eos=True)
            after = loop.collect({"after"})["after"]
    finally:
        engine.runner.forward = forward
    assert hit[-1].finish_reason == FinishReason.ERROR and "injected step failure" in hit[-1].error
    assert after[-1].finish_reason == FinishReason.LENGTH and sum(len(o.new_token_ids) for o in after) == 5
    assert engine.scheduler.slots_used == 0


def test_a_restart_loads_the_saved_graphs_without_tracing(engine, monkeypatch):
    """What a restarted engine does at warm-up: the graphs and their timings come back from the folder the
    first warm-up saved them to; nothing is traced (that took minutes), and the loaded graphs compute what
    the traced ones do."""
    from engine_core import compiled_cache
    from engine_core.compiled_decode import CompiledDecode

    def no_tracing(*args):
        raise AssertionError("a restart traced the decode step again")

    monkeypatch.setattr(compiled_cache, "trace", no_tracing)
    first = engine.runner.compiled
    second = CompiledDecode(engine.runner)
    line = second.warm()
    assert second.folder == first.folder and second.loaded, line
    assert "graphs loaded from" in line and "timings read back" in line
    assert second.measured == first.measured and second.graphs.keys() == first.graphs.keys()
    with torch.inference_mode():
        for shape in second.measured:
            inputs = second._inputs(*shape)
            assert torch.equal(
                second._graph_for(shape)(second.step, *inputs), first._graph_for(shape)(first.step, *inputs)
            )
