"""engine_core/guided.py with the default model's real tokenizer and llguidance: every token path the masks
allow ends in text of the guide's language (seeded random walks over the allowed tokens, validated with
jsonschema / re / the choice list), errors name the problem, compiles are cached and time out."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from engine_core.guided import GuideCompiler, GuideError, PendingGuides, SequenceGuide, allowed_tokens, check_guide
from ipc.messages import Guide, Request, SamplingParams

SCHEMAS = sorted((Path(__file__).parent / "fixtures" / "json_schemas").glob("*.json"))
EOS = 2  # SmolLM2's <|im_end|>, the engine's end of sequence
VOCAB = 49152
# [0-9], not \d: a regex guide is Unicode-aware as Python's re is, and a random walk finds the digits of
# scripts this Python's Unicode tables are too old to know
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
IPV4 = r"((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


@pytest.fixture(scope="module")
def compiler(default_model_path):
    compiler = GuideCompiler.for_model(default_model_path, VOCAB, {EOS})
    yield compiler
    compiler.close()


def guide_state(compiler: GuideCompiler, kind: str, spec: str = "") -> SequenceGuide:
    return compiler.compile(Guide(kind, spec)).result(timeout=60).copy()


def random_walk(guide: SequenceGuide, seed: int, limit: int = 400) -> list[int]:
    """Random allowed tokens until the grammar is complete (end of sequence is taken once it is allowed)."""
    rng, tokens = random.Random(seed), []
    while not guide.done and len(tokens) < limit:
        allowed = allowed_tokens([guide], VOCAB)[0].nonzero().flatten().tolist()
        assert allowed, "a live grammar allows some token"
        token = EOS if EOS in allowed else rng.choice(allowed)
        assert guide.advance(token), guide.error
        tokens.append(token)
    assert guide.done, f"no end after {limit} tokens"
    return tokens


def text_of(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode([t for t in tokens if t != EOS])


@pytest.mark.parametrize("path", SCHEMAS, ids=[p.stem for p in SCHEMAS])
def test_every_allowed_path_validates_against_its_schema(compiler, tokenizer, path):
    schema = json.loads(path.read_text())
    for seed in range(3):
        text = text_of(tokenizer, random_walk(guide_state(compiler, "json_schema", path.read_text()), seed))
        jsonschema.validate(json.loads(text), schema)


def test_twenty_varied_schemas_are_kept():
    """The fixture set the frontend's real-client tests reuse (issue 22's acceptance)."""
    assert len(SCHEMAS) == 20
    keywords = {k for p in SCHEMAS for k in re.findall(r'"([$\w]+)":', p.read_text())}
    assert {"enum", "required", "minimum", "maximum", "pattern", "items", "$ref", "anyOf"} <= keywords


@pytest.mark.parametrize("regex", [DATE, IPV4, r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8})?"])
def test_regex_paths_match_in_full(compiler, tokenizer, regex):
    for seed in range(5):
        text = text_of(tokenizer, random_walk(guide_state(compiler, "regex", regex), seed))
        assert re.fullmatch(regex, text), text


def test_choice_is_one_of_the_strings(compiler, tokenizer):
    choices = ["yes", "no", "maybe later", 'say "hi"\n', "café 😀"]
    for seed in range(8):
        assert text_of(tokenizer, random_walk(guide_state(compiler, "choice", json.dumps(choices)), seed)) in choices


def test_lark_and_gbnf_grammars(compiler, tokenizer):
    lark = 'start: "(" expr ")"\nexpr: NUM (("+" | "*") NUM)*\nNUM: /[1-9][0-9]{0,2}/'
    for seed in range(4):
        text = text_of(tokenizer, random_walk(guide_state(compiler, "grammar", lark), seed))
        assert re.fullmatch(r"\([1-9]\d{0,2}([+*][1-9]\d{0,2})*\)", text), text
    gbnf = 'root ::= answer "." \nanswer ::= "red" | "green" | "blue"'
    assert text_of(tokenizer, random_walk(guide_state(compiler, "grammar", gbnf), 0)) in {"red.", "green.", "blue."}


def test_any_json_takes_a_document_and_ends_with_it(compiler, tokenizer):
    guide = guide_state(compiler, "json")
    for token in tokenizer.encode('{"a": [1, 2.5, null, true], "b": {"c": "d"}}'):
        assert guide.advance(token), guide.error
    assert allowed_tokens([guide], VOCAB)[0].nonzero().flatten().tolist() == [EOS]  # nothing else may follow
    assert guide.advance(EOS) and guide.done
    guide = guide_state(compiler, "json")
    assert not guide.advance(tokenizer.encode("hello")[0]) and "hello" in guide.error


def test_end_of_sequence_only_where_the_grammar_accepts(compiler, tokenizer):
    guide = guide_state(compiler, "json_schema", '{"type": "integer", "minimum": 0}')
    assert not allowed_tokens([guide], VOCAB)[0, EOS]  # nothing written yet
    for token in tokenizer.encode("42"):
        guide.advance(token)
    allowed = allowed_tokens([guide], VOCAB)[0]
    assert allowed[EOS] and allowed[tokenizer.encode("7")[0]] and not guide.done  # "42" is complete, "427" too


def test_rollback_returns_to_an_earlier_state(compiler, tokenizer):
    guide = guide_state(compiler, "regex", DATE)
    start = allowed_tokens([guide], VOCAB)
    tokens = tokenizer.encode("2024-05")
    for token in tokens:
        assert guide.advance(token)
    assert not torch.equal(allowed_tokens([guide], VOCAB), start)
    assert guide.rollback(len(tokens))
    assert torch.equal(allowed_tokens([guide], VOCAB), start)


def test_masks_of_several_rows_and_a_padded_vocabulary(compiler, tokenizer):
    rows = [guide_state(compiler, "choice", '["yes"]'), guide_state(compiler, "choice", '["no"]')]
    allowed = allowed_tokens(rows, VOCAB + 64)  # a model whose lm_head is wider than its tokenizer
    assert allowed.shape == (2, VOCAB + 64) and not allowed[:, VOCAB:].any()
    assert allowed[0, tokenizer.encode("yes")[0]] and not allowed[1, tokenizer.encode("yes")[0]]


@pytest.mark.parametrize(
    ("kind", "spec", "says"),
    [
        ("regex", "[a-", "unclosed character class"),
        ("json_schema", "{not json", "invalid json_schema guide"),
        ("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}', "invalid json_schema guide"),
        ("choice", "[]", "non-empty JSON list of strings"),
        ("choice", '["a", 1]', "non-empty JSON list of strings"),
        ("grammar", "start: undefined_rule", "undefined_rule"),
        ("xml", "<a/>", "unknown guide kind 'xml'"),
    ],
)
def test_invalid_guides_fail_with_a_clear_error(compiler, kind, spec, says):
    with pytest.raises(GuideError, match=re.escape(says)):
        compiler.compile(Guide(kind, spec)).result(timeout=60)
    with pytest.raises(GuideError, match=re.escape(says)):  # the same answer without a tokenizer (a frontend)
        check_guide(Guide(kind, spec))


def test_valid_guides_pass_the_check_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; from engine_core.guided import check_guide; from ipc.messages import Guide\n"
        "for kind, spec in [('json', ''), ('regex', '[0-9]+'), ('choice', '[\"a\"]'), ('grammar', 'start: \"x\"'),"
        " ('json_schema', '{\"type\": \"object\"}')]: check_guide(Guide(kind, spec))\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_a_compile_is_cached_by_kind_and_spec(compiler):
    first = compiler.compile(Guide("regex", r"[0-9]{3}"))
    assert compiler.compile(Guide("regex", r"[0-9]{3}")) is first
    assert compiler.compile(Guide("json_schema", r"[0-9]{3}")) is not first
    template = first.result(timeout=60)
    a, b = template.copy(), template.copy()
    assert a.advance(32) and not b.done  # each sequence walks its own copy ("0" is token 32)
    assert torch.equal(allowed_tokens([b], VOCAB), allowed_tokens([template.copy()], VOCAB))


def _requests(*guides: Guide) -> list[Request]:
    return [Request(f"r{i}", [1, 2, 3], SamplingParams(8, guide=g)) for i, g in enumerate(guides)]


def test_pending_guides_hand_out_ready_requests_and_failures(compiler):
    wakes = []
    pending = PendingGuides(compiler, wake=lambda: wakes.append(1))
    good, bad, dropped = _requests(Guide("regex", "[a-z]+"), Guide("regex", "(unclosed"), Guide("regex", "x"))
    for request in (good, bad, dropped):
        pending.add(request)
    pending.discard("r2")  # aborted while compiling
    ready, failed = [], []
    while len(pending):
        more_ready, more_failed = pending.poll()
        ready, failed = ready + more_ready, failed + more_failed
    assert [(r.request_id, type(g)) for r, g, _ in ready] == [("r0", SequenceGuide)]
    assert [rid for rid, _ in failed] == ["r1"] and "regex" in failed[0][1]
    assert wakes  # the worker told the loop


def test_a_compile_past_the_timeout_fails_its_request(default_model_path):
    slow = GuideCompiler.for_model(default_model_path, VOCAB, {EOS}, timeout_s=0.0)
    try:
        pending = PendingGuides(slow, wake=lambda: None)
        (request,) = _requests(Guide("json_schema", json.dumps({"enum": [f"option {i}" for i in range(3000)]})))
        pending.add(request)  # the tokenizer alone takes a second to load: nothing is ready at once
        ready, failed = pending.poll()
        assert ready == [] and failed == [("r0", "the json_schema guide did not compile within 0 s")]
    finally:
        slow.close()


def test_a_tokenizer_that_does_not_load_fails_each_guided_request():
    def broken():
        raise OSError("no tokenizer.json here")

    compiler = GuideCompiler(broken)
    try:
        with pytest.raises(GuideError, match="tokenizer did not load.*no tokenizer.json here"):
            compiler.compile(Guide("json")).result(timeout=60)
    finally:
        compiler.close()


def test_the_sampler_masks_guided_rows_only(compiler, tokenizer):
    from engine_core.sampler import Sampler
    from engine_core.scheduler import Sequence

    sampler = Sampler(torch.device("cpu"))
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    seqs = [Sequence(f"s{i}", [1, 2], SamplingParams(8, temperature=t, seed=3)) for i, t in enumerate((0, 0.8, 0.8))]
    yes = tokenizer.encode("yes")[0]
    guided = [guide_state(compiler, "choice", '["yes"]'), None, guide_state(compiler, "choice", '["yes"]')]
    unguided = sampler.sample(logits[1:2].clone(), seqs[1:2])
    raw = logits.clone()
    for seq in seqs:
        seq.generator = None  # the same seeds again
    tokens = sampler.sample(logits, seqs, {EOS}, guided)
    assert tokens[0] == yes and tokens[2] == yes and tokens[1] == unguided[0]
    assert torch.equal(logits, raw)  # the logprobs still read the model's own logits
    # a step where the guided sequences sample nothing (their prompts still prefilling) masks nothing
    assert sampler.sample(logits[:1], seqs[:1], {EOS}, [None]) == [int(logits[0].argmax())]
