"""kiln scraped by a real Prometheus server (Debian's `prometheus` package; `.ci/run` installs it where it
can): after a short load, PromQL for request rate, TTFT p50 and KV-cache usage returns numbers, and so
does every query of the shipped Grafana dashboard (deploy/grafana/*.json)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port, running_server
from tests.http_client import generate, run

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="no `prometheus` binary: install Debian's package (apt-get install prometheus) to run this test",
    ),
]
MODEL = "SmolLM2-135M-Instruct"
WINDOW = "5m"  # the dashboards' $__rate_interval here: wide enough to hold the whole short load
DEADLINE_S = 180.0


@pytest.fixture(scope="module")
def server(default_model_path):
    yield from running_server("--max-context", "256")


@pytest.fixture(scope="module")
def prometheus(server):
    """A Prometheus of our own on a free port, scraping the server every second; always stopped."""
    port = free_port((server.port,))
    with tempfile.TemporaryDirectory(prefix="kiln-prometheus-") as folder:
        config = Path(folder) / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: kiln\n    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
        )
        log = open(Path(folder) / "prometheus.log", "w")
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder}/data",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait(lambda: _ready(url), "Prometheus to start", process, Path(log.name))
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _wait(check, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}: {log.read_text()[-3000:]}")
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise TimeoutError(f"gave up waiting for {what} after {DEADLINE_S:.0f} s")


def query(url: str, promql: str) -> list[float]:
    """An instant query's sample values (NaN included), [] for no data."""
    with urllib.request.urlopen(
        f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=10
    ) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    result = body["data"]["result"]
    if body["data"]["resultType"] == "scalar":
        return [float(result[1])]
    return [float(sample["value"][1]) for sample in result]


def numbers(url: str, promql: str) -> list[float] | None:
    """The query's finite values once it has any, else None (still waiting)."""
    values = [v for v in query(url, promql) if math.isfinite(v)]
    return values or None


def positive(url: str, promql: str) -> list[float] | None:
    values = numbers(url, promql)
    return values if values and values[0] > 0 else None


@pytest.fixture(scope="module")
def loaded(server, prometheus):
    """A short load once Prometheus scrapes: a few requests, a stream, a refusal."""
    _wait(lambda: numbers(prometheus, 'up{job="kiln"} == 1'), "the first scrape of kiln")
    for i in range(4):
        status, _ = run(generate(server.url, {"prompt": f"Count to {i}", "max_new_tokens": 8, "ignore_eos": True}))
        assert status == 200
    status, _ = run(generate(server.url, {"prompt": "x", "top_p": 7}))  # a refusal, for the refusal panels
    assert status == 400
    return prometheus


def test_request_rate_ttft_and_kv_usage_in_promql(loaded):
    model = f'model_name="{MODEL}"'
    # Prometheus scrapes every second: wait until the load's last samples are in, not just any sample
    rate = _wait(
        lambda: positive(loaded, f"sum(rate(vllm:request_success_total{{{model}}}[{WINDOW}]))"), "a request rate"
    )
    assert rate[0] > 0
    ttft = _wait(
        lambda: positive(
            loaded,
            f"histogram_quantile(0.5, sum by(le) (rate(vllm:time_to_first_token_seconds_bucket{{{model}}}[{WINDOW}])))",
        ),
        "a TTFT p50",
    )
    assert ttft[0] > 0
    usage = _wait(
        lambda: numbers(loaded, f'vllm:kv_cache_usage_perc{{{model},engine="engine-0"}}'), "the KV-cache usage"
    )
    assert 0 <= usage[0] <= 1
    # the dashboard's error rate counts refusals (the load had one 400), so a 429 storm cannot read 0
    (expr,) = [e for _, title, e in dashboard_queries() if title == "Error Rate"]
    errors = _wait(lambda: positive(loaded, expr.replace("$__rate_interval", WINDOW)), "an error rate above 0")
    assert 0 < errors[0] < 1


def dashboard_queries() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted((REPO_ROOT / "deploy" / "grafana").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], target["expr"]))
    return found


def test_the_dashboard_queries_all_return_data(loaded):
    queries = dashboard_queries()
    assert len(queries) >= 20
    missing = {}

    def all_answer():
        missing.clear()
        for name, title, expr in queries:
            promql = expr.replace("$model_name", MODEL).replace("$__rate_interval", WINDOW)
            if not numbers(loaded, promql):
                missing[f"{name}: {title}"] = promql
        return not missing

    try:
        _wait(all_answer, "every dashboard query to return data")
    except TimeoutError:
        pytest.fail(f"dashboard queries with no data: {json.dumps(missing, indent=1)}")
