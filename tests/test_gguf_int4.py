"""A GGUF's 4-bit blocks read as kiln's int4 codes: each type decodes to the weights gguf-py's own reference
dequantizes them to, and the codes kept beside a conversion read back per linear."""

from __future__ import annotations

import numpy as np
import pytest

from model.gguf_int4 import (
    DECODERS,
    Int4Codes,
    dequantize,
    pack_nibbles,
    unpack_nibbles,
    write_int4_codes,
)

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

ROWS, IN = 6, 512


def random_blocks(kind: str, rng: np.random.Generator) -> np.ndarray:
    """(ROWS, bytes of one row) of valid blocks of `kind`: real fp16 scales, every other byte random."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    blocks = rng.integers(0, 256, (ROWS, IN // block_size, type_size), dtype=np.uint8)
    halves = 2 if kind in ("Q4_1", "Q4_K") else 1  # d (and m or dmin) lead each block
    for h in range(halves):
        value = (rng.random((ROWS, IN // block_size)) * 0.02 - (0.01 if h else 0)).astype(np.float16)
        blocks[..., 2 * h : 2 * h + 2] = value[..., None].view(np.uint8)
    return blocks.reshape(ROWS, -1)


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_each_4bit_type_decodes_to_what_gguf_dequantizes(kind):
    """Q4_0: scale d, zero 0; Q4_1: zero m + 8d; Q4_K: scale d·sc, zero 8·d·sc - dmin·m per 32-wide sub-block."""
    rng = np.random.default_rng(0)
    raw = random_blocks(kind, rng)
    reference = quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(ROWS, IN)
    type_size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType[kind]][1]
    q, scale, zero = DECODERS[kind](raw.reshape(ROWS, -1, type_size))
    assert q.shape == (ROWS, IN) and q.max() <= 15 and scale.shape == zero.shape == (ROWS, IN // 32)
    np.testing.assert_allclose(dequantize(q, scale, zero), reference, rtol=1e-5, atol=1e-6)


def test_nibbles_round_trip():
    q = np.random.default_rng(1).integers(0, 16, (4, 64), dtype=np.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (4, 32) and np.array_equal(unpack_nibbles(packed), q)


class FakeModel:
    """What write_int4_codes needs of a model is the GGUF mapping's; here the codes are given directly."""


def test_kept_codes_read_back_per_linear_and_through_an_alias(tmp_path, monkeypatch):
    from model import gguf_int4

    rng = np.random.default_rng(2)
    q = rng.integers(0, 16, (32, 64), dtype=np.uint8)
    scale, zero = rng.random((32, 2), dtype=np.float32), rng.random((32, 2), dtype=np.float32)
    codes = {
        "model.embed_tokens.q4": pack_nibbles(q),
        "model.embed_tokens.scale": scale,
        "model.embed_tokens.zero": zero,
    }
    monkeypatch.setattr(gguf_int4, "gguf_int4_codes", lambda path, model: (codes, {"Q4_0": 1}))
    assert "4-bit codes kept for kiln's int4 format: 1 Q4_0" in write_int4_codes(
        tmp_path / "m.gguf", FakeModel(), tmp_path
    )
    read = Int4Codes.in_folder(tmp_path, {"lm_head": "model.embed_tokens"})
    assert len(read) == 1 and "lm_head" in read and "model.embed_tokens" in read and "model.norm" not in read
    got_q, got_scale, got_zero = read["lm_head"]
    assert np.array_equal(got_q, q) and np.array_equal(got_scale, scale) and np.array_equal(got_zero, zero)
    assert Int4Codes.in_folder(tmp_path / "elsewhere") is None


def test_a_gguf_without_4bit_linears_writes_nothing(tmp_path, monkeypatch):
    from model import gguf_int4

    monkeypatch.setattr(gguf_int4, "gguf_int4_codes", lambda path, model: ({}, {}))
    assert "no Q4_0 / Q4_1 / Q4_K linears" in write_int4_codes(tmp_path / "m.gguf", FakeModel(), tmp_path)
    assert Int4Codes.in_folder(tmp_path) is None


def test_the_default_conversion_kept_its_q4_1_codes(default_model_path):
    """The embedded default (SmolLM2-135M, Q4_1 with a Q8_0 embedding) converts with every decoder linear's codes."""
    codes = Int4Codes.in_folder(default_model_path)
    assert codes is not None and len(codes) == 30 * 7
    q, scale, zero = codes["model.layers.0.mlp.down_proj"]
    assert q.shape == (576, 1536) and scale.shape == zero.shape == (576, 1536 // 32)
