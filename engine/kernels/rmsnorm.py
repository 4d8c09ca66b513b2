"""RMSNorm with an optional fused residual add (BailingMoeV2 semantics, spec §2.3).

``h = x`` (or ``x + residual`` in x's dtype, which is also returned as the new residual);
``y = weight * (h.float() * rsqrt(mean(h.float()**2, -1) + eps)).to(h.dtype)``.
The normalisation runs in fp32 and is cast back to the input dtype before the weight multiply.
"""

from __future__ import annotations

from typing import overload

import torch

from . import native
from .dispatch import Impl, use_triton


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch reference (and CPU path) of :func:`rms_norm`."""
    h = x if residual is None else x + residual.to(x.dtype)
    h_fp32 = h.float()
    variance = h_fp32.pow(2).mean(dim=-1, keepdim=True)
    y = weight * (h_fp32 * torch.rsqrt(variance + eps)).to(h.dtype)
    return y if residual is None else (y, h)


@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: None = None, *, impl: Impl = "auto") -> torch.Tensor: ...
@overload
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor, *, impl: Impl = "auto"
) -> tuple[torch.Tensor, torch.Tensor]: ...


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    impl: Impl = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of ``x``; returns ``y`` or ``(y, x + residual)`` when a residual is given."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match last dim of x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    if use_triton(impl, x, weight, residual):
        from .triton_impl.rmsnorm import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    if impl == "auto" and x.device.type == "cpu":  # decode-sized: the native kernel, where it is built
        out = native.rms_norm(x, weight, eps, residual)
        if out is not None:
            return out
    return rms_norm_reference(x, weight, eps, residual)
