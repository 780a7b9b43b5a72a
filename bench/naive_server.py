"""The naive baseline: the obvious way to host a model, for the benchmark to beat.

One aiohttp process, `AutoModelForCausalLM.generate` on one request at a time (an
asyncio.Lock; generation in a worker thread so the event loop keeps answering), tokens
streamed from a generate() streamer. Same API as kiln (/health, /generate,
/generate_stream) so the load generator drives both unchanged. No batching, no KV reuse.

    python -m bench.naive_server --model-path FOLDER --dtype float32 --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import msgspec
from aiohttp import web

MAX_STOP_STRINGS = 8


class GenerateBody(msgspec.Struct):
    prompt: Annotated[str, msgspec.Meta(min_length=1)]
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=8192)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    stop: Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=MAX_STOP_STRINGS)] = []
    seed: int | None = None
    ignore_eos: bool = False


def _bad_request(message: str, field: str | None) -> web.Response:
    return web.json_response({"error": {"message": message, "field": field}}, status=400)


class _Cancelled:
    """A stopping criterion that ends generate() once the client has gone away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _QueueStreamer:
    """generate() streamer handing each new token id to the event loop (the first put is the prompt)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, [int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class NaiveModel:
    def __init__(self, path: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        # On the GPU when there is one, as kiln's engine is: a CPU baseline beside a GPU server compares nothing.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.eos = self.model.generation_config.eos_token_id
        self.pad = self.model.generation_config.pad_token_id
        if self.pad is None:
            self.pad = self.eos if isinstance(self.eos, int) else (self.eos or [0])[0]

    def generate(self, body: GenerateBody, ids: list[int], streamer: _QueueStreamer, cancel: threading.Event) -> None:
        torch = self.torch
        try:
            if body.seed is not None:
                torch.manual_seed(body.seed)
            kwargs = dict(
                max_new_tokens=body.max_new_tokens,
                pad_token_id=self.pad,
                streamer=streamer,
                stopping_criteria=[_Cancelled(cancel)],
            )
            if body.temperature == 0:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(do_sample=True, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k)
            if body.ignore_eos:
                kwargs["min_new_tokens"] = body.max_new_tokens
            if body.stop:
                kwargs.update(stop_strings=list(body.stop), tokenizer=self.tok)
            with torch.inference_mode():
                x = torch.tensor([ids], device=self.device)
                self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
        finally:
            streamer.end()

    def is_eos(self, token: int) -> bool:
        return token == self.eos if isinstance(self.eos, int) else token in (self.eos or [])


class _Text:
    """Incremental text of the generated ids: holds back an incomplete UTF-8 character and any
    tail that could still become a stop string, and truncates at the first stop string."""

    def __init__(self, tok, stop: list[str]) -> None:
        self.tok, self.stop, self.ids, self.sent = tok, stop, [], 0
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped = False

    def add(self, new: list[int], final: bool = False) -> str:
        self.ids += new
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, end = True, cut
        elif final:
            end = len(text)
        else:
            end = len(text) - self.hold
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        piece = text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece


class NaiveServer:
    def __init__(self, path: str, dtype: str) -> None:
        self.path, self.dtype = path, dtype
        self.model: NaiveModel | None = None
        self.lock = asyncio.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    async def load(self, app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        self.model = await loop.run_in_executor(self.executor, NaiveModel, self.path, self.dtype)
        print(f"naive server ready at {app['url']}", flush=True)

    def app(self, url: str) -> web.Application:
        app = web.Application()
        app["url"] = url

        async def start_loading(app: web.Application) -> None:
            app["loader"] = asyncio.create_task(self.load(app))

        app.on_startup.append(start_loading)
        app.router.add_get("/health", self.health)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/generate_stream", self.generate_stream)
        return app

    async def health(self, request: web.Request) -> web.Response:
        if self.model is None:
            return web.json_response({"status": "loading"}, status=503)
        return web.json_response({"status": "ok"})

    async def _parse(self, request: web.Request) -> GenerateBody | web.Response:
        if self.model is None:
            return web.json_response({"error": {"message": "model is loading", "field": None}}, status=503)
        try:
            return msgspec.json.decode(await request.read(), type=GenerateBody)
        except msgspec.ValidationError as e:
            m = re.search(r"at `\$\.(\w+)", str(e))
            return _bad_request(str(e), m.group(1) if m else None)
        except msgspec.DecodeError as e:
            return _bad_request(f"body is not valid JSON: {e}", None)

    async def _tokens(self, body: GenerateBody, ids: list[int]):
        """Yield lists of new token ids, one request at a time; cancels generation if abandoned."""
        assert self.model is not None
        async with self.lock:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            cancel = threading.Event()
            fut = loop.run_in_executor(
                self.executor, self.model.generate, body, ids, _QueueStreamer(loop, queue), cancel
            )
            try:
                while (item := await queue.get()) is not None:
                    yield item
                await fut
            finally:
                cancel.set()
                with contextlib.suppress(Exception):
                    await asyncio.shield(fut)

    def _finish(self, text: _Text, body: GenerateBody) -> str:
        assert self.model is not None
        if text.stopped or (text.ids and self.model.is_eos(text.ids[-1])):
            return "stop"
        return "length" if len(text.ids) >= body.max_new_tokens else "stop"

    async def generate(self, request: web.Request) -> web.Response:
        body = await self._parse(request)
        if isinstance(body, web.Response):
            return body
        assert self.model is not None
        t0 = time.perf_counter()
        ids = self.model.tok(body.prompt)["input_ids"]
        text, ttft, out = _Text(self.model.tok, body.stop), None, []
        async with contextlib.aclosing(self._tokens(body, ids)) as tokens:
            async for new in tokens:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                out.append(text.add(new))
                if text.stopped:
                    break
        out.append(text.add([], final=True) if not text.stopped else "")
        return web.json_response(
            {
                "text": "".join(out),
                "finish_reason": self._finish(text, body),
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(text.ids)},
                "timings": {"ttft_s": ttft, "total_s": time.perf_counter() - t0},
            }
        )

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        from aiohttp_sse import sse_response

        body = await self._parse(request)
        if isinstance(body, web.Response):
            return body
        assert self.model is not None
        ids = self.model.tok(body.prompt)["input_ids"]
        text = _Text(self.model.tok, body.stop)
        async with sse_response(request, allow_all_methods=True) as resp:
            try:
                async with contextlib.aclosing(self._tokens(body, ids)) as tokens:
                    async for new in tokens:
                        await resp.send(json.dumps({"text": text.add(new), "token_ids": new}))
                        if text.stopped:
                            break
                final = {
                    "text": text.add([], final=True) if not text.stopped else "",
                    "token_ids": [],
                    "finish_reason": self._finish(text, body),
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": len(text.ids)},
                }
            except (ConnectionResetError, asyncio.CancelledError):
                raise
            except Exception as e:  # the stream has started: report in-band, as kiln does
                final = {"error": {"message": f"generation failed: {e}", "field": None}}
            await resp.send(json.dumps(final))
        return resp


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True, help="local HF folder (safetensors + tokenizer)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    server = NaiveServer(args.model_path, args.dtype)
    url = f"http://{args.host}:{args.port}"
    print(f"naive server starting on {url}", file=sys.stderr, flush=True)
    web.run_app(server.app(url), host=args.host, port=args.port, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
