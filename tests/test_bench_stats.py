"""Unit tests for bench/: percentile math, figures from synthetic records, the SSE decoder,
the report's table / JSON / plot, and the deterministic workload."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from bench import server_counters
from bench.pairs import make_pair, ours_first, summarize
from bench.records import RequestRecord, RunResult, ServerCounters
from bench.report import pair_lines, table, to_json, turn_table, write_json, write_plot
from bench.sse import SSEDecoder
from bench.stats import figures, mean, percentile, ratios, throughput_series
from bench.workload import load_prompts, pick, request_seed

# --- percentile ---------------------------------------------------------------------------


def test_percentile_hand_computed():
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)  # pos 1.5 -> 2 + 0.5*(3-2)
    assert percentile(xs, 90) == pytest.approx(3.7)  # pos 2.7 -> 3 + 0.7*(4-3)
    assert percentile(xs, 99) == pytest.approx(3.97)  # pos 2.97
    assert percentile([10.0, 20.0], 25) == pytest.approx(12.5)


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert mean([]) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_percentile_matches_numpy_linear():
    rng = random.Random(1)
    for n in (1, 2, 3, 10, 101):
        xs = [rng.uniform(0, 5) for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


# --- figures ------------------------------------------------------------------------------


def _run() -> RunResult:
    ok1 = RequestRecord(
        user=0,
        index=0,
        prompt_id=3,
        start_s=0.0,
        ok=True,
        ttft_s=0.1,
        e2e_s=0.4,
        output_tokens=4,
        itl_s=[0.1, 0.1, 0.1],
        token_times_s=[0.1, 0.2, 0.3, 0.4],
    )
    ok2 = RequestRecord(
        user=1,
        index=0,
        prompt_id=5,
        start_s=0.0,
        ok=True,
        ttft_s=0.3,
        e2e_s=1.8,
        output_tokens=4,
        itl_s=[0.5, 0.5, 0.5],
        token_times_s=[0.3, 0.8, 1.3, 1.8],
    )
    bad = RequestRecord(
        user=2,
        index=0,
        prompt_id=1,
        start_s=0.0,
        ok=False,
        error="HTTP 500: boom",
        ttft_s=0.05,
        output_tokens=2,
        itl_s=[9.0],
        token_times_s=[0.05, 9.0],
    )
    return RunResult(records=[ok1, ok2, bad], wall_s=2.0, peak_running=2)


def test_figures_from_records():
    f = figures(_run())
    assert (f.completed, f.failed) == (2, 1)
    assert f.wall_s == 2.0
    assert f.output_tokens == 8  # the failed request's tokens do not count
    assert f.output_tokens_per_s == pytest.approx(4.0)
    assert f.requests_per_s == pytest.approx(1.0)
    assert f.ttft_p50 == pytest.approx(0.2)
    assert f.ttft_p90 == pytest.approx(0.28)
    assert f.itl_p50 == pytest.approx(0.3)  # [.1,.1,.1,.5,.5,.5] -> pos 2.5
    assert f.itl_p99 == pytest.approx(0.5)
    assert f.tpot_mean == pytest.approx(((0.4 - 0.1) / 3 + (1.8 - 0.3) / 3) / 2)
    assert f.e2e_p50 == pytest.approx(1.1)
    assert f.e2e_p99 == pytest.approx(0.4 + 0.99 * 1.4)
    assert f.peak_running == 2


def test_figures_all_failed_or_empty():
    f = figures(RunResult(records=[RequestRecord(user=0, index=0, prompt_id=0, start_s=0, error="x")], wall_s=1.0))
    assert (f.completed, f.failed, f.output_tokens) == (0, 1, 0)
    assert f.ttft_p50 is None and f.itl_p50 is None and f.tpot_mean is None and f.e2e_p99 is None
    assert f.peak_running is None
    empty = figures(RunResult(records=[], wall_s=0.0))
    assert empty.output_tokens_per_s is None and empty.requests_per_s is None


def test_ratios_oriented_so_bigger_is_better():
    ours = figures(_run())
    slow = figures(RunResult(records=_run().records, wall_s=8.0))
    r = ratios(ours, slow)
    assert r["throughput"] == pytest.approx(4.0)
    assert r["ttft_p50"] == pytest.approx(1.0)
    assert ratios(ours, None) is None


def _rec(user: int, index: int = 0, *, ok: bool = True, ttft: float = 0.1, tokens: int = 4, **kw) -> RequestRecord:
    return RequestRecord(
        user=user,
        index=index,
        prompt_id=0,
        start_s=0.0,
        ok=ok,
        ttft_s=ttft if ok else None,
        e2e_s=ttft + 0.3 if ok else None,
        output_tokens=tokens if ok else 0,
        **kw,
    )


def test_statuses_and_short_answers_are_counted():
    records = [
        _rec(0, status=200),
        _rec(1, tokens=3, status=200),  # came back short
        _rec(2, ok=False, status=429, error="HTTP 429: overloaded"),
        _rec(3, ok=False, status=503, error="HTTP 503"),
        _rec(4, ok=False, error="ClientConnectorError"),  # no response at all
    ]
    f = figures(RunResult(records=records, wall_s=1.0), expected_tokens=4)
    assert (f.completed, f.failed, f.http_429, f.http_5xx, f.short) == (2, 3, 1, 1, 1)
    assert figures(RunResult(records=records, wall_s=1.0)).short is None  # EOS respected: fewer is no fault


def test_prefill_speed_is_prompt_tokens_over_ttft():
    records = [_rec(0, ttft=4.0, prompt_tokens=2000), _rec(1, ttft=1.0, prompt_tokens=1000), _rec(2, ttft=0.5)]
    f = figures(RunResult(records=records, wall_s=5.0))
    assert f.prompt_tokens == 3000
    assert f.prefill_tokens_per_s == pytest.approx(750.0)  # median of 500 and 1000; no usage: left out
    assert f.server_prefill_tokens_per_s is None
    f = figures(RunResult(records=[_rec(0, prompt_tokens=10, server_prompt_per_s=900.0)], wall_s=1.0))
    assert f.server_prefill_tokens_per_s == 900.0


def test_prefix_cache_from_kiln_counters_else_from_llama_timings():
    timed = [_rec(0, prompt_tokens=400, cached_tokens=300), _rec(1, prompt_tokens=400, cached_tokens=0)]
    kiln = figures(RunResult(records=timed, wall_s=1.0, counters=ServerCounters(1000, 600, 2)))
    assert (kiln.prefix_cache_queries, kiln.prefix_cache_hits, kiln.preemptions) == (1000, 600, 2)
    assert kiln.prefix_cache_hit_rate == pytest.approx(0.6)
    llama = figures(RunResult(records=timed, wall_s=1.0))
    assert (llama.prefix_cache_queries, llama.prefix_cache_hits, llama.preemptions) == (800, 300, None)
    assert llama.prefix_cache_hit_rate == pytest.approx(0.375)
    none = figures(RunResult(records=[_rec(0, prompt_tokens=400)], wall_s=1.0))
    assert none.prefix_cache_queries is None and none.prefix_cache_hit_rate is None


def test_ttft_per_turn():
    records = [
        _rec(u, t - 1, ttft=t * 0.1 + u * 0.02, turn=t, prompt_tokens=100 * t + u) for u in range(2) for t in (1, 2, 3)
    ]
    records[1] = _rec(0, 1, ok=False, turn=2, error="boom")  # user 0's turn 2 failed
    f = figures(RunResult(records=records, wall_s=2.0))
    turns = f.ttft_by_turn
    assert [t.turn for t in turns] == [1, 2, 3] and [t.completed for t in turns] == [2, 1, 2]
    assert turns[0].ttft_p50 == pytest.approx(0.11) and turns[0].ttft_p90 == pytest.approx(0.118)
    assert turns[1].ttft_p50 == pytest.approx(0.22)  # the failed turn is not in it
    assert turns[2].prompt_tokens_p50 == pytest.approx(300.5)
    assert figures(_run()).ttft_by_turn is None  # not a chat


def test_table_shows_server_rows_only_where_known_and_a_turn_table():
    plain = table(figures(_run()))
    assert "HTTP 429" in plain and "Short answers" in plain
    assert "Prefix cache" not in plain and "Preemptions" not in plain and "Prefill" not in plain
    records = [_rec(0, turn=1, prompt_tokens=50), _rec(0, 1, ttft=0.2, turn=2, prompt_tokens=90)]
    ours = figures(RunResult(records=records, wall_s=1.0, counters=ServerCounters(100, 60, 0)), expected_tokens=4)
    base = figures(RunResult(records=[_rec(0, ttft=0.4, turn=1), _rec(0, 1, ttft=0.8, turn=2)], wall_s=2.0))
    both = table(ours, base, baseline_name="llama.cpp")
    assert "60.0 %" in both and "Preemptions" in both and "Prefill p50 (prompt/TTFT)" in both
    turns = turn_table(ours, base, baseline_name="llama.cpp").splitlines()
    assert "llama.cpp p50" in turns[0] and len(turns) == 4  # header, rule, 2 turns
    assert turns[3].split()[:2] == ["2", "90"] and turns[3].endswith("4.00x")  # 0.8 s vs 0.2 s
    assert turn_table(figures(_run())) is None


def test_pairs_median_worst_and_alternation():
    def run(wall: float) -> RunResult:
        return RunResult(records=[_rec(0, tokens=8)], wall_s=wall)

    base = figures(run(2.0))
    pairs = [make_pair(s, figures(run(w)), base) for s, w in ((0, 1.0), (1, 4.0), (2, 2.0))]  # ratios 2, 0.5, 1
    summary = summarize(pairs)
    assert [p.ratios["throughput"] for p in summary.pairs] == [2.0, 0.5, 1.0]
    assert summary.median["throughput"] == 1.0 and summary.worst["throughput"] == 0.5
    assert summary.median_pair == 2
    text = pair_lines(summary, "llama.cpp")
    assert "pair 2 (seed 1)" in text and "median of 3 pairs: throughput x1.00" in text and "x0.50" in text
    doc = to_json({}, summary.pairs[2].ours, base, summary)
    assert doc["pairs"]["worst"]["throughput"] == 0.5 and len(doc["pairs"]["pairs"]) == 3
    assert [ours_first(k) for k in range(4)] == [True, False, True, False]
    with pytest.raises(ValueError):
        summarize([])


def test_server_counters_from_info_or_metrics_and_their_delta():
    info = {"engines": [{"prefix_cache_queries": 10, "prefix_cache_hits": 4, "preemptions": 0}] * 2}
    assert server_counters.from_info(info) == {"prefix_cache_queries": 20, "prefix_cache_hits": 8, "preemptions": 0}
    older = server_counters.from_info({"engines": [{"running": 1}]})
    assert set(older.values()) == {None}
    metrics = (
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.\n"
        "# TYPE vllm:prefix_cache_hits_total counter\n"
        'vllm:prefix_cache_hits_total{engine="a",model_name="m x"} 30.0\n'
        'vllm:prefix_cache_hits_total{engine="b",model_name="m x"} 12.0\n'
        'vllm:prefix_cache_queries_total{engine="a",model_name="m x"} 64.0\n'
        "vllm:prefix_cache_queries_created 1.7e9\n"
    )
    scraped = server_counters.from_metrics(metrics)
    assert scraped == {"prefix_cache_queries": 64, "prefix_cache_hits": 42, "preemptions": None}
    before = {"prefix_cache_queries": 20, "prefix_cache_hits": 8, "preemptions": None}
    after = {"prefix_cache_queries": 120, "prefix_cache_hits": 5, "preemptions": None}  # hits fell: a restart
    assert server_counters.delta(before, after) == ServerCounters(100, 5, None)
    assert server_counters.delta(older, older) is None


def test_throughput_series_buckets_completed_tokens():
    xs, ys = throughput_series(_run(), bucket_s=1.0)
    assert xs == [0.0, 1.0]
    assert ys == [6.0, 2.0]  # tokens at .1 .2 .3 .4 .3 .8 | 1.3 1.8 ; the failed request's dropped


# --- report -------------------------------------------------------------------------------


def test_table_layouts():
    f = figures(_run())
    alone = table(f)
    assert "Throughput" in alone and "4.00 tok/s" in alone and "TTFT p99" in alone and "Peak running batch" in alone
    assert "naive" not in alone
    both = table(f, figures(RunResult(records=_run().records, wall_s=8.0)), baseline_name="naive")
    header = both.splitlines()[0]
    assert "ours" in header and "naive" in header
    assert "4.00x" in both  # throughput: 4 tok/s vs 1 tok/s


def test_json_shape_exact(tmp_path):
    f = figures(_run())
    doc = to_json({"users": 3}, f, None)
    assert list(doc) == ["config", "ours", "baseline", "ratios", "pairs"]
    assert doc["baseline"] is None and doc["ratios"] is None and doc["pairs"] is None
    path = tmp_path / "out.json"
    write_json(path, {"users": 3}, f, f)
    back = json.loads(path.read_text())
    assert set(back) == {"config", "ours", "baseline", "ratios", "pairs"}
    assert back["ours"]["completed"] == 2 and back["ours"]["ttft_p50"] == pytest.approx(0.2)
    assert back["ratios"] == {k: pytest.approx(1.0) for k in ("throughput", "ttft_p50", "ttft_p90", "itl_p50")}


def test_plot_writes_png(tmp_path):
    path = tmp_path / "bench.png"
    write_plot(path, {"ours": _run(), "naive": RunResult(records=[], wall_s=1.0)})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- SSE decoder --------------------------------------------------------------------------


def _decode(chunks: list[bytes]) -> tuple[list, bool]:
    d = SSEDecoder()
    events = [e for c in chunks for e in d.feed(c)]
    events += d.close()
    return events, d.pending


def test_sse_basic_multiline_and_comments():
    raw = b': a comment\ndata: {"a": 1}\n\nevent: done\ndata: line1\ndata:line2\nid: 7\nretry: 10\n\n'
    events, pending = _decode([raw])
    assert [e.data for e in events] == ['{"a": 1}', "line1\nline2"]
    assert events[1].event == "done" and events[1].id == "7" and events[0].event == "message"
    assert not pending


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_sse_line_endings_split_anywhere(eol):
    raw = b"data: x" + eol + b"data: y" + eol + eol + b":ping" + eol + b"data: \xc3\xa9" + eol + eol
    whole, _ = _decode([raw])
    assert [e.data for e in whole] == ["x\ny", "é"]
    for cut in range(1, len(raw)):  # every split point, including inside \r\n and inside é
        split, pending = _decode([raw[:cut], raw[cut:]])
        assert [e.data for e in split] == ["x\ny", "é"], cut
        assert not pending
    bytewise, _ = _decode([raw[i : i + 1] for i in range(len(raw))])
    assert [e.data for e in bytewise] == ["x\ny", "é"]


def test_sse_bom_blank_data_and_cut():
    events, pending = _decode([b"\xef\xbb\xbfdata\n\ndata: a\n\n"])
    assert [e.data for e in events] == ["", "a"]  # `data` alone is an empty data line
    events, pending = _decode([b"data: a\n\ndata: half"])
    assert [e.data for e in events] == ["a"] and pending  # no blank line: not dispatched, stream cut
    events, pending = _decode([b"data: a\n\ndata: b\n"])
    assert [e.data for e in events] == ["a"] and pending


# --- workload -----------------------------------------------------------------------------


def test_prompt_set_and_deterministic_draw():
    prompts = load_prompts()
    kinds = [p.kind for p in prompts]
    assert kinds.count("code") >= 25 and kinds.count("chat") >= 15
    assert [p.id for p in prompts] == list(range(len(prompts)))
    draw = [pick(prompts, 0, u, i).id for u in range(10) for i in range(5)]
    assert draw == [pick(prompts, 0, u, i).id for u in range(10) for i in range(5)]
    assert draw != [pick(prompts, 1, u, i).id for u in range(10) for i in range(5)]
    assert len(set(draw)) > 10
    assert request_seed(0, 1, 2) == request_seed(0, 1, 2) != request_seed(0, 2, 1)
