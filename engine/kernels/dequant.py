"""Weight-only quantised formats of the routed experts, as the kernels read them.

A quantised matrix ``W [out, in]`` is stored as values ``q`` plus fp32 scales ``s`` with
``W[o, i] ≈ value(q)[o, i] · s[o // block_out, i // block_in]``:

=============  ===========================  ===================  ==========================
format         q                             scale                (block_out, block_in)
=============  ===========================  ===================  ==========================
fp8            float8_e4m3fn [out, in]       [out]                (1, in): per output channel
fp8 (blocks)   float8_e4m3fn [out, in]       [⌈out/128⌉, ⌈in/128⌉] (128, 128)
int8           int8 [out, in]                [out]                (1, in)
int4 (w4a16)   uint8 [out, in/2]             [out, in/group]      (1, group)
=============  ===========================  ===================  ==========================

int4 values are signed, in [-8, 7], stored with an offset of 8 as unsigned nibbles, two per byte
along the input dimension: byte ``j`` of a row holds column ``2j`` in its low nibble and ``2j + 1``
in its high nibble. The group size is ``in / scale.shape[-1]`` (it divides ``in``).

:func:`dequantize` is the one definition of these formats: the torch reference computes with
``dequantize(q, s, x.dtype)`` (fp32 product, then one rounding to the activation dtype), and the
Triton kernel (``triton_impl.moe``) and the CPU kernels are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import native

FP8_BLOCK = 128  # rows and columns sharing one scale in the block-scaled fp8 format
INT4_OFFSET = 8  # stored nibble = value + 8
INT4_MIN, INT4_MAX = -8, 7
NIBBLE_BITS = 4
NIBBLE_MASK = 0xF


@dataclass(frozen=True)
class ScaleLayout:
    """How a scale tensor maps onto its matrix: one scale per (block_out x block_in) block."""

    block_out: int
    block_in: int
    packed_int4: bool

    @property
    def per_channel(self) -> bool:
        return self.block_out == 1 and not self.packed_int4 and self.block_in <= 0


def matrix_in_features(q: torch.Tensor) -> int:
    """Logical input width of a stored matrix (int4 holds two columns per byte)."""
    return q.shape[-1] * 2 if q.dtype == torch.uint8 else q.shape[-1]


def scale_layout(q: torch.Tensor, scale: torch.Tensor) -> ScaleLayout:
    """The block structure of (q, scale), from their dtypes and shapes (see the module table).
    ``block_in`` is 0 for per-channel scales (the whole row)."""
    if q.dtype == torch.uint8:
        if scale.dim() != q.dim() or scale.shape[:-1] != q.shape[:-1]:
            raise ValueError(f"int4 scales must be [..., out, groups]; got {tuple(scale.shape)} for q {tuple(q.shape)}")
        cols = matrix_in_features(q)
        if cols % scale.shape[-1]:
            raise ValueError(f"int4 group count {scale.shape[-1]} does not divide the {cols} input columns")
        return ScaleLayout(1, cols // scale.shape[-1], True)
    if scale.dim() == q.dim() - 1:
        if scale.shape != q.shape[:-1]:
            raise ValueError(f"per-channel scales must be [..., out]; got {tuple(scale.shape)} for q {tuple(q.shape)}")
        return ScaleLayout(1, 0, False)
    out, cols = q.shape[-2:]
    expected = (-(-out // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if scale.dim() != q.dim() or tuple(scale.shape[-2:]) != expected:
        raise ValueError(f"block scales of a [{out}, {cols}] matrix must be [..., {expected[0]}, {expected[1]}]; "
                         f"got {tuple(scale.shape)}")
    return ScaleLayout(FP8_BLOCK, FP8_BLOCK, False)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Signed int4 values [..., in] (any integer dtype, in [-8, 7], ``in`` even) -> uint8 [..., in/2]."""
    if values.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {values.shape[-1]}")
    nib = (values.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << NIBBLE_BITS)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> signed int8 values [..., 2n] (inverse of :func:`pack_int4`)."""
    low = (packed & NIBBLE_MASK).to(torch.int8) - INT4_OFFSET
    high = (packed >> NIBBLE_BITS).to(torch.int8) - INT4_OFFSET
    return torch.stack((low, high), dim=-1).flatten(-2)


def expand_scales(scale: torch.Tensor, layout: ScaleLayout, out: int, cols: int) -> torch.Tensor:
    """Scales broadcast to [..., out, cols] (fp32)."""
    s = scale.float()
    if layout.block_in == 0:
        return s.unsqueeze(-1).expand(*s.shape, cols)
    s = s.repeat_interleave(layout.block_in, dim=-1)[..., :cols]
    if layout.block_out > 1:
        s = s.repeat_interleave(layout.block_out, dim=-2)[..., :out, :]
    return s


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored (q, scale) -> W = value(q) · scale computed in fp32, then rounded once to ``dtype``."""
    layout = scale_layout(q, scale)
    values = unpack_int4(q) if layout.packed_int4 else q
    out, cols = values.shape[-2:]
    return (values.to(torch.float32) * expand_scales(scale, layout, out, cols)).to(dtype)


INT8_MAX = 127.0


def check_input_columns(w: torch.Tensor) -> None:
    """Raise ValueError for a weight no quantised format can store: no input columns (its last dimension is 0,
    or it has none), which leaves nothing for a per-row or per-group scale to measure."""
    if w.dim() == 0 or w.shape[-1] == 0:
        raise ValueError(f"cannot quantise a weight of shape {tuple(w.shape)}: it has no input columns")


# Rows quantised at a time (quantize_int8_rows, engine.placement.quant.quantize_int4_rows): their fp32
# temporaries stay at a few times QUANT_ROW_BLOCK x in x 4 bytes (4 MB at the real width), within the CPU's
# caches: 3.6x the rate of 4096-row blocks for int8 (614 vs 169 M weights/s here; the real lm_head,
# [157184, 4096], would take ~8 GB of them in one go).
QUANT_ROW_BLOCK = 256


def quantize_int8_rows(w: torch.Tensor, reference: bool = False,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per row: W [..., out, in] -> (q int8, scale [..., out]);
    scale = amax_row / 127 (1 for an all-zero row), q = round(W / scale), computed QUANT_ROW_BLOCK rows at a
    time (each row on its own: the same result in one go). Non-finite weights are rejected. An fp32 or bf16
    CPU weight is quantised by the native quantiser where it is built (engine.kernels.native.quantize_rows,
    the same values several times faster); ``reference`` True: by these torch ops, the definition. ``out``
    (q, scale of those shapes): the result written there (a load's parameters: no second copy)."""
    check_input_columns(w)
    if not reference:
        done = native.quantize_rows(w, out=out)
        if done is not None:
            return done
    rows = w.reshape(-1, w.shape[-1])
    q = torch.empty(rows.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=w.device)
    for r0 in range(0, rows.shape[0], QUANT_ROW_BLOCK):
        block = rows[r0:r0 + QUANT_ROW_BLOCK].float()
        amax = block.abs().amax(dim=-1)
        if not bool(torch.isfinite(amax).all()):
            raise ValueError("cannot quantise a weight with non-finite values")
        s = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
        q[r0:r0 + QUANT_ROW_BLOCK] = torch.round(block / s.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        scale[r0:r0 + QUANT_ROW_BLOCK] = s
    return quantized_into(out, q.reshape(w.shape), scale.reshape(w.shape[:-1]))


def quantized_into(out: tuple[torch.Tensor, torch.Tensor] | None, q: torch.Tensor, scale: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale), or copied into `out` (a quantiser's destination) and `out` returned when given."""
    if out is None:
        return q, scale
    out[0].copy_(q)
    out[1].copy_(scale)
    return out
