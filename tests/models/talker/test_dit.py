"""The DiT / aggregator blocks at flowmodel / aggregator settings the public fixture does not use
(spec §7.6, §7.7): per-head QK RMSNorm (`qk_norm: "rms_norm"`) and a hidden size the heads do not
divide (q/k/v are heads * (hidden // heads) wide, as upstream's Attention builds them)."""

import math

import pytest
import torch

from engine.models.talker.config import AGGREGATOR_DEFAULTS, DIT_DEFAULTS, DiTConfig
from engine.models.talker.dit import DiT, Aggregator

ATOL = 1e-5


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or name.endswith("_norm.weight") or "norm" in name.split(".")[-2]:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _gptj_rotary(x, n):
    """Adjacent-pair rotary with theta 10000 over positions 0..n-1, written out independently."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(n).float()[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = b * cos + a * sin
    return out


def _reference_block(blk, x, heads, qk_norm):
    """One DiT block by the spec: x += to_out(Attn(RMS1 x)); x += FF(RMS2 x)."""
    h = _rms(x, blk.norm1.weight)
    b, n, _ = h.shape
    hd = x.shape[-1] // heads
    q, k, v = (lin(h).view(b, n, heads, hd).transpose(1, 2) for lin in (blk.attn.to_q, blk.attn.to_k, blk.attn.to_v))
    if qk_norm:
        q, k = _rms(q, blk.attn.q_norm.weight), _rms(k, blk.attn.k_norm.weight)
    q, k = _gptj_rotary(q, n), _gptj_rotary(k, n)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
    x = x + blk.attn.to_out[0](att.transpose(1, 2).reshape(b, n, heads * hd))
    h2 = _rms(x, blk.norm2.weight)
    ff = blk.mlp.ff
    return x + ff[2](torch.nn.functional.gelu(ff[0][0](h2), approximate="tanh"))


def _reference_dit(dit, x, t, c, his, heads, qk_norm):
    half = 128
    f = torch.exp(-torch.arange(half).float() * math.log(10000) / (half - 1))
    arg = 1000 * t[:, None] * f[None]
    temb = dit.t_embedder.time_mlp(torch.cat([arg.sin(), arg.cos()], -1))
    seq = torch.cat([(temb[:, None] + dit.c_embedder.cond_embedder(c)), dit.x_embedder(torch.cat([his, x], 1))], 1)
    for blk in dit.blocks:
        seq = _reference_block(blk, seq, heads, qk_norm)
    return dit.final_layer.linear(_rms(seq, dit.final_layer.norm_final.weight))[:, -x.shape[1]:]


@pytest.mark.parametrize("hidden, heads, qk_norm", [(48, 4, "rms_norm"), (50, 4, None), (44, 3, "rms_norm")])
def test_dit_matches_the_spec_at_other_attention_settings(hidden, heads, qk_norm):
    cfg = DiTConfig.from_dict({"hidden_size": hidden, "num_heads": heads, "depth": 2, "mlp_ratio": 2.0,
                               "llm_cond_dim": 16, "qk_norm": qk_norm}, DIT_DEFAULTS, "flowmodel", condition=True)
    dit = DiT(cfg).eval()
    hd = hidden // heads
    names = dict(dit.state_dict().items())
    assert names["blocks.0.attn.to_q.weight"].shape == (hd * heads, hidden)
    assert names["blocks.0.attn.to_out.0.weight"].shape == (hidden, hd * heads)
    assert ("blocks.0.attn.q_norm.weight" in names) == (qk_norm is not None)
    if qk_norm:
        assert names["blocks.1.attn.k_norm.weight"].shape == (hd,)
    _randomize(dit, 7)
    g = torch.Generator().manual_seed(8)
    x, his = torch.randn(2, 4, 64, generator=g), torch.randn(2, 32, 64, generator=g)
    c, t = torch.randn(2, 1, 16, generator=g), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        got = dit(x, t, c, his)
        want = _reference_dit(dit, x, t, c, his, heads, qk_norm)
    assert got.shape == (2, 4, 64)
    assert (got - want).abs().max() <= ATOL * max(1.0, float(want.abs().max()))


def test_aggregator_with_qk_norm_matches_the_spec():
    cfg = DiTConfig.from_dict({"hidden_size": 40, "num_heads": 4, "depth": 2, "mlp_ratio": 2.0, "qk_norm": "rms_norm"},
                              AGGREGATOR_DEFAULTS, "aggregator", condition=False)
    agg = Aggregator(cfg, 24).eval()
    _randomize(agg, 9)
    x = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        got = agg(x)
        seq = torch.cat([agg.word_embedder.weight[0].expand(3, 1, -1), agg.x_embedder(x)], 1)
        for blk in agg.blocks:
            seq = _reference_block(blk, seq, 4, True)
        want = agg.final_layer.linear(_rms(seq[:, :1], agg.final_layer.norm_final.weight))
    assert got.shape == (3, 1, 24)
    assert (got - want).abs().max() <= ATOL * max(1.0, float(want.abs().max()))


def test_time_embedding_scales_t_in_the_model_dtype():
    """The reference multiplies t by 1000 in t's dtype (bf16 when the talker runs in bf16) and only then
    by the fp32 frequencies: at t' = 0.8046875 (the bf16 sway knot near 0.805) 1000 t rounds to 804
    in bf16, so the first sine is sin(804), not sin(804.6875) (0.69 rad apart)."""
    from engine.models.talker.dit import sinusoidal_time

    t = torch.tensor([0.80491], dtype=torch.bfloat16)
    assert float(t) == 0.8046875
    emb = sinusoidal_time(t)
    assert emb.dtype == torch.float32
    assert abs(float(emb[0, 0]) - math.sin(804.0)) < 1e-5
    assert abs(float(emb[0, 128]) - math.cos(804.0)) < 1e-5
    # fp32 t keeps full precision
    t32 = torch.tensor([0.8046875])
    assert abs(float(sinusoidal_time(t32)[0, 0]) - math.sin(804.6875)) < 1e-4
