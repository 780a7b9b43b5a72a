"""Tool calls read out of generated text, as it streams: one reader per chat choice.

A model writes its calls in its template family's format; the reader turns the text into events, content
pieces and call pieces, in order, so that a streamed answer and a whole one are built from the same events
(`collect` builds the whole one). What each reader expects:

- `TaggedCalls`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, anywhere in the answer, any
  number of times (Hermes and Qwen templates, and kiln's fallback system prompt for templates without tools).
- `BareJsonCalls`: the whole answer is one call object `{"name", "parameters" | "arguments"}` or a list
  of them (Llama 3.1+'s JSON tool calling; Mistral's `[TOOL_CALLS][...]` once its control token is dropped).
- `NamedCall`: the whole answer is the arguments of one named function (tool_choice names a function; the
  engine constrains the answer to the function's parameter schema).
- `RequiredCalls`: the whole answer is a JSON list of call objects (tool_choice "required", constrained).

Text that looks like a call but is not one (bad JSON, a function not offered) stays content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


@dataclass(frozen=True)
class ContentPiece:
    text: str


@dataclass(frozen=True)
class CallPiece:
    """A piece of call `index`: its header (`call_id` and `name`, once) or a fragment of its arguments."""

    index: int
    arguments: str = ""
    call_id: str | None = None
    name: str | None = None

    def delta(self) -> dict:
        """OpenAI's streamed shape: the header carries id, type and name; later pieces arguments only."""
        if self.call_id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


Piece = ContentPiece | CallPiece


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # JSON text

    def message(self) -> dict:
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def collect(pieces: list[Piece]) -> tuple[str, list[ToolCall]]:
    """The whole answer from its pieces: the content, and the calls in order."""
    content = "".join(p.text for p in pieces if isinstance(p, ContentPiece))
    headers: dict[int, CallPiece] = {}
    arguments: dict[int, list[str]] = {}
    for piece in pieces:
        if isinstance(piece, CallPiece):
            if piece.call_id is not None:
                headers[piece.index] = piece
            arguments.setdefault(piece.index, []).append(piece.arguments)
    calls = [ToolCall(h.call_id, h.name, "".join(arguments[i])) for i, h in sorted(headers.items())]
    return content, calls


class CallReader:
    """push(text) → pieces ready to send; finish() → the rest, once generation ended."""

    def __init__(self, tool_names: frozenset[str] = frozenset(), parallel: bool = True):
        self.tool_names = tool_names
        self.parallel = parallel  # False: only the first call is kept (parallel_tool_calls: false)
        self.calls = 0

    def push(self, text: str) -> list[Piece]:
        return [ContentPiece(text)] if text else []

    def finish(self) -> list[Piece]:
        return []

    def read_all(self, text: str) -> tuple[str, list[ToolCall]]:
        return collect([*self.push(text), *self.finish()])

    def _call(self, name: str, arguments: str) -> list[Piece]:
        """A whole call as its two pieces (header, arguments); nothing once a non-parallel answer has one."""
        if self.calls and not self.parallel:
            return []
        index, self.calls = self.calls, self.calls + 1
        return [CallPiece(index, "", new_call_id(), name), CallPiece(index, arguments)]

    def _parse_call(self, value) -> tuple[str, str] | None:
        """(name, arguments JSON) of a call object naming an offered function, else None."""
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if value["name"] not in self.tool_names or not isinstance(arguments, dict):
            return None
        return value["name"], json.dumps(arguments, ensure_ascii=False)

    def _calls_from_json(self, text: str) -> list[Piece] | None:
        """Pieces of every call in JSON text holding one call object or a list of them; None if it is not."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return None
        parsed = [self._parse_call(item) for item in (value if isinstance(value, list) else [value])]
        if not parsed or None in parsed:
            return None
        return [piece for name, arguments in parsed for piece in self._call(name, arguments)]


class PlainContent(CallReader):
    """No tools offered (or tool_choice "none"): everything is content."""


def _held_prefix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (kept back while streaming)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class TaggedCalls(CallReader):
    """`<tool_call>` JSON `</tool_call>` blocks among content; a partial `<tool_call>` is held back."""

    def __init__(self, tool_names: frozenset[str], parallel: bool = True):
        super().__init__(tool_names, parallel)
        self.buffer = ""
        self.inside = False

    def push(self, text: str) -> list[Piece]:
        self.buffer += text
        pieces: list[Piece] = []
        while True:
            if not self.inside:
                start = self.buffer.find(TOOL_CALL_START)
                if start < 0:
                    keep = _held_prefix(self.buffer, TOOL_CALL_START)
                    pieces += self._content(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return pieces
                pieces += self._content(self.buffer[:start])
                self.buffer, self.inside = self.buffer[start + len(TOOL_CALL_START) :], True
            end = self.buffer.find(TOOL_CALL_END)
            if end < 0:
                return pieces
            pieces += self._block(self.buffer[:end], closed=True)
            self.buffer, self.inside = self.buffer[end + len(TOOL_CALL_END) :], False

    def finish(self) -> list[Piece]:
        """A block left open (generation ended right after its JSON) still counts when its JSON is whole."""
        rest, self.buffer = self.buffer, ""
        return self._block(rest, closed=False) if self.inside else self._content(rest)

    def _block(self, body: str, closed: bool) -> list[Piece]:
        calls = self._calls_from_json(body.strip())
        if calls is not None:
            return calls
        return self._content(TOOL_CALL_START + body + (TOOL_CALL_END if closed else ""))

    def _content(self, text: str) -> list[Piece]:
        if self.calls:  # the newlines between and after calls are not content
            text = text.strip()
        return [ContentPiece(text)] if text else []


class BareJsonCalls(CallReader):
    """An answer that opens with `{` or `[` is held whole and read as calls at the end; any other is content."""

    def __init__(self, tool_names: frozenset[str], parallel: bool = True):
        super().__init__(tool_names, parallel)
        self.buffer = ""
        self.is_json: bool | None = None  # undecided until the first non-space character

    def push(self, text: str) -> list[Piece]:
        if self.is_json is False:
            return super().push(text)
        self.buffer += text
        opening = self.buffer.lstrip()
        if not opening:
            return []
        self.is_json = opening[0] in "{["
        if self.is_json:
            return []
        text, self.buffer = self.buffer, ""
        return [ContentPiece(text)]

    def finish(self) -> list[Piece]:
        text, self.buffer = self.buffer, ""
        if not text:
            return []
        calls = self._calls_from_json(text.strip()) if self.is_json else None
        return calls if calls is not None else [ContentPiece(text)]


class NamedCall(CallReader):
    """The answer is the named function's arguments (constrained): its header first, then every piece as it
    comes, so that arguments stream as they are generated."""

    def __init__(self, name: str):
        super().__init__(frozenset([name]))
        self.name = name
        self.opened = False

    def push(self, text: str) -> list[Piece]:
        pieces: list[Piece] = []
        if not self.opened:
            text = text.lstrip()
            if not text:
                return []
            self.opened = True
            pieces.append(CallPiece(0, "", new_call_id(), self.name))
        return [*pieces, CallPiece(0, text)] if text else pieces

    def finish(self) -> list[Piece]:
        return [] if self.opened else [CallPiece(0, "", new_call_id(), self.name)]


class RequiredCalls(CallReader):
    """The answer is a JSON list of call objects (constrained); read at the end. Cut short (`length`), it is
    content, as any text that does not parse."""

    def __init__(self, tool_names: frozenset[str], parallel: bool = True):
        super().__init__(tool_names, parallel)
        self.buffer = ""

    def push(self, text: str) -> list[Piece]:
        self.buffer += text
        return []

    def finish(self) -> list[Piece]:
        text, self.buffer = self.buffer, ""
        calls = self._calls_from_json(text.strip())
        if calls is not None:
            return calls
        return [ContentPiece(text)] if text else []
