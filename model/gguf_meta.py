"""Read a GGUF file's metadata and tensor table without loading tensors, numpy or torch.

`gguf.GGUFReader` parses every array (the 49k-entry token list included) into numpy
objects, which takes about 2 s for the default model; `cli.py plan` has to finish in
under 2 s. This reader walks the header with `struct` over an mmap, skips arrays it does
not need and keeps only scalars, small arrays and each tensor's name and shape.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import msgspec

# value type id -> struct format of one element (None: variable size)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 64  # arrays longer than this are skipped; their length is still recorded


class GGUFError(ValueError):
    """The file is not a GGUF file this reader understands."""


class GGUFTensor(msgspec.Struct, frozen=True):
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class GGUFMetadata(msgspec.Struct, frozen=True):
    version: int
    fields: dict[str, object]  # scalars, strings and short arrays
    array_lengths: dict[str, int]  # length of every array field, kept or skipped
    tensors: list[GGUFTensor]


class _Cursor:
    """Little-endian reads over a buffer; one object per file, no shared state."""

    def __init__(self, buf) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]


def _value(cur: _Cursor, vtype: int, key: str, lengths: dict[str, int]):
    if vtype in _SCALAR:
        return cur.unpack(_SCALAR[vtype])
    if vtype == _STRING:
        return cur.string()
    if vtype != _ARRAY:
        raise GGUFError(f"unknown GGUF value type {vtype} for key {key!r}")
    etype, count = cur.unpack("I"), cur.unpack("Q")
    lengths[key] = count
    if count <= _KEEP_ARRAY:
        return [_value(cur, etype, key, lengths) for _ in range(count)]
    if etype in _SCALAR:
        cur.pos += count * struct.calcsize("<" + _SCALAR[etype])
    elif etype == _STRING:
        for _ in range(count):
            cur.skip_string()
    else:
        for _ in range(count):  # nested arrays: rare, walk them
            _value(cur, etype, key, {})
    return None


def read_gguf_metadata(path: str | Path) -> GGUFMetadata:
    """Parse the header, the key/value section and the tensor table of a GGUF file."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
        cur = _Cursor(buf)
        cur.pos = 4
        version = cur.unpack("I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: unsupported GGUF version {version} (big-endian or v1 file?)")
        n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
        fields: dict[str, object] = {}
        lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = cur.string()
            fields[key] = _value(cur, cur.unpack("I"), key, lengths)
        tensors = []
        for _ in range(n_tensors):
            name = cur.string()
            ndim = cur.unpack("I")
            shape = tuple(cur.unpack("Q") for _ in range(ndim))
            cur.pos += 4 + 8  # ggml type (uint32) and data offset (uint64): the planner needs neither
            tensors.append(GGUFTensor(name=name, shape=shape))
    fields = {k: v for k, v in fields.items() if v is not None}
    return GGUFMetadata(version=version, fields=fields, array_lengths=lengths, tensors=tensors)
