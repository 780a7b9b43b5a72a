#!/usr/bin/env bash
# The one command a borrowed GPU machine runs: install the carried wheels, say what the machine is,
# run every GPU check (python -m bench.gpu), leave the report in OUTDIR.
#   bash bench/gpu_check.sh OUTDIR [extra bench.gpu flags, e.g. --only sc2-3b-bf16 --budget-s 200]
# Expects .whl/*.whl (pyzmq, msgspec, bitsandbytes, gguf, aiohttp-sse: the machine has no network)
# and .gpu-carry/tokenizer (python -m bench.gpu prepare .gpu-carry/tokenizer, run beforehand).
set -u
OUTDIR="${1:?usage: bench/gpu_check.sh OUTDIR [bench.gpu flags]}"
shift
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    start=$(date +%s)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && echo "wheels installed into /tmp/site in $(( $(date +%s) - start )) s"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi || echo "nvidia-smi failed"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "| transformers", transformers.__version__)'
python3 -c 'import zmq, msgspec, bitsandbytes; print("pyzmq", zmq.__version__, "msgspec", msgspec.__version__, "bitsandbytes", bitsandbytes.__version__)' \
    || echo "a carried wheel does not import"

TOKENIZER=.gpu-carry/tokenizer
[ -f "$TOKENIZER/tokenizer.json" ] || { echo "missing $TOKENIZER/tokenizer.json (run: python -m bench.gpu prepare $TOKENIZER)"; TOKENIZER=""; }
python3 -m bench.gpu "$OUTDIR" ${TOKENIZER:+--tokenizer "$TOKENIZER"} "$@"
code=$?
echo "bench.gpu exit $code"
ls -la "$OUTDIR"
exit $code
