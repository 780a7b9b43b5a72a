r"""Constrained decoding (issue 22): a request's `Guide` becomes an llguidance grammar, compiled off the
busy loop, and each guided sequence walks it token by token so that every sampled token keeps the output
a prefix of the guide's language.

Grammars (`Guide.kind`): "json" any JSON value; "json_schema" a JSON schema (llguidance's JSON-schema
subset; its patterns are ECMA's, `\d` is [0-9]); "regex" in Rust `regex` syntax, matched in full (`\d`
and `\w` are Unicode-aware, as in Python's `re`: write [0-9] for ASCII digits); "choice" a JSON list of
strings, one of which is the whole output; "grammar" in llguidance's Lark syntax (a llama.cpp GBNF
grammar is converted). JSON is written with `json.dumps`' separators and no other whitespace: a small
model given free whitespace tends to fill its budget with newlines.

Why llguidance, not xgrammar (bench/RESULTS.md, `python -m bench.grammar_libs`): on this project's 2-core
machines it compiles the 20 test schemas 10x faster (0.6 ms median) and a 200-property schema in 10 ms
where xgrammar takes 7-10 s of both cores, it bounds the work of one mask (its "fuel" limits: a grammar
that needs more fails instead of stalling the step), and it installs without dependencies (xgrammar
pulls triton). Its masks cost more per token (18 us median, 0.5-0.6 ms p99) than xgrammar's
precomputed ones, a small share of a 20-90 ms decode step.

Why the engine loads a tokenizer: the engine otherwise sees token ids only, but a grammar constrains
text, and the library needs every token's bytes to know which tokens keep the output in the language.
It is loaded once, on the compile worker before the first guided request's compile, never on the busy loop.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from hardware.cpu_sharing import lower_this_thread
from ipc.messages import Guide, Request

if TYPE_CHECKING:  # torch and numpy are imported where used: `check_guide` serves a process without them
    import torch

DEFAULT_COMPILE_TIMEOUT_S = 10.0
CACHE_ENTRIES = 128  # compiled grammars kept (an LRU keyed by (kind, spec)); a template each, a few kB
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json", "json_schema", "regex", "choice", "grammar")


class GuideError(ValueError):
    """A guide that cannot become a grammar: its message is the request's `error`."""


def grammar_for(guide: Guide) -> str:
    """The llguidance grammar for a guide (not yet checked against a tokenizer)."""
    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark

    matcher = llguidance.LLMatcher
    try:
        if guide.kind == "json":
            return matcher.grammar_from_json_schema("{}", overrides=COMPACT_JSON)
        if guide.kind == "json_schema":
            return matcher.grammar_from_json_schema(guide.spec, overrides=COMPACT_JSON)
        if guide.kind == "regex":
            return matcher.grammar_from_regex(guide.spec)
        if guide.kind == "choice":
            choices = json.loads(guide.spec)
            if not choices or not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise GuideError("a choice guide is a non-empty JSON list of strings")
            literals = (json.dumps(c, ensure_ascii=False) for c in choices)  # Lark strings take JSON's escapes
            return matcher.grammar_from_lark("start: " + " | ".join(literals))
        if guide.kind == "grammar":
            return matcher.grammar_from_lark(any_to_lark(guide.spec))
    except GuideError:
        raise
    except Exception as exc:  # malformed JSON, a GBNF the converter rejects
        raise GuideError(f"invalid {guide.kind} guide: {exc}") from exc
    raise GuideError(f"unknown guide kind {guide.kind!r}; one of {', '.join(KINDS)}")


def check_guide(guide: Guide) -> None:
    """Raise GuideError, with the message the engine would fail the request with, if the guide cannot
    compile. Needs neither a tokenizer nor torch: a frontend can answer 400 before sending it."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar_for(guide))
    if is_error:
        raise GuideError(f"invalid {guide.kind} guide: {messages[0]}")


class SequenceGuide:
    """One sequence's position in its grammar: the mask of allowed next tokens, advancing by the token
    sampled, whether the output is complete, and rollback (for speculative steps)."""

    __slots__ = ("matcher", "vocab")

    def __init__(self, matcher, vocab: int):
        self.matcher = matcher
        self.vocab = vocab  # tokens the grammar knows (the tokenizer's, or the model's when padded)

    def copy(self) -> SequenceGuide:
        """A fresh state over the same compiled grammar (a compiled template is copied per sequence)."""
        return SequenceGuide(self.matcher.deep_copy(), self.vocab)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32 words, bit i of word w = token 32w+i).
        End of sequence is allowed only where the grammar accepts the output as it stands."""
        target = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())

    def advance(self, token: int) -> bool:
        """False if the token leaves the grammar (the matcher is then in error for good)."""
        return self.matcher.consume_token(token)

    def rollback(self, tokens: int) -> bool:
        return self.matcher.rollback(tokens)

    @property
    def done(self) -> bool:
        """The output is complete: the grammar allows nothing more (or end of sequence was taken)."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


def allowed_tokens(guides: list[SequenceGuide], vocab: int) -> torch.Tensor:
    """(len(guides), vocab) bool on CPU: the tokens each guide allows next. Logits past the grammar's
    vocabulary (a model's padded lm_head) are never allowed."""
    import numpy as np
    import torch

    known = guides[0].vocab  # one tokenizer serves every guide of an engine
    bitmask = torch.zeros((len(guides), -(-known // 32)), dtype=torch.int32)
    for row, guide in enumerate(guides):
        guide.fill(bitmask, row)
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : min(known, vocab)]
    allowed = torch.from_numpy(bits.view(np.bool_))
    if vocab > known:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - known), value=False)
    return allowed


class GuideCompiler:
    """Guides to grammars on one worker thread, cached by (kind, spec). The llguidance tokenizer is built
    there before the first compile, from the served model's tokenizer (not at start: an engine that never
    sees a guided request does not hold it, ~80 MB with its load's leftovers for a 150k vocabulary); a
    compile that finds it broken fails with why."""

    def __init__(self, load_tokenizer: Callable[[], object], timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kiln-grammar", initializer=lower_this_thread
        )
        self._load_tokenizer = load_tokenizer
        self._tokenizer: Future | None = None
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()

    def tokenizer(self) -> Future:
        """The llguidance tokenizer's future; its load is queued on the worker at the first call."""
        if self._tokenizer is None:
            self._tokenizer = self._executor.submit(self._load_tokenizer)
        return self._tokenizer

    @classmethod
    def for_model(cls, model_path: str, vocab: int, eos_token_ids: set[int], **kwargs) -> GuideCompiler:
        """The served model's HF tokenizer, wrapped for llguidance over the model's `vocab` logits, with
        the engine's end-of-sequence ids (the ones its finish rule stops on)."""
        # resolved here, on the caller's thread: transformers' lazy attributes are not safe to resolve from
        # two threads at once (the worker's first lookup raced the caller's and missed)
        import llguidance.hf
        from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

        def load():
            tokenizer = AutoTokenizer.from_pretrained(model_path)
            return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=sorted(eos_token_ids) or None)

        return cls(load, **kwargs)

    def compile(self, guide: Guide) -> Future:
        """A future of the grammar's template `SequenceGuide` (copied for each sequence); cached, so equal
        guides compile once."""
        key = (guide.kind, guide.spec)
        future = self._cache.get(key)
        if future is None:
            tokenizer = self.tokenizer()  # queued ahead of the compile on the one worker
            future = self._cache[key] = self._executor.submit(self._compile, guide, tokenizer)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return future

    def _compile(self, guide: Guide, tokenizer_future: Future):
        import llguidance

        try:
            tokenizer = tokenizer_future.result()
        except Exception as exc:
            raise GuideError(f"the model's tokenizer did not load, no constrained decoding: {exc}") from exc
        template = SequenceGuide(llguidance.LLMatcher(tokenizer, grammar_for(guide), log_level=0), tokenizer.vocab_size)
        allowed_tokens([template], template.vocab)  # the first mask: lazy lexer work happens here, not on the loop
        if template.error:
            raise GuideError(f"invalid {guide.kind} guide: {_without_state(template.error)}")
        return template

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _without_state(error: str) -> str:
    """llguidance's error without the parser state it dumps after it; its name for a grammar that no token
    can start, in words."""
    message = error.split("\n<state>")[0].strip()
    if message.startswith("NoExtensionBias"):
        return "it allows no text this model's tokens can write"
    return message


@dataclass
class _Waiting:
    request: Request
    grammar: Future
    deadline: float  # time.monotonic()
    arrived_at: float  # time.perf_counter(), the clock of a Sequence's timings


class Ready(NamedTuple):
    request: Request
    guide: SequenceGuide  # this request's own state in the compiled grammar
    arrived_at: float  # when the engine took the request (its compile counts as queue time)


class PendingGuides:
    """Guided requests whose grammar is still compiling, held out of the scheduler until it is ready, so
    the busy loop never waits on a compile. `wake` is called from the worker when a compile ends (the
    engine puts a no-op in its inbox, so a loop blocked on it looks at once)."""

    def __init__(self, compiler: GuideCompiler, wake: Callable[[], None]):
        self.compiler = compiler
        self.wake = wake
        self._waiting: dict[str, _Waiting] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting

    def add(self, request: Request) -> None:
        grammar = self.compiler.compile(request.params.guide)
        deadline = time.monotonic() + self.compiler.timeout_s
        self._waiting[request.request_id] = _Waiting(request, grammar, deadline, time.perf_counter())
        grammar.add_done_callback(lambda _: self.wake())

    def discard(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    def poll(self) -> tuple[list[Ready], list[tuple[str, str]]]:
        """(requests now ready; (request id, error) of those that failed or ran past the compile timeout).
        Both leave the waiting room."""
        ready, failed = [], []
        now = time.monotonic()
        for request_id, waiting in list(self._waiting.items()):
            if waiting.grammar.done():
                error = waiting.grammar.exception()
                if error is None:
                    ready.append(Ready(waiting.request, waiting.grammar.result().copy(), waiting.arrived_at))
                elif isinstance(error, GuideError):
                    failed.append((request_id, str(error)))
                else:
                    failed.append((request_id, f"the {waiting.request.params.guide.kind} guide failed: {error!r}"))
            elif now >= waiting.deadline:
                failed.append(
                    (
                        request_id,
                        f"the {waiting.request.params.guide.kind} guide did not compile within "
                        f"{self.compiler.timeout_s:g} s",
                    )
                )
            else:
                continue
            del self._waiting[request_id]
        return ready, failed
