"""Hardware detection, simulated machines, size parsing, model shapes from config.json and GGUF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hardware import profile as hp
from hardware.profile import GiB, MiB, detect_hardware, parse_gpu_spec, parse_size, simulated_profile
from model.gguf_meta import GGUFError, read_gguf_metadata
from model.shape import ModelConfigError, load_model_shape, model_shape_for_spec, shape_from_config
from tests.conftest import SMOL_LIKE, TIMINGS

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).parent / "fixtures" / "configs"


# ---------------------------------------------------------------- sizes and simulated machines


@pytest.mark.parametrize(
    "text, expected",
    [
        ("16GiB", 16 * GiB),
        ("16GB", 16 * 10**9),
        ("12G", 12 * GiB),
        ("8000MiB", 8000 * MiB),
        ("512MB", 512 * 10**6),
        ("1.5GiB", int(1.5 * GiB)),
        ("24gib", 24 * GiB),
        ("1073741824", GiB),
        (" 2 TiB ", 2 << 40),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "16XB", "-4GiB", "sixteen", "16iB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_gpu_spec_with_and_without_cc():
    t4 = parse_gpu_spec("T4:16GiB:7.5", 0)
    assert (t4.name, t4.total_bytes, t4.free_bytes, t4.compute_capability) == ("T4", 16 * GiB, 16 * GiB, (7, 5))
    assert parse_gpu_spec("RTX4090:24GiB", 1).compute_capability == (8, 9)
    assert parse_gpu_spec("A100:80GB:8.0", 0).total_bytes == 80 * 10**9
    for bad in ("T4", "T4:16GiB:seven", "MysteryCard:8GiB", ":8GiB:8.0", "T4:16GiB:7.5:extra"):
        with pytest.raises(ValueError):
            parse_gpu_spec(bad, 0)


def test_simulated_profile():
    p = simulated_profile(["T4:16GiB:7.5", "A100:80GiB:8.0"], "32GiB")
    assert p.source == "simulated"
    assert [g.index for g in p.gpus] == [0, 1]
    assert p.gpus[1].compute_capability == (8, 0)
    assert p.ram_total_bytes == p.ram_available_bytes == 32 * GiB
    assert p.cpu_cores >= 1

    cpu = simulated_profile([], "8GiB", cpu_only=True)
    assert cpu.gpus == [] and cpu.ram_available_bytes == 8 * GiB and "cpu-only" in cpu.source

    with pytest.raises(ValueError, match="contradict"):
        simulated_profile(["T4:16GiB:7.5"], None, cpu_only=True)


def test_simulated_profile_keeps_real_ram_when_not_given():
    p = simulated_profile(["T4:16GiB:7.5"])
    assert 0 < p.ram_available_bytes <= p.ram_total_bytes


# ---------------------------------------------------------------- detection on this machine


def test_detect_hardware_is_quiet_and_cpu_only_here(capfd):
    p = detect_hardware()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert p.ram_total_bytes > 0 and 0 < p.ram_available_bytes <= p.ram_total_bytes
    assert p.cpu_cores >= 1
    if not hp.nvidia_device_nodes():
        assert p.gpus == []
        assert p.source.startswith("none")


def test_detect_hardware_does_not_import_torch():
    code = "import sys, hardware.profile as p; p.detect_hardware(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_cgroup_limit_caps_ram(monkeypatch):
    limits = {"/sys/fs/cgroup/memory.max": 4 * GiB, "/sys/fs/cgroup/memory.current": 1 * GiB}
    monkeypatch.setattr(hp, "_read_int", lambda path: limits.get(path))
    total, available = hp.detect_ram()
    assert total <= 4 * GiB
    assert available <= 3 * GiB


def test_cgroup_v1_unlimited_is_ignored(monkeypatch):
    values = {"/sys/fs/cgroup/memory/memory.limit_in_bytes": 9223372036854771712}
    monkeypatch.setattr(hp, "_read_int", lambda path: values.get(path))
    assert hp.cgroup_memory() == (None, None)


# ---------------------------------------------------------------- model shapes


# Published parameter counts (model cards / safetensors metadata on the hub).
PUBLISHED = {"starcoder2-3b": 3.03e9, "starcoder2-7b": 7.17e9, "starcoder2-15b": 15.96e9, "llama-3.1-8b": 8.03e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published_totals(name):
    shape = load_model_shape(CONFIGS / name)
    assert shape.total_params == pytest.approx(PUBLISHED[name], rel=0.02)
    assert shape.total_params == (
        shape.embedding_params + shape.lm_head_params + shape.decoder_linear_params + shape.other_params
    )
    assert shape.notes == []


def test_llama_split_by_hand():
    s = load_model_shape(CONFIGS / "llama-3.1-8b")
    h, inter, layers, vocab, kv_dim = 4096, 14336, 32, 128256, 8 * 128
    assert (s.head_dim, s.num_kv_heads, s.max_position_embeddings) == (128, 8, 131072)
    assert not s.tie_word_embeddings
    assert s.embedding_params == s.lm_head_params == vocab * h
    assert s.decoder_linear_params == layers * (2 * h * h + 2 * h * kv_dim + 3 * h * inter)
    assert s.other_params == layers * 2 * h + h
    assert s.torch_dtype == "bfloat16"


def test_starcoder2_split_by_hand():
    s = load_model_shape(CONFIGS / "starcoder2-3b")
    h, inter, layers, kv_dim = 3072, 12288, 30, 2 * 128
    assert s.tie_word_embeddings and s.lm_head_params == 0
    assert s.decoder_linear_params == layers * (2 * h * h + 2 * h * kv_dim + 2 * h * inter)
    biases = h + 2 * kv_dim + h + inter + h  # q, k, v, o, c_fc, c_proj
    assert s.other_params == layers * (4 * h + biases) + 2 * h
    assert s.torch_dtype == "float32"
    assert not load_model_shape(CONFIGS / "starcoder2-15b").tie_word_embeddings


def test_folder_with_only_config_and_config_file(tmp_path):
    cfg = json.loads((CONFIGS / "starcoder2-7b" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = load_model_shape(tmp_path)
    b = load_model_shape(tmp_path / "config.json")
    assert a.total_params == b.total_params


def test_unknown_architecture_is_refused_in_one_line():
    cfg = {
        "model_type": "mystery",
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "vocab_size": 1000,
        "max_position_embeddings": 1024,
    }
    with pytest.raises(ModelConfigError, match="architecture 'mystery' is not supported") as refused:
        shape_from_config(cfg)
    assert "\n" not in str(refused.value)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelConfigError):
        load_model_shape(tmp_path / "nope")
    with pytest.raises(ModelConfigError):
        load_model_shape(tmp_path)  # a folder without config.json


# ---------------------------------------------------------------- GGUF metadata


@pytest.fixture(scope="module")
def default_gguf():
    from model.source import ModelNotFound, default_gguf

    try:
        return default_gguf()
    except ModelNotFound as e:
        pytest.skip(str(e))


def test_gguf_shape_of_embedded_default(default_gguf):
    s = load_model_shape(default_gguf)
    assert s.architecture == "llama"
    assert (s.num_layers, s.hidden_size, s.num_attention_heads, s.num_kv_heads) == (30, 576, 9, 3)
    assert (s.vocab_size, s.head_dim, s.intermediate_size, s.max_position_embeddings) == (49152, 64, 1536, 8192)
    assert s.tie_word_embeddings and s.lm_head_params == 0
    assert s.total_params == pytest.approx(134.5e6, rel=0.01)
    # the tensor table agrees with the Llama arithmetic applied to the same numbers
    by_config = shape_from_config(SMOL_LIKE)
    assert by_config.total_params == s.total_params
    assert by_config.decoder_linear_params == s.decoder_linear_params
    assert by_config.layer_params == s.layer_params


def test_default_spec_reads_gguf_without_converting(default_gguf, monkeypatch, tmp_path):
    monkeypatch.delenv("BASE_MODEL", raising=False)
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    s = model_shape_for_spec(None)
    assert s.name == "SmolLM2-135M-Instruct"
    assert not any(tmp_path.iterdir())  # nothing converted


def test_gguf_reader_agrees_with_gguf_package(default_gguf):
    gguf = pytest.importorskip("gguf")
    ours = read_gguf_metadata(default_gguf)
    ref = gguf.GGUFReader(str(default_gguf))
    for key in (
        "general.architecture",
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.head_count_kv",
        "llama.context_length",
    ):
        assert ours.fields[key] == ref.fields[key].contents()
    assert ours.array_lengths["tokenizer.ggml.tokens"] == len(ref.fields["tokenizer.ggml.tokens"].data)
    assert [(t.name, t.shape) for t in ours.tensors] == [(t.name, tuple(int(d) for d in t.shape)) for t in ref.tensors]


def test_gguf_reader_rejects_other_files(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 32)
    with pytest.raises(GGUFError):
        read_gguf_metadata(bad)


# ---------------------------------------------------------------- cached CPU format timings


def test_cpu_format_timings_round_trip_through_the_cache(tmp_path):
    s = shape_from_config(SMOL_LIKE)
    assert hp.read_cpu_format_ms(s, tmp_path) == {}
    path = hp.write_cpu_format_ms(s, TIMINGS, tmp_path)
    assert path.parent == tmp_path / "cpu-formats" and path.suffix == ".json"
    assert hp.read_cpu_format_ms(s, tmp_path) == TIMINGS
    assert json.loads(path.read_text())["key"]["layer_linears"] == [
        [576, 576],
        [576, 192],
        [576, 192],
        [576, 576],
        [576, 1536],
        [576, 1536],
        [1536, 576],
    ]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_another_model_shape_is_another_cache_entry(tmp_path):
    hp.write_cpu_format_ms(shape_from_config(SMOL_LIKE), TIMINGS, tmp_path)
    other = shape_from_config({**SMOL_LIKE, "vocab_size": 32000})
    assert hp.read_cpu_format_ms(other, tmp_path) == {}


def test_unreadable_cache_reads_as_not_measured(tmp_path):
    s = shape_from_config(SMOL_LIKE)
    path = hp.cpu_format_cache_path(s, tmp_path)
    path.parent.mkdir(parents=True)
    for text in ("not json", "[1, 2]", '{"ms": {"float32@1": -1}}', '{"ms": {}}'):
        path.write_text(text)
        assert hp.read_cpu_format_ms(s, tmp_path) == {}
    with pytest.raises(ValueError):
        hp.write_cpu_format_ms(s, {"float32@1": 0.0}, tmp_path)


def test_profiles_read_the_cache_for_a_given_model(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    s = shape_from_config(SMOL_LIKE)
    assert detect_hardware(s).cpu_format_ms == {}
    hp.write_cpu_format_ms(s, TIMINGS, None)  # the default root: KILN_CACHE
    assert detect_hardware(s).cpu_format_ms == TIMINGS
    assert simulated_profile(cpu_only=True, shape=s).cpu_format_ms == TIMINGS
    assert detect_hardware().cpu_format_ms == {}  # no model, no timings


def test_reading_cached_timings_does_not_import_torch(tmp_path):
    code = (
        "import sys; from hardware import profile as p; from model.shape import shape_from_config; "
        f"s = shape_from_config({SMOL_LIKE!r}); p.write_cpu_format_ms(s, {TIMINGS!r}); "
        f"assert p.detect_hardware(s).cpu_format_ms == {TIMINGS!r}; assert 'torch' not in sys.modules"
    )
    subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60, env={**os.environ, "KILN_CACHE": str(tmp_path)}
    )
