"""A plain forward of the Preview's SD3-style image DiT written from spec §8.10 and the diffusers SD3 parts it
names [L] (PatchEmbed with a cropped 2-D sin-cos table, CombinedTimestepTextProjEmbeddings, AdaLayerNormZero
single-stream refiners, joint blocks, AdaLayerNormContinuous): float64 tensor maths on a state dict, no
engine or diffusers code. Used by test_sd3_reference.py."""

from __future__ import annotations

import math

import torch

LN_EPS = 1e-6
ROPE_AXES = (20, 22, 22)  # frame, row, column channels of each 64-wide head (spec §8.10)
ROPE_THETA = 10000.0
TIME_CHANNELS = 256
MAX_PERIOD = 10000.0


def linear(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine weights (eps 1e-6)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def feed_forward(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return linear(sd, f"{name}.net.2", gelu_tanh(linear(sd, f"{name}.net.0.proj", x)))


def head_norm(sd: dict, name: str, x: torch.Tensor, qk_norm: str | None) -> torch.Tensor:
    """The config's `qk_norm` on [B, S, heads, d] queries or keys: "rms_norm" x / rms(x) (eps 1e-6) times the
    learned per-channel weight `name`.weight; None leaves them as they are."""
    if qk_norm is None:
        return x
    assert qk_norm == "rms_norm", qk_norm
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + LN_EPS) * sd[f"{name}.weight"]


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.reshape(-1, 1).double() * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def pos_table(dim: int, max_size: int, base_size: int) -> torch.Tensor:
    """[max_size², dim]: the first half encodes the column, the second the row, positions i / (max_size / base)."""
    coord = torch.arange(max_size, dtype=torch.float64) / (max_size / base_size)
    rows, cols = torch.meshgrid(coord, coord, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def patch_embed(sd: dict, name: str, latent: torch.Tensor, patch: int, max_size: int, base_size: int) -> torch.Tensor:
    """Non-overlapping patch x patch projection (a conv written as a matmul), tokens row-major, plus the table's
    centre crop."""
    b, c, h, w = latent.shape
    ht, wt = h // patch, w // patch
    patches = latent.reshape(b, c, ht, patch, wt, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, ht * wt, -1)
    weight = sd[f"{name}.proj.weight"].reshape(sd[f"{name}.proj.weight"].shape[0], -1)
    tokens = patches @ weight.T + sd[f"{name}.proj.bias"]
    table = pos_table(tokens.shape[-1], max_size, base_size).reshape(max_size, max_size, -1)
    top, left = (max_size - ht) // 2, (max_size - wt) // 2
    return tokens + table[top:top + ht, left:left + wt].reshape(1, ht * wt, -1)


def time_text_embedding(sd: dict, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """cos-then-sin timestep features (flip_sin_to_cos, no frequency shift) -> MLP, plus the pooled text MLP."""
    half = TIME_CHANNELS // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float64) / half)
    angles = t.double().reshape(-1, 1) * freqs
    feats = torch.cat([angles.cos(), angles.sin()], dim=1)
    p = "time_text_embed"
    temb = linear(sd, f"{p}.timestep_embedder.linear_2", silu(linear(sd, f"{p}.timestep_embedder.linear_1", feats)))
    text = linear(sd, f"{p}.text_embedder.linear_2", silu(linear(sd, f"{p}.text_embedder.linear_1", pooled)))
    return temb + text


def modulation(sd: dict, name: str, temb: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return [m[:, None] for m in linear(sd, f"{name}.linear", silu(temb)).chunk(parts, dim=-1)]


def rope_angles(frames: int, rows: int, cols: int, text: int) -> torch.Tensor:
    """[tokens, 32] angles: image tokens frame-major with rows / columns centred (i - (n - n//2)), then the text
    tokens at max(rows//2, cols//2) + j on every axis; per axis pos * θ^(-2k/d)."""
    pos = [(f, r - (rows - rows // 2), c - (cols - cols // 2))
           for f in range(frames) for r in range(rows) for c in range(cols)]
    start = max(rows // 2, cols // 2)
    pos += [(start + j,) * 3 for j in range(text)]
    pos = torch.tensor(pos, dtype=torch.float64)
    out = []
    for axis, d in enumerate(ROPE_AXES):
        inv = ROPE_THETA ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        out.append(pos[:, axis:axis + 1] * inv)
    return torch.cat(out, dim=1)


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, 64]: channels (2k, 2k+1) rotated by angle k of each token."""
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, S, heads, d] each -> [B, S, heads * d], softmax(q k^T / sqrt d) v, no mask."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    return out.flatten(2)


def single_block(sd: dict, name: str, x: torch.Tensor, temb: torch.Tensor, heads: int) -> torch.Tensor:
    shift, scale, gate, shift2, scale2, gate2 = modulation(sd, f"{name}.norm1", temb, 6)
    h = layer_norm(x) * (1 + scale) + shift
    q, k, v = (linear(sd, f"{name}.attn.to_{n}", h).unflatten(-1, (heads, -1)) for n in "qkv")
    x = x + gate * linear(sd, f"{name}.attn.to_out.0", attention(q, k, v))
    return x + gate2 * feed_forward(sd, f"{name}.ff", layer_norm(x) * (1 + scale2) + shift2)


def joint_block(sd: dict, name: str, x: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor, heads: int,
                angles: torch.Tensor, last: bool, qk_norm: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    shift, scale, gate, shift2, scale2, gate2 = modulation(sd, f"{name}.norm1", temb, 6)
    if last:  # the last block only reads the caption (AdaLayerNormContinuous: scale first, then shift)
        c_scale, c_shift = modulation(sd, f"{name}.norm1_context", temb, 2)
    else:
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = modulation(sd, f"{name}.norm1_context", temb, 6)
    h, hc = layer_norm(x) * (1 + scale) + shift, layer_norm(ctx) * (1 + c_scale) + c_shift
    q, k, v = (linear(sd, f"{name}.attn.to_{n}", h).unflatten(-1, (heads, -1)) for n in "qkv")
    cq, ck, cv = (linear(sd, f"{name}.attn.add_{n}_proj", hc).unflatten(-1, (heads, -1)) for n in "qkv")
    q, k = (head_norm(sd, f"{name}.attn.norm_{n}", t, qk_norm) for n, t in (("q", q), ("k", k)))
    cq, ck = (head_norm(sd, f"{name}.attn.norm_added_{n}", t, qk_norm) for n, t in (("q", cq), ("k", ck)))
    q, k, v = torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1)
    out = attention(rotate_pairs(q, angles), rotate_pairs(k, angles), v)
    n_img = x.shape[1]
    x = x + gate * linear(sd, f"{name}.attn.to_out.0", out[:, :n_img])
    x = x + gate2 * feed_forward(sd, f"{name}.ff", layer_norm(x) * (1 + scale2) + shift2)
    if last:
        return x, None
    ctx = ctx + c_gate * linear(sd, f"{name}.attn.to_add_out", out[:, n_img:])
    ctx = ctx + c_gate2 * feed_forward(sd, f"{name}.ff_context", layer_norm(ctx) * (1 + c_scale2) + c_shift2)
    return x, ctx


def sd3_forward(sd: dict, cfg: dict, latent: torch.Tensor, caption: torch.Tensor, pooled: torch.Tensor,
                t: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
    """The prediction [B, C, h, w] for `latent` (spec §8.10): refined noisy tokens then refined reference tokens
    (frame 1), joint blocks with the 3-axis RoPE over [image, text], the noisy latent's tokens out."""
    sd = {k: v.double() for k, v in sd.items()}
    latent, caption, pooled = latent.double(), caption.double(), pooled.double()
    p, heads, max_size = cfg["patch_size"], cfg["num_attention_heads"], cfg["pos_embed_max_size"]
    base = cfg["sample_size"] // p
    temb = time_text_embedding(sd, t, pooled)
    ctx = linear(sd, "context_embedder", caption)
    x = patch_embed(sd, "pos_embed", latent, p, max_size, base)
    for i in range(2):
        x = single_block(sd, f"noise_refiner.{i}", x, temb, heads)
    n_img = x.shape[1]
    if ref is not None:
        r = patch_embed(sd, "ref_pos_embed", ref.double(), p, max_size, base)
        for i in range(2):
            r = single_block(sd, f"ref_image_refiner.{i}", r, temb, heads)
        x = torch.cat([x, r], dim=1)
    rows, cols = latent.shape[-2] // p, latent.shape[-1] // p
    angles = rope_angles(1 if ref is None else 2, rows, cols, ctx.shape[1])
    layers = cfg["num_layers"]
    for i in range(layers):
        x, ctx = joint_block(sd, f"transformer_blocks.{i}", x, ctx, temb, heads, angles, last=i == layers - 1,
                             qk_norm=cfg.get("qk_norm"))
    scale, shift = modulation(sd, "norm_out", temb, 2)
    out = linear(sd, "proj_out", layer_norm(x[:, :n_img]) * (1 + scale) + shift)
    c = out.shape[-1] // (p * p)
    out = out.reshape(-1, rows, cols, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(-1, c, rows * p, cols * p)
