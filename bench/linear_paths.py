"""Every way kiln could compute a model's linears on CPU, timed at decode and prompt-chunk row counts.

`python -m bench.linear_paths [--model DIR] [--rows 1,8,64,256] [--threads 1,2] [--rounds 7]`

Each path runs all the decoder layers' linears (distinct weights per layer, as the model holds
them; lm_head left out: a prompt chunk's logits are its last row's) and reports ms per call of the
whole stack, the fastest of `--rounds` interleaved rounds (a busy neighbour slows a round, never
speeds one up). The engine's own probe (engine_core/cpu_formats.py) times the candidates it can
choose among; this bench also times the ones it does not offer, to say why:
- float32, bfloat16: F.linear at the weight dtype.
- int8-kernel: torch's int8-weight kernel (`_weight_int8pack_mm`), the int8 decode path.
- int8-dequant: weights converted to bf16 per call, bf16 F.linear, output scaled (Int8Linear's path for many rows).
- int8-dequant-w: weights converted and scaled to bf16 per call (w_int8.to(bf16) * scale[:, None]), then F.linear.
- int8-dynamic: activations quantized to int8 per row and an int8 x int8 matmul (`torch._int_mm`):
  not exact to bf16 (per-row activation rounding), timed for comparison only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def paths():
    import torch
    import torch.nn.functional as F

    from engine_core.int8_weights import dequantized_linear, int8_kernel_linear

    def dynamic(x, q, scale):
        x_scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        xq = torch.round(x.float() / x_scale).to(torch.int8)
        return (torch._int_mm(xq, q.t()).float() * x_scale * scale.float()).to(torch.bfloat16)

    return {
        "float32": lambda x32, x16, w: F.linear(x32, w["float32"]),
        "bfloat16": lambda x32, x16, w: F.linear(x16, w["bfloat16"]),
        "int8-kernel": lambda x32, x16, w: int8_kernel_linear(x16, *w["int8"]),
        "int8-dequant": lambda x32, x16, w: dequantized_linear(x16, *w["int8"]),
        "int8-dequant-w": lambda x32, x16, w: F.linear(x16, w["int8"][0].to(torch.bfloat16) * w["int8"][1][:, None]),
        "int8-dynamic": lambda x32, x16, w: dynamic(x16, *w["int8"]),
    }


def layer_weights(shape):
    """Per layer, per linear: the same random weights in every format."""
    import torch

    from engine_core.int8_weights import quantize_rows
    from hardware.profile import decoder_linear_shapes

    generator = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(shape.num_layers):
        layer = []
        for i, o in decoder_linear_shapes(shape):
            w = torch.randn(o, i, generator=generator) * 0.02
            layer.append({"float32": w, "bfloat16": w.bfloat16(), "int8": quantize_rows(w), "in": i})
        layers.append(layer)
    return layers


def stack_seconds(fn, layers, inputs) -> float:
    start = time.perf_counter()
    for layer in layers:
        for w in layer:
            fn(*inputs[w["in"]], w)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.linear_paths", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--rows", default="1,8,64,256")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--paths", default=None, help="comma-separated subset of the paths")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)

    import torch

    from model.shape import shape_from_config
    from model.source import resolve_model

    path = args.model or resolve_model(None).path
    shape = shape_from_config(json.loads((Path(path) / "config.json").read_text()))
    layers = layer_weights(shape)
    chosen = {k: v for k, v in paths().items() if args.paths is None or k in args.paths.split(",")}
    results: dict[str, dict[str, float]] = {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = {}
            for i in {w["in"] for w in layers[0]}:
                x = torch.randn(rows, i)
                inputs[i] = (x, x.bfloat16())
            best = {name: float("inf") for name in chosen}
            for round_ in range(args.rounds + 1):  # round 0 warms up
                for name, fn in chosen.items():
                    seconds = stack_seconds(fn, layers, inputs)
                    if round_:
                        best[name] = min(best[name], seconds)
            key = f"threads {threads}, rows {rows}"
            results[key] = {name: round(s * 1e3, 2) for name, s in best.items()}
            print(f"{key:>20}: " + "  ".join(f"{n} {v:.1f}" for n, v in results[key].items()) + " ms", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"layers": shape.num_layers, "ms": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
