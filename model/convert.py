"""One-time conversion of a GGUF checkpoint into an HF folder (safetensors + tokenizer).

transformers dequantizes GGUF tensors on load (about 20 s for the 135M default here); saving the
result means every later start is a plain safetensors load. Written to a temporary folder and
renamed, so an interrupted conversion never leaves a half folder that looks complete.
Usage: python -m model.convert FILE.gguf OUT_FOLDER
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path


def stage(what: str) -> None:
    """Tell the parent (model.source.convert_gguf reads our stdout) which step runs now."""
    print(f"stage: {what}", flush=True)


def convert(gguf: Path, out: Path) -> None:
    stage("importing transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    stage("dequantizing tensors")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized now; drop the GGUF marker so save_pretrained accepts them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    stage("writing safetensors")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
        # another process finished the same conversion first: its copy is as good as ours
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
