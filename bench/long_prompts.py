"""Long prompts built from a shipped document, counted with the served model's tokenizer.

- `SharedPrefix`: every request = one system prompt of about N tokens + a short distinct question
  (what chat apps, agents and RAG send: the same long prefix on every call).
- `DistinctPrompts`: every request a different excerpt of about N tokens (no prefix beyond the first
  few tokens is shared): pool pressure and prefill speed without cache hits.

The document is PEP 8 (public domain), shipped as bench/prompts/pep-0008.txt: real prose and code,
about 12,000 tokens. Each prompt starts with a line naming the run's seed, so runs with different
seeds (the interleaved pairs) never reuse each other's cached prefix on either server.
"""

from __future__ import annotations

import json
import random
from importlib import resources

from tokenizers import Tokenizer

from bench.workload import SPECIAL_TOKENS_SLACK, Prompt, Workload

DOCUMENT = "pep-0008.txt"
QUESTIONS = "questions.json"
CHARS_PER_TOKEN_GUESS = 6  # English prose and code run 3-5 characters a token in byte-level BPE
SPARE_TOKENS = 16


def shipped_text(name: str) -> str:
    return resources.files("bench").joinpath("prompts", name).read_text("utf-8")


def load_questions() -> list[str]:
    questions = json.loads(shipped_text(QUESTIONS))["questions"]
    if not questions:
        raise ValueError(f"{QUESTIONS} holds no question")
    return questions


class TokenCounter:
    """Counts and cuts text in the served model's tokens (no special tokens added)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def head(self, text: str, tokens: int) -> str:
        """The text up to the end of its `tokens`-th token (all of it when shorter). Encodes a slice a
        little longer than needed, growing it if it falls short, not the whole text."""
        if tokens < 1:
            return ""
        chars = tokens * CHARS_PER_TOKEN_GUESS
        while True:
            piece = text[:chars]
            encoding = self.tokenizer.encode(piece, add_special_tokens=False)
            # the slice's last word may be cut short, changing its tokens: keep a few to spare
            if len(encoding.ids) > tokens + SPARE_TOKENS or chars >= len(text):
                break
            chars *= 2
        if len(encoding.ids) <= tokens:
            return piece
        return piece[: encoding.offsets[tokens - 1][1]]


class Questions:
    """Short questions, distinct for every (user, index) of a run: request k = index × users + user takes
    the k-th; past the shipped list a round number keeps them distinct."""

    def __init__(self, questions: list[str], users: int):
        self.questions, self.users = questions, users

    def pick(self, user: int, index: int) -> str:
        k = index * self.users + user
        rounds, i = divmod(k, len(self.questions))
        return self.questions[i] + (f" ({rounds + 1})" if rounds else "")

    def longest(self, counter: TokenCounter) -> int:
        return max(counter.count(q + " (99)") for q in self.questions)


def seed_line(seed: int) -> str:
    return f"[run {seed}]\n"


class PrefixText:
    """The shared system prompt: the seed's line, then `source` cut to about `tokens` tokens in all
    (all of `source` when `tokens` is None)."""

    def __init__(self, counter: TokenCounter, source: str, tokens: int | None):
        self.counter, self.source, self.tokens = counter, source, tokens
        self._by_seed: dict[int, str] = {}

    def text(self, seed: int) -> str:
        if seed not in self._by_seed:
            line = seed_line(seed)
            body = self.source
            if self.tokens is not None:
                body = self.counter.head(body, max(1, self.tokens - self.counter.count(line)))
            self._by_seed[seed] = line + body
        return self._by_seed[seed]

    def counted(self, seed: int) -> int:
        return self.counter.count(self.text(seed))


def question_prompt(prefix: str, question: str) -> str:
    return f"{prefix}\n\nQuestion: {question}\nAnswer:"


class SharedPrefix(Workload):
    kind = "shared-prefix"

    def __init__(self, prefix: PrefixText, questions: Questions):
        self.prefix, self.questions = prefix, questions

    def prompt(self, seed: int, user: int, index: int) -> Prompt:
        text = question_prompt(self.prefix.text(seed), self.questions.pick(user, index))
        return Prompt(id=index * self.questions.users + user, kind=self.kind, text=text)

    def prepare(self, seed: int, users: int, requests: int) -> None:
        self.prefix.text(seed)

    def longest_prompt(self, max_new_tokens: int) -> int:
        question = self.prefix.counter.count(question_prompt("", "")) + self.questions.longest(self.prefix.counter)
        return self.prefix.counted(0) + question + SPECIAL_TOKENS_SLACK + 4  # + a longer seed line

    def describe(self) -> dict:
        return {"kind": self.kind, "prefix_tokens": self.prefix.counted(0)}


class DistinctPrompts(Workload):
    """Each request an excerpt of the document from its own paragraph on, wrapping around, about
    `tokens` tokens long; the first line names (seed, user, index), so no two prompts share a block."""

    kind = "distinct"

    def __init__(self, counter: TokenCounter, source: str, tokens: int, users: int):
        self.counter, self.source, self.tokens, self.users = counter, source, tokens, users
        self.starts = [0] + [i + 2 for i in range(len(source) - 2) if source.startswith("\n\n", i)]
        self.copies = tokens // max(1, counter.count(source)) + 2  # enough text from any start
        self._built: dict[tuple[int, int, int], Prompt] = {}

    def prompt(self, seed: int, user: int, index: int) -> Prompt:
        key = (seed, user, index)
        if key not in self._built:
            start = random.Random(f"distinct:{seed}:{user}:{index}").choice(self.starts)
            text = f"Excerpt {seed}.{user}.{index}\n" + self.source[start:] + ("\n\n" + self.source) * self.copies
            self._built[key] = Prompt(
                id=index * self.users + user, kind=self.kind, text=self.counter.head(text, self.tokens)
            )
        return self._built[key]

    def prepare(self, seed: int, users: int, requests: int) -> None:
        """Cut every prompt before the clock starts: tens of milliseconds each, which would otherwise
        stall the load generator's event loop while other users' streams run."""
        for user in range(users):
            for index in range(requests):
                self.prompt(seed, user, index)

    def longest_prompt(self, max_new_tokens: int) -> int:
        return self.tokens + SPECIAL_TOKENS_SLACK + 4  # a cut inside a word may re-encode a token longer

    def describe(self) -> dict:
        return {"kind": self.kind, "prompt_tokens": self.tokens}
