"""Unit tests for bench/: percentile math, figures from synthetic records, the SSE decoder,
the report's table / JSON / plot, and the deterministic workload."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from bench.records import RequestRecord, RunResult
from bench.report import table, to_json, write_json, write_plot
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
    assert list(doc) == ["config", "ours", "baseline", "ratios"]
    assert doc["baseline"] is None and doc["ratios"] is None
    path = tmp_path / "out.json"
    write_json(path, {"users": 3}, f, f)
    back = json.loads(path.read_text())
    assert set(back) == {"config", "ours", "baseline", "ratios"}
    assert back["ours"]["completed"] == 2 and back["ours"]["ttft_p50"] == pytest.approx(0.2)
    assert back["ratios"] == {"throughput": pytest.approx(1.0), "ttft_p50": pytest.approx(1.0)}


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
