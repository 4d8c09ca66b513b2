"""RMSNorm: the reference against a hand-computed value, the Triton kernel (interpreter) against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from engine.kernels import rms_norm, rms_norm_reference

pytest.importorskip("triton")
from engine.kernels.triton_impl.rmsnorm import rms_norm_triton  # noqa: E402

EPS = 1e-6
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_reference_matches_hand_computed_value() -> None:
    x = torch.tensor([[3.0, 4.0]])
    weight = torch.tensor([1.0, 2.0])
    rms = math.sqrt((9.0 + 16.0) / 2.0)
    expected = torch.tensor([[3.0 / rms, 2.0 * 4.0 / rms]])
    torch.testing.assert_close(rms_norm_reference(x, weight, 0.0), expected)


def test_reference_rounds_to_input_dtype_before_weight() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    weight = torch.randn(64, dtype=torch.float32)
    y = rms_norm_reference(x, weight, EPS)
    normed = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + EPS)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, weight * normed.to(torch.bfloat16).float())


def test_reference_residual_returns_sum() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    residual = torch.randn(3, 32, dtype=torch.bfloat16)
    weight = torch.rand(32, dtype=torch.bfloat16)
    y, new_residual = rms_norm_reference(x, weight, EPS, residual)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(y, rms_norm_reference(x + residual, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 40), (7, 100)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_matches_reference(dtype: torch.dtype, shape: tuple[int, ...], with_residual: bool) -> None:
    torch.manual_seed(1)
    x = (torch.randn(shape) * 3).to(dtype)
    weight = (torch.rand(shape[-1]) + 0.5).to(dtype)
    residual = torch.randn(shape).to(dtype) if with_residual else None
    got = rms_norm_triton(x, weight, EPS, residual)
    want = rms_norm_reference(x, weight, EPS, residual)
    if with_residual:
        assert isinstance(got, tuple) and isinstance(want, tuple)
        assert torch.equal(got[1], want[1])
        got, want = got[0], want[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want)


def test_triton_fp32_weight_with_bf16_input_promotes_like_torch() -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    weight = torch.rand(48, dtype=torch.float32)
    got = rms_norm_triton(x, weight, EPS)
    want = rms_norm_reference(x, weight, EPS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_dispatch_explicit_impls_agree() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32)
    weight = torch.rand(32)
    torch.testing.assert_close(rms_norm(x, weight, EPS, impl="triton"), rms_norm(x, weight, EPS, impl="torch"))


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        rms_norm(torch.randn(2, 8), torch.ones(7), EPS)
    with pytest.raises(ValueError):
        rms_norm(torch.randn(2, 8), torch.ones(8), EPS, torch.randn(3, 8))


@pytest.mark.parametrize("impl", ["auto", "torch", "triton"])
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (3, 0), (0, 0)])
def test_no_row_or_rows_of_no_width_give_the_empty_result(impl, shape) -> None:
    """An empty batch, or rows of width 0, give the empty result of x's shape on every path (before: the
    native CPU kernel divided by the width, the Triton wrapper could not reshape [-1, 0])."""
    x = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]  # a strided view, as a caller may pass
    weight = torch.rand(shape[-1])
    y = rms_norm(x, weight, EPS, impl=impl)
    y2, h = rms_norm(x, weight, EPS, x.clone(), impl=impl)
    assert y.shape == y2.shape == h.shape == x.shape and y.dtype == x.dtype
