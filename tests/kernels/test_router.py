"""The compact router (engine.kernels.router) against the straightforward form of spec §2.6, exactly,
including bf16 scores with many ties."""

import pytest
import torch

from engine.kernels.router import ROUTER_NORM_EPS, route_experts


def straightforward(logits, bias, n_group, topk_group, top_k, scaling):
    scores = torch.sigmoid(logits)
    biased = scores + bias.to(scores.dtype)
    n, e = biased.shape
    grouped = biased.view(n, n_group, e // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    keep = group_scores.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros(n, n_group, dtype=torch.bool).scatter_(1, keep, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(n, e)
    ids = biased.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1, sorted=False).indices
    chosen = scores.gather(1, ids)
    weights = chosen.float() / (chosen.float().sum(-1, keepdim=True) + ROUTER_NORM_EPS) * scaling
    return ids, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row_bias", [False, True])
def test_compact_router_equals_the_straightforward_form(dtype, per_row_bias):
    g = torch.Generator().manual_seed(0)
    n, e = 300, 64
    logits = (torch.randn(n, e, generator=g) * 3).to(dtype)
    logits[:50] = logits[:50].round()  # exact ties in scores and group sums
    bias = (torch.rand(n, e, generator=g) * 0.3 - 0.15) if per_row_bias else torch.rand(e, generator=g) * 0.3 - 0.15
    got = route_experts(logits, bias, 8, 4, 6, 2.5)
    want = straightforward(logits, bias, 8, 4, 6, 2.5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1].dtype == torch.float32
    torch.testing.assert_close(got[1].sum(-1), torch.full((n,), 2.5), atol=1e-5, rtol=0)


def test_router_shapes_are_checked():
    with pytest.raises(ValueError, match="router shape"):
        route_experts(torch.zeros(2, 10), torch.zeros(10), 4, 2, 2, 1.0)
    with pytest.raises(ValueError, match="bias"):
        route_experts(torch.zeros(2, 8), torch.zeros(3, 8), 4, 2, 2, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_1_routing_keeps_the_unbiased_score_times_the_scale(dtype):
    """The reference renormalises the chosen scores only when top_k > 1 (a held-out config with
    num_experts_per_tok = 1 broke here: every weight came out exactly the scale, 2.5)."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(40, 16, generator=g) * 2).to(dtype)
    bias = torch.rand(16, generator=g) * 0.3 - 0.15
    ids, weights = route_experts(logits, bias, 4, 2, 1, 2.5)
    scores = torch.sigmoid(logits)
    assert torch.equal(ids, straightforward(logits, bias, 4, 2, 1, 2.5)[0])
    want = (scores.gather(1, ids) * 2.5).float()
    assert weights.dtype == torch.float32 and torch.equal(weights, want)
    assert (weights < 2.5).all()
