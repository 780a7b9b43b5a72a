"""The prompt set and the deterministic draw of prompts per (user, request).

Ours and the baseline must see the exact same workload, so a prompt depends only on
(seed, user, index), never on timing or on how many requests other users have sent.
"""

from __future__ import annotations

import json
import random
from importlib import resources

import msgspec

DEFAULT_SET = "default.json"


class Prompt(msgspec.Struct, frozen=True):
    id: int
    kind: str  # "code" or "chat"
    text: str


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
