"""int8 weight-only linears: close to the 16-bit layer they replace, and the default model stays coherent
through the engine's own runner whichever format this machine's plan picked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine_core.int8_weights import Int8Linear, kernel_available, quantize_linears, quantize_rows

pytestmark = pytest.mark.skipif(not kernel_available(), reason="this torch has no _weight_int8pack_mm")


def test_rows_round_trip_within_a_step():
    weight = torch.randn(64, 96) * torch.logspace(-3, 0, 64)[:, None]  # rows of very different magnitudes
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    step = scale.float()[:, None]
    assert ((q.float() * step - weight).abs() <= step * (0.5 + 1e-3)).all()  # rounded against the stored scale


def test_int8_linear_matches_the_linear_it_replaces():
    torch.manual_seed(0)
    linear = nn.Linear(256, 384, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    expected, got = linear(x).float(), Int8Linear(linear)(x).float()
    assert got.shape == expected.shape == (3, 5, 384)
    assert (got - expected).norm() / expected.norm() < 0.02


def test_quantized_default_model_greedy_is_coherent_through_the_runner(default_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine_core.model_runner import ModelRunner
    from engine_core.scheduler import Scheduler
    from ipc.messages import Request, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.bfloat16).eval()
    report = quantize_linears(model)
    assert report.startswith("int8 weights: ") and not any(isinstance(m, nn.Linear) for m in model.modules())
    runner = ModelRunner(model, 1, 128, torch.device("cpu"), torch.float32)
    scheduler = Scheduler(1, 64, 128, eos_token_ids=set())
    prompt = tokenizer("def fibonacci(n):").input_ids
    seq = scheduler.add(Request("fib", prompt, SamplingParams(max_new_tokens=32, temperature=0.0)))
    while len(scheduler):
        chunks = scheduler.schedule()
        scheduler.update(chunks, runner.forward(chunks).sample.argmax(-1).tolist())
    assert "fibonacci(n - 1)" in tokenizer.decode(seq.output_ids)
