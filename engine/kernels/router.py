"""Group-limited sigmoid top-k expert choice of the BailingMoeV2 router (spec §2.6 steps 2-5).

Given router logits [N, E]: ``s = sigmoid(logits)``; selection scores ``s + bias`` (bias [E], or [N, E]
when each row has its own gate, as the MultiRouter's per-token choice of gate does); the E experts
form ``n_group`` consecutive groups, a group's score is the sum of its two best selection scores,
the ``topk_group`` best groups stay; the ``top_k`` best experts of those are chosen (order not
significant); their weights are the **unbiased** s renormalised to sum to one (+1e-20) and scaled.
With ``top_k == 1`` the reference skips the renormalisation (it would make every weight exactly the
scale): the one weight is the unbiased score times the scale, rounded in the logits' dtype.
Selection runs in the logits' dtype (the reference's bf16 router rounds there, spec §2.11); the
weights are fp32.

:func:`route_experts_reference` is the compact torch form (13 ops where the straightforward one has
18: the group mask is one scatter into a -inf/0 row added to the scores, no boolean masks or
expands). It is what every device runs; the result does not depend on the batch a row is in.
"""

from __future__ import annotations

import torch

# Group score = sum of the two largest biased scores of the group (spec §2.6 step 4).
GROUP_SCORE_TOP = 2
# Epsilon of the routing-weight renormalisation (spec §2.6 step 5).
ROUTER_NORM_EPS = 1e-20


def route_experts_reference(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                            scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, top_k] int64, weights [N, top_k] fp32) for router logits [N, E] (see module doc)."""
    scores = torch.sigmoid(logits)
    biased = scores + bias.to(scores.dtype)
    n, e = biased.shape
    grouped = biased.view(n, n_group, e // n_group)
    group_scores = grouped.topk(min(GROUP_SCORE_TOP, grouped.shape[-1]), dim=-1).values.sum(-1)
    keep_groups = group_scores.topk(topk_group, dim=-1).indices
    # 0 for kept groups, -inf for the others: x + 0 is x exactly, x + -inf is -inf (what masked_fill gives).
    group_offset = torch.full_like(group_scores, float("-inf")).scatter_(1, keep_groups, 0.0)
    candidates = (grouped + group_offset.unsqueeze(-1)).view(n, e)
    ids = candidates.topk(top_k, dim=-1, sorted=False).indices
    chosen = scores.gather(1, ids)
    if top_k == 1:  # the reference renormalises only when top_k > 1
        return ids, (chosen * scaling).float()
    chosen = chosen.float()
    weights = chosen / (chosen.sum(dim=-1, keepdim=True) + ROUTER_NORM_EPS) * scaling
    return ids, weights


def route_experts(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                  scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids and weights for each row of ``logits`` (see module doc)."""
    n, e = logits.shape
    if e % n_group or not 0 < topk_group <= n_group or not 0 < top_k <= e:
        raise ValueError(f"router shape: {e} experts, {n_group} groups, keep {topk_group}, top-{top_k}")
    if bias.shape not in ((e,), (n, e)):
        raise ValueError(f"bias must be [{e}] or [{n}, {e}]; got {tuple(bias.shape)}")
    return route_experts_reference(logits, bias, n_group, topk_group, top_k, scaling)
