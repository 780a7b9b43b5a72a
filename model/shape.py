"""A model's shape and parameter counts, from config.json or GGUF metadata, without torch.

The planner sizes memory from parameter counts (not checkpoint file sizes: an fp32
checkpoint is twice its 16-bit footprint). Counts are split the way bitsandbytes splits
them: only the decoder's `nn.Linear` weights get quantized; embeddings, an untied
`lm_head`, norms and biases stay in the compute dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec

from model.gguf_meta import GGUFMetadata, read_gguf_metadata

# What kiln serves, by HF model_type: the one list that both the shape reader (so `plan`, and every
# engine before it loads weights, refuses anything else) and the model runner check. Each entry has an
# exactness test (tests/test_architectures.py): transformers' own modules run with kiln's attention
# plugged in and must give `generate`'s greedy tokens; the note says what sets the architecture apart.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "the reference decoder",
    "mistral": "sliding-window attention",
    "qwen2": "q/k/v biases, sliding window on upper layers",
    "qwen3": "per-head q/k RMSNorm",
    "starcoder2": "LayerNorm, plain 2-matrix MLP with biases, sliding window",
    "phi3": "fused qkv_proj and gate_up_proj",
    "gemma2": "attention and final logit softcapping, alternating sliding layers",
    "gemma3_text": "q/k norms, local/global layers with their own rotary bases",
    "granite": "embedding, residual, attention multipliers and logits scaling",
    "smollm3": "NoPE layers (no rotary embedding every few layers)",
    "olmo2": "q/k RMSNorm over all heads, norms after attention and MLP",
    "cohere": "parallel attention and MLP, LayerNorm, logit scale",
}
# llama.cpp's names for architectures transformers loads from GGUF under another model_type
GGUF_MODEL_TYPES = {"command-r": "cohere", "gemma3": "gemma3_text"}

# c_fc/c_proj MLP with biases, LayerNorm with bias; every other supported decoder is sized as
# q/k/v/o (phi3: fused, same count) + gated MLP (gate, up, down) + RMSNorm-sized norms
TWO_MATRIX_MLP = {"starcoder2"}
# Every supported architecture names its modules model.embed_tokens / model.layers.N / model.norm /
# model.rotary_emb / lm_head (checked on transformers 5.17 and 5.24), so the planner's device_map fits.
ACCELERATE_LAYOUT = frozenset(SUPPORTED_ARCHITECTURES)


class ModelConfigError(ValueError):
    """The config cannot be read, lacks a field the planner needs, or names an unsupported architecture."""


def unsupported_architecture(model_type: str | None) -> str | None:
    """The one-line refusal for a model_type kiln does not serve; None when it is supported."""
    if model_type in SUPPORTED_ARCHITECTURES:
        return None
    return (
        f"architecture {model_type!r} is not supported; kiln serves "
        f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} (each tested token for token against transformers)"
    )


def _check_supported(model_type: str) -> None:
    if (reason := unsupported_architecture(model_type)) is not None:
        raise ModelConfigError(reason)


class ModelShape(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    architecture: str  # HF model_type / GGUF general.architecture, e.g. "llama", "starcoder2"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    embedding_params: int
    lm_head_params: int  # 0 when tied to the embeddings
    decoder_linear_params: int  # what bitsandbytes quantizes
    other_params: int  # norms and biases
    total_params: int
    layer_params: int  # one decoder layer, linear + norms + biases (for offload placement)
    torch_dtype: str | None = None  # the checkpoint's dtype, when known
    source: str = ""  # the file the shape was read from
    notes: list[str] = msgspec.field(default_factory=list)  # assumptions made


def _get(cfg: dict, *keys: str, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is not None:
        return default
    raise ModelConfigError(f"config has none of {keys}")


def _longrope_limit(cfg: dict) -> int | None:
    """The context a longrope model must stay within to be served exactly, or None for other rotary types.

    Longrope switches every layer to its long factors once the largest position in a forward passes
    original_max_position_embeddings; kiln's forward holds every running sequence, so one long sequence
    would change the rotation of the short ones beside it, which `generate` never does. Phi3 reads the
    top-level field first (as transformers does), then the one inside the rope parameters."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    per_layer_type = [r for r in rope.values() if isinstance(r, dict)]  # e.g. {"full_attention": {...}, ...}
    if not any((r.get("rope_type") or r.get("type")) == "longrope" for r in [rope, *per_layer_type]):
        return None
    inner = [r.get("original_max_position_embeddings") for r in [rope, *per_layer_type]]
    return next((int(v) for v in [cfg.get("original_max_position_embeddings"), *inner] if v), None)


def shape_from_config(cfg: dict, *, name: str = "model", source: str = "") -> ModelShape:
    """Parameter arithmetic for a HF config dict (text models; a `text_config` is used if present).

    The architecture is the outer model_type: a multimodal wrapper (e.g. "gemma3", "llava") is not its
    text decoder as far as loading goes, so it is refused rather than planned as one."""
    arch = str(cfg.get("model_type") or "unknown")
    _check_supported(arch)
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "torch_dtype": cfg.get("torch_dtype", cfg.get("dtype"))}
    notes: list[str] = []
    h = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
    layers = int(_get(cfg, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_get(cfg, "num_attention_heads", "n_head"))
    kv = int(_get(cfg, "num_key_value_heads", default=heads))
    hd = int(cfg.get("head_dim") or h // heads)
    inter = int(_get(cfg, "intermediate_size", "n_inner", default=4 * h))
    vocab = int(_get(cfg, "vocab_size"))
    max_pos = int(_get(cfg, "max_position_embeddings", "n_positions", "max_seq_len", default=2048))
    tied = bool(cfg.get("tie_word_embeddings", True))  # PretrainedConfig's default is True
    if (limit := _longrope_limit(cfg)) is not None and limit < max_pos:
        notes.append(
            f"context capped at {limit} (original_max_position_embeddings, not {max_pos}): beyond it "
            "longrope's long factors would apply to every sequence of a step, not only the long one"
        )
        max_pos = limit
    q_out, kv_out = heads * hd, kv * hd

    attn_linear = h * q_out + 2 * h * kv_out + q_out * h
    if arch in TWO_MATRIX_MLP:
        mlp_linear = 2 * h * inter
        bias = bool(cfg.get("use_bias", True))
        layer_other = 2 * 2 * h  # two LayerNorms, weight + bias
        if bias:
            layer_other += q_out + 2 * kv_out + h + inter + h  # q, k, v, o, c_fc, c_proj biases
        final_norm = 2 * h
    else:
        mlp_linear = 3 * h * inter
        layer_other = 2 * h  # input and post-attention RMSNorm
        if arch == "qwen2" or cfg.get("attention_bias"):
            layer_other += q_out + 2 * kv_out  # q/k/v biases (Qwen2 always has them)
            if cfg.get("attention_bias"):
                layer_other += h  # Llama's attention_bias also adds an o_proj bias
        if cfg.get("mlp_bias"):
            layer_other += 2 * inter + h
        if arch in ("qwen3", "gemma3_text"):
            layer_other += 2 * hd  # q_norm, k_norm
        final_norm = h

    embedding = vocab * h
    lm_head = 0 if tied else vocab * h
    linear = layers * (attn_linear + mlp_linear)
    other = layers * layer_other + final_norm
    return ModelShape(
        name=name,
        architecture=arch,
        num_layers=layers,
        hidden_size=h,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_kv_heads=kv,
        head_dim=hd,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tied,
        embedding_params=embedding,
        lm_head_params=lm_head,
        decoder_linear_params=linear,
        other_params=other,
        total_params=embedding + lm_head + linear + other,
        layer_params=attn_linear + mlp_linear + layer_other,
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        source=source,
        notes=notes,
    )


def shape_from_gguf(meta: GGUFMetadata, *, name: str = "model", source: str = "") -> ModelShape:
    """Shape from GGUF keys (`{arch}.block_count`, ...); parameter counts from the tensor table.

    Counting the actual tensors is exact and needs no per-architecture arithmetic; a missing
    `output.weight` tensor means the lm_head is tied to `token_embd.weight`.
    """
    f = meta.fields
    arch = str(f.get("general.architecture", "unknown"))  # the prefix of the file's keys
    model_type = GGUF_MODEL_TYPES.get(arch, arch)
    _check_supported(model_type)

    def key(suffix: str, default=None):
        value = f.get(f"{arch}.{suffix}", default)
        if value is None:
            raise ModelConfigError(f"{source or 'GGUF file'} lacks {arch}.{suffix}")
        return value

    h = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv = key("attention.head_count_kv", heads)
    kv = int(max(kv) if isinstance(kv, list) else kv)  # per-layer lists exist in some files
    inter = key("feed_forward_length")
    inter = int(max(inter) if isinstance(inter, list) else inter)
    hd = int(f.get(f"{arch}.attention.key_length") or h // heads)
    vocab = int(f.get(f"{arch}.vocab_size") or meta.array_lengths.get("tokenizer.ggml.tokens") or 0)

    embedding = lm_head = linear = other = 0
    per_layer: dict[str, int] = {}
    for t in meta.tensors:
        if t.name == "token_embd.weight":
            embedding += t.numel
            vocab = vocab or t.shape[-1]
        elif t.name == "output.weight":
            lm_head += t.numel
        elif t.name.startswith("blk.") and len(t.shape) >= 2:
            linear += t.numel
        else:
            other += t.numel
        if t.name.startswith("blk."):
            layer = t.name.split(".")[1]
            per_layer[layer] = per_layer.get(layer, 0) + t.numel
    notes = []
    file_type = f.get("general.file_type")
    if file_type is not None:
        notes.append(f"GGUF file_type {file_type}: sized as the dequantized model the engine loads")
    return ModelShape(
        name=name,
        architecture=model_type,
        num_layers=int(key("block_count")),
        hidden_size=h,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_kv_heads=kv,
        head_dim=hd,
        vocab_size=vocab,
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings=lm_head == 0,
        embedding_params=embedding,
        lm_head_params=lm_head,
        decoder_linear_params=linear,
        other_params=other,
        total_params=embedding + lm_head + linear + other,
        layer_params=max(per_layer.values(), default=0),
        torch_dtype=None,
        source=source,
        notes=notes,
    )


def _hub_cache_config(repo_id: str) -> Path | None:
    """config.json of a hub model: from the local HF cache, else downloaded (a few KB) where there is internet."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(Path.home(), ".cache", "huggingface"), "hub"
    )
    snapshots = Path(hub) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    if found:
        return found[0]
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, "config.json", etag_timeout=5))
    except Exception:  # offline, unknown repo, gated model: the caller explains
        return None


def load_model_shape(path: str | os.PathLike) -> ModelShape:
    """Shape of a folder with config.json, a config.json file, a .gguf file, or a cached hub id."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelConfigError(f"GGUF file not found: {p}")
        meta = read_gguf_metadata(p)
        return shape_from_gguf(meta, name=p.stem, source=str(p))  # the name model.source reports
    if p.is_dir():
        cfg_path = p / "config.json"
        name = p.resolve().name
    elif p.is_file():
        cfg_path, name = p, p.resolve().parent.name
    elif (cached := _hub_cache_config(str(path))) is not None:
        cfg_path, name = cached, str(path)
    else:
        raise ModelConfigError(
            f"{path}: no such folder or file, and not in the local Hugging Face cache "
            "(this machine may have no internet: pass a local folder or a .gguf file)"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelConfigError(f"cannot read {cfg_path}: {e}") from e
    return shape_from_config(cfg, name=name, source=str(cfg_path))


def model_shape_for_spec(spec: str | None) -> ModelShape:
    """`--model` / `BASE_MODEL` / nothing -> shape; the default GGUF is read, never converted."""
    spec = spec or os.environ.get("BASE_MODEL") or None
    if spec is None:
        from model.source import DEFAULT_NAME, default_gguf

        shape = load_model_shape(default_gguf())
        return msgspec.structs.replace(shape, name=DEFAULT_NAME)
    return load_model_shape(spec)
