"""Sampling with the Z-Image DiT (spec §8.5, §8.6, §8.8): caption features, the flow-matching
schedule, the CFG Euler loop (one step at a time, so callers can preview and cancel between steps),
the initial noise, and the VAE at both ends.

The models are diffusers' own `ZImageTransformer2DModel`, `AutoencoderKL` and
`FlowMatchEulerDiscreteScheduler` (bit-identical to the reference on the fixtures). Editing uses the
DiT's frame axis: the reference latent is frame 1 of every branch and only frame 0 is kept; diffusers
0.42.1's class does this as the Ming fork does, so no subclass is needed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.imagegen.config import QueryHeadConfig

# text_encoder_norm: the condition is L2-normalised and scaled by this before the DiT (spec §8.5).
CAPTION_NORM_SCALE = 1000.0
# Defaults of the dynamic-shift line when scheduler_config.json omits them (diffusers' own, spec §8.6).
SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
# The DiT patchifies the latent 2x2, one frame deep (spec §8.5): latent sides must be even. The pipeline calls
# the DiT with these, whatever sizes its config builds embedders for (all_patch_size / all_f_patch_size).
DIT_PATCH = 2
DIT_FRAME_PATCH = 1
# The reference pipeline's DiT timestep is (1000 - t) / 1000 with this constant written in the loop,
# whatever the scheduler's num_train_timesteps (t = sigma * num_train_timesteps): 1 - sigma at the
# shipped 1000 (spec §8.6).
PIPELINE_TIMESTEP_SCALE = 1000.0


@dataclass(frozen=True)
class CfgOptions:
    """ZImagePipeline's CFG options besides the scale (spec §8.6), with the pipeline's defaults (both off).

    truncation: CFG is skipped (one DiT branch, the positive, and no guidance) on steps whose DiT
        timestep (1000 − t)/1000 exceeds it; None or above 1 never truncates.
    normalization: False is off; True or a factor k > 0 caps ‖pred‖ at k·‖pos‖ (True = 1, the
        pipeline's float(cfg_normalization)), norms over each sample's whole prediction in fp32."""

    truncation: float | None = 1.0
    normalization: bool | float = False

    def __post_init__(self) -> None:
        t, k = self.truncation, self.normalization
        if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t)):
            raise ValueError(f"cfg_truncation must be a finite number or None, got {t!r}")
        if not isinstance(k, (int, float)) or not math.isfinite(k) or k < 0:
            raise ValueError(f"cfg_normalization must be a bool or a factor >= 0, got {k!r}")

    def guided_at(self, dit_t: float) -> bool:
        """Whether a CFG run keeps its guidance at this DiT timestep."""
        return self.truncation is None or float(self.truncation) > 1 or dit_t <= float(self.truncation)

    def renormalize(self, pred: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The guided prediction scaled down to at most factor·‖pos‖ (unchanged when off or within it)."""
        factor = float(self.normalization)
        if factor <= 0:
            return pred
        limit = torch.linalg.vector_norm(pos) * factor
        norm = torch.linalg.vector_norm(pred)
        return pred * (limit / norm) if norm > limit else pred


def caption_features(condition: torch.Tensor, head: QueryHeadConfig, caption_mlp: nn.Module | None) -> torch.Tensor:
    """The wrapper before `cap_embedder` (spec §8.5): L2-normalise ×1000 when `text_encoder_norm`,
    then the caption MLP (identity when `use_identity_mlp`). An all-zero negative stays zero."""
    x = condition
    if head.text_encoder_norm:
        x = F.normalize(x, dim=-1) * CAPTION_NORM_SCALE
    if caption_mlp is not None:
        x = caption_mlp(x.to(next(caption_mlp.parameters()).dtype))
    return x


def dynamic_shift_mu(image_tokens: int, config) -> float:
    """μ = m·n + b on the line through (base_seq, base_shift) and (max_seq, max_shift) (spec §8.6)."""
    get = (lambda k: config.get(k, SHIFT_DEFAULTS[k])) if hasattr(config, "get") else (
        lambda k: getattr(config, k, SHIFT_DEFAULTS[k]))
    base_seq, max_seq = get("base_image_seq_len"), get("max_image_seq_len")
    base_shift, max_shift = get("base_shift"), get("max_shift")
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return image_tokens * m + (base_shift - m * base_seq)


def make_scheduler(scheduler_config: dict, steps: int, latent_hw: tuple[int, int], device=None):
    """The scheduler as the reference sets it up: from the shipped config, `sigma_min` forced to 0 (so
    the last step lands on σ = 0), `set_timesteps(steps, mu=μ)`.

    Dynamic shifting follows the config file's `use_dynamic_shifting` exactly: upstream's attempt to
    force it on writes the FrozenDict item, while `set_timesteps` reads the attribute, which keeps the
    file's value (spec §8.6). μ is computed either way and ignored by a static-shift config.
    Returns (scheduler, μ)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    h, w = latent_hw
    mu = dynamic_shift_mu((h // DIT_PATCH) * (w // DIT_PATCH), sched.config)
    sched.sigma_min = 0.0
    with warnings.catch_warnings():  # the exponential shift divides by σ = 0 at the terminal step (-> 0)
        warnings.simplefilter("ignore", RuntimeWarning)
        with np.errstate(divide="ignore"):
            sched.set_timesteps(steps, device=device, mu=mu)
    sched.set_begin_index(0)
    return sched, mu


def seeded_noise(seed: int, shape: tuple[int, ...], device=None) -> tuple[torch.Tensor, torch.Generator]:
    """What the reference's `torch.manual_seed(seed)` gives its pipeline (spec §8.6, §9 item 21): fp32 Gaussian
    latents from the CPU stream (the same numbers on any device the loop then runs on), moved to `device`,
    and the generator a stochastic scheduler step (`stochastic_sampling` in the scheduler config) draws from.
    Those steps call torch.randn_like on the latents' device with the global generators that manual_seed
    seeded: on the CPU the stream the latents came from goes on, elsewhere that device's stream starts at
    `seed`."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    latents = torch.randn(shape, generator=gen, dtype=torch.float32)
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cpu":
        return latents, gen
    return latents.to(device), torch.Generator(device=device).manual_seed(int(seed))


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 CPU latents of `seeded_noise`."""
    return seeded_noise(seed, shape)[0]


def latent_shape(height: int, width: int, channels: int, vae_scale: int) -> tuple[int, int, int, int]:
    """[1, C, H/f, W/f] with even latent sides, as the reference computes it (2·⌊H/(2f)⌋)."""
    return (1, channels, DIT_PATCH * (height // (vae_scale * DIT_PATCH)), DIT_PATCH * (width // (vae_scale * DIT_PATCH)))


@dataclass
class DenoiseStep:
    """What one step computed (the caller previews, cancels, or records it for parity)."""

    index: int
    total: int
    timestep: torch.Tensor           # scheduler timestep t (the DiT gets (1000 − t)/1000)
    sigma: float
    latents_in: torch.Tensor         # [1, C, h, w] fp32
    latents_out: torch.Tensor        # after the Euler step
    model_output: torch.Tensor       # −(pos + g·(pos − neg)), fp32
    dit_t: torch.Tensor              # [branches] DiT timestep input
    dit_out: torch.Tensor            # [branches, C, 1, h, w] frame 0 of each branch

    def predicted_clean(self) -> torch.Tensor:
        """x̂₀ = x_t − σ·v: where this step points (what previews show)."""
        return self.latents_in - self.sigma * self.model_output


def dit_velocity(transformer: nn.Module, latents: torch.Tensor, t_dit: torch.Tensor, captions: list[torch.Tensor],
                 ref_latent: torch.Tensor | None) -> torch.Tensor:
    """One DiT call on a batch of branches sharing the latent: returns frame 0 of each, [B, C, 1, h, w].
    `ref_latent` [C, 1, h, w] becomes frame 1 of every branch (spec §8.8). `t_dit` is passed in fp32, the
    captions in the dtype they come in."""
    dtype = next(transformer.parameters()).dtype
    x = latents[0].to(dtype).unsqueeze(1)  # [C, 1, h, w]
    if ref_latent is not None:
        x = torch.cat([x, ref_latent.to(x.device, dtype)], dim=1)
    xs = [x for _ in captions]
    # As the reference pipeline hands them over: the latents in the DiT's dtype, the timestep in float32 (the DiT
    # builds its sinusoid from t·t_scale in fp32 and casts the embedding itself) and the captions uncast (fp32
    # from the identity wrapper: cap_embedder's RMSNorm takes its statistics in fp32 and rounds to the weights'
    # dtype once).
    out = transformer(xs, t_dit.float(), list(captions), return_dict=False)[0]
    return torch.stack([o[:, :1] for o in out])


def denoise(transformer: nn.Module, scheduler, latents: torch.Tensor, caption: torch.Tensor,
            negative_caption: torch.Tensor, guidance: float, ref_latent: torch.Tensor | None = None,
            options: CfgOptions = CfgOptions(), generator: torch.Generator | None = None) -> Iterator[DenoiseStep]:
    """The CFG Euler loop (spec §8.6), one yield per step. `latents` fp32 [1, C, h, w] on the DiT's
    device; captions [L, C_cap]. CFG runs when guidance > 1 and `options` does not truncate the step:
    pred = pos + g·(pos − neg) in fp32, renormalised per `options`; otherwise the DiT runs the positive
    branch alone and pred = pos. The model output is −pred. A stochastic scheduler draws its step noise
    from `generator` (seeded_noise's; None: the global RNG). Yields happen outside inference mode (it is
    thread-local)."""
    timesteps = scheduler.timesteps
    t_scale = PIPELINE_TIMESTEP_SCALE
    n = len(timesteps)
    for i in range(n):
        with torch.inference_mode():
            t = timesteps[i]
            t_step = (t_scale - t) / t_scale
            cfg = guidance > 1.0 and options.guided_at(float(t_step))
            captions = [caption, negative_caption] if cfg else [caption]
            t_dit = t_step.expand(len(captions)).to(latents.device)
            out = dit_velocity(transformer, latents, t_dit, captions, ref_latent)
            pos = out[0, :, 0].float()
            pred = options.renormalize(pos + guidance * (pos - out[1, :, 0].float()), pos) if cfg else pos
            model_output = -pred.unsqueeze(0)
            sigma = float(scheduler.sigmas[i])
            new = scheduler.step(model_output, t, latents, generator=generator, return_dict=False)[0]
        yield DenoiseStep(index=i, total=n, timestep=t, sigma=sigma, latents_in=latents, latents_out=new,
                          model_output=model_output, dit_t=t_dit, dit_out=out)
        latents = new


# --------------------------------------------------------------------------------------------- VAE


def vae_scale_factor(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _shift(vae) -> float:
    return float(vae.config.shift_factor or 0.0)


def decode_latents(vae: nn.Module, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """x / scaling + shift -> VAE decode -> uint8 (clamp(x/2 + 0.5)·255 rounded) (spec §8.6).
    Returns (VAE input, decoded [1, 3, H, W], image [H, W, 3] uint8)."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + _shift(vae)
    decoded = vae.decode(z, return_dict=False)[0]
    img = (decoded * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return z, decoded, (img[0] * 255).round().astype(np.uint8)


def encode_latents(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [−1, 1] -> DiT-space latents [N, C, h, w] = (posterior mode − shift)·scale (spec §8.8)."""
    z = vae.encode(pixels.to(vae.dtype), return_dict=False)[0].mode()
    return ((z - _shift(vae)) * vae.config.scaling_factor).float()


def encode_reference(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[1, 3, H, W] in [−1, 1] -> the DiT reference latent [C, 1, h, w] (frame axis second)."""
    return encode_latents(vae, pixels)[0].unsqueeze(1)


def check_latent_grid(height: int, width: int, vae_scale: int, patch: int = DIT_PATCH) -> None:
    """The diffusion size must cut into whole DiT tokens of `patch` latent pixels (the DiT's own patch size)."""
    unit = vae_scale * patch
    if height % unit or width % unit or height <= 0 or width <= 0:
        raise ValueError(f"diffusion size {width}x{height} must be positive multiples of {unit} "
                         f"(VAE factor {vae_scale} x DiT patch {patch})")


def steps_for_preview(total: int, every: int) -> set[int]:
    """Step indices (0-based) after which a preview is due: every k-th step, never the last one (the
    final image follows it)."""
    if every <= 0:
        return set()
    return {i for i in range(total - 1) if (i + 1) % every == 0}


__all__ = ["CAPTION_NORM_SCALE", "CfgOptions", "DenoiseStep", "caption_features", "check_latent_grid", "decode_latents",
           "denoise", "dit_velocity", "dynamic_shift_mu", "encode_latents", "encode_reference", "initial_noise", "latent_shape",
           "make_scheduler", "seeded_noise", "steps_for_preview", "vae_scale_factor"]
