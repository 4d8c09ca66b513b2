"""A deliberately plain Z-Image DiT forward and CFG sampling loop for tests: spec §8.5 (the 2.0 DiT) and §8.6
(schedule, CFG, Euler step) written out step by step from a state dict and the `transformer/` and
`scheduler/` config dicts, sharing nothing with diffusers or engine.models.imagegen. One sample at a time,
eager attention, fp32: tiny models only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SEQ_MULTIPLE = 32          # captions and image tokens are padded to a multiple of this (§8.5 steps 2-3)
TIME_FREQ_DIM = 256        # the timestep sinusoid's width
TIME_MAX_PERIOD = 10000.0
FINAL_NORM_EPS = 1e-6      # the final layer's LayerNorm (no affine)
PIPELINE_T = 1000.0        # the loop feeds the DiT (1000 - t) / 1000
SHIFT_LINE = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def timestep_embedding(sd: dict, t: float, t_scale: float) -> torch.Tensor:
    """a = MLP([cos(u f_k), sin(u f_k)]), u = t_scale t, f_k = exp(-ln(10000) k / 128)."""
    half = TIME_FREQ_DIM // 2
    freqs = torch.exp(-math.log(TIME_MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.tensor(t * t_scale, dtype=torch.float32) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)])
    hidden = F.silu(F.linear(emb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"]))
    return F.linear(hidden, sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])


def rope_angles(positions: torch.Tensor, cfg: dict) -> torch.Tensor:
    """[N, 3] integer (f, h, w) -> complex rotations [N, sum(axes_dims) / 2], one table per axis."""
    parts = []
    for axis, d in enumerate(cfg["axes_dims"]):
        inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angle = positions[:, axis].double()[:, None] * inv[None]
        parts.append(torch.polar(torch.ones_like(angle), angle).to(torch.complex64))
    return torch.cat(parts, dim=-1)


def rotate_pairs(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [N, heads, d]: channels (2k, 2k+1) form one complex number, multiplied by rot [N, d / 2]."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * rot[:, None]).flatten(-2)


def attention(sd: dict, p: str, x: torch.Tensor, rot: torch.Tensor, cfg: dict) -> torch.Tensor:
    heads = cfg["n_heads"]
    kv = cfg.get("n_kv_heads") or heads
    hd = cfg["dim"] // heads
    n = x.shape[0]
    q = F.linear(x, sd[p + "to_q.weight"]).view(n, heads, hd)
    k = F.linear(x, sd[p + "to_k.weight"]).view(n, kv, hd)
    v = F.linear(x, sd[p + "to_v.weight"]).view(n, kv, hd)
    if cfg["qk_norm"]:
        q, k = rms(q, sd[p + "norm_q.weight"], 1e-5), rms(k, sd[p + "norm_k.weight"], 1e-5)
    q, k = rotate_pairs(q, rot), rotate_pairs(k, rot)
    k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
    weights = (torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)).softmax(-1)
    out = torch.einsum("hqk,khd->qhd", weights, v).reshape(n, heads * hd)
    return F.linear(out, sd[p + "to_out.0.weight"])


def block(sd: dict, p: str, x: torch.Tensor, rot: torch.Tensor, cfg: dict, a: torch.Tensor | None) -> torch.Tensor:
    """A refiner or main block; `a` None: no modulation (the context refiner)."""
    eps = cfg["norm_eps"]
    if a is None:
        scale1 = scale2 = 1.0
        gate1 = gate2 = 1.0
    else:
        s1, g1, s2, g2 = F.linear(a, sd[p + "adaLN_modulation.0.weight"], sd[p + "adaLN_modulation.0.bias"]).chunk(4)
        scale1, scale2, gate1, gate2 = 1 + s1, 1 + s2, torch.tanh(g1), torch.tanh(g2)
    h = attention(sd, p + "attention.", rms(x, sd[p + "attention_norm1.weight"], eps) * scale1, rot, cfg)
    x = x + gate1 * rms(h, sd[p + "attention_norm2.weight"], eps)
    h = rms(x, sd[p + "ffn_norm1.weight"], eps) * scale2
    ff = p + "feed_forward."
    h = F.linear(F.silu(F.linear(h, sd[ff + "w1.weight"])) * F.linear(h, sd[ff + "w3.weight"]), sd[ff + "w2.weight"])
    return x + gate2 * rms(h, sd[p + "ffn_norm2.weight"], eps)


def _pad_to_multiple(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows padded by repeating the last one to a multiple of 32; also returns the padding count."""
    pad = -rows.shape[0] % SEQ_MULTIPLE
    return torch.cat([rows, rows[-1:].expand(pad, -1)]), pad


def dit(sd: dict, cfg: dict, latent: torch.Tensor, t: float, caption: torch.Tensor) -> torch.Tensor:
    """latent [C, F, h, w], t in [0, 1], caption [L, cap_feat_dim] -> velocity of frame 0 [C, 1, h, w]."""
    patch, fpatch = cfg["all_patch_size"][0], cfg["all_f_patch_size"][0]
    a = timestep_embedding(sd, t, cfg["t_scale"])
    # caption: padded, positions (1 + i, 0, 0), RMSNorm + Linear, pad rows the learned pad token
    cap, cap_pad = _pad_to_multiple(caption.float())
    cap_len = cap.shape[0]
    cap = F.linear(rms(cap, sd["cap_embedder.0.weight"], cfg["norm_eps"]), sd["cap_embedder.1.weight"],
                   sd["cap_embedder.1.bias"])
    if cap_pad:
        cap[-cap_pad:] = sd["cap_pad_token"].view(-1)
    cap_pos = torch.stack([torch.arange(1, cap_len + 1), torch.zeros(cap_len), torch.zeros(cap_len)], dim=1)
    # image: 2x2(x1) patches in (f, h, w) order, each vector (pf, ph, pw, c); positions (cap_len + 1 + f, h, w)
    c, frames, h, w = latent.shape
    gf, gh, gw = frames // fpatch, h // patch, w // patch
    tokens = (latent.float().view(c, gf, fpatch, gh, patch, gw, patch).permute(1, 3, 5, 2, 4, 6, 0)
              .reshape(gf * gh * gw, -1))
    grid = torch.stack(torch.meshgrid(torch.arange(gf), torch.arange(gh), torch.arange(gw), indexing="ij"), -1)
    img_pos = (grid.reshape(-1, 3) + torch.tensor([cap_len + 1, 0, 0]))
    n_img = tokens.shape[0]
    tokens, img_pad = _pad_to_multiple(tokens)
    img_pos = torch.cat([img_pos, torch.zeros(img_pad, 3, dtype=img_pos.dtype)])
    x = F.linear(tokens, sd[f"all_x_embedder.{patch}-{fpatch}.weight"], sd[f"all_x_embedder.{patch}-{fpatch}.bias"])
    if img_pad:
        x[-img_pad:] = sd["x_pad_token"].view(-1)
    img_rot, cap_rot = rope_angles(img_pos, cfg), rope_angles(cap_pos.long(), cfg)
    for i in range(cfg["n_refiner_layers"]):
        x = block(sd, f"noise_refiner.{i}.", x, img_rot, cfg, a)
        cap = block(sd, f"context_refiner.{i}.", cap, cap_rot, cfg, None)
    u, rot = torch.cat([x, cap]), torch.cat([img_rot, cap_rot])  # image first
    for i in range(cfg["n_layers"]):
        u = block(sd, f"layers.{i}.", u, rot, cfg, a)
    final = f"all_final_layer.{patch}-{fpatch}."
    scale = 1 + F.linear(F.silu(a), sd[final + "adaLN_modulation.1.weight"], sd[final + "adaLN_modulation.1.bias"])
    out = F.layer_norm(u[:n_img], (u.shape[-1],), eps=FINAL_NORM_EPS) * scale
    out = F.linear(out, sd[final + "linear.weight"], sd[final + "linear.bias"])
    out = out.view(gf, gh, gw, fpatch, patch, patch, c).permute(6, 0, 3, 1, 4, 2, 5).reshape(c, frames, h, w)
    return out[:, :1]


def sigmas(scheduler: dict, steps: int, latent_hw: tuple[int, int]) -> list[float]:
    """σ'_0 .. σ'_{N-1} then 0: linspace(1, 0, N) shifted, exponentially with μ when the file's
    use_dynamic_shifting is on, else by the static `shift`."""
    base = torch.linspace(1, 0, steps, dtype=torch.float64)
    if scheduler.get("use_dynamic_shifting"):
        line = {k: scheduler.get(k, v) for k, v in SHIFT_LINE.items()}
        m = (line["max_shift"] - line["base_shift"]) / (line["max_image_seq_len"] - line["base_image_seq_len"])
        tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        mu = m * tokens + line["base_shift"] - m * line["base_image_seq_len"]
        shifted = [0.0 if s == 0 else math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in base.tolist()]
    else:
        shift = scheduler.get("shift", 1.0)
        shifted = (shift * base / (1 + (shift - 1) * base)).tolist()
    return shifted + [0.0]


def sample(sd: dict, cfg: dict, scheduler: dict, noise: torch.Tensor, caption: torch.Tensor, guidance: float,
           steps: int, ref_latent: torch.Tensor | None = None) -> torch.Tensor:
    """The CFG Euler loop: noise [1, C, h, w] -> final latents; the negative caption is zeros; CFG when g > 1."""
    x = noise.float()
    sig = sigmas(scheduler, steps, tuple(noise.shape[-2:]))
    for i in range(steps):
        # the scheduler's timestep σ·T in fp32, then the pipeline's (1000 - t) / 1000
        t = float((PIPELINE_T - torch.tensor(sig[i] * scheduler["num_train_timesteps"], dtype=torch.float32))
                  / PIPELINE_T)
        frames = x[0].unsqueeze(1) if ref_latent is None else torch.cat([x[0].unsqueeze(1), ref_latent], dim=1)
        pos = dit(sd, cfg, frames, t, caption)[:, 0]
        pred = pos
        if guidance > 1:
            pred = pos + guidance * (pos - dit(sd, cfg, frames, t, torch.zeros_like(caption))[:, 0])
        x = x + (sig[i + 1] - sig[i]) * -pred.unsqueeze(0)
    return x
