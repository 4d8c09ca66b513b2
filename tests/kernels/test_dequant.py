"""Row-wise int8 quantisation (engine.kernels.dequant.quantize_int8_rows), done a block of rows at a time."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import dequant
from engine.kernels.dequant import INT8_MAX, quantize_int8_rows


def _in_one_go(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    amax = w.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return torch.round(w / scale.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


@pytest.mark.parametrize("shape", [(1000, 48), (3, 50, 16), (7,), (0, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_of_rows_give_what_one_pass_gives(shape, dtype, monkeypatch):
    """Each row is quantised on its own, so blocks of rows (bounded fp32 temporaries: the real lm_head would
    need ~8 GB of them in one pass) give what one pass gives: the same elementwise operations on the same
    rows (a tolerance all the same: scales within 1e-6, values within one step)."""
    monkeypatch.setattr(dequant, "QUANT_ROW_BLOCK", 7)
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    if w.dim() > 1 and w.numel():
        w.reshape(-1, shape[-1])[2] = 0  # an all-zero row: scale 1
    q, scale = quantize_int8_rows(w)
    q_ref, scale_ref = _in_one_go(w)
    assert q.shape == w.shape and scale.shape == w.shape[:-1] and q.dtype == torch.int8
    assert (q.int() - q_ref.int()).abs().max().item() <= 1 if q.numel() else True
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    if q.numel():  # not a block shifted by a row: the values agree almost everywhere
        assert (q != q_ref).float().mean().item() < 1e-3


def test_a_non_finite_weight_in_a_later_block_is_refused(monkeypatch):
    monkeypatch.setattr(dequant, "QUANT_ROW_BLOCK", 4)
    w = torch.randn(20, 8)
    w[17, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int8_rows(w)
