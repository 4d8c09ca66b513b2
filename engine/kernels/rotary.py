"""Partial rotate-half rotary embedding (spec §2.4 item 3).

``x`` is ``[B, *heads, L, head_dim]`` (or ``[L, head_dim]`` with B == 1); ``cos``/``sin`` are
``[B or 1, L, rot]`` with per-channel angles in the duplicated ``[f, f]`` layout, broadcast over the
head dims. Channel ``c < rot/2`` pairs with ``c + rot/2``; channels ``>= rot`` pass through. The math
is torch's ``x * cos + rotate_half(x) * sin`` with cos/sin cast to x's dtype.
"""

from __future__ import annotations

import torch

from . import native
from .dispatch import Impl, use_triton


def check_rotary_shapes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Raise ValueError unless x, cos and sin have compatible rotary shapes."""
    if cos.shape != sin.shape or cos.dim() != 3:
        raise ValueError(f"cos/sin must both be [B, L, rot]; got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if x.dim() < 2:
        raise ValueError(f"x must be [..., L, head_dim]; got {tuple(x.shape)}")
    batch, seq_len, rot = cos.shape
    if rot % 2 or rot > x.shape[-1] or rot == 0:
        raise ValueError(f"rotary dim {rot} must be even, positive and <= head_dim {x.shape[-1]}")
    if x.shape[-2] != seq_len:
        raise ValueError(f"x has L={x.shape[-2]} but cos/sin have L={seq_len}")
    x_batch = x.shape[0] if x.dim() >= 3 else 1
    if batch not in (1, x_batch):
        raise ValueError(f"cos/sin batch {batch} does not broadcast to x batch {x_batch}")


def _broadcast_to_x(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a [B, L, rot] table to broadcast against x = [B, *heads, L, head_dim], in x's dtype."""
    batch, seq_len, rot = table.shape
    if x.dim() == 2:
        return table.to(x.dtype).reshape(seq_len, rot)
    head_dims = (1,) * (x.dim() - 3)
    return table.to(x.dtype).reshape(batch, *head_dims, seq_len, rot)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[a, b] -> [-b, a]`` over the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Torch reference (and CPU path) of :func:`apply_rotary`."""
    check_rotary_shapes(x, cos, sin)
    rot = cos.shape[-1]
    cos_x = _broadcast_to_x(cos, x)
    sin_x = _broadcast_to_x(sin, x)
    x_rot = x[..., :rot]
    rotated = x_rot * cos_x + rotate_half(x_rot) * sin_x
    if rot == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rot:]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, impl: Impl = "auto") -> torch.Tensor:
    """Apply partial rotate-half RoPE to ``x`` (a new tensor; x is not modified)."""
    if use_triton(impl, x, cos, sin):
        from .triton_impl.rotary import apply_rotary_triton

        return apply_rotary_triton(x, cos, sin)
    if impl == "auto" and x.device.type == "cpu":  # one position (decode): the native kernel, where it is built
        check_rotary_shapes(x, cos, sin)
        out = native.rotary(x, cos, sin)
        if out is not None:
            return out
    return apply_rotary_reference(x, cos, sin)
