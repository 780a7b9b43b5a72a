"""The two HTTP dialects the load generator speaks: kiln's native routes and OpenAI's /v1/completions.

One client for every server is what makes their figures compare; only the request body and the
reading of a chunk differ. kiln (and the naive baseline) answer /generate_stream with `token_ids`
per event and end at the event that carries `finish_reason`. OpenAI-style servers (llama.cpp's
`llama-server`, vLLM, kiln's own /v1 routes) send one `choices[0].text` per chunk, then, when asked
with `stream_options.include_usage`, `usage` (on a final chunk with no choices, or on the last one for
some servers: read from whichever chunk carries it), then `data: [DONE]`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from bench.records import LoadConfig

DONE = "[DONE]"


class Chunk(msgspec.Struct, frozen=True):
    """One stream event, normalized: how many tokens it carries and whether it ends the request."""

    tokens: int = 0
    finish_reason: str | None = None
    usage: dict | None = None
    text: str = ""
    timings: dict | None = None  # llama-server's own figures (prompt_n, cache_n, prompt_per_second)


class Dialect(msgspec.Struct, frozen=True):
    name: str
    stream_path: str
    plain_path: str
    openai: bool
    polls_info: bool  # kiln's /info gives the peak batch; OpenAI servers have none to poll
    # Measured: llama-server advertises keep-alive after a streamed answer but drops the connection,
    # so the next request on it fails ("Can not write request body"); a fresh connection per
    # request costs well under a millisecond on loopback.
    keep_alive: bool

    def body(self, cfg: LoadConfig, prompt: str, seed: int) -> dict:
        """The same sampling in either dialect: greedy or seeded, a fixed budget, EOS ignored if asked.
        A JSON schema travels as `json_schema`, the field both kiln's native routes and llama-server's
        /v1/completions take; with one, EOS is respected: the grammar ends the answer (llama-server's
        ignore_eos would forbid the only token a complete grammar allows)."""
        ignore_eos = cfg.ignore_eos and cfg.json_schema is None
        common = {"prompt": prompt, "temperature": cfg.temperature, "ignore_eos": ignore_eos, "seed": seed}
        if cfg.json_schema is not None:
            common["json_schema"] = cfg.json_schema
        if not self.openai:
            return {**common, "max_new_tokens": cfg.max_new_tokens}
        body = {**common, "max_tokens": cfg.max_new_tokens, "stream": cfg.stream}
        return {**body, "stream_options": {"include_usage": True}} if cfg.stream else body

    def warm_up_body(self) -> dict:
        return {"prompt": "Hello", "temperature": 0.0, "max_tokens" if self.openai else "max_new_tokens": 4}

    def chunk(self, msg: dict[str, Any]) -> Chunk:
        """Read one decoded stream event (a kiln piece or an OpenAI completion chunk)."""
        if not self.openai:
            ids = msg.get("token_ids")
            tokens = len(ids) if isinstance(ids, list) else int(bool(msg.get("text")))
            return Chunk(tokens=tokens, finish_reason=msg.get("finish_reason"), usage=msg.get("usage"), text=_text(msg))
        choice = _first_choice(msg)
        return Chunk(
            tokens=int(bool(choice.get("text"))),
            finish_reason=choice.get("finish_reason"),
            usage=msg.get("usage"),
            text=_text(choice),
            timings=msg.get("timings") if isinstance(msg.get("timings"), dict) else None,
        )

    def ends_at_finish(self) -> bool:
        """kiln's stream is over at `finish_reason`; OpenAI's may still send `usage`, then [DONE]."""
        return not self.openai

    def plain(self, msg: dict[str, Any]) -> tuple[str | None, int, float | None]:
        """(finish_reason, output tokens, the server's own TTFT if it reports one) of a non-streamed answer."""
        usage = msg.get("usage") or {}
        tokens = int(usage.get("completion_tokens", 0))
        if self.openai:
            return _first_choice(msg).get("finish_reason"), tokens, None
        ttft = (msg.get("timings") or {}).get("ttft_s")
        return msg.get("finish_reason"), tokens, float(ttft) if ttft is not None else None

    def plain_chunk(self, msg: dict[str, Any]) -> Chunk:
        """A non-streamed answer's text, usage and server timings, as one chunk."""
        source = _first_choice(msg) if self.openai else msg
        timings = msg.get("timings") if self.openai and isinstance(msg.get("timings"), dict) else None
        return Chunk(usage=msg.get("usage"), text=_text(source), timings=timings)


def _text(source: dict[str, Any]) -> str:
    text = source.get("text")
    return text if isinstance(text, str) else ""


def _first_choice(msg: dict[str, Any]) -> dict:
    choices = msg.get("choices")
    return choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}


NATIVE = Dialect(
    name="native",
    stream_path="/generate_stream",
    plain_path="/generate",
    openai=False,
    polls_info=True,
    keep_alive=True,
)
OPENAI = Dialect(
    name="openai",
    stream_path="/v1/completions",
    plain_path="/v1/completions",
    openai=True,
    polls_info=False,
    keep_alive=False,
)
