"""How an engine finds a frontend: `frontend.json` in a local server's runtime folder, or tcp://.

`cli.py serve` keeps its sockets in a private temporary folder named `kiln-run-*` and describes
itself there; `cli.py engine` on the same machine globs for those folders, so nobody copies
socket paths around. For another machine, `--frontend tcp://HOST:PORT` names the request socket;
outputs go to PORT+1.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import msgspec

RUNTIME_PREFIX = "kiln-run-"


class FrontendInfo(msgspec.Struct):
    input: str
    output: str
    model: str
    model_path: str
    pid: int
    url: str
    tcp_input: str | None = None
    tcp_output: str | None = None


class FrontendNotFound(Exception):
    pass


def running_frontends() -> list[FrontendInfo]:
    """Servers alive on this machine (folders of crashed ones are skipped)."""
    found = []
    for path in sorted(Path(tempfile.gettempdir()).glob(RUNTIME_PREFIX + "*/frontend.json")):
        try:
            info = msgspec.json.decode(path.read_bytes(), type=FrontendInfo)
            os.kill(info.pid, 0)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            continue
        found.append(info)
    return found


def find_frontend(address: str | None) -> tuple[str, str, FrontendInfo | None]:
    """(input address, output address, local info if any) for `cli.py engine --frontend ADDRESS`.

    ADDRESS: None (the one local server), a local server's URL or port, or tcp://HOST:PORT.
    """
    if address and address.startswith("tcp://"):
        host, _, port = address[len("tcp://") :].rpartition(":")
        if not host or not port.isdigit():
            raise FrontendNotFound(f"{address}: expected tcp://HOST:PORT (the server's --engine-port)")
        return address, f"tcp://{host}:{int(port) + 1}", None
    local = running_frontends()
    if address:
        local = [f for f in local if f.url.rstrip("/").endswith(":" + address.rstrip("/").rpartition(":")[2])]
    if not local:
        raise FrontendNotFound(
            "no running `cli.py serve` found on this machine"
            + (f" matching {address}" if address else "")
            + "; start one, or pass --frontend"
        )
    if len(local) > 1:
        raise FrontendNotFound(
            "several servers run here; pick one with --frontend PORT: " + ", ".join(f.url for f in local)
        )
    return local[0].input, local[0].output, local[0]
