"""A deliberately plain ByT5 glyph path for tests (spec §8.4): byte tokens, the T5 encoder (relative position
buckets in the first block, RMS norms without a mean, unscaled scores, the config's `feed_forward_proj`: dense or
gated, relu / silu / GELU) and the T5EncoderBlockByT5Mapper, written out from raw config dicts and state dicts,
sharing nothing with transformers' T5 classes or engine.models.imagegen.glyph. Tiny models only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BYTE_OFFSET = 3            # ids 0, 1, 2 are pad, </s>, <unk>; byte b is b + 3
PAD_ID, EOS_ID = 0, 1


def byte_ids(text: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes + 3, cut to leave room for </s>, then </s>, then padding to max_length: ids and mask [1, L]."""
    ids = [b + BYTE_OFFSET for b in text.encode("utf-8")][:max_length - 1] + [EOS_ID]
    mask = [1] * len(ids) + [0] * (max_length - len(ids))
    return torch.tensor([ids + [PAD_ID] * (max_length - len(ids))]), torch.tensor([mask])


def t5_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """[L, L] bucket of key j for query i (bidirectional: half the buckets for keys after the query)."""
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(n < exact, n, large)


def t5_blocks(x: torch.Tensor, mask: torch.Tensor, sd: dict, prefix: str, n_blocks: int, cfg: dict) -> torch.Tensor:
    """T5 encoder blocks `prefix{i}.layer...` over x [L, d]; keys outside `mask` [L] are hidden."""
    heads, d_kv, eps = cfg["num_heads"], cfg["d_kv"], cfg["layer_norm_epsilon"]
    length = x.shape[0]
    table = sd[f"{prefix}0.layer.0.SelfAttention.relative_attention_bias.weight"]  # [buckets, heads]
    bias = table[relative_buckets(length, cfg["relative_attention_num_buckets"],
                                  cfg["relative_attention_max_distance"])].permute(2, 0, 1)
    bias = bias.masked_fill(~mask.bool()[None, None, :], torch.finfo(torch.float32).min)
    for i in range(n_blocks):
        p = f"{prefix}{i}.layer."
        h = t5_norm(x, sd[p + "0.layer_norm.weight"], eps)
        q, k, v = (F.linear(h, sd[f"{p}0.SelfAttention.{n}.weight"]).view(length, heads, d_kv).transpose(0, 1)
                   for n in "qkv")
        attn = ((q @ k.transpose(1, 2)) + bias).softmax(-1) @ v
        x = x + F.linear(attn.transpose(0, 1).reshape(length, heads * d_kv), sd[p + "0.SelfAttention.o.weight"])
        h = t5_norm(x, sd[p + "1.layer_norm.weight"], eps)
        x = x + feed_forward(h, sd, p + "1.DenseReluDense.", cfg["feed_forward_proj"])
    return x


ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def feed_forward(h: torch.Tensor, sd: dict, ff: str, kind: str) -> torch.Tensor:
    """T5's `feed_forward_proj`: "relu" / "gelu" / "silu" a dense act(wi h); "gated-<act>" act(wi_0 h) * wi_1 h
    (byt5-small's "gated-gelu" is the tanh GELU, "gelu_new"); then wo."""
    gated, act = kind.startswith("gated-"), kind.split("-")[-1]
    act = "gelu_new" if kind == "gated-gelu" else act
    if gated:
        inner = ACTIVATIONS[act](F.linear(h, sd[ff + "wi_0.weight"])) * F.linear(h, sd[ff + "wi_1.weight"])
    else:
        inner = ACTIVATIONS[act](F.linear(h, sd[ff + "wi.weight"]))
    return F.linear(inner, sd[ff + "wo.weight"])


def glyph_embeds(text: str, encoder_sd: dict, mapper_sd: dict, t5: dict, mapper_layers: int,
                 max_length: int) -> torch.Tensor:
    """[max_length, C]: encoder, mapper (blocks, norm, channel_mapper, norm), padding rows zeroed."""
    ids, mask = byte_ids(text, max_length)
    x = encoder_sd["embed_tokens.weight"][ids[0]]
    x = t5_norm(t5_blocks(x, mask[0], encoder_sd, "block.", t5["num_layers"], t5),
                encoder_sd["final_layer_norm.weight"], t5["layer_norm_epsilon"])
    x = t5_norm(t5_blocks(x, mask[0], mapper_sd, "blocks.", mapper_layers, t5), mapper_sd["layer_norm.weight"],
                t5["layer_norm_epsilon"])
    x = F.linear(x, mapper_sd["channel_mapper.weight"], mapper_sd["channel_mapper.bias"])
    x = t5_norm(x, mapper_sd["final_layer_norm.weight"], t5["layer_norm_epsilon"])
    return x * mask[0, :, None]
