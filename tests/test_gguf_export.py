"""bench.gguf_export: a random-weight HF folder as an F16 GGUF that llama.cpp computes as transformers does.

The file's layout is checked everywhere; where llama.cpp is installed (`pip install -e .[peers]`),
llama-server runs the export and its greedy continuation and log-probabilities must be transformers'
on the same folder, which fails for a wrong tensor name or Q/K rows not permuted into llama.cpp's rope
layout (checked: the test exports without the permutation too and sees it differ). Tiny models with
large random weights (init_std 0.5): the logits are far apart, so F16 rounding never flips a token.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from bench import gguf_export, llama_cpp
from bench.random_model import build_random_model, tiny_config, write_config_dir
from bench.server_proc import free_port, running_server

pytestmark = pytest.mark.timeout(300)

PROMPT = "def fibonacci(n):\n    return 12 + 345"
NEW_TOKENS = 8
LOGPROB_TOL = 0.1  # F16 weights and activations: seen up to 0.03; a wrong permutation is off by whole units
TOP = 5
# Greedy paths are compared while transformers' top two logits are this far apart: past a closer call
# (seen: 0.06) float noise may pick the other token and the paths part, rightly
CLEAR_GAP = 0.2


def _config(arch: str) -> dict:
    config = tiny_config("llama")
    if arch == "qwen2":  # untied head, q/k/v biases (filled below), Qwen's rope base
        return {**config, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "rope_theta": 1e6}
    # tied like llama-3.2-1b, with its llama3 rope scaling (original context 64: every band of the scaling used)
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    return {
        **config,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": {**scaling, "original_max_position_embeddings": 64},
    }


def _random_biases(folder) -> None:
    """random_model zeroes biases; nonzero ones make a wrong bias name or layout show."""
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(1)
    for name, tensor in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory, default_model_path):
    """(arch, folder): float16 weights, so the F16 export holds exactly the values transformers runs."""
    root = tmp_path_factory.mktemp(request.param)
    folder = build_random_model(
        write_config_dir(_config(request.param), root / "config"),
        root / "model",
        dtype="float16",
        tokenizer_dir=default_model_path,
        init_std=0.5,
    )
    if request.param == "qwen2":
        _random_biases(folder)
    return request.param, folder


@pytest.fixture(scope="module")
def server_bin():
    try:
        return llama_cpp.find_tool(llama_cpp.SERVER)
    except llama_cpp.LlamaCppUnavailable as exc:
        pytest.skip(f"llama.cpp not installed here ({exc})")


# --- the file, without llama.cpp -------------------------------------------------------------------


def test_layout_and_metadata(tiny, tmp_path):
    from gguf import GGUFReader

    arch, folder = tiny
    reader = GGUFReader(gguf_export.export_gguf(folder, tmp_path / "m.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items() if name != "tokenizer.ggml.merges"}
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.attention.head_count"] == 4 and fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # kiln's converted SmolLM2 tokenizer: GPT-2's split
    assert len(fields["tokenizer.ggml.tokens"]) == 49152 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.add_bos_token"] is False
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "F16" and types["blk.1.ffn_down.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    if arch == "llama":
        assert "output.weight" not in types and types["rope_freqs.weight"] == "F32"  # tied head; llama3 rope
        assert fields["llama.rope.freq_base"] == 500000.0
    else:
        assert types["output.weight"] == "F16" and types["blk.0.attn_q.bias"] == "F32"
        assert "rope_freqs.weight" not in types
    # token_embd, output_norm, rope_freqs (llama) or output (qwen2); 9 per layer, 12 with q/k/v biases
    assert len(types) == 3 + 2 * (9 if arch == "llama" else 12)


def test_vocab_is_padded_to_the_models_rows(default_model_path):
    from gguf import TokenType

    tokens, types, pre, adds = gguf_export.vocab(default_model_path, 49152 + 100)
    assert len(tokens) == len(types) == 49252 and tokens[49160] == "[PAD49160]" and types[49160] == TokenType.UNUSED
    assert types[0] == TokenType.CONTROL and types[1000] == TokenType.NORMAL  # <|endoftext|>; a merge
    assert adds == {"bos": False, "eos": False}
    with pytest.raises(gguf_export.ExportError, match="past the model's vocab_size"):
        gguf_export.vocab(default_model_path, 1000)


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert gguf_export.pre_tokenizer_name(byte_level) == "gpt-2"
    assert gguf_export.pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    split = {"type": "Split", "pattern": {"Regex": next(iter(gguf_export.SPLITS))}, "behavior": "Isolated"}
    llama3 = {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    assert gguf_export.pre_tokenizer_name(llama3) == "llama-bpe"
    with pytest.raises(gguf_export.ExportError, match="no llama.cpp pre-tokenizer"):
        gguf_export.pre_tokenizer_name({"type": "Metaspace"})


def test_llama3_rope_factors_of_llama_3_2_1b():
    config = json.loads((Path(__file__).parent / "fixtures" / "configs" / "llama-3.2-1b" / "config.json").read_text())
    factors = gguf_export.llama3_rope_factors(config, 64)
    assert factors.shape == (32,) and factors[0] == 1.0 and factors[-1] == 32.0  # fast bands kept, slow ones / 32
    assert all(a <= b for a, b in zip(factors, factors[1:]))
    assert gguf_export.llama3_rope_factors({"rope_theta": 1e6}, 64) is None


def test_other_architectures_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    write_config_dir(tiny_config("starcoder2"), tmp_path / "sc2")
    with pytest.raises(llama_cpp.LlamaCppUnavailable, match="model_type 'starcoder2'"):
        llama_cpp.baseline_gguf(str(tmp_path / "sc2"), "F16")


# --- llama.cpp computes what transformers computes ------------------------------------------------


def _post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _llama_server(setup: llama_cpp.LlamaCppSetup):
    """llama-server as the bench starts it, with one slot and one thread (the machine is shared)."""
    port = free_port()
    cmd = llama_cpp.server_command(setup, port, users=1, context=256, threads=1)
    return running_server(cmd, f"http://127.0.0.1:{port}", name="llama.cpp", timeout_s=60)


def _f16(server: str, gguf) -> llama_cpp.LlamaCppSetup:
    return llama_cpp.LlamaCppSetup(server=server, gguf=str(gguf), quant="F16")


def _llama_greedy(url: str, prompt_ids: list[int]) -> list[tuple[int, float, list[int]]]:
    """(token, its logprob, the top ids) for each greedy step, llama.cpp's log-softmax of the raw logits."""
    body = {"prompt": prompt_ids, "n_predict": NEW_TOKENS, "temperature": 0, "n_probs": TOP, "cache_prompt": False}
    steps = _post(url, "/completion", body)["completion_probabilities"]
    return [(s["id"], s["logprob"], [t["id"] for t in s["top_logprobs"]]) for s in steps]


def _hf_greedy(folder, prompt_ids: list[int]) -> list[tuple[int, float, float]]:
    """(token, its logprob, its lead over the runner-up) for each greedy step of transformers, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    steps = []
    for token, logits in zip(out.sequences[0, len(prompt_ids) :].tolist(), out.logits):
        logprobs = torch.log_softmax(logits[0].float(), -1)
        first, second = logprobs.topk(2).values.tolist()
        steps.append((token, logprobs[token].item(), first - second))
    return steps


def _clear_steps(expected) -> int:
    """How many leading greedy steps are clear calls (CLEAR_GAP): the ones both paths must share."""
    return next((i for i, step in enumerate(expected) if step[2] < CLEAR_GAP), len(expected))


def _agree(got, expected) -> bool:
    clear = _clear_steps(expected)
    return all(g[0] == e[0] and abs(g[1] - e[1]) < LOGPROB_TOL for g, e in zip(got[:clear], expected[:clear]))


def _prompt_ids(folder) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids


def test_llama_server_computes_what_transformers_computes(tiny, server_bin, tmp_path):
    arch, folder = tiny
    prompt = _prompt_ids(folder)
    expected = _hf_greedy(folder, prompt)
    with _llama_server(_f16(server_bin, gguf_export.export_gguf(folder, tmp_path / "m.gguf"))) as url:
        got = _llama_greedy(url, prompt)
        tokenized = _post(url, "/tokenize", {"content": PROMPT + " ünïcode\n\n\tend"})["tokens"]
    assert len(got) == NEW_TOKENS and _clear_steps(expected) >= 3 and _agree(got, expected), (got, expected)
    from tokenizers import Tokenizer

    assert tokenized == Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT + " ünïcode\n\n\tend").ids


def test_the_check_sees_q_k_rows_left_unpermuted(tiny, server_bin, tmp_path, monkeypatch):
    arch, folder = tiny
    if arch != "llama":
        pytest.skip("qwen2 is not permuted")
    monkeypatch.setattr(gguf_export, "permute", lambda weights, n_head: weights)
    prompt = _prompt_ids(folder)
    with _llama_server(_f16(server_bin, gguf_export.export_gguf(folder, tmp_path / "wrong.gguf"))) as url:
        got = _llama_greedy(url, prompt)
    assert not _agree(got, _hf_greedy(folder, prompt))


def test_q8_0_is_made_by_llama_quantize_once_and_runs(tiny, server_bin, tmp_path, monkeypatch):
    """Through the bench's own path (prepare: export, llama-quantize, the repack probe), then served."""
    from gguf import GGUFReader

    arch, folder = tiny
    if arch != "llama":
        pytest.skip("one architecture is enough")
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    setup = llama_cpp.prepare(str(folder), "Q8_0")
    path = gguf_export.exported_path(folder, "Q8_0")
    assert setup.gguf == str(path) and setup.quant == "Q8_0"
    assert gguf_export.exported_path(folder, "F16").is_file()  # the F16 export it was made from, beside it
    assert {t.tensor_type.name for t in GGUFReader(path).tensors} == {"Q8_0", "F32"}
    mtime = path.stat().st_mtime_ns
    assert llama_cpp.baseline_gguf(str(folder), "Q8_0") == (path, "Q8_0") and path.stat().st_mtime_ns == mtime
    prompt = _prompt_ids(folder)
    with _llama_server(setup) as url:
        got = _llama_greedy(url, prompt)
    # int8 rounding moves these chaotic random logits (std 0.5) more than F16: transformers' first
    # token among llama.cpp's top 5 (seen: its second), not a garbled model's 5 in 49152
    assert len(got) == NEW_TOKENS and _hf_greedy(folder, prompt)[0][0] in got[0][2]


def test_repacked_kernels_that_fault_mean_no_repack(tmp_path, monkeypatch):
    """An AMX CPU whose AMX faults (a VM): llama-completion beside llama-server dies of SIGILL on the
    quantized file, so llama-server gets --no-repack; without AMX nothing is probed."""
    server = tmp_path / "llama-server"
    completion = tmp_path / "llama-completion"
    for script, body in ((server, "exit 0"), (completion, f'echo "$@" > {tmp_path}/probed; kill -ILL $$')):
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    gguf = tmp_path / "m.Q8_0.gguf"
    monkeypatch.setattr(llama_cpp, "cpu_model_and_flags", lambda: ("Xeon", ["avx512f", "amx_int8"]))
    assert llama_cpp.repack_runs(str(server), gguf) is False
    assert f"-m {gguf} " in (tmp_path / "probed").read_text()
    setup = llama_cpp.LlamaCppSetup(server=str(server), gguf=str(gguf), quant="Q8_0", repack=False)
    assert llama_cpp.server_command(setup, 1, users=1, context=256, threads=1)[-1] == "--no-repack"
    completion.write_text("#!/bin/sh\nkill -SEGV $$\n")
    assert llama_cpp.repack_runs(str(server), gguf) is False
    completion.write_text("#!/bin/sh\nexit 0\n")
    assert llama_cpp.repack_runs(str(server), gguf) is True
    monkeypatch.setattr(llama_cpp, "cpu_model_and_flags", lambda: ("EPYC", ["avx512f"]))
    completion.write_text("#!/bin/sh\nkill -ILL $$\n")
    assert llama_cpp.repack_runs(str(server), gguf) is True
