"""One request's life inside the frontend, shared by the native and the OpenAI-style routes:
admit (cheap refusals first, then tokenize off the loop, then the context check), stream token
ids from an engine, detokenize, count the outcome, and abort in the engine whichever way the
handler leaves. Handlers wrap everything from `start` on in try/finally `close`, so any failure
at any stage leaves nothing registered.
"""

from __future__ import annotations

import os
import time

from aiohttp import web

from frontend.api import ApiError, GenerateRequest, Timings, Usage
from frontend.chat_template import PromptPiece
from frontend.context import CLIENT, METRICS, PROMPT_ENCODER, REQUEST_IDS, TOKENIZER
from frontend.detokenizer import IncrementalDetokenizer
from frontend.router import NoEngineAvailable
from ipc.messages import FinishReason, RequestTiming, TokenLogprobs


class Generation:
    """One request's life: admission, the engine stream, detokenization, timings."""

    def __init__(self, app: web.Application, body: GenerateRequest):
        self.app = app
        self.client = app[CLIENT]
        self.metrics = app[METRICS]
        self.body = body
        self.request_id = f"{os.getpid()}-{next(app[REQUEST_IDS])}"
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.prompt_ids: list[int] = []
        self.detok: IncrementalDetokenizer | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []  # in step with token_ids, when the request asked for them
        self.prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1..n-1, when asked
        self.engine_timing: RequestTiming | None = None  # queue and prefill time inside the engine
        self.finish_reason: str | None = None
        self.stream = None
        self.closed = False

    async def start(
        self,
        add_special_tokens: bool = True,
        field: str = "prompt",
        pieces: list[PromptPiece] | None = None,
        prompt_ids: list[int] | None = None,
    ) -> None:
        """Refuse early and cheaply, then tokenize, then hand the request to an engine. `field`: what
        the client sent the prompt as (OpenAI chat: `messages`), for error messages; `pieces`: the
        prompt as template and client text (a chat), so client text cannot become control tokens;
        `prompt_ids`: the prompt as token ids, not tokenized again."""
        engine = self._pick_engine()
        encoder = self.app[PROMPT_ENCODER]
        encoder.check_length(self.body.prompt, engine.hello.plan.max_context, field)
        if prompt_ids is not None:  # the client sent token ids (OpenAI completions): used as they are
            self.prompt_ids = list(prompt_ids)
        elif pieces is None:
            self.prompt_ids = await encoder.encode(self.body.prompt, add_special_tokens)
        else:
            self.prompt_ids = await encoder.encode_pieces(pieces)
        if not self.prompt_ids:
            raise ApiError(400, f"`{field}` encodes to no tokens", field)
        self._check_token_ids()
        self.detok = IncrementalDetokenizer(self.app[TOKENIZER], self.prompt_ids, self.body.stop)
        engine = self._pick_engine()  # again: engines may have come or gone while tokenizing
        context = engine.hello.plan.max_context
        if len(self.prompt_ids) >= context:
            raise ApiError(
                400,
                f"{field} is {len(self.prompt_ids)} tokens; the context window is {context} "
                f"tokens (prompt + generated), so the prompt must be shorter",
                field,
            )
        # generation stops at the context window: finish_reason "length", as if max_new_tokens were smaller
        budget = min(self.body.max_new_tokens, context - len(self.prompt_ids))
        try:
            self.stream = await self.client.submit(
                self.request_id, self.prompt_ids, self.body.sampling_params(budget), engine, self.body.cache_salt
            )
        except NoEngineAvailable as exc:
            raise ApiError(503, str(exc), kind="unavailable") from None

    def _check_token_ids(self) -> None:
        """Token ids the client named (logit_bias) must exist in the vocabulary: the engine indexes with them."""
        vocab = self.app[TOKENIZER].get_vocab_size(with_added_tokens=True)
        bad = next((t for t in self.body.logit_bias or () if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(
                400, f"`logit_bias` names token id {bad}; the vocabulary has ids 0..{vocab - 1}", "logit_bias"
            )

    def _pick_engine(self):
        try:
            engine = self.client.pick_engine()
        except NoEngineAvailable:
            raise ApiError(503, "no engine is ready yet; retry shortly", kind="unavailable") from None
        if self.client.overloaded():
            raise ApiError(429, "server overloaded: too many requests waiting; retry later", kind="overloaded")
        return engine

    async def pieces(self):
        """Yield (text, token_ids) as tokens arrive; sets finish_reason at the end."""
        while self.finish_reason is None:
            output = await self.stream.queue.get()
            if output.finish_reason in (FinishReason.ERROR, FinishReason.REFUSED):
                refused = output.finish_reason is FinishReason.REFUSED
                self.finish_reason = str(output.finish_reason)
                raise EngineError(output.error or "engine error", refused)
            if self.first_token_at is None and output.new_token_ids:
                self.first_token_at = time.perf_counter()
            if output.timing is not None:
                self.engine_timing = output.timing
            if output.prompt_logprobs is not None:
                self.prompt_logprobs = output.prompt_logprobs
            if output.logprobs:
                self.logprobs += output.logprobs
            self.token_ids += output.new_token_ids
            text = self.detok.push(output.new_token_ids)
            if self.detok.stopped:
                self.finish_reason = "stop"
                await self.client.abort(self.request_id)
            else:
                self.finish_reason = None if output.finish_reason is None else str(output.finish_reason)
            if self.finish_reason is not None:
                text += self.detok.flush()
            if text or output.new_token_ids:
                yield text, output.new_token_ids

    async def close(self) -> None:
        """Abort in the engine unless it already finished (idempotent); count the outcome."""
        if self.stream is None or self.closed:
            return
        self.closed = True
        timings = self.timings()
        self.metrics.observe(
            self.finish_reason or "abort",
            len(self.prompt_ids),
            len(self.token_ids),
            timings.ttft_s,
            timings.total_s,
            engine=self.stream.engine_id,
            timing=self.engine_timing,
            max_tokens=self.body.max_new_tokens,
        )
        await self.client.abort(self.request_id)

    @property
    def engine_id(self) -> str:
        """The engine that served it (a request moved off a lost engine reports the new one)."""
        return self.stream.engine_id

    def usage(self) -> Usage:
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.token_ids))

    def timings(self) -> Timings:
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        return Timings(ttft_s=ttft, total_s=time.perf_counter() - self.started)


class EngineError(Exception):
    """The engine ended a request with an error: its failure (500) or, `refused`, the request's (400)."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused

    def api_error(self) -> ApiError:
        if self.refused:
            return ApiError(400, str(self), kind="invalid_request")
        return ApiError(500, str(self), kind="engine_error")
