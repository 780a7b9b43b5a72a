"""bench.gpu's report: the acceptance verdicts and gpu_report.{json,md}, rebuilt from the results so far.

Kept apart from the scenarios so rendering can be tested on made-up numbers (a slip must not
surface first on a borrowed GPU) and read on its own.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.gpu import Result, Session

NF4_RATIO_MAX = 0.30  # NF4 weight memory / bf16 weight memory


def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if isinstance(n, (int, float)) else "-"


def acceptance(session: Session) -> list[dict]:
    """The checks the GPU run exists for, recomputed from whatever scenarios have finished."""
    results = session.results
    items = []
    for name in ("sc2-3b-bf16", "sc2-3b-nf4", "llama8b-offload", "small-gpu"):
        res = results.get(name)
        if res is None or session.cpu:
            continue
        peak = next((c for c in res.checks if c["name"].startswith("peak <=")), None)
        items.append(
            {
                "name": f"{name}: peak <= plan within 5%",
                "ok": peak["ok"] if peak else None,
                "detail": peak["detail"] if peak else res.status,
            }
        )
    if not session.cpu:
        items.append(nf4_ratio(results))
    if (res := results.get("tiny-fp32-exact")) is not None:
        items.append(
            {
                "name": "tiny fp32 greedy == transformers",
                "ok": res.status == "PASS" if res.checks else None,
                "detail": res.status,
            }
        )
    if (res := results.get("small-gpu")) is not None and not session.cpu:
        planned = next((c["ok"] for c in res.checks if c["name"].startswith("planned")), None)
        items.append(
            {
                "name": "small GPU: embeddings on CPU planned and served",
                "ok": (planned and res.status == "PASS") if res.checks else None,
                "detail": res.status + ("" if planned is not False else " (not planned)"),
            }
        )
    return items


def step_time_weights(results: dict[str, Result], step_key: str) -> int | None:
    """bench.step_time's measured weight bytes (memory_allocated around the load), when it ran."""
    speed = results.get("speed")
    step = speed.numbers.get(step_key) if speed else None
    if not isinstance(step, dict):
        return None
    keys = sorted((k for k in step if "weight" in k and "bytes" in k), key=lambda k: "measured" not in k)
    return next((int(step[k]) for k in keys if isinstance(step[k], (int, float)) and step[k] > 0), None)


def served_weights(results: dict[str, Result], scenario: str) -> int | None:
    """gpu_allocated_bytes - kv_cache_bytes after serving: weights plus whatever else stayed allocated."""
    res = results.get(scenario)
    return res.numbers.get("weights_measured_bytes") if res else None


def nf4_ratio(results: dict[str, Result]) -> dict:
    """NF4 / bf16 weight bytes from one source for both (step_time preferred), never a mix."""
    name = f"NF4 / bf16 weight memory <= {NF4_RATIO_MAX}"
    pairs = [
        (
            (step_time_weights(results, "step_time_nf4"), step_time_weights(results, "step_time_bfloat16")),
            "bench.step_time weights_bytes_measured",
        ),
        (
            (served_weights(results, "sc2-3b-nf4"), served_weights(results, "sc2-3b-bf16")),
            "serving: gpu_allocated_bytes - kv_cache_bytes",
        ),
    ]
    for (nf4, bf16), source in pairs:
        if nf4 and bf16:
            ratio = nf4 / bf16
            return {
                "name": name,
                "ok": ratio <= NF4_RATIO_MAX,
                "ratio": round(ratio, 3),
                "detail": f"{gib(nf4)} / {gib(bf16)} = {ratio:.3f} ({source})",
            }
    return {"name": name, "ok": None, "detail": "not measured"}


def write_report(session: Session) -> None:
    """gpu_report.json and gpu_report.md, replaced whole so a kill mid-run leaves the previous version."""
    report = {
        "device": session.device,
        "elapsed_s": round(time.time() - session.started, 1),
        "budget_left_s": round(session.budget.left(), 1),
        "acceptance": acceptance(session),
        "scenarios": {name: res.to_json() for name, res in session.results.items()},
        "logs": session.copied_logs,
    }
    replace_file(session.outdir / "gpu_report.json", json.dumps(report, indent=2, default=str))
    try:
        text = markdown(report)
    except Exception:  # a rendering bug must not cost the run: the JSON above has everything
        text = f"# kiln GPU checks\n\nrendering failed, see gpu_report.json:\n\n```\n{traceback.format_exc()}```\n"
    replace_file(session.outdir / "gpu_report.md", text)


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def mark(ok) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


def markdown(report: dict) -> str:
    device = report["device"]
    gpus = ", ".join(f"{g['name']} ({g['memory_total_mib']} MiB, driver {g['driver']})" for g in device["gpus"])
    lines = [
        f"# kiln GPU checks ({device['mode']} mode)",
        "",
        f"Device: {gpus or device['cpu']}; {device['cores']} cores; Python {device['python']}; "
        + ", ".join(f"{k} {v}" for k, v in device["versions"].items()),
        f"Elapsed {report['elapsed_s']} s, budget left {report['budget_left_s']} s.",
        "",
        "## Acceptance",
        "",
    ]
    lines += [f"- **{mark(a['ok'])}** {a['name']}: {a['detail']}" for a in report["acceptance"]] or ["- (none yet)"]
    lines += ["", "## Scenarios", "", "| scenario | status | s | checks |", "|---|---|---:|---|"]
    for name, s in report["scenarios"].items():
        failed = [c["name"] for c in s["checks"] if not c["ok"]]
        lines.append(
            f"| {name} | {s['status']} | {s['seconds']} | {len(s['checks']) - len(failed)}/{len(s['checks'])}"
            + (f" (failed: {'; '.join(failed)})" if failed else "")
            + " |"
        )
    for name, s in report["scenarios"].items():
        lines += scenario_markdown(name, s)
    return "\n".join(lines) + "\n"


def scenario_markdown(name: str, s: dict) -> list[str]:
    lines = ["", f"### {name}: {s['status']}", ""]
    lines += [f"- {mark(c['ok'])} {c['name']}" + (f": {c['detail']}" if c["detail"] else "") for c in s["checks"]]
    lines += [f"- note: {n}" for n in s["notes"]]
    numbers = s["numbers"]
    if "plan" in numbers:
        p = numbers["plan"]
        lines.append(
            f"- plan: {p['dtype']}, quantization {p['quantization']}, offload {p['offload']}, batch "
            f"{p['max_batch']}, context {p['max_context']}, weights {gib(p['weights_bytes'])}, KV "
            f"{gib(p['kv_cache_bytes'])}, reserve {gib(p['reserve_bytes'])}, budget {gib(p['budget_bytes'])}, "
            f"max_memory {p['max_memory']}, device_map {json.dumps(p['device_map'])[:300]}"
        )
    if "gpu_peak_bytes" in numbers:
        lines.append(
            f"- memory: peak {gib(numbers['gpu_peak_bytes'])}, allocated {gib(numbers['gpu_allocated_bytes'])}, "
            f"plan GPU-side {gib(numbers.get('plan_gpu_bytes'))}, nvidia-smi used "
            f"{numbers.get('nvidia_smi_used_mib')} MiB, engine RSS {gib(numbers.get('engine_rss_bytes'))}"
        )
    if "load" in numbers:
        lines.append(f"- load: {json.dumps(numbers['load'])}")
    lines += step_time_markdown(numbers)
    if (bench := numbers.get("bench")) and bench.get("ours"):
        lines += bench_markdown(bench)
    if s.get("error"):
        lines += ["", "```", s["error"].rstrip(), "```"]
    if s.get("log_tail"):
        lines += [
            "",
            "<details><summary>log tail</summary>",
            "",
            "```",
            s["log_tail"][-2000:].rstrip(),
            "```",
            "</details>",
        ]
    rest = {
        k: v
        for k, v in numbers.items()
        if k not in ("plan", "load", "bench", "engine") and not k.startswith("step_time")
    }
    if rest:
        lines.append(f"- numbers: {json.dumps(rest, default=str)[:1500]}")
    return lines


def step_time_markdown(numbers: dict) -> list[str]:
    """bench.step_time's per-batch rows as a table, whatever its columns (its format is its own)."""
    lines = []
    for key, value in numbers.items():
        if not key.startswith("step_time") or value is None:
            continue
        rows = table_rows(value)
        if not rows:
            lines += [f"- {key}: {json.dumps(value)[:800]}"]
            continue
        columns = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
        lines += ["", f"{key}:", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
        extra = {k: v for k, v in value.items() if not isinstance(v, (list, dict))} if isinstance(value, dict) else {}
        if extra:
            lines.append(f"\n- {key} also: {json.dumps(extra, default=str)[:600]}")
    return lines


def table_rows(value) -> list[dict]:
    """Per-batch rows: a list of dicts, or a dict of them keyed by batch size (`{"steps": {"1": {...}}}`)."""
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        return value
    if isinstance(value, dict):
        for v in value.values():
            if rows := table_rows(v):
                return rows
            if isinstance(v, dict) and v and all(isinstance(r, dict) for r in v.values()):
                return [{"batch": k, **r} for k, r in v.items()]
    return []


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def bench_markdown(bench: dict) -> list[str]:
    ours, base, ratios = bench["ours"], bench.get("baseline") or {}, bench.get("ratios") or {}
    lines = [
        "",
        f"cli.py bench ({bench.get('dtype')}), ours vs naive:",
        "",
        "| metric | ours | naive | ours better by |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (
        ("output_tokens_per_s", "tok/s"),
        ("ttft_p50", "TTFT p50 s"),
        ("itl_p50", "ITL p50 s"),
        ("tpot_mean", "TPOT s"),
        ("completed", "completed"),
        ("failed", "failed"),
    ):
        better = {"output_tokens_per_s": ratios.get("throughput"), "ttft_p50": ratios.get("ttft_p50")}.get(key)
        lines.append(
            f"| {label} | {fmt(ours.get(key))} | {fmt(base.get(key))} | {'' if better is None else f'{better:.2f}x'} |"
        )
    return lines
