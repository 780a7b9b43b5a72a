"""Random-weight models with real shapes, for speed and memory work without downloads.

Speed and memory depend on shapes, not on trained weights, so a model built from a known
config (tests/fixtures/configs/*) with random weights measures what the real one would.
Building is fast even for 8B: the modules are created directly on `device` with torch's and
transformers' weight init switched off, then every tensor is filled once with a cheap
normal draw (ones for norm scales, zeros for biases). The tokenizer files come from another
folder (default: the embedded SmolLM2 default model, vocab 49152); a config whose vocab is
larger (llama-3.1: 128256) still loads, and ids past the tokenizer decode to nothing.

    python -m bench.random_model CONFIG_DIR OUT_DIR [--dtype bfloat16] [--num-layers N]
        [--tokenizer DIR] [--device cuda]

Imports torch lazily: `tiny_config` and the CLI's argument parsing stay cheap.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

FIXTURE_CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "configs"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_VOCAB = 49152  # SmolLM2's tokenizer, the same size as starcoder2's
NORM_MARKERS = ("norm", "ln_")  # parameter names of normalization layers: scales start at 1


def tiny_config(arch: str = "llama") -> dict:
    """A few-layer float32 config that runs in milliseconds on CPU and fits the default tokenizer."""
    common = {
        "vocab_size": DEFAULT_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if arch == "llama":
        return {
            **common,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
        }
    if arch == "starcoder2":
        return {
            **common,
            "architectures": ["Starcoder2ForCausalLM"],
            "model_type": "starcoder2",
            "hidden_act": "gelu_pytorch_tanh",
            "norm_epsilon": 1e-5,
            "use_bias": True,
            "sliding_window": 512,
            "rope_theta": 10000.0,
            "attention_dropout": 0.0,
            "residual_dropout": 0.0,
            "embedding_dropout": 0.0,
        }
    raise ValueError(f"tiny_config: unknown arch {arch!r} (llama or starcoder2)")


def write_config_dir(config: dict, folder: str | Path) -> Path:
    """A config dict as a folder holding config.json, the form build_random_model reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def default_tokenizer_dir() -> Path:
    """The embedded default model's converted folder (converted once if needed)."""
    from model.source import resolve_model

    return Path(resolve_model(None).path)


def copy_tokenizer(tokenizer_dir: str | Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files that exist; a folder without tokenizer.json is refused early."""
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
            copied.append(name)
    return copied


def _fill_random(model, std: float, seed: int) -> None:
    """One cheap pass: matrices ~ N(0, std), norm scales 1, biases and other vectors 0."""
    import torch

    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std, generator=generator)
            elif name.endswith("weight") and any(m in name for m in NORM_MARKERS):
                param.fill_(1.0)
            else:
                param.zero_()


def build_random_model(
    config_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    num_layers: int | None = None,
    tokenizer_dir: str | Path | None = None,
    device: str = "cpu",
    overrides: dict | None = None,
    init_std: float | None = None,
    seed: int = 0,
) -> Path:
    """Build a random-weight model from `config_dir`/config.json and save it (safetensors +
    tokenizer) into `out_dir`; returns `out_dir`. `init_std` defaults to the config's
    initializer_range (0.02): larger values make greedy argmaxes clear-cut (exactness tests)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(config_dir)
    for key, value in {**(overrides or {}), **({"num_hidden_layers": num_layers} if num_layers else {})}.items():
        setattr(config, key, value)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    _fill_random(model, init_std if init_std is not None else getattr(config, "initializer_range", 0.02), seed)
    model.tie_weights()  # a tied lm_head must be the embedding again after the fill, as in the real checkpoint
    model.config.dtype = dtype
    model.save_pretrained(out_dir)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    copy_tokenizer(tokenizer_dir if tokenizer_dir is not None else default_tokenizer_dir(), out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", help="folder with config.json, or a fixture name (starcoder2-3b, ...)")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: the embedded model's)")
    parser.add_argument("--device", default="cpu", help="where to build: cpu or cuda (much faster for 8B)")
    parser.add_argument("--init-std", type=float, default=None)
    parser.add_argument("--overrides", default=None, help="JSON object of config fields to change")
    args = parser.parse_args(argv)
    config_dir = Path(args.config_dir)
    if not config_dir.is_dir() and (FIXTURE_CONFIGS / args.config_dir).is_dir():
        config_dir = FIXTURE_CONFIGS / args.config_dir
    out = build_random_model(
        config_dir,
        args.out_dir,
        dtype=args.dtype,
        num_layers=args.num_layers,
        tokenizer_dir=args.tokenizer,
        device=args.device,
        init_std=args.init_std,
        overrides=json.loads(args.overrides) if args.overrides else None,
    )
    print(out)


if __name__ == "__main__":
    main()
