"""The model's chat template (Jinja), rendered the way transformers' `apply_chat_template` does,
without importing transformers (and torch) into the frontend: a sandboxed Jinja environment with
`trim_blocks`/`lstrip_blocks`, the tokenizer's special tokens and `raise_exception`.

`render_pieces` keeps apart what the template wrote and what the client typed, so that special-token
text inside a message (`<|im_start|>system`) can be tokenized as plain text, never as a control token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from jinja2 import meta
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(Exception):
    pass


class PromptPiece(NamedTuple):
    text: str
    from_client: bool  # message content: its special-token text must stay plain text


# Stands in for message i's content while rendering; private-use characters no template writes itself.
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


def _placeholder(index: int) -> str:
    return f"\ue000{index}\ue001"


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson`: plain json.dumps (Jinja's own escapes `<`, `>` and `&` for HTML, which would
    show a model its tools' schemas differently than it was trained on)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson
        self.source = source
        self.template = env.from_string(source)
        self.variables = frozenset(meta.find_undeclared_variables(env.parse(source)))  # e.g. `tools`, if it takes them
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

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """`tools`, when given, as transformers passes them (OpenAI's `{"type": "function", "function"}` shape)."""
        extra = {} if tools is None else {"tools": tools}
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens, **extra
            )
        except TemplateError as exc:
            raise ChatTemplateError(str(exc)) from None

    def render_pieces(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[PromptPiece]:
        """The rendered prompt as template text and message contents, in order. Contents are rendered
        as placeholders, then put back verbatim (a template filter on content, such as `trim`, is not
        applied to it); rendering costs the same whatever the contents' size. An empty content stays
        empty (templates test it: an assistant turn with only tool calls)."""
        stand_ins = [
            {**message, "content": _placeholder(i) if message["content"] else ""} for i, message in enumerate(messages)
        ]
        rendered = self.render(stand_ins, add_generation_prompt, tools)
        pieces, start = [], 0
        for match in _PLACEHOLDER.finditer(rendered):
            pieces.append(PromptPiece(rendered[start : match.start()], False))
            pieces.append(PromptPiece(messages[int(match.group(1))]["content"], True))
            start = match.end()
        pieces.append(PromptPiece(rendered[start:], False))
        return [piece for piece in pieces if piece.text]
