"""Cheap step previews: a fixed linear map from the DiT's latent channels to RGB (no VAE decode).

The map is fitted once per checkpoint from its own VAE: a small set of synthetic images (solid
colours, colour ramps, smooth random blobs; fixed seed) is encoded to latents exactly as editing
encodes a reference ((mode − shift)·scale), and least squares fits RGB (the images average-pooled to
the latent grid, in [−1, 1]) ≈ W·z + b. It is what the VAE encoder itself says each latent channel
means in colour, so it works for any VAE (the real 16-channel one or the tiny random one), costs one
encode of 24 tiny images at load, and a preview is one [C -> 3] product per latent pixel.

Previews show the step's predicted clean latent x̂₀ = x_t − σ·v (see DenoiseStep.predicted_clean),
which is far more readable than the noisy x_t early on.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn

from engine.models.imagegen.diffusion import encode_latents, vae_scale_factor

FIT_SEED = 1234
FIT_SIDE_LATENT = 8          # fit images are 8 latent pixels square (64 px for an 8x VAE)
_COLOURS = ((1, 1, 1), (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1),
            (0.5, 0.5, 0.5), (1, 0.5, 0), (0.3, 0.6, 0.9), (0.6, 0.4, 0.2))
N_BLOBS = 8
PREVIEW_PNG_LEVEL = 1        # previews favour speed over size
PREVIEW_MAX_SIDE = 512       # previews are at most this long (the final image has the full size)


def _fit_images(side: int) -> torch.Tensor:
    """[N, 3, side, side] in [0, 1]: solid colours, four ramps, smooth random blobs."""
    imgs = [torch.tensor(c, dtype=torch.float32).view(3, 1, 1).expand(3, side, side) for c in _COLOURS]
    ramp = torch.linspace(0, 1, side)
    for c in range(3):
        img = torch.zeros(3, side, side)
        img[c] = ramp.view(1, -1)
        img[(c + 1) % 3] = ramp.view(-1, 1)
        imgs.append(img)
    imgs.append(ramp.view(1, 1, -1).expand(3, side, side))
    gen = torch.Generator().manual_seed(FIT_SEED)
    for _ in range(N_BLOBS):
        coarse = torch.rand(1, 3, 4, 4, generator=gen)
        imgs.append(torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic",
                                                    align_corners=False)[0].clamp(0, 1))
    return torch.stack([i.contiguous() for i in imgs])


class LatentRGB:
    """rgb[−1, 1] ≈ z @ weight + bias per latent pixel (weight [C, 3], bias [3])."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight = weight.float().cpu()
        self.bias = bias.float().cpu()

    @classmethod
    def fit(cls, vae: nn.Module) -> "LatentRGB":
        f = vae_scale_factor(vae)
        side = FIT_SIDE_LATENT * f
        images = _fit_images(side)
        dev = next(vae.parameters()).device
        with torch.inference_mode():
            z = encode_latents(vae, (images * 2 - 1).to(dev)).float().cpu()  # [N, C, h, w]
        target = torch.nn.functional.avg_pool2d(images * 2 - 1, f)  # [N, 3, h, w]
        x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
        y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
        x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        sol = torch.linalg.lstsq(x1, y, driver="gelsd").solution
        return cls(sol[:-1].float(), sol[-1].float())

    def to_rgb(self, latents: torch.Tensor) -> np.ndarray:
        """[1, C, h, w] -> uint8 [h, w, 3]."""
        z = latents[0].float().cpu().permute(1, 2, 0)
        rgb = (z @ self.weight + self.bias).clamp(-1, 1)
        return ((rgb * 0.5 + 0.5) * 255).round().to(torch.uint8).numpy()


def preview_size(output: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a preview: the output's shape, the long side at most PREVIEW_MAX_SIDE."""
    h, w = output
    f = min(1.0, PREVIEW_MAX_SIDE / max(h, w))
    return max(1, round(h * f)), max(1, round(w * f))


def preview_png(rgb: np.ndarray, size: tuple[int, int]) -> bytes:
    """Upscale a latent-resolution preview to (height, width) and encode it as PNG."""
    img = Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PREVIEW_PNG_LEVEL)
    return buf.getvalue()
