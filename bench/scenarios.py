"""`cli.py bench`'s workload options turned into a `Workload`.

- nothing: the shipped short prompts (bench/prompts/default.json);
- `--prefix-tokens N` / `--prefix-file PATH`: a shared system prompt + a distinct question per request;
- `--chat-turns T`: conversations of T turns (with the shared prefix as system prompt, if one is given);
- `--prompt-tokens N`: a distinct prompt of about N tokens per request.

Long prompts are counted with the served model's tokenizer, loaded the way the frontend loads it.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from bench.workload import DEFAULT_SET, ShortPrompts, Workload, load_prompts


class WorkloadOptions(msgspec.Struct, frozen=True):
    prefix_tokens: int | None = None
    prefix_file: str | None = None
    chat_turns: int | None = None
    prompt_tokens: int | None = None

    @property
    def has_prefix(self) -> bool:
        return self.prefix_tokens is not None or self.prefix_file is not None

    @property
    def needs_tokenizer(self) -> bool:
        return self.has_prefix or self.chat_turns is not None or self.prompt_tokens is not None


def problem(opts: WorkloadOptions) -> str | None:
    """Why these options do not make one workload, or None."""
    for name, value in (("prefix_tokens", opts.prefix_tokens), ("prompt_tokens", opts.prompt_tokens)):
        if value is not None and value < 8:
            return f"--{name.replace('_', '-')} must be at least 8, got {value}"
    if opts.chat_turns is not None and opts.chat_turns < 1:
        return f"--chat-turns must be at least 1, got {opts.chat_turns}"
    if opts.prompt_tokens is not None and (opts.has_prefix or opts.chat_turns is not None):
        return "--prompt-tokens (distinct prompts) excludes --prefix-tokens/--prefix-file and --chat-turns"
    if opts.prefix_file is not None and not Path(opts.prefix_file).is_file():
        return f"--prefix-file {opts.prefix_file}: no such file"
    return None


def build_workload(opts: WorkloadOptions, users: int, model: str | None) -> Workload:
    """The workload for these options; `model` (--model, else BASE_MODEL or the embedded default) gives
    the tokenizer and the chat template."""
    if not opts.needs_tokenizer:
        return ShortPrompts(load_prompts(DEFAULT_SET))
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
    from frontend.server import load_tokenizer
    from model.source import resolve_model

    source = resolve_model(model)
    counter = TokenCounter(load_tokenizer(source))
    document = shipped_text(DOCUMENT)
    if opts.prompt_tokens is not None:
        return DistinctPrompts(counter, document, opts.prompt_tokens, users)
    questions = Questions(load_questions(), users)
    prefix = None
    if opts.has_prefix:
        text = Path(opts.prefix_file).read_text("utf-8") if opts.prefix_file else document
        prefix = PrefixText(counter, text, opts.prefix_tokens)
    if opts.chat_turns is None:
        return SharedPrefix(prefix, questions)
    from bench.chat import Chat
    from frontend.chat_template import ChatTemplate

    template = None if source.is_hub else ChatTemplate.from_folder(source.path)
    if template is None:
        raise ValueError(f"--chat-turns needs the model's chat template; {source.path} has none here")
    return Chat(template, counter, questions, opts.chat_turns, prefix)
