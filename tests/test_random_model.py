"""bench.random_model: a tiny random model builds in seconds, loads with transformers, carries a tokenizer."""

from __future__ import annotations

import json

import pytest

from bench.random_model import build_random_model, tiny_config, write_config_dir


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_model_path):
    root = tmp_path_factory.mktemp("random")
    config_dir = write_config_dir(tiny_config("llama"), root / "config")
    return build_random_model(
        config_dir,
        root / "model",
        dtype="float32",
        tokenizer_dir=default_model_path,
        overrides={"num_hidden_layers": 3},
    )


def test_tiny_model_loads_with_its_tokenizer(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (tiny_llama / "model.safetensors").is_file() and (tiny_llama / "tokenizer.json").is_file()
    assert json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"] == 3
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert 0.01 < model.model.layers[0].mlp.up_proj.weight.std().item() < 0.03  # initializer_range 0.02
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape[1] == ids.shape[1] + 4


def test_num_layers_and_dtype(tmp_path, default_model_path):
    import torch
    from transformers import AutoModelForCausalLM

    config_dir = write_config_dir(tiny_config("starcoder2"), tmp_path / "config")
    out = build_random_model(
        config_dir, tmp_path / "model", dtype="bfloat16", num_layers=1, tokenizer_dir=default_model_path, init_std=0.5
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.c_fc.bias.abs().sum().item() == 0


def test_ids_beyond_the_tokenizer_decode_to_nothing(default_model_path):
    """llama-3.1's vocab (128256) is larger than the carried tokenizer's: the frontend's
    detokenizer must skip such ids instead of failing."""
    from tokenizers import Tokenizer

    from frontend.detokenizer import IncrementalDetokenizer

    tokenizer = Tokenizer.from_file(str(default_model_path) + "/tokenizer.json")
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hello").ids)
    assert detok.push([128000]) == "" and detok.push([100, 127999]) + detok.flush() == tokenizer.decode([100])


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown arch"):
        tiny_config("gpt2")
