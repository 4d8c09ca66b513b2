"""Partial rotate-half RoPE: reference against an fp64 rotation oracle, Triton (interpreter) against the reference."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import apply_rotary, apply_rotary_reference

pytest.importorskip("triton")
from engine.kernels.triton_impl.rotary import apply_rotary_triton  # noqa: E402


def _tables(batch: int, seq_len: int, rot: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [batch, L, rot] in the duplicated [f, f] layout from random angles."""
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(batch, seq_len, rot // 2, generator=gen) * 20.0 - 10.0
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _oracle(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairwise 2-D rotation of (c, c + rot/2) in fp64, written out channel by channel."""
    rot = cos.shape[-1]
    half = rot // 2
    xd = x.double()
    out = xd.clone()
    c_tab = cos.double().reshape(cos.shape[0], *([1] * (x.dim() - 3)), cos.shape[1], rot)
    s_tab = sin.double().reshape_as(c_tab)
    for c in range(half):
        lo, hi = xd[..., c], xd[..., c + half]
        out[..., c] = lo * c_tab[..., c] - hi * s_tab[..., c]
        out[..., c + half] = hi * c_tab[..., c + half] + lo * s_tab[..., c + half]
    return out


@pytest.mark.parametrize("rot", [8, 16])
def test_reference_matches_fp64_oracle(rot: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16)
    cos, sin = _tables(2, 5, rot)
    torch.testing.assert_close(apply_rotary_reference(x, cos, sin).double(), _oracle(x, cos, sin))


def test_reference_passthrough_channels_unchanged() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 32, dtype=torch.bfloat16)
    cos, sin = _tables(1, 4, 16)
    out = apply_rotary_reference(x, cos, sin)
    assert torch.equal(out[..., 16:], x[..., 16:])


CASES = [
    # (x shape, table batch, rot)
    ((2, 3, 5, 16), 2, 8),  # partial rotary, per-batch tables
    ((2, 3, 5, 16), 1, 16),  # full rotary, batch-broadcast tables
    ((1, 4, 7, 24), 1, 12),  # rot/2 = 6 and head_dim not powers of two
    ((2, 9, 32), 2, 16),  # no head dim: [B, L, D]
    ((6, 32), 1, 16),  # [L, D]
    ((1, 2, 1, 128), 1, 64),  # decode step at the Ling head shape
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("x_shape", "table_batch", "rot"), CASES)
def test_triton_matches_reference(dtype: torch.dtype, x_shape: tuple[int, ...], table_batch: int, rot: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(x_shape).to(dtype)
    cos, sin = _tables(table_batch, x_shape[-2], rot, seed=3)
    got = apply_rotary_triton(x, cos, sin)
    want = apply_rotary_reference(x, cos, sin)
    assert got.dtype == dtype and got.shape == x.shape
    # Same roundings as torch (products and sum each rounded to x's dtype): expect equality.
    torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)


def test_triton_non_contiguous_input() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 5, 3, 16).transpose(1, 2)  # [B, heads, L, D] view of a [B, L, heads, D] tensor
    cos, sin = _tables(2, 5, 8)
    torch.testing.assert_close(apply_rotary(x, cos, sin, impl="triton"), apply_rotary(x, cos, sin, impl="torch"))


def test_shape_errors() -> None:
    x = torch.randn(1, 2, 4, 16)
    cos, sin = _tables(1, 4, 8)
    with pytest.raises(ValueError):
        apply_rotary(x, cos[:, :3], sin[:, :3])
    odd = torch.ones(1, 4, 7)
    with pytest.raises(ValueError):
        apply_rotary(x, odd, odd)
    wide = torch.ones(1, 4, 32)
    with pytest.raises(ValueError):
        apply_rotary(x, wide, wide)
