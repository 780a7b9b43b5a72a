"""bench.server_proc: a bench stopped by SIGTERM (an orchestrator, `timeout`) or SIGHUP (a closed
terminal) still stops the server it started (issue 10: `cli.py bench` left `bench.naive_server` running).
A stand-in server (a few lines of http.server) keeps it cheap: the signal handling is what is tested.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from bench.server_proc import free_port
from tests.conftest import REPO_ROOT, pid_alive

STAND_IN_SERVER = """
import http.server, sys
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *args): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""

BENCH = """
import sys, time
from bench.server_proc import running_server
port = sys.argv[1]
with running_server([sys.executable, "-c", sys.argv[2], port], f"http://127.0.0.1:{port}", name="stand-in",
                    timeout_s=60):
    print("ready", flush=True)
    time.sleep(600)
"""


def default_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_bench_stopped_by_a_signal_stops_its_server(sig):
    bench = subprocess.Popen(
        [sys.executable, "-c", BENCH, str(free_port()), STAND_IN_SERVER],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        stderr=subprocess.DEVNULL,
        preexec_fn=default_signals,  # as from a terminal, even when the tests run under nohup (SIGHUP ignored)
    )
    servers = []
    try:
        assert bench.stdout.readline().strip() == "ready"
        servers = [p.pid for p in psutil.Process(bench.pid).children(recursive=True)]
        assert servers, "the bench should have started its server"
        bench.send_signal(sig)
        assert bench.wait(60) == 128 + sig
        assert not [pid for pid in servers if pid_alive(pid)], "the server outlived the bench"
    finally:
        bench.kill()
        bench.wait()
        for pid in servers:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
