"""Scheduler, sampler and model runner in-process, with the real default model (no sockets)."""

from __future__ import annotations

import copy

import pytest
import torch

from engine_core.sampler import Sampler
from engine_core.scheduler import Scheduler, Sequence
from ipc.messages import FinishReason, Request, SamplingParams

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


def test_scheduler_reserves_slots_and_queues_the_rest():
    sched = Scheduler(max_batch=2, prefill_chunk=100, max_context=64, eos_token_ids=set())
    for i in range(3):
        sched.add(Request(f"r{i}", [1, 2, 3], GREEDY))
    chunks = sched.schedule()
    assert [c.seq.request_id for c in chunks] == ["r0", "r1"]
    assert sched.slots_used == 2 and len(sched.waiting) == 1
    sched.abort("r0")
    assert sched.slots_used == 1
    assert sched.update(chunks, [5, 5]) == []  # r0's chunk is skipped: it was aborted mid-step
    assert sched.by_id["r1"].output_ids == [5] and sched.by_id["r1"].num_computed == 3
    chunks = sched.schedule()
    assert {c.seq.request_id for c in chunks} == {"r1", "r2"}  # r2 took the freed slot
    assert sched.abort("unknown") is None and sched.abort("r0") is None  # idempotent


def test_scheduler_chunks_long_prompts_within_the_budget():
    sched = Scheduler(max_batch=4, prefill_chunk=16, max_context=64, eos_token_ids=set())
    sched.add(Request("long", list(range(40)), GREEDY))
    spans = []
    while True:
        chunks = sched.schedule()
        (chunk,) = chunks
        spans.append((chunk.start, chunk.length, chunk.sample))
        sched.update(chunks, [7] if chunk.sample else [])
        if chunk.sample:
            break
    assert spans == [(0, 16, False), (16, 16, False), (32, 8, True)]


def _seq(temperature=1.0, top_k=0, top_p=1.0, seed=None) -> Sequence:
    return Sequence(
        "r", [1], SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    )


def test_sampler_mixes_greedy_and_sampled_rows():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    seqs = [_seq(temperature=0.0), _seq(top_k=1), _seq(seed=7)]
    tokens = sampler.sample(logits, seqs)
    best = logits.argmax(-1).tolist()
    assert tokens[0] == best[0] and tokens[1] == best[1]


def test_seeded_sampling_is_independent_of_the_batch():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    alone = Sampler(torch.device("cpu")).sample(logits[2:3], [_seq(seed=42)])
    batched = Sampler(torch.device("cpu")).sample(logits, [_seq(), _seq(0.0), _seq(seed=42), _seq(top_p=0.5)])
    assert alone[0] == batched[2]


def test_penalties_follow_openai_and_hf_rules():
    """presence/frequency: subtract per generated occurrence; repetition: divide positive logits, multiply
    negative ones, for prompt and output tokens; logit_bias adds; min_tokens masks end of sequence."""
    logits = torch.tensor([[4.0, 3.0, -1.0, 0.5, 2.0]])

    def seq(**params):
        s = Sequence("r", [2], SamplingParams(max_new_tokens=9, temperature=0.0, **params))
        s.output_ids = [0, 0, 1]
        return s

    process = Sampler(torch.device("cpu"))._process
    out = process(logits, [seq(presence_penalty=0.5, frequency_penalty=1.0)], set())
    assert out.tolist() == [[4.0 - 0.5 - 2.0, 3.0 - 0.5 - 1.0, -1.0, 0.5, 2.0]]
    out = process(logits, [seq(repetition_penalty=2.0)], set())
    assert out.tolist() == [[2.0, 1.5, -2.0, 0.5, 2.0]]
    out = process(logits, [seq(logit_bias={3: 10.0}, min_tokens=4)], {4})
    assert out.tolist() == [[4.0, 3.0, -1.0, 10.5, float("-inf")]]
    assert process(logits, [seq(min_tokens=3)], {4}) is logits  # 3 tokens out already: nothing to do
    assert logits.tolist() == [[4.0, 3.0, -1.0, 0.5, 2.0]]  # processing never touches the raw logits


def test_top_p_and_top_k_keep_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = [SamplingParams(1, top_p=0.7), SamplingParams(1, top_k=3), SamplingParams(1, top_p=0.85, top_k=1)]
    filtered = Sampler._filter(logits.repeat(3, 1), params)
    kept = torch.isfinite(filtered).tolist()
    assert kept == [[True, True, False, False], [True, True, True, False], [True, False, False, False]]


@pytest.fixture(scope="module")
def model(default_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()


def test_chunked_prefill_and_batching_match_one_full_forward(model):
    from engine_core.model_runner import ModelRunner

    prompt = [int(t) for t in torch.randint(100, 40000, (37,), generator=torch.Generator().manual_seed(3))]
    other = prompt[:20]
    with torch.inference_mode():
        expected = model(torch.tensor([prompt])).logits[0, -1]
    runner = ModelRunner(model, max_batch=3, max_context=64, device=torch.device("cpu"), kv_dtype=torch.float32)
    sched = Scheduler(max_batch=3, prefill_chunk=16, max_context=64, eos_token_ids=set())
    sched.add(Request("a", other, GREEDY))
    sched.add(Request("b", prompt, GREEDY))
    logits = {}
    while "b" not in logits:
        chunks = sched.schedule()
        out = runner.forward(chunks).sample
        for chunk, row in zip([c for c in chunks if c.sample], out):
            logits.setdefault(chunk.seq.request_id, row)
        sched.update(chunks, out.argmax(-1).tolist())
    torch.testing.assert_close(logits["b"], expected, atol=2e-4, rtol=1e-4)


def test_sliding_window_matches_transformers():
    """A random-weight Mistral with a tiny window: chunked prefill and decode see only the window."""
    from transformers import MistralConfig, MistralForCausalLM

    from engine_core.model_runner import ModelRunner

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    model = MistralForCausalLM(config).eval()
    reference = copy.deepcopy(model)  # the runner switches its model to kiln attention
    prompt = [int(t) for t in torch.randint(0, 128, (21,), generator=torch.Generator().manual_seed(5))]
    runner = ModelRunner(model, max_batch=1, max_context=64, device=torch.device("cpu"), kv_dtype=torch.float32)
    sched = Scheduler(max_batch=1, prefill_chunk=16, max_context=64, eos_token_ids=set())
    seq = sched.add(Request("w", prompt, SamplingParams(max_new_tokens=4, temperature=0.0)))
    produced = []
    while len(sched):
        chunks = sched.schedule()
        out = runner.forward(chunks).sample
        produced += list(out)
        sched.update(chunks, out.argmax(-1).tolist())
    assert seq.finish_reason == FinishReason.LENGTH and len(seq.output_ids) == 4
    ids = torch.tensor([prompt + seq.output_ids[:-1]])
    with torch.inference_mode():
        expected = reference(ids).logits[0, len(prompt) - 1 :]
    torch.testing.assert_close(torch.stack(produced), expected, atol=1e-4, rtol=1e-4)
