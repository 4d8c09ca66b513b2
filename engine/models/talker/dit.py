"""The talker's two DiT stacks, named like the checkpoint (spec §7.6, §7.7):

  * `DiT` (`cfm.model.*`): the flow-matching velocity network over [cond token, 32 history latents,
    4 current latents], no adaLN: the condition enters only through the prepended token;
  * `Aggregator` (`aggregator.*`): a learned CLS token plus one latent patch -> the next LLM input.

Both use x-transformers' rotary embedding: an angle table with interleaved duplication
[f0, f0, f1, f1, ...] computed in the dtype of the persistent `rotary_embed.inv_freq` buffer, rotating
adjacent channel pairs (2k, 2k+1) of q and k (GPT-J style).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.talker.backbone import RMSNorm
from engine.models.talker.config import DiTConfig

NORM_EPS = 1e-6
TIME_EMBED_DIM = 256   # sinusoidal width of the time embedding
TIME_SCALE = 1000.0    # t in [0, 1] is scaled by 1000 before the sinusoids
ROTARY_THETA = 10000.0


class RotaryEmbedding(nn.Module):
    """x-transformers `RotaryEmbedding(head_dim)`: `inv_freq` is persistent (stored in the checkpoint)."""

    def __init__(self, dim: int):
        super().__init__()
        inv = 1.0 / (ROTARY_THETA ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv)

    def forward(self, seq_len: int) -> torch.Tensor:
        """Angles [seq_len, dim]: positions 0.. times inv_freq, each frequency repeated twice in place."""
        t = torch.arange(seq_len, device=self.inv_freq.device).to(self.inv_freq.dtype)
        freqs = t[:, None] * self.inv_freq[None, :]
        return torch.stack((freqs, freqs), dim=-1).flatten(-2)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) on adjacent channel pairs."""
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs.unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    return (x * freqs.cos() + rotate_pairs(x) * freqs.sin()).to(dtype)


class Attention(nn.Module):
    """Non-causal multi-head attention, no mask, biases on all projections (`to_q/to_k/to_v/to_out.0`),
    heads of hidden // heads channels (q/k/v are heads * head_dim wide). With `qk_norm="rms_norm"` each
    head's q and k go through an RMSNorm (`q_norm` / `k_norm`, eps 1e-6) before the rotary. Rotary on
    all heads, or on the first `pe_attn_head` heads when the config says so."""

    def __init__(self, dim: int, heads: int, pe_attn_head: int | None = None, qk_norm: str | None = None):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        inner = self.head_dim * heads
        self.pe_attn_head = pe_attn_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        if qk_norm == "rms_norm":
            self.q_norm = RMSNorm(self.head_dim, NORM_EPS)
            self.k_norm = RMSNorm(self.head_dim, NORM_EPS)
        else:
            self.q_norm = self.k_norm = None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.pe_attn_head is None:
            q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        else:
            pn = self.pe_attn_head
            q = torch.cat([apply_rotary(q[:, :pn], freqs), q[:, pn:]], dim=1)
            k = torch.cat([apply_rotary(k[:, :pn], freqs), k[:, pn:]], dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class FeedForward(nn.Module):
    """`ff.0.0` Linear -> tanh-GELU -> (dropout, inactive) -> `ff.2` Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh")),
                                nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, NORM_EPS)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.pe_attn_head, cfg.qk_norm)
        self.norm2 = RMSNorm(cfg.hidden_size, NORM_EPS)
        self.mlp = FeedForward(cfg.hidden_size, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), freqs)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = RMSNorm(dim, NORM_EPS)
        self.linear = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


def sinusoidal_time(t: torch.Tensor, dim: int = TIME_EMBED_DIM, scale: float = TIME_SCALE) -> torch.Tensor:
    """[B] -> [B, dim]: sin then cos of scale*t*f_k, f_k = exp(-k ln(10000)/(dim/2 - 1)), in fp32.
    As in the reference, scale * t is formed in t's dtype (bf16 rounds it) before the fp32 product."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000.0) / (half - 1)))
    arg = (scale * t).float()[:, None] * freqs[None, :]
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(TIME_EMBED_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(sinusoidal_time(t).to(self.time_mlp[0].weight.dtype))


class CondEmbedder(nn.Module):
    def __init__(self, cond_dim: int, dim: int):
        super().__init__()
        self.cond_embedder = nn.Linear(cond_dim, dim)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.cond_embedder(c)


class DiT(nn.Module):
    """Velocity v(x, t | c, history): x [B, patch, 64], t [B], c [B, 1, cond], his [B, H, 64] -> [B, patch, 64]."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.x_embedder = nn.Linear(cfg.in_channels, cfg.hidden_size)
        self.c_embedder = CondEmbedder(cfg.llm_cond_dim, cfg.hidden_size)
        if cfg.spk_dim:  # present in some configs; the 2.0 sampler never passes a speaker vector (spec §7.1)
            self.spk_embedder = nn.Linear(cfg.spk_dim, cfg.hidden_size)
        self.rotary_embed = RotaryEmbedding(cfg.head_dim)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, his: torch.Tensor) -> torch.Tensor:
        patch = x.shape[1]
        z = self.x_embedder(torch.cat([his, x], dim=1))
        y = self.t_embedder(t)[:, None] + self.c_embedder(c)
        h = torch.cat([y, z], dim=1)
        freqs = self.rotary_embed(h.shape[1])
        for block in self.blocks:
            h = block(h, freqs)
        return self.final_layer(h)[:, -patch:]


class Aggregator(nn.Module):
    """Latent patch [B, patch, 64] -> next LLM input embedding [B, 1, llm_hidden] (the CLS output)."""

    def __init__(self, cfg: DiTConfig, llm_hidden: int):
        super().__init__()
        self.config = cfg
        self.word_embedder = nn.Embedding(1, cfg.hidden_size)
        self.x_embedder = nn.Linear(cfg.in_channels, cfg.hidden_size)
        self.rotary_embed = RotaryEmbedding(cfg.head_dim)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, llm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.word_embedder.weight[0].expand(x.shape[0], 1, -1)
        h = torch.cat([cls.to(x.dtype), self.x_embedder(x)], dim=1)
        freqs = self.rotary_embed(h.shape[1])
        for block in self.blocks:
            h = block(h, freqs)
        return self.final_layer(h[:, :1])
