"""A 4-bit GGUF's own codes for kiln's int4 format, so a Q4 model runs its original weights, not a re-quantization.

kiln's int4 (engine_core/int4_weights.py) holds w = (q - 8) * scale + zero, q in 0..15, one scale and zero per
32 input features of a row; GGUF's 4-bit blocks are the same thing in other words:
  - Q4_0, 32 weights: w = (q - 8) d                -> scale d,    zero 0
  - Q4_1, 32 weights: w = q d + m                  -> scale d,    zero m + 8 d
  - Q4_K, 256 weights in 8 sub-blocks of 32 with 6-bit sc, m each: w = d sc q - dmin m
                                                   -> scale d sc, zero 8 d sc - dmin m
Other types (Q8_0: one scale per 32 int8 weights, where kiln's int8 has one per row; Q5, Q6_K, ...) have no
matching kiln format and are widened, as before.

How the codes reach the loader: the one-time conversion (model/convert.py), which already reads the GGUF and
holds the dequantized model, also writes INT4_FILE into the converted folder: per linear `<name>.q4` (uint8,
two codes a byte, low nibble first, in the checkpoint's row order), `<name>.scale` and `<name>.zero` (float32,
one per 32 weights). The loader reads it only when the plan picks int4 and needs no GGUF, gguf-py or name
mapping at start; a checkpoint without the file is quantized from its float weights instead. The name and row
order come from transformers' own GGUF mapping (names, llama's q/k row permutation), applied to the codes, and
each linear is kept only if its codes dequantize to the weights transformers loaded (so a mapping kiln gets
wrong is dropped, never served). Torch-free: numpy and safetensors' numpy API.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INT4_FILE = "kiln-int4.safetensors"
GROUP = 32
MATCH_TOLERANCE = 1e-3  # of the tensor's largest |w|: rounding apart (float32 sums in another order), no more


def _codes(blocks: np.ndarray) -> np.ndarray:
    """(…, 16) bytes -> (…, 32) codes: low nibbles are the first 16 weights, high nibbles the next 16."""
    return np.concatenate([blocks & 0x0F, blocks >> 4], axis=-1)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def decode_q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, groups, 18) bytes -> q (rows, groups * 32) uint8, scale, zero (rows, groups) float32."""
    d = _f16(blocks[..., 0:2])
    q = _codes(blocks[..., 2:18])
    return q.reshape(q.shape[0], -1), d, np.zeros_like(d)


def decode_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, groups, 20) bytes: d, m, 16 bytes of codes."""
    d, m = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    q = _codes(blocks[..., 4:20])
    return q.reshape(q.shape[0], -1), d, m + 8 * d


def decode_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, superblocks, 144) bytes: d, dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of codes
    (each 32 bytes: 32 weights in the low nibbles, the next 32 in the high ones)."""
    from gguf.quants import Q4_K

    rows, supers = blocks.shape[:2]
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
    scale = d[..., None] * sc.reshape(rows, supers, 8).astype(np.float32)
    zero = 8 * scale - dmin[..., None] * m.reshape(rows, supers, 8).astype(np.float32)
    qs = blocks[..., 16:144].reshape(rows, supers, 4, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (rows, supers, 4, 64): 64 weights per 32 bytes
    return q.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)


DECODERS = {"Q4_0": decode_q4_0, "Q4_1": decode_q4_1, "Q4_K": decode_q4_k}


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    rows = q.shape[0]
    w = (q.reshape(rows, -1, GROUP).astype(np.float32) - 8) * scale[..., None] + zero[..., None]
    return w.reshape(rows, -1)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(rows, in) codes -> (rows, in / 2) bytes, column 2j in the low nibble and 2j + 1 in the high one."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def gguf_int4_codes(gguf: Path, model) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """({"<linear>.q4" / ".scale" / ".zero": array}, {GGUF type: linears taken}) for every 2-D Q4_0 / Q4_1 / Q4_K
    tensor of `gguf` that maps onto a weight of `model` (transformers' model loaded from that file) and whose
    codes give back that weight."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = GGUFReader(gguf)
    field = reader.fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode()
    config = {k: getattr(model.config, k, None) for k in ("num_attention_heads", "num_key_value_heads")}
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
    names = get_gguf_hf_weights_map(model, processor)
    weights = model.state_dict()
    out: dict[str, np.ndarray] = {}
    taken: dict[str, int] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in DECODERS or len(tensor.shape) != 2:
            continue
        rows = int(tensor.shape[1])  # GGUF lists the fastest-varying dimension (in features) first
        try:
            done = [
                processor.process(
                    weights=a, name=tensor.name, tensor_key_mapping=names, parsed_parameters={"tensors": {}}
                )
                for a in _decoded(tensor.data, kind, rows)
            ]
        except Exception:  # a processor that does more than reorder rows: this tensor stays widened
            continue
        hf = names.get(done[0].name)
        if hf is None or not hf.endswith(".weight") or hf not in weights:
            continue
        q, scale, zero = (np.ascontiguousarray(d.weights) for d in done)
        expected = weights[hf].detach().float().numpy()
        if expected.shape != q.shape or not _matches(dequantize(q, scale, zero), expected):
            continue
        linear = hf.removesuffix(".weight")
        out[f"{linear}.q4"] = pack_nibbles(q)
        out[f"{linear}.scale"] = scale.astype(np.float32)
        out[f"{linear}.zero"] = zero.astype(np.float32)
        taken[kind] = taken.get(kind, 0) + 1
    return out, taken


def _decoded(data: np.ndarray, kind: str, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}[kind]
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, -1, block_bytes)
    return DECODERS[kind](blocks)


def _matches(got: np.ndarray, expected: np.ndarray) -> bool:
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(got - expected).max()) <= MATCH_TOLERANCE * scale


def write_int4_codes(gguf: Path, model, folder: Path) -> str:
    """Write INT4_FILE into `folder` when `gguf` has 4-bit linears; returns a line saying what was kept."""
    from safetensors.numpy import save_file

    codes, taken = gguf_int4_codes(gguf, model)
    if not codes:
        return "no Q4_0 / Q4_1 / Q4_K linears: the int4 format, when chosen, quantizes the float weights"
    save_file(codes, str(folder / INT4_FILE))
    return "4-bit codes kept for kiln's int4 format: " + ", ".join(f"{n} {k}" for k, n in sorted(taken.items()))


class Int4Codes:
    """The codes in a converted folder's INT4_FILE, read lazily per linear: `name in codes`, `codes[name]` ->
    (q (out, in) uint8, scale, zero (out, in / 32) float32) as numpy arrays. `aliases`: {linear: linear whose codes
    it shares} (a tied LM head reads the embedding's)."""

    def __init__(self, path: Path, aliases: dict[str, str] | None = None) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="numpy")
        self._keys = set(self._file.keys())
        self._aliases = aliases or {}

    @classmethod
    def in_folder(cls, folder: str | Path, aliases: dict[str, str] | None = None) -> Int4Codes | None:
        path = Path(folder) / INT4_FILE
        return cls(path, aliases) if path.is_file() else None

    def _name(self, linear: str) -> str:
        return linear if f"{linear}.q4" in self._keys else self._aliases.get(linear, linear)

    def __contains__(self, linear: str) -> bool:
        return f"{self._name(linear)}.q4" in self._keys

    def __getitem__(self, linear: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        name = self._name(linear)
        if f"{name}.q4" not in self._keys:
            raise KeyError(linear)
        return tuple(
            unpack_nibbles(self._file.get_tensor(f"{name}.q4"))
            if part == "q4"
            else self._file.get_tensor(f"{name}.{part}")
            for part in ("q4", "scale", "zero")
        )

    def __len__(self) -> int:
        return sum(k.endswith(".q4") for k in self._keys)
