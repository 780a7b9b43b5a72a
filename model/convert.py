"""One-time conversion of a GGUF checkpoint into an HF folder (safetensors + tokenizer).

transformers dequantizes GGUF tensors on load (about 20 s for the 135M default here); saving the
result means every later start is a plain safetensors load. The 4-bit linears' own codes are saved
beside it (model/gguf_int4.py), so a plan that picks kiln's int4 format runs them unwidened. Written
to a temporary folder and renamed, so an interrupted conversion never leaves a half folder that looks
complete.
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


def keep_int4_codes(gguf: Path, model, folder: Path) -> str:
    """The GGUF's 4-bit codes into `folder` for kiln's int4 format; a failure costs only that (the int4 format
    then quantizes the float weights), never the conversion."""
    from model.gguf_int4 import write_int4_codes

    try:
        return write_int4_codes(gguf, model, folder)
    except Exception as exc:  # an architecture gguf-py or transformers map differently: widened, as before
        return (
            f"4-bit codes not kept ({type(exc).__name__}: {exc!s:.200}): int4, when chosen, quantizes the float weights"
        )


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
        stage("keeping the 4-bit codes")
        print(f"kiln: {keep_int4_codes(gguf, model, tmp)}", file=sys.stderr, flush=True)
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
