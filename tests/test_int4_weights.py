"""int4 weight-only linears: torch's kernel computes what kiln says its codes stand for, every packed layout is
read back, the layer stays close to the linear it replaces (and, compiled, to itself eager), and the default
model stays coherent in int4, from its float weights and from its GGUF's own 4-bit codes."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from engine_core import int4_weights
from engine_core.int4_weights import (
    GROUP_SIZE,
    Int4Linear,
    dequantize_groups,
    dequantize_transposed,
    dequantized_linear,
    int4_kernel_linear,
    kernel_available,
    pack,
    packed_layout,
    quantize_groups,
    quantize_linears,
)

pytestmark = pytest.mark.skipif(not kernel_available(), reason="this torch has no _weight_int4pack_mm_for_cpu")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def random_codes(rows: int, in_features: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, in_features), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(rows, in_features // GROUP_SIZE, generator=gen) * 0.1 + 0.01).bfloat16()
    zero = (torch.randn(rows, in_features // GROUP_SIZE, generator=gen) * 0.1).bfloat16()
    return q, scale, zero


def test_the_kernel_computes_q_minus_8_times_scale_plus_zero():
    """The convention every int4 path of kiln rests on (quantizing, the GGUF mapping, dequantizing), against a
    float64 reference: w = (q - 8) * scale + zero, the zero point in the float domain. The other readings of
    the same numbers are far off, so this tells them apart."""
    q, scale, zero = random_codes(96, 128)
    x = torch.randn(5, 128).bfloat16()
    got = int4_kernel_linear(x, *pack(q, scale, zero))
    s = scale.double().repeat_interleave(GROUP_SIZE, dim=1)
    z = zero.double().repeat_interleave(GROUP_SIZE, dim=1)
    for weight, close in (
        ((q.double() - 8) * s + z, True),
        (q.double() * s + z, False),  # zero point on the codes' side, unsigned
        ((q.double() - 8) * s - z, False),  # a zero subtracted
        ((q.double() - 8) * s, False),  # symmetric, no zero
    ):
        assert (relative_error(got, x.double() @ weight.t()) < 4e-3) == close


def test_groups_round_trip_within_half_a_step():
    weight = torch.randn(64, 256) * torch.logspace(-3, 0, 64)[:, None]  # rows of very different magnitudes
    q, scale, zero = quantize_groups(weight)
    assert q.dtype == torch.uint8 and q.max() <= 15 and scale.shape == zero.shape == (64, 256 // GROUP_SIZE)
    step = scale.float().repeat_interleave(GROUP_SIZE, dim=1)
    assert ((dequantize_groups(q, scale, zero) - weight).abs() <= step * (0.5 + 1e-2)).all()  # stored scale, zero


def pack_as(q: torch.Tensor, block: int, split: bool) -> torch.Tensor:
    """One of torch's int4 packings, written from its description in aten/src/ATen/native/cpu/int4mm_kernel.cpp
    (weight_to_int4pack_kernel): rows in blocks of `block`, each stored as (in, block / 2) bytes; a whole block
    holds rows j and j + block / 2 in byte j when `split`, a short last block (or any block when not) rows 2j, 2j+1."""
    rows, in_features = q.shape
    out = []
    for start in range(0, rows, block):
        b = q[start : start + block].t()  # (in, n)
        n = b.shape[1]
        if split and n == block:
            out.append(b[:, : n // 2] | (b[:, n // 2 :] << 4))
        else:
            out.append(b[:, 0::2] | (b[:, 1::2] << 4))
    return torch.cat([o.reshape(-1) for o in out]).view(rows, in_features // 2)


@pytest.mark.parametrize("layout", int4_weights.LAYOUTS)
@pytest.mark.parametrize("rows", [128, 176, 48, 1008])  # whole blocks, a short last block, only a short one
def test_every_packed_layout_reads_back(layout, rows):
    q, _, _ = random_codes(rows, 64)
    assert torch.equal(int4_weights._unpack(pack_as(q, *layout), *layout), q)


def test_this_torch_packs_in_a_layout_kiln_reads():
    layout = packed_layout()
    assert layout in int4_weights.LAYOUTS
    q, scale, zero = random_codes(176, 96)
    packed, _ = pack(q, scale, zero)
    assert torch.equal(packed, pack_as(q, *layout))


def test_packing_in_row_blocks_gives_the_same_bytes(monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(64, 1008)  # 15 whole blocks of 64 and a short one of 48
    whole = Int4Linear.from_linear(linear)
    monkeypatch.setattr(int4_weights, "PACK_ROWS", 128)
    blocks = Int4Linear.from_linear(linear)
    assert torch.equal(blocks.weight_int4, whole.weight_int4)
    assert torch.equal(blocks.scales_and_zeros, whole.scales_and_zeros)


def test_int4_linear_matches_the_linear_it_replaces():
    torch.manual_seed(0)
    linear = nn.Linear(256, 384, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    layer = Int4Linear.from_linear(linear)
    got = layer(x)
    assert got.shape == (3, 5, 384) and got.dtype == torch.bfloat16
    # what its codes stand for, up to bf16 rounding; and 16 levels per group from the float layer
    codes = quantize_groups(linear.weight)
    expected = x.double() @ dequantize_groups(*codes).double().t() + linear.bias.double()
    assert relative_error(got, expected) < 2**-7
    assert relative_error(got, linear(x)) < 0.1


def count_calls(monkeypatch, name: str) -> list[int]:
    """Rows of each call to int4_weights.<name>, which still runs."""
    real, rows = getattr(int4_weights, name), []

    def counted(x, *args):
        rows.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(int4_weights, name, counted)
    return rows


def test_prompt_rows_are_dequantized_and_agree_with_the_kernel(monkeypatch):
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(nn.Linear(256, 384, bias=True), dequant_from_rows=16)
    dequantized, kernel = count_calls(monkeypatch, "dequantized_linear"), count_calls(monkeypatch, "int4_kernel_linear")
    prompt, decode = torch.randn(1, 40, 256, dtype=torch.bfloat16), torch.randn(15, 256, dtype=torch.bfloat16)
    got = layer(prompt)
    layer(decode)
    assert dequantized == [40] and kernel == [15]  # 40 rows ≥ 16 dequantized, a 15-row decode step not
    expected = int4_kernel_linear(prompt[0], layer.weight_int4, layer.scales_and_zeros) + layer.bias
    assert got.shape == (1, 40, 384) and got.dtype == torch.bfloat16
    assert relative_error(got[0], expected) < 2**-7  # bf16 rounding apart


def test_dequantizing_in_row_blocks_matches_one_block(monkeypatch):
    q, scale, zero = random_codes(1008, 64)  # a short last block of 48 rows
    packed, scales_and_zeros = pack(q, scale, zero)
    weight = dequantize_transposed(packed, scales_and_zeros).t()
    assert relative_error(weight, dequantize_groups(q, scale, zero)) < 2**-8  # one bf16 rounding
    x = torch.randn(300, 64, dtype=torch.bfloat16)
    whole = dequantized_linear(x, packed, scales_and_zeros)
    monkeypatch.setattr(int4_weights, "DEQUANT_BLOCK_ELEMENTS", 64 * 128)  # blocks of 128 rows, the last 112
    assert torch.equal(dequantized_linear(x, packed, scales_and_zeros), whole)
    assert relative_error(whole, int4_kernel_linear(x, packed, scales_and_zeros)) < 2**-7


def test_a_traced_graph_takes_the_kernel_whatever_its_rows(monkeypatch):
    """The compiled decode step is traced once for every batch size: no guard on the row count, no recompile."""
    torch._dynamo.reset()
    layer = Int4Linear.from_linear(nn.Linear(64, 32), dequant_from_rows=16)
    dequantized = count_calls(monkeypatch, "dequantized_linear")
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(layer, backend=counting_backend, dynamic=True)
    for rows in (2, 40, 300):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert torch.equal(compiled(x), int4_kernel_linear(x, layer.weight_int4, layer.scales_and_zeros) + layer.bias)
    assert len(graphs) == 1 and dequantized == []
    torch._dynamo.reset()


class GatedMLP(nn.Module):
    """A decoder layer's MLP, as the compiled decode step runs it: elementwise work around the linears."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(64, 128, bias=False), nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def test_inductor_compiles_int4_linears_and_matches_eager():
    """torch.compile with inductor (the engine's CPU decode graph) runs the int4 kernel inside generated code."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GatedMLP().to(torch.bfloat16)
    quantize_linears(model)
    compiled = torch.compile(model, dynamic=True)
    with torch.inference_mode():
        for rows in (1, 3, 17):
            x = torch.randn(rows, 64, dtype=torch.bfloat16)
            assert relative_error(compiled(x), model(x)) < 2**-7  # fused elementwise ops round differently
    torch._dynamo.reset()


def test_the_probe_timings_set_where_int4_linears_start_dequantizing():
    timings = {"int4@64": 100.0, "int4@256": 400.0, "int4-dequant@64": 60.0, "int4-dequant@256": 150.0}
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    assert "calls of 64+ rows dequantized" in quantize_linears(model, timings)
    assert [m.dequant_from_rows for m in model] == [64, 64]
    model = nn.Sequential(nn.Linear(64, 64))
    assert "every call through the int4 kernel" in quantize_linears(model)  # no timings: the kernel
    assert model[0].dequant_from_rows is None


def test_quantizing_frees_each_float_weight_and_leaves_odd_shapes():
    """The int4 weights replace the float ones (RAM holds one copy); a shape the kernel cannot take stays."""
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 40), nn.Linear(40, 64))  # 40 rows, then 40 inputs
    freed = weakref.ref(model[0].weight)
    report = quantize_linears(model)
    gc.collect()
    assert freed() is None and isinstance(model[0], Int4Linear)
    assert [type(m) for m in model[1:]] == [nn.Linear, nn.Linear] and "left unquantized (shape): 1, 2" in report


def test_given_codes_are_used_as_they_are():
    q, scale, zero = random_codes(128, 64)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    report = quantize_linears(model, exact={"0": (q.numpy(), scale.float().numpy(), zero.float().numpy())})
    assert "2 linears in groups of 32, 1 with the GGUF's own 4-bit codes" in report
    layer = model[0]
    assert torch.equal(int4_weights._unpack(layer.weight_int4, *packed_layout()), q)
    assert torch.equal(layer.scales_and_zeros, torch.stack([scale, zero], dim=-1).transpose(0, 1))


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_the_lm_head_and_embedding_are_int8_rows_one_copy_when_tied(tied):
    """Every logit sees the LM head's rounding, so the int4 format keeps it (and the embedding) in int8 rows, as
    llama.cpp's Q4 files keep their output matrix at 6-8 bits; tied, the embedding reads the head's rows."""
    from engine_core.int4_weights import Int8Embedding
    from engine_core.int8_weights import Int8Linear

    model = tiny_llama(tied)
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    table = weakref.ref(model.model.embed_tokens.weight)
    report = quantize_linears(model)
    gc.collect()
    assert table() is None  # the float table is gone, tied or not
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.model.embed_tokens, Int8Embedding)
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 2 * 7 and "the LM head in int8 rows" in report
    shares = model.model.embed_tokens.weight_int8.data_ptr() == model.lm_head.weight_int8.data_ptr()
    assert shares == tied and ("reads the LM head's int8 rows (tied)" in report) == tied
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    assert relative_error(got, expected) < 0.1


def test_an_int4_plan_loads_int4_and_lets_go_of_the_checkpoint(tmp_path):
    """The loader applies the plan's int4 format, then copies the few float tensors left (norms) out of the
    checkpoint's memory map: while any tensor viewed it, every page of the file read while quantizing stayed
    in the engine's resident size (2.9 GB for a 1.5B bf16 checkpoint whose int4 weights are 1 GB)."""
    from engine_core.int8_weights import Int8Linear
    from engine_core.loader import load_model
    from hardware.profile import simulated_profile
    from model.shape import load_model_shape
    from planning.overrides import overrides_from_flags
    from planning.planner import make_plan

    tiny_llama(tied=False).save_pretrained(tmp_path)  # bf16, the plan's dtype: transformers maps the file
    plan = make_plan(
        load_model_shape(tmp_path), simulated_profile((), "8GiB", True), overrides_from_flags(quantization="int4")
    )
    assert plan.quantization == "int4"
    model = load_model(str(tmp_path), plan)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear) and isinstance(model.lm_head, Int8Linear)
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert not [line for line in maps if str(tmp_path) in line]  # no mapping of the checkpoint left


# ---------------------------------------------------------------- the default model


def greedy_through_the_runner(model, tokenizer, prompt: str, new_tokens: int = 32) -> str:
    from engine_core.model_runner import ModelRunner
    from engine_core.scheduler import Scheduler
    from ipc.messages import Request, SamplingParams

    runner = ModelRunner(model, 1, 128, torch.device("cpu"), torch.float32)
    scheduler = Scheduler(1, 64, 128, eos_token_ids=set())
    seq = scheduler.add(
        Request("r", tokenizer(prompt).input_ids, SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
    )
    while len(scheduler):
        chunks = scheduler.schedule()
        scheduler.update(chunks, runner.forward(chunks).sample.argmax(-1).tolist())
    return tokenizer.decode(seq.output_ids)


@pytest.mark.parametrize("source", ["float weights", "gguf codes"])
def test_int4_default_model_greedy_is_coherent_through_the_runner(default_model_path, source):
    """The embedded default is a Q4_1 GGUF: in int4 it runs either its own codes (kept by the conversion) or a
    re-quantization of the weights it was dequantized to; both write the function the int8 test expects."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine_core.loader import gguf_int4_codes

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.bfloat16).eval()
    codes = gguf_int4_codes(default_model_path, model) if source == "gguf codes" else None
    report = quantize_linears(model, exact=codes)
    assert report.startswith("int4 weights: ") and not any(isinstance(m, nn.Linear) for m in model.modules())
    if source == "gguf codes":  # every decoder linear (7 x 30 layers) is Q4_1; the head is tied to a Q8_0 table
        assert "210 linears in groups of 32, 210 with the GGUF's own 4-bit codes, the LM head in int8 rows" in report
    assert "fibonacci(n - 1)" in greedy_through_the_runner(model, tokenizer, "def fibonacci(n):")


def test_the_gguf_codes_give_back_the_weights_the_model_was_converted_to(default_model_path):
    """The int4 layers built from the kept Q4_1 codes compute with the converted (dequantized) weights
    themselves, up to bf16 rounding of the scales and zeros: the 4-bit original, unwidened and not
    re-quantized, for every decoder linear."""
    from transformers import AutoModelForCausalLM

    from engine_core.loader import gguf_int4_codes

    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    codes = gguf_int4_codes(default_model_path, model)
    assert codes is not None and len(codes) == 210
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        layer = Int4Linear.from_codes(*codes[name])
        weight = model.get_submodule(name).weight.detach()
        assert relative_error(dequantize_transposed(layer.weight_int4, layer.scales_and_zeros).t(), weight) < 2**-7
