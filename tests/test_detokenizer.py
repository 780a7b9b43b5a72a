"""Incremental detokenization with the default model's real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from frontend.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model_path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(default_model_path) / "tokenizer.json"))


def stream(tokenizer, prompt: str, text: str, stop=None, step: int = 1) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt).ids, stop)
    ids = tokenizer.encode(text).ids
    pieces = [detok.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    pieces.append(detok.flush())
    return pieces, detok


@pytest.mark.parametrize("step", [1, 3])
def test_pieces_rebuild_the_text(tokenizer, step):
    text = " Grüße aus Köln 🧀🍷 — naïve café, 日本語もOK.\n    def f(x):\n        return x"
    pieces, detok = stream(tokenizer, "Say:", text, step=step)
    assert "".join(pieces) == text == detok.text


def test_multibyte_character_is_never_split(tokenizer):
    ids = tokenizer.encode("🧀").ids
    assert len(ids) > 1, "the emoji should span several byte-level tokens for this test to mean anything"
    pieces, _ = stream(tokenizer, "x", "🧀")
    assert all("\ufffd" not in p for p in pieces)
    assert [p for p in pieces if p] == ["🧀"]


def test_stop_string_never_leaks_while_streaming(tokenizer):
    text = "alpha beta STOP gamma"
    pieces, detok = stream(tokenizer, "x", text, stop=["STOP", "never"])
    assert detok.stopped
    assert "".join(pieces) == "alpha beta "
    assert not any("S" in p for p in pieces)


def test_holdback_releases_text_that_is_not_a_stop(tokenizer):
    pieces, detok = stream(tokenizer, "x", "one two three", stop=["three!"])
    assert not detok.stopped
    assert "".join(pieces) == "one two three"
    assert pieces[-1], "the held-back tail arrives with the final flush"
