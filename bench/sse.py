"""A small Server-Sent Events decoder for aiohttp response bodies.

Why not a library: the maintained SSE clients for aiohttp (aiohttp-sse-client2) are
EventSource implementations that GET and reconnect on their own; a benchmark needs a POST
and must see a cut stream as a failure, not silently retry it. The decoder follows the
WHATWG parsing rules: lines end in \\r\\n, \\n or \\r (a \\r\\n split across chunks included),
`data` lines of one event are joined with \\n, `:` lines are comments, a blank line dispatches.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator

import msgspec


class Event(msgspec.Struct):
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Incremental: feed bytes as they arrive, get the events completed so far."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._started = False

    def feed(self, chunk: bytes) -> list[Event]:
        self._buf += self._utf8.decode(chunk)
        if not self._started and self._buf:
            self._started = True
            self._buf = self._buf.removeprefix("\ufeff")
        return self._drain(final=False)

    def close(self) -> list[Event]:
        """End of body: complete the last line; an event without its blank line is dropped (per spec)."""
        self._buf += self._utf8.decode(b"", final=True)
        events = self._drain(final=True)
        if self._buf:
            self._line(self._buf)
            self._buf = ""
        return events

    @property
    def pending(self) -> bool:
        """True when the body stopped inside an event (data seen but no dispatching blank line)."""
        return bool(self._data or self._buf.strip())

    def _drain(self, final: bool) -> list[Event]:
        events: list[Event] = []
        buf, pos = self._buf, 0
        while True:
            n, r = buf.find("\n", pos), buf.find("\r", pos)
            if n < 0 and r < 0:
                break
            if r >= 0 and (n < 0 or r < n):
                if r + 1 == len(buf) and not final:
                    break  # a lone \r at the end may be the first half of \r\n
                end, nxt = r, r + 2 if buf.startswith("\n", r + 1) else r + 1
            else:
                end, nxt = n, n + 1
            event = self._line(buf[pos:end])
            if event is not None:
                events.append(event)
            pos = nxt
        self._buf = buf[pos:]
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = Event(data="\n".join(self._data), event=self._event or "message", id=self._id)
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        return None  # `retry` and unknown fields are ignored


class StreamCut(Exception):
    """The body ended in the middle of an event."""


async def iter_events(content: AsyncIterator[bytes] | object) -> AsyncIterator[Event]:
    """Events from an aiohttp `StreamReader` (`resp.content`) as they arrive."""
    decoder = SSEDecoder()
    async for chunk in content.iter_any():  # type: ignore[attr-defined]
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.close():
        yield event
    if decoder.pending:
        raise StreamCut("stream ended inside an event")
