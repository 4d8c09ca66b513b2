"""One token's grouped-query attention over a long KV window, as two batched GEMMs (for GPUs).

A decode step that is a CUDA graph attends over its whole static window with a mask, and torch's fused
attention then takes its memory-efficient kernel, which parallelises over query blocks and heads only:
one token's query heads grouped by KV head give it n_kv thread blocks (4 at the Ming-flash shape), each
walking the whole window. On an H200 that kernel took 29 µs a layer at 586 keys and 93 µs at 2 122 (3 ms
of a 8.7 ms fp8 decode step), for 2 and 4 MB of keys and values. Here the scores are one batched GEMM over
all keys, the softmax one kernel and the weighted sum another GEMM, so the whole GPU reads the window.
Everything is fp32 (scores, softmax, sum) and rounded once to the activation dtype, as the fused kernels
compute it. Shorter windows keep the fused kernel (fewer launches; see ``MIN_KEYS``).
"""

from __future__ import annotations

import torch

MIN_KEYS = 512  # windows from this many keys on take the GEMM path (GPUs)


def applies(q: torch.Tensor, keys: int) -> bool:
    """Whether a one-token step's attention over `keys` slots takes :func:`grouped_decode_attention`."""
    return q.is_cuda and keys >= MIN_KEYS


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of q [B, Hkv, G, D] (the G query heads that share KV head h, one token) over
    k / v [B, Hkv, T, D]; `mask` [B or 1, 1, 1, T] boolean (True: attend) or additive, or None.
    Returns [B, Hkv, G, D] in q's dtype; scale 1/sqrt(D), as scaled_dot_product_attention's default."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    if mask is not None:
        if mask.dtype == torch.bool:  # (the finite minimum: a fully masked row stays finite, as with an additive mask)
            scores.masked_fill_(~mask, torch.finfo(torch.float32).min)
        else:
            scores.add_(mask.float())
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
