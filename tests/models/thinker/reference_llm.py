"""A deliberately plain BailingMoeV2 forward for tests: the rules of the reference's modelling code (spec §2,
§2.11 fp32 path) written out step by step from a raw config dict and a checkpoint state dict, sharing nothing
with engine.models.thinker. Config keys a dict omits take BailingMoeV2Config's defaults (listed here, not
imported). Eager attention, one token at a time through the experts: tiny models only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# BailingMoeV2Config.__init__ defaults (configuration_bailing_moe_v2.py) for the keys this forward reads.
CLASS_DEFAULTS = {"num_experts": 16, "num_experts_per_tok": 2, "n_group": 8, "topk_group": 4,
                  "routed_scaling_factor": 2.5, "num_shared_experts": 0, "first_k_dense_replace": 0,
                  "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "head_dim": None,
                  "router_type": "topN", "tie_word_embeddings": False, "use_sliding_window": False,
                  "sliding_window": 81920}
# The reference's hard-coded VideoRoPE split: [T 8, H 12, W 12] frequencies, assembled as sections of
# (24 H/W alternating, 8 T) twice (spec §2.4).
HW_SECTION, T_SECTION = 24, 8


def settings(config: dict) -> dict:
    c = {**CLASS_DEFAULTS, **config}
    c["head_dim"] = c["head_dim"] or c["hidden_size"] // c["num_attention_heads"]
    return c


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    gate, up = F.linear(x, sd[p + "gate_proj.weight"]), F.linear(x, sd[p + "up_proj.weight"])
    return F.linear(F.silu(gate) * up, sd[p + "down_proj.weight"])


def route(x: torch.Tensor, sd: dict, p: str, c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One gate: fp32 logits, sigmoid, bias for selection, top-2-sum group scores, top-k, renormalised x scale."""
    scores = torch.sigmoid(F.linear(x.float(), sd[p + "weight"].float()))
    biased = scores + sd[p + "expert_bias"].float()
    n, groups = x.shape[0], c["n_group"]
    group_scores = biased.view(n, groups, -1).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros(n, groups).scatter_(1, group_scores.topk(c["topk_group"], dim=-1).indices, 1.0)
    allowed = keep.repeat_interleave(c["num_experts"] // groups, dim=1).bool()
    ids = biased.masked_fill(~allowed, float("-inf")).topk(c["num_experts_per_tok"], dim=-1).indices
    weights = scores.gather(1, ids)
    if c["num_experts_per_tok"] > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * c["routed_scaling_factor"]


def moe(x: torch.Tensor, sd: dict, p: str, c: dict, image_mask=None, audio_mask=None) -> torch.Tensor:
    b, length, h = x.shape
    flat = x.reshape(-1, h)
    ids, weights = route(flat, sd, p + "gate.", c)
    if c["router_type"] == "MultiRouter":
        for mask, gate in ((image_mask, "image_gate."), (audio_mask, "audio_gate.")):
            if mask is not None:
                own = route(flat, sd, p + gate, c)
                pick = mask.reshape(-1, 1).bool()
                ids, weights = torch.where(pick, own[0], ids), torch.where(pick, own[1], weights)
    out = torch.zeros(flat.shape, dtype=weights.dtype)
    for t in range(flat.shape[0]):
        for j in range(ids.shape[1]):
            out[t] += weights[t, j] * swiglu(flat[t:t + 1], sd, f"{p}experts.{int(ids[t, j])}.")[0].to(weights.dtype)
    out = out.to(x.dtype).view(b, length, h)
    if c["num_shared_experts"] is not None:
        out = out + swiglu(x, sd, p + "shared_experts.")
    return out


def video_rope(position_ids: torch.Tensor, c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, L, channels] from position ids [3, B, L] (channels: at most 64). A config without
    rope_scaling: plain RoPE of the whole rotary width on the temporal positions (transformers' default)."""
    dim = int(c["head_dim"] * c["partial_rotary_factor"])
    inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    if c.get("rope_scaling") is None:
        return emb[0].cos(), emb[0].sin()
    cos, sin, index, parts = emb.cos(), emb.sin(), 0, []
    for section in (HW_SECTION, T_SECTION, HW_SECTION, T_SECTION):
        for j in range(section):
            axis = 0 if section == T_SECTION else (1 if j % 2 == 0 else 2)
            parts.append((cos[axis, ..., index:index + 1], sin[axis, ..., index:index + 1]))
            index += 1
    return torch.cat([a for a, _ in parts], -1), torch.cat([s for _, s in parts], -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat([-rot[..., r // 2:], rot[..., :r // 2]], dim=-1)
    return torch.cat([rot * cos + half * sin, rest], dim=-1)


def attention(x: torch.Tensor, sd: dict, p: str, c: dict, cos, sin, mask: torch.Tensor) -> torch.Tensor:
    b, length, _ = x.shape
    heads, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    qkv = F.linear(x, sd[p + "query_key_value.weight"], sd.get(p + "query_key_value.bias"))
    q, k, v = qkv.view(b, length, heads + 2 * kv, hd).split([heads, kv, kv], dim=2)
    q = rms_norm(q.transpose(1, 2), sd[p + "q_norm.weight"], c["rms_norm_eps"])
    k = rms_norm(k.transpose(1, 2), sd[p + "k_norm.weight"], c["rms_norm_eps"])
    q, k = rotate(q, cos.unsqueeze(1), sin.unsqueeze(1)), rotate(k, cos.unsqueeze(1), sin.unsqueeze(1))
    k = k.repeat_interleave(heads // kv, dim=1)
    v = v.transpose(1, 2).repeat_interleave(heads // kv, dim=1)
    scores = torch.matmul(q / math.sqrt(hd), k.transpose(2, 3)) + mask
    out = torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)
    return F.linear(out.transpose(1, 2).reshape(b, length, -1), sd[p + "dense.weight"], sd.get(p + "dense.bias"))


def logits(sd: dict, config: dict, ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
           image_mask=None, audio_mask=None, prefix: str = "") -> torch.Tensor:
    """[B, L, V] logits of a whole sequence (left padding: attention_mask 0) from the state dict's tensors
    `prefix + <upstream name>`."""
    c = settings(config)
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    table = sd["model.word_embeddings.weight"]
    x = final_hidden(sd, config, table[ids.clamp(0, table.shape[0] - 1)], position_ids, attention_mask,
                     image_mask, audio_mask)
    return F.linear(x, table if c["tie_word_embeddings"] else sd["lm_head.weight"])


def final_hidden(sd: dict, config: dict, x: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
                 image_mask=None, audio_mask=None) -> torch.Tensor:
    """[B, L, H] output of the final RMSNorm for inputs_embeds x [B, L, H] (state dict names without the
    wrapper's prefix: `model.layers.0. ...`)."""
    c = settings(config)
    b, length, _ = x.shape
    keys = torch.ones(b, length, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    causal = torch.ones(length, length).tril().bool()
    if c["use_sliding_window"] and c["sliding_window"] is not None:  # the eager mask: keys j > i - window
        causal &= torch.ones(length, length).triu(1 - c["sliding_window"]).bool()
    allowed = causal.unsqueeze(0) & keys.unsqueeze(1)
    mask = torch.zeros(b, 1, length, length).masked_fill(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
    cos, sin = video_rope(position_ids, c)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = x + attention(rms_norm(x, sd[p + "input_layernorm.weight"], c["rms_norm_eps"]), sd, p + "attention.", c,
                          cos, sin, mask)
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], c["rms_norm_eps"])
        if c["num_experts"] is not None and layer >= c["first_k_dense_replace"]:
            x = x + moe(h, sd, p + "mlp.", c, image_mask, audio_mask)
        else:
            x = x + swiglu(h, sd, p + "mlp.")
    return rms_norm(x, sd["model.norm.weight"], c["rms_norm_eps"])
