"""A deliberately plain `Qwen2Model` forward on inputs_embeds for tests, written from transformers 4.57's
rules (the version the ming_ref fixtures were generated with) and sharing nothing with engine.models.talker:
a raw config dict (omitted keys take Qwen2Config.__init__'s defaults, listed here), a state dict, and the
whole causal sequence at once (a KV cache only ever reproduces this). Eager attention, fp32 softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Qwen2Config.__init__ defaults (transformers 4.57 configuration_qwen2.py) for the keys this forward reads.
QWEN2_CONFIG_DEFAULTS = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                         "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                         "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
                         "layer_types": None}

ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def qwen2_settings(config: dict) -> dict:
    """Qwen2Config(**config) as 4.57 fills it: kv heads None -> heads; sliding_window kept only with
    use_sliding_window; layer_types from max_window_layers when not given."""
    c = {**QWEN2_CONFIG_DEFAULTS, **config}
    if c["num_key_value_heads"] is None:
        c["num_key_value_heads"] = c["num_attention_heads"]
    c["sliding_window"] = c["sliding_window"] if c["use_sliding_window"] else None
    if c["layer_types"] is None:
        c["layer_types"] = ["sliding_attention" if c["sliding_window"] is not None and i >= c["max_window_layers"]
                            else "full_attention" for i in range(c["num_hidden_layers"])]
    # Qwen2Attention: getattr(config, "head_dim", hidden // heads)
    c["head_dim"] = config.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    return c


def qwen2_state_entries(c: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2Model of settings `c` holds, by its state-dict name."""
    h, hd = c["hidden_size"], c["head_dim"]
    q, kv, inter = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["intermediate_size"]
    out = {f"{prefix}embed_tokens.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (inter, h),
                    p + "mlp.up_proj.weight": (inter, h), p + "mlp.down_proj.weight": (h, inter),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    out[f"{prefix}norm.weight"] = (h,)
    return out


def qwen2_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qwen2_forward(x: torch.Tensor, sd: dict, prefix: str, c: dict, run_layers: int | None = None,
                  causal: bool = True) -> torch.Tensor:
    """Final-norm hidden states [B, n, H] of inputs_embeds x [B, n, H] from position 0. `run_layers`:
    how many layers run (Qwen2Model.forward loops over layers[:config.num_hidden_layers]); `causal` False:
    every token sees every other (the image generator's connector, spec §8.3)."""
    b, n, _ = x.shape
    hd, heads, kvh = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = torch.arange(n).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    masks = {"full_attention": j <= i if causal else torch.ones(n, n, dtype=torch.bool)}
    if c["sliding_window"] is not None:
        masks["sliding_attention"] = (j <= i) & (j > i - c["sliding_window"])
    act = ACTIVATIONS[c["hidden_act"]]
    for layer in range(c["num_hidden_layers"] if run_layers is None else run_layers):
        p = f"{prefix}layers.{layer}."
        h = qwen2_rms_norm(x, sd[p + "input_layernorm.weight"], c["rms_norm_eps"])
        q = F.linear(h, sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.q_proj.bias"]).view(b, n, heads, hd).transpose(1, 2)
        k = F.linear(h, sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.k_proj.bias"]).view(b, n, kvh, hd).transpose(1, 2)
        v = F.linear(h, sd[p + "self_attn.v_proj.weight"], sd[p + "self_attn.v_proj.bias"]).view(b, n, kvh, hd).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kvh, dim=1), v.repeat_interleave(heads // kvh, dim=1)
        scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
        probs = scores.masked_fill(~masks[c["layer_types"][layer]], float("-inf")).float().softmax(-1).to(q.dtype)
        attn = (probs @ v).transpose(1, 2).reshape(b, n, heads * hd)
        x = x + F.linear(attn, sd[p + "self_attn.o_proj.weight"])
        h = qwen2_rms_norm(x, sd[p + "post_attention_layernorm.weight"], c["rms_norm_eps"])
        mlp = act(F.linear(h, sd[p + "mlp.gate_proj.weight"])) * F.linear(h, sd[p + "mlp.up_proj.weight"])
        x = x + F.linear(mlp, sd[p + "mlp.down_proj.weight"])
    return qwen2_rms_norm(x, sd[prefix + "norm.weight"], c["rms_norm_eps"])
