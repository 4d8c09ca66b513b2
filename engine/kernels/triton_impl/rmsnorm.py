"""Triton RMSNorm kernel (one program per row) with an optional fused residual add."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import interpreting, round_to


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    y_ptr,
    new_residual_ptr,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    EMULATE_BF16_RTNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offsets = row * n_cols + cols
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
        # torch adds in fp32 and rounds once to x's dtype
        h = round_to(x.to(tl.float32) + r.to(tl.float32), x.dtype, EMULATE_BF16_RTNE)
        tl.store(new_residual_ptr + offsets, h, mask=mask)
    else:
        h = x
    h32 = h.to(tl.float32)
    variance = tl.sum(h32 * h32, axis=0) / n_cols
    normed = round_to(h32 * tl.math.rsqrt(variance + eps), h.dtype, EMULATE_BF16_RTNE)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + offsets, round_to(y, y_ptr.dtype.element_ty, EMULATE_BF16_RTNE), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`engine.kernels.rms_norm` (same arguments and results)."""
    n_cols = x.shape[-1]
    n_rows = math.prod(x.shape[:-1])  # (not reshape(-1, ...): ambiguous for rows of width 0)
    x2d = x.reshape(n_rows, n_cols).contiguous()
    out_dtype = torch.result_type(weight, x)
    y = torch.empty(x2d.shape, dtype=out_dtype, device=x.device)
    if residual is not None:
        residual2d = residual.to(x.dtype).reshape(n_rows, n_cols).contiguous()
        new_residual = torch.empty_like(x2d)
    else:
        residual2d = x2d
        new_residual = x2d
    if x2d.numel() > 0:  # no row, or rows of no width: the empty result
        _rms_norm_kernel[(n_rows,)](
            x2d,
            residual2d,
            weight.contiguous(),
            y,
            new_residual,
            n_cols,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(n_cols),
            EMULATE_BF16_RTNE=interpreting(),
        )
    y = y.reshape(x.shape)
    if residual is None:
        return y
    return y, new_residual.reshape(x.shape)
