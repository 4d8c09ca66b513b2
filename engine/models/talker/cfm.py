"""Conditional flow matching (`cfm.*`): the Euler sampler that turns the LLM's hidden state into one
latent patch with classifier-free guidance (spec §7.6).

  y0 ~ N(0, I);  for k in steps:  v = v_c + cfg (v_c - v_u);  y += v dt_k;  y += sigma sqrt(temperature) sqrt|dt_k| xi_k

on the EPSS time grid warped by "sway" (coefficient -1). The unconditional branch zeroes only the LLM
condition (history, x and t are shared); both branches run as one doubled batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engine.models.talker.dit import DiT

# EPSS knot tables, in 1/32 units, per step count (spec §7.6); other counts use linspace.
EPSS_KNOTS = {
    5: [0, 2, 4, 8, 16, 32],
    6: [0, 2, 4, 6, 8, 16, 32],
    7: [0, 2, 4, 6, 8, 16, 24, 32],
    10: [0, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32],
    12: [0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32],
    16: [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32],
}
SWAY_COEF = -1.0
# The Preview's CFM runs the conditional branch alone when its cfg_strength is below this (its upstream
# sample loop: no unconditional DiT call, v = v_c); 2.0's always runs both branches.
PREVIEW_UNGUIDED_BELOW = 1e-5


def runs_unconditional_branch(cfg: float, preview: bool) -> bool:
    """Whether a CFM step evaluates the zero-condition branch for this cfg (see PREVIEW_UNGUIDED_BELOW)."""
    return not (preview and cfg < PREVIEW_UNGUIDED_BELOW)


def epss_timesteps(steps: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    knots = EPSS_KNOTS.get(steps)
    if knots is None:
        return torch.linspace(0, 1, steps + 1, dtype=dtype, device=device)
    return (1 / 32) * torch.tensor(knots, dtype=dtype, device=device)


def sway(t: torch.Tensor, coef: float = SWAY_COEF) -> torch.Tensor:
    return t + coef * (torch.cos(math.pi / 2 * t) - 1 + t)


def time_grid(steps: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[steps + 1] flow times, computed in the talker dtype as the reference does."""
    return sway(epss_timesteps(steps, dtype, device))


@dataclass(frozen=True)
class SamplingParams:
    """Per-task sampler settings (spec §7.10): TTS-like tasks cfg 2.0, sigma 0.25, temperature 0;
    sound effects cfg 4.5, sigma 0.3, temperature 2.5."""

    cfg: float = 2.0
    sigma: float = 0.25
    temperature: float = 0.0

    @property
    def noise_scale(self) -> float:
        return self.sigma * math.sqrt(self.temperature)

    def __post_init__(self):
        for name in ("cfg", "sigma", "temperature"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def sde_scalars(params: SamplingParams, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cfg, sigma * sqrt(temperature)) as 0-d tensors formed as the reference forms them: the three
    settings held in the talker dtype, the noise scale computed in it (bf16 rounds each step)."""
    args = torch.tensor([params.cfg, params.sigma, params.temperature], dtype=dtype, device=device)
    return args[0], args[1] * args[2] ** 0.5


class CFM(nn.Module):
    """Holds the DiT as `model` (checkpoint prefix `cfm.model.`)."""

    def __init__(self, dit: DiT, steps: int):
        super().__init__()
        self.model = dit
        self.steps = steps

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, his: torch.Tensor, cfg,
                 trace: dict | None = None, guided: bool = True) -> torch.Tensor:
        """Guided velocity: the conditional and the zero-condition branch as one batch of 2B; unguided
        (`guided` False), the conditional branch alone."""
        b = x.shape[0]
        if not guided:
            v_c = self.model(x, t.expand(b), cond, his)
            if trace is not None:
                trace.setdefault("pred_cond", []).append(v_c)
            return v_c
        pred = self.model(torch.cat([x, x]), t.expand(2 * b), torch.cat([cond, torch.zeros_like(cond)]),
                          torch.cat([his, his]))
        v_c, v_u = pred[:b], pred[b:]
        if trace is not None:
            trace.setdefault("pred_cond", []).append(v_c)
            trace.setdefault("pred_uncond", []).append(v_u)
        return v_c + (v_c - v_u) * cfg

    def sample(self, cond: torch.Tensor, his: torch.Tensor, y0: torch.Tensor, sde_noise: torch.Tensor,
               cfg: float | torch.Tensor, noise_scale: float | torch.Tensor, times: torch.Tensor | None = None,
               trace: dict | None = None, guided: bool = True) -> torch.Tensor:
        """cond [B, 1, llm_cond_dim], his [B, H, 64], y0 [B, patch, 64], sde_noise [steps, B, patch, 64];
        `cfg` and `noise_scale` (= sigma sqrt(temperature)) may be 0-d tensors (CUDA-graph inputs);
        `guided` False skips the unconditional branch (runs_unconditional_branch)."""
        times = time_grid(self.steps, y0.dtype, y0.device) if times is None else times
        y = y0
        for k in range(self.steps):
            t, dt = times[k], times[k + 1] - times[k]
            if trace is not None:
                trace.setdefault("x", []).append(y)
                trace.setdefault("t", []).append(t)
            v = self.velocity(y, t.reshape(1), cond, his, cfg, trace, guided)
            y = y + v * dt
            y = y + noise_scale * torch.sqrt(dt.abs()) * sde_noise[k]
        return y
