"""The benchmark's long-prompt and chat workloads (bench/long_prompts.py, bench/chat.py, bench/scenarios.py),
built with the default model's own tokenizer and chat template: what each request sends, nothing served."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from bench.chat import Chat
from bench.long_prompts import (
    DOCUMENT,
    DistinctPrompts,
    PrefixText,
    Questions,
    SharedPrefix,
    TokenCounter,
    load_questions,
    shipped_text,
)
from bench.scenarios import WorkloadOptions, build_workload, problem
from bench.workload import ShortPrompts
from frontend.chat_template import ChatTemplate


@pytest.fixture(scope="module")
def counter(default_model_path) -> TokenCounter:
    return TokenCounter(Tokenizer.from_file(str(Path(default_model_path) / "tokenizer.json")))


@pytest.fixture(scope="module")
def document() -> str:
    return shipped_text(DOCUMENT)


def _ids(counter: TokenCounter, text: str) -> list[int]:
    return counter.tokenizer.encode(text, add_special_tokens=False).ids


def _common(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_the_document_is_long_enough_and_the_cut_is_about_n_tokens(counter, document):
    assert counter.count(document) > 8000  # room for 3,000-token excerpts from many starting points
    for n in (1, 16, 300, 1400):
        head = counter.head(document, n)
        assert document.startswith(head) and abs(counter.count(head) - n) <= 2
    assert counter.head("short", 100) == "short" and counter.head(document, 0) == ""
    whole = counter.tokenizer.encode(document, add_special_tokens=False).offsets  # the slow way: encode it all
    for n in (7, 500, 3001):
        assert counter.head(document, n) == document[: whole[n - 1][1]]


def test_questions_are_distinct_for_every_request():
    questions = Questions(load_questions(), users=10)
    picked = [questions.pick(u, i) for u in range(10) for i in range(8)]  # 80 > the 64 shipped
    assert len(set(picked)) == 80
    assert questions.pick(3, 1) == questions.pick(3, 1)


def test_shared_prefix_prompts_share_exactly_the_prefix_and_differ_after(counter, document):
    workload = SharedPrefix(PrefixText(counter, document, 300), Questions(load_questions(), users=3))
    prefix = workload.prefix.text(0)
    assert abs(counter.count(prefix) - 300) <= 2 and workload.describe()["prefix_tokens"] == counter.count(prefix)
    prompts = [workload.prompt(0, u, i).text for u in range(3) for i in range(2)]
    assert all(p.startswith(prefix) for p in prompts)
    assert len({p[len(prefix) :] for p in prompts}) == 6  # a distinct question each
    shared = prefix + "\n\nQuestion: "
    assert all(len(shared) <= _common(a, b) < min(len(a), len(b)) for a in prompts for b in prompts if a != b)
    # in tokens too, which is what a prefix cache keys on: all but the prefix's last token (it may merge)
    prefix_ids = _ids(counter, prefix)
    assert all(_ids(counter, p)[: len(prefix_ids) - 1] == prefix_ids[:-1] for p in prompts)
    assert all(counter.count(p) <= workload.longest_prompt(64) for p in prompts)
    # another seed (the next interleaved pair): another prefix from its first block on
    assert _common(_ids(counter, workload.prefix.text(1)), prefix_ids) < 16
    again = SharedPrefix(PrefixText(counter, document, 300), Questions(load_questions(), users=3))
    assert [again.prompt(0, u, i).text for u in range(3) for i in range(2)] == prompts


def test_distinct_prompts_are_distinct_and_about_n_tokens(counter, document):
    workload = DistinctPrompts(counter, document, 500, users=4)
    prompts = [workload.prompt(0, u, i).text for u in range(4) for i in range(2)]
    counts = [counter.count(p) for p in prompts]
    assert all(abs(c - 500) <= 3 for c in counts) and max(counts) <= workload.longest_prompt(1)
    assert len(set(prompts)) == 8
    ids = [_ids(counter, p) for p in prompts]
    assert max(_common(a, b) for a in ids for b in ids if a is not b) <= 8  # only the first few tokens shared
    long = DistinctPrompts(counter, document, 20000, users=1)  # longer than the document: it wraps around
    assert abs(counter.count(long.prompt(0, 0, 0).text) - 20000) <= 3
    assert [workload.prompt(0, u, i).text for u in range(4) for i in range(2)] == prompts


def test_chat_history_grows_turn_by_turn_and_carries_the_answers(counter, document, default_model_path):
    template = ChatTemplate.from_folder(default_model_path)
    chat = Chat(
        template, counter, Questions(load_questions(), users=2), turns=3, system=PrefixText(counter, document, 100)
    )
    session = chat.session(0, 1)
    prompts = []
    for index in range(3):
        prompt = session.next_prompt(index)
        assert prompt.turn == index + 1
        prompts.append(prompt.text)
        session.answered(f"ANSWER-{index} " + counter.head(document[5000:], 64))
    for turn in (1, 2):
        assert prompts[turn].startswith(prompts[turn - 1])  # the whole history, resent
        assert all(f"ANSWER-{k}" in prompts[turn] for k in range(turn))
        assert f"ANSWER-{turn}" not in prompts[turn]
    assert all(chat.system.text(0) in p for p in prompts)
    assert prompts[2].count("<|im_start|>user") == 3 and prompts[2].endswith("<|im_start|>assistant\n")
    assert counter.count(prompts[2]) <= chat.longest_prompt(64)
    restart = session.next_prompt(3)  # past the last turn: a new conversation
    assert restart.turn == 1 and "ANSWER" not in restart.text
    other = chat.session(0, 0).next_prompt(0)
    assert other.text != prompts[0]  # users ask different first questions
    assert chat.describe() == {"kind": "chat", "turns": 3, "system_prompt_tokens": chat.system.counted(0)}


def test_options_build_one_workload_or_say_why_not(default_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("BASE_MODEL", default_model_path)
    assert isinstance(build_workload(WorkloadOptions(), 2, None), ShortPrompts)
    assert "excludes" in problem(WorkloadOptions(prompt_tokens=100, chat_turns=2))
    assert "excludes" in problem(WorkloadOptions(prompt_tokens=100, prefix_tokens=100))
    assert "no such file" in problem(WorkloadOptions(prefix_file=str(tmp_path / "absent.txt")))
    assert problem(WorkloadOptions(prefix_tokens=1400, chat_turns=6)) is None
    mine = tmp_path / "system.txt"
    mine.write_text("You answer questions about the kiln project. " * 20)
    workload = build_workload(WorkloadOptions(prefix_file=str(mine)), 2, None)
    assert isinstance(workload, SharedPrefix) and workload.prompt(5, 0, 0).text.startswith(
        "[run 5]\n" + mine.read_text()
    )
    chat = build_workload(WorkloadOptions(chat_turns=2), 2, None)
    assert isinstance(chat, Chat) and chat.system is None
    assert isinstance(build_workload(WorkloadOptions(prompt_tokens=64), 2, None), DistinctPrompts)
