"""int4 weight-only linears for CPU: a quarter of bf16's bytes per decode step (plus one bf16 scale and
zero per 32 weights), computed by torch's own int4 CPU kernel (`aten._weight_int4pack_mm_for_cpu`: bf16
activations, 4-bit weights packed by `aten._convert_weight_to_int4pack_for_cpu`, a bf16 scale and zero
per group of 32 input features and output row) for few rows, and by a bf16 matmul over weights
dequantized per call for many.

The kernel computes w = (q - 8) * scale + zero with q in 0..15 (the zero point lives in the float
domain; tests/test_int4_weights.py checks it against a reference). Groups are 32 wide, GGUF's block:
  - a float checkpoint is quantized at load per group, asymmetrically to the group's min and max (as
    GGUF's Q4_1): scale = (max - min) / 15, zero = min + 8 * scale, each row rounded against the scale
    and zero as stored (bf16);
  - a 4-bit GGUF's own codes are loaded unchanged (model/gguf_int4.py): Q4_0 (w = (q - 8) d) is
    scale d, zero 0; Q4_1 (w = q d + m) is scale d, zero m + 8 d; Q4_K (w = d sc q - dmin m per
    32-wide sub-block) is scale d sc, zero 8 d sc - dmin m. Only the scales and zeros round (to bf16,
    a relative 2^-9, as the int8 format's row scales do).
Only the decoder's linears are int4: the LM head, whose rounding every logit sees, is held as int8 rows
(engine_core/int8_weights.py; with 4-bit groups the default model's greedy picks agreed with fp32's at
0.875 of positions against 0.97 with int8 rows, and llama.cpp's Q4 files keep their output matrix at 6-8
bits too), and so is the input embedding, which reads the LM head's rows when the two are tied. Each
float weight is released as its linear is converted, so RAM never holds both. Whether int4 is the
fastest format on a machine is measured (engine_core/cpu_formats.py), never assumed.

The kernel is built for a few rows (its time grows linearly with the rows, like the int8 one), so from
`dequant_from_rows` rows on (measured per machine by the same probe) a call unpacks the weights to bf16,
multiplies, and drops the copy: blocks of at most DEQUANT_BLOCK_ELEMENTS weights, so memory does not
grow. Unpacking needs the kernel's packed layout, which torch picks per CPU capability (AVX-512: 64 rows
per block, AVX2 and others: 32, rows of a short last block in pairs); `packed_layout()` finds which one
this torch uses by packing a probe matrix, and without a match there is no dequantized path (the probe
then does not time one, so no plan asks for it). Compiled graphs (the decode step) always take the kernel.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from engine_core.int8_weights import ACTIVATION_DTYPE, WeightOnlyLinear, as_bias
from planning.cpu_dtype import dequant_from_rows as measured_dequant_from_rows

GROUP_SIZE = 32  # input features per scale and zero: GGUF's block, and it divides every hidden size here
ROW_MULTIPLE = 16  # the kernel packs and computes output rows in blocks of 16, 32, 48 or 64
DEQUANT_BLOCK_ELEMENTS = 1 << 21  # weights dequantized at once (4 MiB of bf16: unpacked, scaled, multiplied)


def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def fits(in_features: int, out_features: int) -> bool:
    """Whether a linear of this shape can be held in int4 (whole groups, whole row blocks)."""
    return in_features % GROUP_SIZE == 0 and out_features % ROW_MULTIPLE == 0


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 (out, in) in 0..15, scale, zero (out, in / GROUP_SIZE) in bf16) with
    weight ≈ (q - 8) * scale + zero per group, within half a step: asymmetric to each group's min and max."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(ACTIVATION_DTYPE)
    zero = (lo + 8 * scale.float()).to(ACTIVATION_DTYPE)
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15).to(torch.uint8)
    return q.reshape(out_features, in_features), scale, zero


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float32 weight (q - 8) * scale + zero that q, scale, zero stand for (the kernel's convention)."""
    out_features, in_features = q.shape
    groups = q.float().reshape(out_features, -1, GROUP_SIZE) - 8
    return (groups * scale.float()[..., None] + zero.float()[..., None]).reshape(out_features, in_features)


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weights in the kernel's layout (out, in / 2) uint8, scales_and_zeros (in / GROUP_SIZE, out, 2))."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).to(ACTIVATION_DTYPE).transpose(0, 1).contiguous()
    return packed, scales_and_zeros


def int4_kernel_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x (rows, in) bf16 @ W.T by torch's int4 kernel: fastest for a few rows."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, scales_and_zeros)


# ---------------------------------------------------------------- the kernel's packed layout, for dequantizing


def _codes_into(packed: torch.Tensor, block: int, split: bool, out: torch.Tensor, centered: bool) -> None:
    """Write the codes in `packed` (rows, in / 2), stored in one of the kernel's layouts, into `out` (in, rows),
    transposed: q, or q - 8 when `centered` (out then a float dtype). The layouts: rows in blocks of `block`,
    each block stored input-feature-major as (in, block / 2) bytes; in a whole block (`split`) byte j holds
    row j (low nibble) and row j + block / 2 (high), in a short last block (and in every block when not
    `split`) rows 2j and 2j + 1."""
    rows, half = packed.shape
    in_features = 2 * half
    full = rows // block * block

    def put(dst: torch.Tensor, nibbles: torch.Tensor) -> None:
        dst.copy_(nibbles.sub_(8).view(torch.int8) if centered else nibbles)  # uint8 q - 8 wraps: int8's bits

    if full:
        b = packed[:full].view(full // block, in_features, block // 2).permute(1, 0, 2)
        o = out[:, :full].view(in_features, full // block, block)
        if split:
            low, high = o[..., : block // 2], o[..., block // 2 :]
        else:
            pairs = o.view(in_features, full // block, block // 2, 2)
            low, high = pairs[..., 0], pairs[..., 1]
        put(low, b & 15)
        put(high, b >> 4)
    if rows > full:
        b = packed[full:].view(in_features, (rows - full) // 2)
        pairs = out[:, full:].view(in_features, (rows - full) // 2, 2)
        put(pairs[..., 0], b & 15)
        put(pairs[..., 1], b >> 4)


def _unpack(packed: torch.Tensor, block: int, split: bool) -> torch.Tensor:
    """q (rows, in) uint8 from `packed` read in the layout (block, split)."""
    out = torch.empty(packed.shape[1] * 2, packed.shape[0], dtype=torch.uint8)
    _codes_into(packed, block, split, out, centered=False)
    return out.t()


LAYOUTS = ((64, True), (32, True), (32, False))  # AVX-512, AVX2, no vector unit (see _codes_into)


@functools.cache
def packed_layout() -> tuple[int, bool] | None:
    """The layout this torch packs in (from LAYOUTS), found by packing probe matrices (a whole number of
    blocks and a short last block) and unpacking each way; None when none matches."""
    if not kernel_available():
        return None
    gen = torch.Generator().manual_seed(0)
    probes = [torch.randint(0, 16, (rows, 64), generator=gen, dtype=torch.int32) for rows in (128, 176)]
    packed = [(p, torch.ops.aten._convert_weight_to_int4pack_for_cpu(p, 1)) for p in probes]
    for layout in LAYOUTS:
        try:
            if all(torch.equal(_unpack(b, *layout).to(torch.int32), p) for p, b in packed):
                return layout
        except RuntimeError:  # a shape this layout cannot read: not this one
            continue
    return None


def dequantize_transposed(packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """W.T (in, rows) in bf16, the weight the kernel computes with, from its packed form: the codes written
    straight into their transposed places as q - 8, then * scale + zero per group in one pass (needs
    packed_layout()). About 0.6 ns a weight on one core (2023 Xeon), so a call pays roughly a 100-row
    bf16 matmul's time to unpack: the probe measures from how many rows it is worth it."""
    layout = packed_layout()
    if layout is None:
        raise RuntimeError("this torch packs int4 weights in a layout kiln cannot read")
    rows, in_features = packed.shape[0], packed.shape[1] * 2
    wt = torch.empty(in_features, rows, dtype=ACTIVATION_DTYPE)
    _codes_into(packed, *layout, wt, centered=True)
    scale = scales_and_zeros[..., 0].contiguous().unsqueeze(1)  # (groups, 1, rows): contiguous broadcasts fast
    zero = scales_and_zeros[..., 1].contiguous().unsqueeze(1)
    groups = wt.view(in_features // GROUP_SIZE, GROUP_SIZE, rows)
    torch.addcmul(zero, groups, scale, out=groups)  # one pass, one rounding (computed in fp32)
    return wt


def dequantized_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The same product as int4_kernel_linear through a bf16 matmul, weights unpacked to bf16 per call in blocks
    of whole packed row blocks (so the transient copy stays small and cache-warm). Fastest for many rows."""
    block = packed_layout()[0]
    rows, in_features = packed.shape[0], packed.shape[1] * 2
    step = max(block, DEQUANT_BLOCK_ELEMENTS // in_features // block * block)
    outs = [
        x @ dequantize_transposed(packed[start : start + step], scales_and_zeros[:, start : start + step])
        for start in range(0, rows, step)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


# ---------------------------------------------------------------- the layer


class Int4Linear(WeightOnlyLinear):
    """A drop-in for nn.Linear at inference: same in/out features and bias, int4 weights in groups of 32.

    `dequant_from_rows`: calls with at least this many rows go through dequantized_linear (None: never)."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
        dequant_from_rows: int | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        if not fits(self.in_features, self.out_features):
            shape = (self.in_features, self.out_features)
            raise ValueError(f"int4 needs in % {GROUP_SIZE} == 0 and out % {ROW_MULTIPLE} == 0: {shape}")
        self.dequant_from_rows = dequant_from_rows if packed_layout() is not None else None
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = as_bias(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dequant_from_rows: int | None = None) -> Int4Linear:
        """`linear` quantized per group of 32 (quantize_groups)."""
        weight = linear.weight.detach()
        return cls(
            *_in_row_blocks(lambda a, b: pack(*quantize_groups(weight[a:b])), weight.shape[0]),
            linear.bias,
            dequant_from_rows,
        )

    @classmethod
    def from_codes(
        cls, q, scale, zero, bias: torch.Tensor | None = None, dequant_from_rows: int | None = None
    ) -> Int4Linear:
        """From codes q (out, in) in 0..15 and per-group scale and zero (out, in / 32), e.g. a GGUF's."""
        q, scale, zero = (torch.as_tensor(t) for t in (q, scale, zero))
        return cls(
            *_in_row_blocks(lambda a, b: pack(q[a:b], scale[a:b], zero[a:b]), q.shape[0]), bias, dequant_from_rows
        )

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return int4_kernel_linear(rows, self.weight_int4, self.scales_and_zeros)

    def _dequantized(self, rows: torch.Tensor) -> torch.Tensor:
        return dequantized_linear(rows, self.weight_int4, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={GROUP_SIZE}"


PACK_ROWS = 1024  # rows quantized and packed at once: a multiple of every packed row block, so the parts join


def _in_row_blocks(pack_rows, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_rows(start, end) over blocks of PACK_ROWS rows, joined: a large LM head never holds a float32 or
    int32 copy of itself whole (packing blocks of whole packed row blocks gives the same bytes as packing all)."""
    parts = [pack_rows(start, min(rows, start + PACK_ROWS)) for start in range(0, rows, PACK_ROWS)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p for p, _ in parts]), torch.cat([sz for _, sz in parts], dim=1)


class Int8Embedding(nn.Module):
    """An input embedding held as int8 rows with one bf16 scale each (engine_core/int8_weights.py's format): a
    lookup gathers the rows and scales them. A tied model's LM head, held in that same format, lends it its
    tensors, so one int8 copy serves both."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.padding_idx = padding_idx
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[ids].to(ACTIVATION_DTYPE) * self.scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_linears(model: nn.Module, cpu_format_ms: dict[str, float] | None = None, exact=None) -> str:
    """The int4 format, in place: every nn.Linear of the decoder layers becomes an Int4Linear; the LM head, one
    matrix whose rounding every logit sees (llama.cpp's Q4 files keep it at 6 or 8 bits too), and the input
    embedding become int8 rows (engine_core/int8_weights.py; one copy for both when tied); norms stay bf16.
    Each float weight is released as soon as it is replaced, so RAM never holds both. Returns a line for the log.

    `cpu_format_ms` (the plan's probe timings) says from how many rows a call is dequantized to bf16. `exact`:
    {linear name: (q, scale, zero)} read from a 4-bit GGUF (model/gguf_int4.py), used instead of quantizing
    that linear's float weight (the LM head's too, when the GGUF holds it in 4 bits). A linear whose shape the
    kernel cannot take stays as it is."""
    from engine_core import int8_weights

    ms, exact = cpu_format_ms or {}, exact or {}
    dequant_from_rows = measured_dequant_from_rows(ms, "int4")
    before = _held_bytes(model)
    head, embedding = _embeddings(model)
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    from_gguf, kept = 0, []
    for name in [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        linear = model.get_submodule(name)
        codes = exact[name] if name in exact else None
        if codes is not None and tuple(codes[0].shape) != (linear.out_features, linear.in_features):
            codes = None
        if not fits(linear.in_features, linear.out_features):
            kept.append(name)
            continue
        if codes is not None:
            layer = Int4Linear.from_codes(*codes, linear.bias, dequant_from_rows)
            from_gguf += 1
        elif name == head_name and int8_weights.kernel_available():
            layer = int8_weights.Int8Linear(linear, measured_dequant_from_rows(ms, "int8"))
        else:
            layer = Int4Linear.from_linear(linear, dequant_from_rows)
        _swap(model, name, layer)
        del linear  # the float weight goes now (a tied LM head's with the embedding, below)
    new_head = model.get_submodule(head_name) if head_name is not None else None
    table = ""
    if embedding is not None:
        if tied and isinstance(new_head, int8_weights.Int8Linear):
            model.set_input_embeddings(Int8Embedding(new_head.weight_int8, new_head.scale, embedding.padding_idx))
            table = "; the input embedding reads the LM head's int8 rows (tied)"
        elif not tied or new_head is not head:
            model.set_input_embeddings(
                Int8Embedding(*int8_weights.quantize_rows(embedding.weight), embedding.padding_idx)
            )
            table = "; the input embedding in int8 rows"
        del embedding
    prompt = (
        f"calls of {dequant_from_rows}+ rows dequantized to bf16 (measured faster)"
        if dequant_from_rows is not None
        else "every call through the int4 kernel"
    )
    int4 = sum(isinstance(m, Int4Linear) for m in model.modules())
    source = f", {from_gguf} with the GGUF's own 4-bit codes" if from_gguf else ""
    head_kind = (
        ""
        if new_head is None
        else ", the LM head in int8 rows"
        if isinstance(new_head, int8_weights.Int8Linear)
        else f", the LM head as {type(new_head).__name__}"
    )
    left = f"; left unquantized (shape): {', '.join(kept)}" if kept else ""
    saved = (before - _held_bytes(model)) / 2**20
    return (
        f"int4 weights: {int4} linears in groups of {GROUP_SIZE}{source}{head_kind}{table}; {saved:.0f} MiB less "
        f"held; {prompt}{left}"
    )


def _embeddings(model: nn.Module) -> tuple[nn.Linear | None, nn.Embedding | None]:
    """(the LM head, the input embedding) of a transformers model, each None where it is something else (a
    subclass of nn.Embedding, e.g. gemma's scaled one, does more than a lookup and is kept)."""
    heads = getattr(model, "get_output_embeddings", None)
    tables = getattr(model, "get_input_embeddings", None)
    head = heads() if callable(heads) else None
    table = tables() if callable(tables) else None
    return (head if isinstance(head, nn.Linear) else None, table if type(table) is nn.Embedding else None)


def _held_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors, each storage once (tied weights share one)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
