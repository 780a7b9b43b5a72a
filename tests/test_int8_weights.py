"""int8 weight-only linears: close to the 16-bit layer they replace, and the default model stays coherent
through the engine's own runner whichever format this machine's plan picked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine_core import int8_weights
from engine_core.int8_weights import (
    Int8Linear,
    dequantized_linear,
    int8_kernel_linear,
    kernel_available,
    quantize_linears,
    quantize_rows,
)

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


def count_calls(monkeypatch, name: str) -> list[int]:
    """Rows of each call to int8_weights.<name>, which still runs."""
    real, rows = getattr(int8_weights, name), []

    def counted(x, *args):
        rows.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(int8_weights, name, counted)
    return rows


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def test_prompt_rows_are_dequantized_and_agree_with_the_kernel(monkeypatch):
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(256, 384, bias=True), dequant_from_rows=16)
    dequantized, kernel = count_calls(monkeypatch, "dequantized_linear"), count_calls(monkeypatch, "int8_kernel_linear")
    prompt, decode = torch.randn(1, 40, 256, dtype=torch.bfloat16), torch.randn(15, 256, dtype=torch.bfloat16)
    got = layer(prompt)
    layer(decode)
    assert dequantized == [40] and kernel == [15]  # 40 rows ≥ 16 dequantized, a 15-row decode step not
    expected = int8_kernel_linear(prompt[0], layer.weight_int8, layer.scale) + layer.bias
    assert got.shape == (1, 40, 384) and got.dtype == torch.bfloat16
    assert relative_error(got[0], expected) < 2**-7  # bf16 rounding apart: both ~2^-9 per element


def test_a_compiled_graph_takes_the_kernel_whatever_its_rows(monkeypatch):
    """The compiled decode step is traced once for every batch size: no guard on the row count, no recompile."""
    torch._dynamo.reset()
    layer = Int8Linear(nn.Linear(64, 32), dequant_from_rows=16)
    dequantized = count_calls(monkeypatch, "dequantized_linear")
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(layer, backend=counting_backend, dynamic=True)
    for rows in (2, 40, 300):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert torch.equal(compiled(x), int8_kernel_linear(x, layer.weight_int8, layer.scale) + layer.bias)
    assert len(graphs) == 1 and dequantized == []
    torch._dynamo.reset()


def test_dequantizing_in_row_blocks_matches_one_block(monkeypatch):
    torch.manual_seed(0)
    q, scale = quantize_rows(torch.randn(1000, 64))
    x = torch.randn(300, 64, dtype=torch.bfloat16)
    whole = dequantized_linear(x, q, scale)
    monkeypatch.setattr(int8_weights, "DEQUANT_BLOCK_ELEMENTS", 64 * 96)  # 96 rows per block: 11 blocks, last one short
    assert torch.equal(dequantized_linear(x, q, scale), whole)
    assert relative_error(whole, int8_kernel_linear(x, q, scale)) < 2**-7


def test_the_probe_timings_set_where_int8_linears_start_dequantizing():
    timings = {"int8@64": 100.0, "int8@256": 400.0, "int8-dequant@64": 60.0, "int8-dequant@256": 150.0}
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    assert "calls of 64+ rows dequantized" in quantize_linears(model, timings)
    assert [m.dequant_from_rows for m in model] == [64, 64]
    model = nn.Sequential(nn.Linear(8, 8))
    assert "every call through the int8 kernel" in quantize_linears(model)  # no timings: the kernel, as before
    assert model[0].dequant_from_rows is None


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


def test_default_model_prompt_through_either_int8_path_differs_by_bf16_rounding_only(default_model_path):
    """A 256-token prompt chunk of real text dequantized to bf16 against the same chunk through the int8 kernel:
    the two paths differ no more than bf16 differs from fp32 on the same model (within 2x), so the path a
    measured plan takes for prompts is a matter of rounding, not of quality."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.prefill import prompt_ids
    from tests.test_cpu_dtype import MEASURED

    ids = torch.tensor([prompt_ids(AutoTokenizer.from_pretrained(default_model_path), 256)])
    logits = {}
    for name, dtype, timings in (
        ("kernel", torch.bfloat16, None),
        ("dequantized", torch.bfloat16, MEASURED),  # 64+ rows dequantized
        ("bf16", torch.bfloat16, "unquantized"),
        ("fp32", torch.float32, "unquantized"),
    ):
        model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=dtype).eval()
        if timings != "unquantized":
            quantize_linears(model, timings)
        with torch.inference_mode():
            logits[name] = model(input_ids=ids, use_cache=False).logits[0].float()

    def agreement(a: str, b: str) -> float:
        return (logits[a].argmax(-1) == logits[b].argmax(-1)).float().mean().item()

    assert relative_error(logits["dequantized"], logits["kernel"]) < 2 * relative_error(logits["bf16"], logits["fp32"])
    assert agreement("dequantized", "kernel") >= agreement("bf16", "fp32") - 0.03  # greedy picks, position by position
