"""Pathological grammars against a running server while a stream runs: does a guide that is slow to
compile, or too big for the grammar library, fail (or finish) only its own request, and how long did the
stream wait between tokens meanwhile (issue 22's acceptance: its largest gap under 0.5 s on an idle machine).

    python -m bench.guided_isolation --url http://127.0.0.1:8000 [--repeat 2]

Unguided streams run back to back on /generate_stream (bench/hostile.py's), first alone (the machine's own
gaps), then while each pathological request of `pathological_requests()` is sent on /generate, one after
the other, `--repeat` times each (a repeat finds the engine's compile cache: only the first pays the
compile). /health is probed meanwhile: a slow answer means the frontend's loop stalled, where a long token
gap alone may be the engine's step. Exits 1 when a stream did not finish or a gap went over --max-gap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp

from bench.hostile import StreamGaps, one_stream, probe_health, stream_until

ATTACK_MAX_NEW_TOKENS = 16  # what a pathological request may generate if its grammar does compile


def _nested_schema(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"n": schema}, "required": ["n"], "additionalProperties": False}
    return schema


def _patterned_properties(count: int) -> dict:
    """`count` required string properties, each with its own counted pattern: a large schema and lexer."""
    return {
        "type": "object",
        "properties": {f"k{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 30},{100 + i}}}$"} for i in range(count)},
        "required": [f"k{i}" for i in range(count)],
    }


def pathological_requests() -> dict[str, dict]:
    """name → the guide fields of a native /generate body, as hard as a client can make them within the
    4 MiB body limit. Each is refused (a 400 naming the field, or the engine's error) or served, never
    more. Measured alone on a 2-core EPYC, default model's tokenizer, llguidance 1.9.1 (bench/RESULTS.md):
    the frontend's check is the dear part, pure Python (jsonschema) for a large schema."""
    return {
        # 0.55 MB: frontend check 2.8 s, engine compile + first mask 0.8 s; accepted
        "patterns_8000": {"json_schema": _patterned_properties(8000)},
        # 2.8 MB: frontend check 11.5 s, then the grammar library's "schema too large": a 400
        "patterns_40000": {"json_schema": _patterned_properties(40_000)},
        # a 20,000-string enum (0.5 MB): check 39 ms, compile 31 ms
        "enum_20k": {"json_schema": {"enum": [f"value-{i:06d}-{'x' * (i % 17)}" for i in range(20_000)]}},
        # objects nested 200 deep: a 400 (nested too deeply)
        "nested_200": {"json_schema": _nested_schema(200)},
        # the classic exponential DFA (the 26th character from the end is an `a`): llguidance builds it
        # lazily, 1 ms
        "regex_dfa_blowup": {"regex": "(a|b)*a(a|b){25}"},
        # an ambiguous Lark grammar (Earley items could grow with every token): 1 ms, masks 0.1 ms
        "lark_ambiguous": {"grammar": 'start: x\nx: x x | x x x | "a" | "aa" | "a" x\n'},
    }


async def send_attack(session: aiohttp.ClientSession, url: str, name: str, guide: dict) -> dict:
    """One pathological request on /generate: its status, the seconds it took, its error or output head."""
    body = {"prompt": "Answer:", "max_new_tokens": ATTACK_MAX_NEW_TOKENS, "temperature": 0, **guide}
    started = time.perf_counter()
    async with session.post(url + "/generate", json=body) as response:
        text = await response.text()
    elapsed = time.perf_counter() - started
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {}
    error = answer.get("error") if isinstance(answer, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return {
        "name": name,
        "status": response.status,
        "seconds": round(elapsed, 3),
        "finish_reason": answer.get("finish_reason") if isinstance(answer, dict) else None,
        "said": str(message if message is not None else answer.get("text", text))[:160],
    }


async def run(url: str, repeat: int, names: list[str] | None = None) -> dict:
    attacks = pathological_requests()
    chosen = [(name, attacks[name]) for name in (names or list(attacks))]
    quiet, gaps, done = StreamGaps(), StreamGaps(), asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await one_stream(session, url, StreamGaps())  # warm-up: a server's first stream pays one-time costs
        for _ in range(2):  # the gaps this machine shows without an attack
            await one_stream(session, url, quiet)
        streamer = asyncio.create_task(stream_until(session, url, done, gaps))
        await asyncio.sleep(1.0)  # the first stream is under way before the attack starts
        health: list[float] = []
        prober = asyncio.create_task(probe_health(session, url, done, health))
        results = []
        for _ in range(repeat):
            for name, guide in chosen:
                seen = len(gaps.gaps)
                results.append(await send_attack(session, url, name, guide))
                await asyncio.sleep(0.5)  # a gap that ends just after the answer still counts for it
                results[-1]["largest_gap_s"] = round(max(gaps.gaps[seen:], default=0.0), 3)
        done.set()
        await asyncio.gather(streamer, prober)
    return {
        "attacks": results,
        "streams": gaps.streams,
        "token_gaps": len(gaps.gaps),
        "largest_gap_s": round(gaps.largest_gap(), 3),
        "p99_gap_s": round(sorted(gaps.gaps)[int(0.99 * (len(gaps.gaps) - 1))], 3) if gaps.gaps else None,
        "largest_gap_without_attack_s": round(quiet.largest_gap(), 3),
        "largest_health_latency_s": round(max(health, default=0.0), 3),
        "unfinished_streams": gaps.unfinished[:5],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.guided_isolation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--repeat", type=int, default=2, help="times each pathological request is sent")
    parser.add_argument("--only", default=None, help="comma-separated names of the attacks to send (default: all)")
    parser.add_argument("--max-gap", type=float, default=0.5, help="seconds between tokens that fail the run")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else None
    report = asyncio.run(run(args.url.rstrip("/"), args.repeat, names))
    print(json.dumps(report, indent=2))
    failed = report["unfinished_streams"] or report["largest_gap_s"] > args.max_gap
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
