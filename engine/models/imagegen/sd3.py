"""The Preview's image DiT and its sampler (spec §8.10; the Preview's diffusion/sd3_transformer.py,
mm_rope.py, sd3_loss.py and pipeline_stable_diffusion_3.py).

`SD3Transformer2DModel` is diffusers' SD3 parts (PatchEmbed, CombinedTimestepTextProjEmbeddings,
JointTransformerBlock, SD3SingleTransformerBlock, AdaLayerNormContinuous) with the Ming additions named as
in the checkpoint: a second PatchEmbed `ref_pos_embed` for the reference latent, two single-stream
refiners per stream (`noise_refiner`, `ref_image_refiner`) and a 3-axis complex RoPE over [image tokens,
text tokens] in the joint blocks. The wrapper (SD3Model_withMLP) runs the caption MLP on the condition and
pools its output into the pooled projection. The sampler follows the Preview pipeline: noise in the DiT's
dtype from the seeded CPU generator, the scheduler as configured (no sigma_min override), the raw
timestep t, CFG over 2 branches ([null, text]) or, editing with image guidance, 4 ([null/zero ref,
null/ref, text/zero ref, text/ref]), and the model output stepped as is. On CUDA the DiT's forward alone runs
under bf16 autocast, as SD3Model_withMLP runs it (`dit_autocast`); elsewhere it runs in its load dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.imagegen.config import SD3_ROPE_AXES, SD3_ROPE_THETA, ImageGenError, SD3DiTConfig
from engine.models.imagegen.diffusion import DenoiseStep, dynamic_shift_mu

DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


# --------------------------------------------------------------------------------------------- RoPE


def rope_positions(frames: int, height: int, width: int, text_len: int) -> torch.Tensor:
    """[frames·h·w + text_len, 3] integer (frame, row, column) positions (mm_rope.py QwenEmbedRope with
    scale_rope): image tokens frame-major, rows and columns centred (i − (n − n//2)), then the text tokens at
    max(h//2, w//2) + j on all three axes."""
    f = torch.arange(frames)
    r = torch.arange(height) - (height - height // 2)
    c = torch.arange(width) - (width - width // 2)
    grid = torch.stack(torch.meshgrid(f, r, c, indexing="ij"), dim=-1).reshape(-1, 3)
    text = (torch.arange(text_len) + max(height // 2, width // 2)).unsqueeze(1).expand(text_len, 3)
    return torch.cat([grid, text])


def rope_freqs(positions: torch.Tensor, axes: tuple[int, ...] = SD3_ROPE_AXES,
               theta: float = SD3_ROPE_THETA) -> torch.Tensor:
    """complex64 [N, Σaxes/2]: per axis e^{i·pos·θ^(−2k/d)}, angles in fp32 (QwenEmbedRope.rope_params)."""
    out = []
    for a, d in enumerate(axes):
        inv = 1.0 / torch.pow(theta, torch.arange(0, d, 2, dtype=torch.float32).div(d))
        ang = positions[:, a:a + 1].to(torch.float32) * inv
        out.append(torch.polar(torch.ones_like(ang), ang))
    return torch.cat(out, dim=1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] rotated on adjacent channel pairs by freqs [B, S, D/2] (complex, in fp32)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2))
    return torch.view_as_real(xc * freqs.unsqueeze(2)).flatten(3).type_as(x)


class RopeJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 with the Preview's RoPE on the joint [image, text] queries and keys
    after the q/k norms (mm_rope.py JointAttnProcessor2_0)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask=None, image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        b, n_img = hidden_states.shape[:2]

        def heads(t):
            return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq = heads(attn.add_q_proj(encoder_hidden_states))
            ck = heads(attn.add_k_proj(encoder_hidden_states))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1)
        if image_rotary_emb is not None:
            freqs = image_rotary_emb[:, :q.shape[1]]
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        context = None
        if encoder_hidden_states is not None:
            out, context = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, context)


# --------------------------------------------------------------------------------------------- DiT


class SD3Transformer2DModel(nn.Module):
    """The Preview's SD3-style DiT (module names as in transformer/diffusion_pytorch_model*.safetensors)."""

    def __init__(self, config: SD3DiTConfig):
        super().__init__()
        from diffusers.models.attention import JointTransformerBlock
        from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
        from diffusers.models.normalization import AdaLayerNormContinuous
        from diffusers.models.transformers.transformer_sd3 import SD3SingleTransformerBlock

        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim

        def patch_embed():
            return PatchEmbed(height=config.sample_size, width=config.sample_size, patch_size=config.patch_size,
                              in_channels=config.in_channels, embed_dim=dim, pos_embed_max_size=config.pos_embed_max_size)

        def refiner():
            return nn.ModuleList([SD3SingleTransformerBlock(dim, heads, head_dim) for _ in range(REFINER_LAYERS)])

        self.pos_embed = patch_embed()
        self.ref_pos_embed = patch_embed()
        self.noise_refiner = refiner()
        self.ref_image_refiner = refiner()
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(embedding_dim=dim,
                                                                  pooled_projection_dim=config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, config.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            JointTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim,
                                  context_pre_only=i == config.num_layers - 1, qk_norm=config.qk_norm,
                                  use_dual_attention=i in config.dual_attention_layers)
            for i in range(config.num_layers)])
        processor = RopeJointAttnProcessor()
        for block in self.transformer_blocks:
            block.attn.set_processor(processor)
            if block.attn2 is not None:
                block.attn2.set_processor(processor)
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, config.patch_size ** 2 * config.out_channels)

    def rotary(self, frames: int, h_tokens: int, w_tokens: int, text_len: int, device) -> torch.Tensor:
        """The 3-axis RoPE over the token grid (spec §8.10). Upstream's forward (sd3_transformer.py) sizes its
        grid as latent height // 2 x width // 2 whatever `patch_size` says, and its attention cuts the table to
        the sequence: the same at patch 2 (SD3's default), a scrambled or too short table at any other;
        the token grid is what it means."""
        pos = rope_positions(frames, h_tokens, w_tokens, text_len)
        top = int(pos.max()) + 1
        if top > self.config.rope_max_index or int(pos.min()) < -self.config.rope_max_index:
            raise ImageGenError(f"the DiT's RoPE table holds {self.config.rope_max_index} positions; this image and "
                                f"condition need {top}")
        return rope_freqs(pos).to(device)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                timestep: torch.Tensor, ref_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [B, C, h, w] (+ the reference [B, C, h, w]) -> the prediction [B, C, h, w] for the first."""
        p = self.config.patch_size
        height, width = hidden_states.shape[-2:]
        temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        x = self.pos_embed(hidden_states)
        for layer in self.noise_refiner:
            x = layer(x, temb)
        n_img = x.shape[1]
        if ref_hidden_states is not None:
            ref = self.ref_pos_embed(ref_hidden_states)
            for layer in self.ref_image_refiner:
                ref = layer(ref, temb)
            x = torch.cat([x, ref], dim=1)
        frames = 1 if ref_hidden_states is None else 2
        rotary = self.rotary(frames, height // p, width // p, context.shape[1], x.device)
        kwargs = {"image_rotary_emb": rotary.unsqueeze(0).expand(x.shape[0], -1, -1)}
        for block in self.transformer_blocks:
            context, x = block(hidden_states=x, encoder_hidden_states=context, temb=temb, joint_attention_kwargs=kwargs)
        x = self.proj_out(self.norm_out(x[:, :n_img], temb))
        c = self.config.out_channels
        x = x.reshape(x.shape[0], height // p, width // p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, height, width)

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype, device: torch.device | str) -> "SD3Transformer2DModel":
        """transformer/: config.json and the diffusers safetensors (one file, or shards with their index)."""
        import json

        from engine.loader import CheckpointError, CheckpointFiles, check_unexpected, load_module

        folder = Path(folder)
        config = SD3DiTConfig.from_file(folder / "config.json")
        with torch.device("meta"):
            model = cls(config)
        try:
            if (folder / DIFFUSERS_INDEX).is_file():
                weight_map = json.loads((folder / DIFFUSERS_INDEX).read_text(encoding="utf-8"))["weight_map"]
                files = CheckpointFiles(folder, {str(k): str(v) for k, v in weight_map.items()})
            else:
                files = CheckpointFiles.open(folder)
            with files.reader() as reader:
                consumed = load_module(model, reader, "", dtype, device)
            check_unexpected(files, consumed)
        except (CheckpointError, OSError, ValueError, KeyError, TypeError) as e:
            raise ImageGenError(f"{folder}: cannot load the Preview DiT ({e})") from e
        return model.eval()


# The Preview builds exactly two single-stream refiners per stream (num_refiner_layers = 2 in its __init__,
# whatever the config says).
REFINER_LAYERS = 2


# --------------------------------------------------------------------------------------------- wrapper


def caption_and_pooled(condition: torch.Tensor, caption_mlp: nn.Module, pooled_dim: int,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3Model_withMLP: the caption MLP on the condition [B, L, C] -> [B, L, D] in the DiT's dtype, and the
    pooled projection: its mean over tokens, adaptive-average-pooled from D to `pooled_dim` [B, P]."""
    enc = caption_mlp(condition.to(caption_mlp.fc1.weight.dtype)).to(dtype)
    pooled = F.adaptive_avg_pool1d(enc.permute(0, 2, 1), output_size=1)
    return enc, F.adaptive_avg_pool1d(pooled.squeeze(2), output_size=pooled_dim)


# SD3Model_withMLP.forward runs the transformer, and only it, under torch.cuda.amp.autocast(bfloat16): the caption
# MLP and pooling before it, the CFG combine, the scheduler step and the VAE run outside (upstream's autocast is
# CUDA's, so it is off on a CPU).
DIT_AUTOCAST_DEVICE = "cuda"
DIT_AUTOCAST_DTYPE = torch.bfloat16


def dit_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """The precision context of one DiT forward on `device`: bf16 autocast on CUDA, as upstream; none elsewhere
    (the DiT computes in its load dtype)."""
    if torch.device(device).type == DIT_AUTOCAST_DEVICE:
        return torch.autocast(DIT_AUTOCAST_DEVICE, dtype=DIT_AUTOCAST_DTYPE)
    return contextlib.nullcontext()


def combine_guidance(out: torch.Tensor, guidance: float, image_guidance: float) -> torch.Tensor:
    """The Preview pipeline's CFG (mode 1) over the branch outputs: 2 branches [null, text]:
    u + g·(t − u); 4 branches [null/zero ref, null/ref, text/zero ref, text/ref]: u + g_img·(img − u) + g·(full − img).
    One branch: itself."""
    if out.shape[0] == 1:
        return out
    if out.shape[0] == 2:
        uncond, text = out.chunk(2)
        return uncond + guidance * (text - uncond)
    uncond, img, _text, full = out.chunk(4)
    return uncond + image_guidance * (img - uncond) + guidance * (full - img)


def sd3_noise(seed: int, shape: tuple[int, ...], dtype: torch.dtype, device=None) -> torch.Tensor:
    """The pipeline's randn_tensor with `torch.manual_seed(seed)`: drawn on the CPU in the DiT's dtype, moved."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=dtype).to(device if device is not None else "cpu")


def sd3_latent_shape(height: int, width: int, channels: int, vae_scale: int) -> tuple[int, int, int, int]:
    return (1, channels, height // vae_scale, width // vae_scale)


def make_sd3_scheduler(scheduler_config: dict, steps: int, latent_hw: tuple[int, int], patch: int, device=None):
    """The scheduler as the Preview pipeline sets it: from the shipped config as is, μ from the image tokens
    when it shifts dynamically, `set_timesteps(steps)`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    kwargs = {}
    if sched.config.get("use_dynamic_shifting", None):
        kwargs["mu"] = dynamic_shift_mu((latent_hw[0] // patch) * (latent_hw[1] // patch), sched.config)
    sched.set_timesteps(steps, device=device, **kwargs)
    return sched


def denoise_sd3(transformer: SD3Transformer2DModel, caption_mlp: nn.Module, scheduler, latents: torch.Tensor,
                condition: torch.Tensor, guidance: float, image_guidance: float,
                ref_latent: torch.Tensor | None = None,
                negative_condition: torch.Tensor | None = None) -> Iterator[DenoiseStep]:
    """The Preview's CFG Euler loop, one yield per step. `latents` [1, C, h, w] in the DiT's dtype, `condition`
    [1, L, C_cond], `negative_condition` the null branches' condition of the same shape (a negative prompt's; None:
    zeros, spec §8.2), both through the same MLP, `ref_latent` [1, C, h, w] or None. CFG runs when
    guidance > 1; with a reference and image_guidance > 1 over 4 branches. The DiT's forward runs in
    `dit_autocast` of the latents' device (bf16 autocast on CUDA); its output is combined and stepped as it comes,
    outside it, as the Preview pipeline does."""
    dtype = next(transformer.parameters()).dtype
    cfg = guidance > 1.0
    four = cfg and ref_latent is not None and image_guidance > 1.0
    if negative_condition is not None and negative_condition.shape != condition.shape:
        raise ValueError(f"the negative condition is {tuple(negative_condition.shape)}, the condition "
                         f"{tuple(condition.shape)}: the CFG branches need one shape")
    with torch.inference_mode():
        null = torch.zeros_like(condition) if negative_condition is None else negative_condition.to(condition)
        conds = ([null, null, condition, condition] if four else [null, condition] if cfg else [condition])
        enc, pooled = caption_and_pooled(torch.cat(conds), caption_mlp, transformer.config.pooled_projection_dim, dtype)
        ref_in = None
        if ref_latent is not None:
            ref = ref_latent.to(latents.device, latents.dtype)
            zero = torch.zeros_like(ref)
            ref_in = torch.cat([zero, ref, zero, ref] if four else [ref] * len(conds))
    timesteps = scheduler.timesteps
    n = len(timesteps)
    for i in range(n):
        with torch.inference_mode():
            t = timesteps[i]
            t_dit = t.expand(len(conds))
            x = torch.cat([latents] * len(conds)).to(dtype)
            with dit_autocast(x.device):
                out = transformer(x, enc, pooled, t_dit, ref_in)
            pred = combine_guidance(out, guidance, image_guidance)
            sigma = float(scheduler.sigmas[i])
            new = scheduler.step(pred, t, latents, return_dict=False)[0]
        yield DenoiseStep(index=i, total=n, timestep=t, sigma=sigma, latents_in=latents, latents_out=new,
                          model_output=pred, dit_t=t_dit, dit_out=out)
        latents = new


__all__ = ["RopeJointAttnProcessor", "SD3Transformer2DModel", "apply_rope", "caption_and_pooled", "combine_guidance",
           "denoise_sd3", "dit_autocast", "make_sd3_scheduler", "rope_freqs", "rope_positions", "sd3_latent_shape",
           "sd3_noise"]
