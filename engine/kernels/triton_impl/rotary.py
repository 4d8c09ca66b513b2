"""Triton partial rotate-half rotary kernel; each program handles a block of (batch, head, position) rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rotary import check_rotary_shapes
from .common import interpreting, round_to

ROWS_PER_PROGRAM = 16


@triton.jit
def _load_table(table_ptr, table_row, channels, mask, dtype: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    """Load cos or sin at ``channels`` of each row, rounded to ``dtype`` and returned as fp32."""
    values = tl.load(table_ptr + table_row[:, None] + channels[None, :], mask=mask, other=0.0)
    return round_to(values.to(tl.float32), dtype, EMULATE_BF16_RTNE).to(tl.float32)


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    n_rows,
    rows_per_batch,
    seq_len,
    head_dim,
    table_batch_stride,
    HALF: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    EMULATE_BF16_RTNE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    pos = rows64 % seq_len
    batch = rows64 // rows_per_batch
    table_row = batch * table_batch_stride + pos * (2 * HALF)
    x_row = rows64 * head_dim

    c = tl.arange(0, BLOCK_HALF)
    m = row_mask[:, None] & (c < HALF)[None, :]
    x_lo = tl.load(x_ptr + x_row[:, None] + c[None, :], mask=m, other=0.0)
    x_hi = tl.load(x_ptr + x_row[:, None] + HALF + c[None, :], mask=m, other=0.0)
    dtype = x_lo.dtype
    x_lo32 = x_lo.to(tl.float32)
    x_hi32 = x_hi.to(tl.float32)
    # cos/sin are cast to x's dtype first, as in torch.
    cos_lo = _load_table(cos_ptr, table_row, c, m, dtype, EMULATE_BF16_RTNE)
    cos_hi = _load_table(cos_ptr, table_row, HALF + c, m, dtype, EMULATE_BF16_RTNE)
    sin_lo = _load_table(sin_ptr, table_row, c, m, dtype, EMULATE_BF16_RTNE)
    sin_hi = _load_table(sin_ptr, table_row, HALF + c, m, dtype, EMULATE_BF16_RTNE)
    # Round each product and the sum to x's dtype, as torch's x*cos + rotate_half(x)*sin does.
    a_lo = round_to(x_lo32 * cos_lo, dtype, EMULATE_BF16_RTNE).to(tl.float32)
    b_lo = round_to(x_hi32 * sin_lo, dtype, EMULATE_BF16_RTNE).to(tl.float32)
    out_lo = round_to(a_lo - b_lo, dtype, EMULATE_BF16_RTNE)
    a_hi = round_to(x_hi32 * cos_hi, dtype, EMULATE_BF16_RTNE).to(tl.float32)
    b_hi = round_to(x_lo32 * sin_hi, dtype, EMULATE_BF16_RTNE).to(tl.float32)
    out_hi = round_to(a_hi + b_hi, dtype, EMULATE_BF16_RTNE)
    tl.store(out_ptr + x_row[:, None] + c[None, :], out_lo, mask=m)
    tl.store(out_ptr + x_row[:, None] + HALF + c[None, :], out_hi, mask=m)

    p = 2 * HALF + tl.arange(0, BLOCK_PASS)
    pm = row_mask[:, None] & (p < head_dim)[None, :]
    x_pass = tl.load(x_ptr + x_row[:, None] + p[None, :], mask=pm, other=0.0)
    tl.store(out_ptr + x_row[:, None] + p[None, :], x_pass, mask=pm)


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton implementation of :func:`engine.kernels.apply_rotary` (same arguments and result)."""
    check_rotary_shapes(x, cos, sin)
    table_batch, seq_len, rot = cos.shape
    head_dim = x.shape[-1]
    x_c = x.contiguous()
    out = torch.empty_like(x_c)
    n_rows = x_c.numel() // head_dim
    x_batch = x.shape[0] if x.dim() >= 3 else 1
    rows_per_batch = n_rows // x_batch
    if n_rows == 0:
        return out
    grid = (triton.cdiv(n_rows, ROWS_PER_PROGRAM),)
    _rotary_kernel[grid](
        x_c,
        cos.contiguous(),
        sin.contiguous(),
        out,
        n_rows,
        rows_per_batch,
        seq_len,
        head_dim,
        0 if table_batch == 1 else seq_len * rot,
        HALF=rot // 2,
        BLOCK_ROWS=ROWS_PER_PROGRAM,
        BLOCK_HALF=triton.next_power_of_2(rot // 2),
        BLOCK_PASS=triton.next_power_of_2(max(head_dim - rot, 1)),
        EMULATE_BF16_RTNE=interpreting(),
    )
    return out
