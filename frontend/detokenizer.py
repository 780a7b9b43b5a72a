"""Incremental, UTF-8-safe detokenization with stop strings.

Decoding token by token breaks multi-byte characters and the spacing of byte-level and
SentencePiece tokenizers, so (like vLLM) we decode a small window of recent tokens twice and emit
only what the newest tokens added, and nothing while the text ends in U+FFFD (a character still
incomplete). While streaming, the last `max(len(stop)) - 1` characters are held back so a stop
string is cut out before any of it reaches the client.
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 6  # prompt tokens kept as left context so the first output token spaces right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = [s for s in (stop or []) if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # the generated text so far, stop string excluded
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found; generation should end
        self._searched = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; returns the text that is now safe to send (may be empty)."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._find_stop()
        limit = len(self.text) if self.stopped else len(self.text) - self.holdback
        return self._take(limit)

    def flush(self) -> str:
        """At the end of generation: whatever was held back."""
        return self._take(len(self.text))

    def _take(self, limit: int) -> str:
        if limit <= self.sent:
            return ""
        piece = self.text[self.sent : limit]
        self.sent = limit
        return piece

    def _find_stop(self) -> None:
        if not self.stop:
            return
        start = max(0, self._searched - self.holdback)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        self._searched = len(self.text)
