"""A plain-PyTorch Qwen2 decoder stack with the tensor names of transformers' `Qwen2Model`
(`embed_tokens`, `layers.{i}.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`,
`post_attention_layernorm`, `norm`). The talker LLM and the three AudioVAE stacks are all Qwen2
(spec §7.1, §7.8); they run on `inputs_embeds` with causal attention, standard rotate-half RoPE, and
optionally a sliding window on some layers (query i sees keys j with i - window < j <= i, as
transformers 4.57 masks it).

Two KV caches share one interface:
  * `DynamicKVCache` grows as chunks arrive (the VAE decoder's stream); a sliding layer keeps only the
    last window - 1 keys;
  * `StaticKVCache` is a fixed buffer written at tensor positions, so a decode step can be captured in a
    CUDA graph (the talker's 2048-position cache, spec §7.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.dispatch import keep_attention_off_cudnn
from engine.models.talker.config import ACT2FN, Qwen2BackboneConfig
from engine.models.thinker.layers import RMSNorm  # Qwen2RMSNorm semantics (engine.kernels.rms_norm)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RotaryTable(nn.Module):
    """cos/sin of standard RoPE for given positions (computed in fp32, cast to the activations' dtype).
    `model_dtype`: the dtype the stack runs in; the reference casts the whole model with .to(dtype),
    which also rounds this (non-persistent) inv_freq buffer, so a bf16 stack uses bf16-rounded values."""

    def __init__(self, head_dim: int, theta: float, model_dtype: torch.dtype = torch.float32):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv.to(model_dtype).float(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class DynamicKVCache:
    """Growing per-layer keys/values; `window[i]` (None = full) bounds what a sliding layer keeps."""

    def __init__(self, cfg: Qwen2BackboneConfig):
        self.windows = [cfg.sliding_window if t == "sliding_attention" else None
                        for t in cfg.layer_types[:cfg.num_hidden_layers]]
        self.keys: list[torch.Tensor | None] = [None] * len(self.windows)
        self.values: list[torch.Tensor | None] = [None] * len(self.windows)
        self.starts = [0] * len(self.windows)  # absolute position of each layer's first kept key
        self.length = 0                         # tokens seen

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor):
        """Append k/v ([B, kvh, n, d]); returns (K, V, mask) for the attention of this call."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        start = self.starts[layer]
        window = self.windows[layer]
        k_pos = torch.arange(start, start + k.shape[2], device=k.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        keep = k.shape[2] if window is None else min(k.shape[2], window - 1)
        self.keys[layer], self.values[layer] = k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]
        self.starts[layer] = start + k.shape[2] - keep
        return k, v, (None if bool(allowed.all()) else allowed)

    def advance(self, n: int) -> None:
        self.length += n

    def kept_length(self, layer: int) -> int:
        return 0 if self.keys[layer] is None else int(self.keys[layer].shape[2])


class StaticKVCache:
    """Fixed [B, kvh, capacity, d] buffers per layer. Writes go to tensor positions (`index_copy_`),
    so the same code runs eagerly or inside a CUDA graph. Eagerly, attention reads only the filled
    prefix; `full_view=True` (graph capture) reads the whole buffer behind a position mask. A sliding
    layer keeps every key but masks those at or beyond `window` positions back (i - window < j <= i)."""

    def __init__(self, cfg: Qwen2BackboneConfig, capacity: int, batch: int, dtype: torch.dtype, device):
        self.windows = [cfg.sliding_window if t == "sliding_attention" else None
                        for t in cfg.layer_types[:cfg.num_hidden_layers]]
        shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.capacity = capacity
        self.length = 0
        self.full_view = False
        self._k_pos = torch.arange(capacity, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor):
        self.keys[layer].index_copy_(2, q_pos, k)
        self.values[layer].index_copy_(2, q_pos, v)
        window = self.windows[layer]
        if self.full_view:
            return self.keys[layer], self.values[layer], self._mask(self._k_pos, q_pos, window)
        end = self.length + k.shape[2]
        kk, vv = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        if k.shape[2] == 1 and (window is None or end <= window):
            return kk, vv, None
        return kk, vv, self._mask(self._k_pos[:end], q_pos, window)

    @staticmethod
    def _mask(k_pos: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        return allowed

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2BackboneConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, layer: int, cache, q_pos, window: int | None):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v, mask = cache.update(layer, k, v, q_pos)
        else:
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            if window is not None:
                mask = mask & ~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-window)
        rep = self.heads // self.kv_heads
        if rep > 1:
            k = k[:, :, None].expand(b, self.kv_heads, rep, *k.shape[2:]).reshape(b, self.heads, *k.shape[2:])
            v = v[:, :, None].expand(b, self.kv_heads, rep, *v.shape[2:]).reshape(b, self.heads, *v.shape[2:])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2BackboneConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2BackboneConfig, index: int):
        super().__init__()
        self.index = index
        self.window = cfg.sliding_window if cfg.layer_types[index] == "sliding_attention" else None
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, q_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, self.index, cache, q_pos, self.window)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Backbone(nn.Module):
    """`Qwen2Model` on inputs_embeds: returns the final-norm hidden states [B, n, H].
    `run_layers`: how many of its layers the forward runs (all by default); Qwen2Model.forward loops over
    layers[:config.num_hidden_layers], so a config changed after the model was built runs fewer."""

    def __init__(self, cfg: Qwen2BackboneConfig, run_layers: int | None = None):
        super().__init__()
        keep_attention_off_cudnn()  # a new plan per key length otherwise (engine.kernels.dispatch)
        self.config = cfg
        self.run_layers = cfg.num_hidden_layers if run_layers is None else min(run_layers, cfg.num_hidden_layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryTable(cfg.head_dim, cfg.rope_theta)

    def forward(self, inputs_embeds: torch.Tensor, cache=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Without a cache: a whole causal sequence from position 0. With one: the next tokens at
        `positions` (default: continuing from `cache.length`); the cache advances by n."""
        n = inputs_embeds.shape[1]
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + n, device=inputs_embeds.device)
        cos, sin = self.rotary(positions, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers[:self.run_layers]:
            x = layer(x, cos, sin, cache, positions)
        if cache is not None:
            cache.advance(n)
        return self.norm(x)
