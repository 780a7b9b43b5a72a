"""The model's chat template (Jinja), rendered the way transformers' `apply_chat_template` does,
without importing transformers (and torch) into the frontend: a sandboxed Jinja environment with
`trim_blocks`/`lstrip_blocks`, the tokenizer's special tokens and `raise_exception`.
"""
from __future__ import annotations

import json
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(Exception):
    pass


def _raise(message: str):
    raise TemplateError(message)


def _token_text(value) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source)
        self.special_tokens = special_tokens

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTemplate | None:
        """chat_template.jinja, else tokenizer_config.json's `chat_template`; None if the model has none."""
        folder = Path(folder)
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        source = None
        if (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text()
        elif isinstance(config.get("chat_template"), str):
            source = config["chat_template"]
        elif isinstance(config.get("chat_template"), list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in config["chat_template"]}
            source = named.get("default") or next(iter(named.values()), None)
        if not source:
            return None
        specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(source, specials)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except TemplateError as exc:
            raise ChatTemplateError(str(exc)) from None
