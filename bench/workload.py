"""What each user sends: the shipped prompt set and its deterministic draw, and the `Workload` interface
the long-prompt and chat workloads (bench/long_prompts.py, bench/chat.py) implement.

Ours and the baseline must see the exact same workload, so a prompt depends only on
(seed, user, index) and, in a chat, on the answers that user got so far; never on timing or on
how many requests other users have sent.
"""

from __future__ import annotations

import json
import random
from importlib import resources

import msgspec

DEFAULT_SET = "default.json"
SPECIAL_TOKENS_SLACK = 4  # BOS and friends a server may add around a prompt


class Prompt(msgspec.Struct, frozen=True):
    id: int
    kind: str  # "code" or "chat" in the shipped set; the workload's kind for built prompts
    text: str
    turn: int | None = None  # chat workloads: 1..T


def load_prompts(name: str = DEFAULT_SET) -> list[Prompt]:
    """Load a shipped set (`bench/prompts/<name>`: {"code": [...], "chat": [...]}) in a fixed order."""
    raw = json.loads(resources.files("bench").joinpath("prompts", name).read_text("utf-8"))
    prompts: list[Prompt] = []
    for kind in sorted(raw):
        for text in raw[kind]:
            prompts.append(Prompt(id=len(prompts), kind=kind, text=text))
    if not prompts:
        raise ValueError(f"prompt set {name} is empty")
    return prompts


def pick(prompts: list[Prompt], seed: int, user: int, index: int) -> Prompt:
    """The prompt user `user` sends as its `index`-th request; a string seed is stable across runs."""
    return prompts[random.Random(f"{seed}:{user}:{index}").randrange(len(prompts))]


def request_seed(seed: int, user: int, index: int) -> int:
    """A per-request sampling seed so temperature > 0 runs are reproducible on both servers."""
    return random.Random(f"sample:{seed}:{user}:{index}").randrange(2**31)


class Session:
    """One user's requests in order. Independent requests ignore the answers; a chat keeps them."""

    def __init__(self, workload: Workload, seed: int, user: int):
        self.workload, self.seed, self.user = workload, seed, user

    def next_prompt(self, index: int) -> Prompt:
        return self.workload.prompt(self.seed, self.user, index)

    def answered(self, text: str) -> None:
        """The answer to the last prompt (what arrived of it, if the request failed)."""


class Workload:
    """The load's prompts; `kind` names it in the report and the JSON."""

    kind = "short"

    def session(self, seed: int, user: int) -> Session:
        return Session(self, seed, user)

    def prompt(self, seed: int, user: int, index: int) -> Prompt:
        raise NotImplementedError

    def prepare(self, seed: int, users: int, requests: int) -> None:
        """Build ahead, before the clock starts, whatever is slow to build (a no-op by default)."""

    def longest_prompt(self, max_new_tokens: int) -> int:
        """An upper bound on any prompt's tokens (a baseline that splits its context per slot needs it)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind}


class ShortPrompts(Workload):
    """The shipped set (default.json): short code and chat openings, drawn per (seed, user, index)."""

    kind = "short"

    def __init__(self, prompts: list[Prompt], name: str = DEFAULT_SET):
        self.prompts, self.name = prompts, name

    def prompt(self, seed: int, user: int, index: int) -> Prompt:
        return pick(self.prompts, seed, user, index)

    def longest_prompt(self, max_new_tokens: int) -> int:
        """Without a tokenizer: byte-level BPE never makes more tokens than UTF-8 bytes."""
        return max(len(p.text.encode()) for p in self.prompts) + SPECIAL_TOKENS_SLACK

    def describe(self) -> dict:
        return {"kind": self.kind, "prompt_set": self.name}


def as_workload(prompts: list[Prompt] | Workload) -> Workload:
    return prompts if isinstance(prompts, Workload) else ShortPrompts(prompts)
