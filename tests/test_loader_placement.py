"""The loader keeps a GPU plan's CPU-placed embeddings / lm_head resident and running on CPU.

No GPU here, so accelerate's offload is reproduced on CPU the two ways it puts weights on meta:
disk offload through `from_pretrained` (weights read from files), and the hooks `dispatch_model`
attaches for "cpu" entries of a GPU map (weights kept in a RAM state dict). A tiny random Llama
(2 layers, hidden 64) keeps each test to a second or two.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate.hooks import AlignDevicesHook, attach_align_device_hook_on_blocks  # noqa: E402
from accelerate.utils import OffloadedWeightsLoader, extract_submodules_state_dict, find_tied_parameters  # noqa: E402

from engine_core.loader import cast_offloaded_weights, cpu_resident_modules, keep_resident_on_cpu  # noqa: E402
from hardware.profile import simulated_profile  # noqa: E402
from model.shape import load_model_shape  # noqa: E402
from planning.overrides import overrides_from_flags  # noqa: E402
from planning.planner import make_plan  # noqa: E402

HEADS = ["model.embed_tokens", "lm_head"]
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=request.param,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return folder, request.param


def load(folder, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=kwargs.pop("dtype", torch.float32), **kwargs
    ).eval()


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits


def dispatch_like_a_gpu_map(model, offloaded: list[str]) -> None:
    """What accelerate's dispatch_model does for "cpu" entries of a GPU device map: weights to meta,
    RAM copies in a weights_map, loaded per forward. The execution device is the CPU here."""
    state = extract_submodules_state_dict(model.state_dict(), offloaded)
    tied = {model.get_parameter(names[0]).data_ptr(): {} for names in find_tied_parameters(model)}
    attach_align_device_hook_on_blocks(
        model,
        execution_device={**{name: "cpu" for name in DEVICE_MAP}, "": "cpu"},
        offload={name: name in offloaded for name in DEVICE_MAP},
        weights_map=OffloadedWeightsLoader(state_dict=state),
        tied_params_map=tied,
    )


def assert_resident_on_cpu(model, tied: bool) -> None:
    for name in HEADS:
        module = model.get_submodule(name)
        assert module.weight.device.type == "cpu" and module.weight.numel() > 0
        hook = module._hf_hook
        assert isinstance(hook, AlignDevicesHook)
        assert hook.execution_device == "cpu" and hook.io_same_device and not hook.offload
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight  # one tensor in RAM


def test_disk_offloaded_heads_come_back_resident(tiny, tmp_path):
    folder, tied = tiny
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    expected = logits(load(folder), ids)
    device_map = {**DEVICE_MAP, "model.embed_tokens": "disk", "model.layers.1": "disk", "lm_head": "disk"}
    model = load(folder, device_map=device_map, offload_folder=str(tmp_path))
    assert model.model.embed_tokens.weight.device.type == "meta"  # accelerate's offload, as on a GPU map
    keep_resident_on_cpu(model, HEADS)
    assert_resident_on_cpu(model, tied)
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # other offload is left alone
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)


def test_gpu_map_cpu_entries_come_back_resident(tiny):
    folder, tied = tiny
    ids = torch.tensor([[7, 7, 2, 31]])
    expected = logits(load(folder), ids)
    model = load(folder)
    dispatch_like_a_gpu_map(model, HEADS + ["model.layers.1"])
    assert model.lm_head.weight.device.type == "meta"
    keep_resident_on_cpu(model, HEADS)
    assert_resident_on_cpu(model, tied)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)


def test_fp32_offloaded_layer_is_cast_to_the_compute_dtype(tiny):
    """bitsandbytes' fp32 CPU offload: an fp32 layer on meta would meet a bf16 hidden state."""
    folder, _ = tiny
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    expected = logits(load(folder, dtype=torch.bfloat16), ids)
    model = load(folder, dtype=torch.bfloat16)
    model.model.layers[1].float()  # as llm_int8_enable_fp32_cpu_offload leaves it
    dispatch_like_a_gpu_map(model, ["model.layers.1"])
    with pytest.raises(RuntimeError):
        logits(model, ids)
    assert cast_offloaded_weights(model, torch.bfloat16) == 9  # q, k, v, o, gate, up, down, two norms
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    hook = model.model.layers[1].mlp.up_proj._hf_hook
    assert hook.weights_map["weight"].dtype == torch.bfloat16
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    assert cast_offloaded_weights(model, torch.bfloat16) == 0


def test_only_gpu_plans_keep_heads_resident():
    shape = load_model_shape("tests/fixtures/configs/llama-3.1-8b")
    small = make_plan(shape, simulated_profile(["GTX1650:4GiB:7.5"], "32GiB"))
    assert cpu_resident_modules(small) == ["model.embed_tokens"]
    tighter = make_plan(shape, simulated_profile(["GTX:3584MiB:7.5"], "32GiB"))
    assert cpu_resident_modules(tighter) == HEADS
    assert cpu_resident_modules(make_plan(shape, simulated_profile(["A100:80GiB:8.0"], "64GiB"))) == []
    cpu_disk = make_plan(shape, simulated_profile([], "16GiB", True), overrides_from_flags(gpu_layers=16))
    assert cpu_disk.device_map["model.embed_tokens"] == "cpu" and cpu_resident_modules(cpu_disk) == []
