"""The talker's autoregressive loop for one text segment (spec §7.5):

  step 0: prefill the prompt embeddings; later steps: one embedding, the aggregator output of the
  previous patch. Each step: h = last hidden -> CFM patch (CFG) -> aggregator -> stop probability
  (from the same h) -> history update -> stop when step > 10 and p > 0.5 (the final patch is kept).

Bounded by MAX_STEPS and the 2048-position static cache. `cancel` (a threading.Event) is checked
before every patch. Noise comes from a `NoiseSource` (a seeded generator, or stored noise for parity).
On CUDA the per-patch work runs as captured graphs (engine.models.talker.graphs).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.models.talker.backbone import StaticKVCache
from engine.models.talker.cfm import SamplingParams, runs_unconditional_branch, sde_scalars, time_grid
from engine.models.talker.config import MAX_CACHE_LEN, MAX_STEPS
from engine.models.talker.model import BailingTalker2

MIN_STEPS_BEFORE_STOP = 10  # stop only when step > 10
STOP_THRESHOLD = 0.5


class NoiseSource:
    """Per step: y0 [1, patch, 64] then SDE noise [steps, 1, patch, 64], drawn in the reference's order.
    With `sde=False` (the Preview's sampler has no SDE term, spec §7.11) only y0 is drawn; the SDE
    noise is zeros.

    The reference draws both with `torch.randn(..., device=h.device, dtype=h.dtype)` from the global
    generators `torch.manual_seed(seed)` seeded: on the talker's device and in its dtype (a CUDA stream is
    not the CPU's, and the CPU's bf16 draws are not its fp32 draws rounded at every size). `device` and
    `dtype` are the talker's, so a seed gives the reference's numbers there too."""

    def __init__(self, seed: int | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def draw(self, step: int, steps: int, patch: int, channels: int,
             sde: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        y0 = self._randn(1, patch, channels)
        if not sde:
            return y0, y0.new_zeros(steps, 1, patch, channels)
        return y0, self._randn(steps, 1, patch, channels)


class StoredNoise(NoiseSource):
    """Noise recorded by the reference (parity): re-injected instead of drawn."""

    def __init__(self, y0: torch.Tensor, sde: torch.Tensor):
        self.y0, self.sde = y0, sde

    def draw(self, step, steps, patch, channels, sde=True):
        return self.y0[step:step + 1], self.sde[step].unsqueeze(1)


@dataclass
class Patch:
    latents: torch.Tensor   # [1, patch, 64]
    stop_prob: float
    is_last: bool
    step: int


def initial_history(cfg, prompt_latents: torch.Tensor | None, dtype, device) -> torch.Tensor:
    """zeros [1, history, 64] with the last min(history, N_f) prompt latent frames right-aligned."""
    his = torch.zeros(1, cfg.history_patch_size, cfg.latent_dim, dtype=dtype, device=device)
    if prompt_latents is not None and prompt_latents.shape[1]:
        n = min(cfg.history_patch_size, prompt_latents.shape[1])
        his[:, -n:] = prompt_latents[:, -n:].to(dtype)
    return his


class PatchStep:
    """One AR step after the LLM: CFM sample -> aggregator -> stop probability (what the reference's
    CFM graph executor captures). Eager here; engine.models.talker.graphs swaps in CUDA graphs."""

    def __init__(self, talker: BailingTalker2):
        self.talker = talker
        self.times = time_grid(talker.config.steps, talker.dtype, talker.device)

    def __call__(self, h, his, y0, sde, params: SamplingParams, trace: dict | None = None):
        t = self.talker
        cfg, noise_scale = sde_scalars(params, self.times.dtype, self.times.device)
        guided = runs_unconditional_branch(params.cfg, t.config.preview)
        gen = t.cfm.sample(h, his, y0, sde, cfg, noise_scale, self.times, trace, guided)
        return gen, t.aggregator(gen), t.stop_probability(h)


class LLMStep:
    """The talker LLM's 1-token decode step on the static cache (graphed on CUDA)."""

    def __init__(self, talker: BailingTalker2, cache: StaticKVCache):
        self.talker, self.cache = talker, cache

    def __call__(self, embed: torch.Tensor) -> torch.Tensor:
        return self.talker.model(embed, self.cache)[:, -1:]


def generate_patches(talker: BailingTalker2, inputs_embeds: torch.Tensor, prompt_latents: torch.Tensor | None,
                     params: SamplingParams, noise: NoiseSource, cancel: threading.Event | None = None,
                     trace: dict | None = None, runner=None,
                     min_steps: int = MIN_STEPS_BEFORE_STOP) -> Iterator[Patch]:
    """Yields latent patches until the stop head fires (only once step > `min_steps`, the reference's
    min_new_token), a bound is reached, or `cancel` is set.
    `runner` (engine.models.talker.graphs.GraphRunner) replaces the eager steps on CUDA."""
    cfg = talker.config
    dtype, device = talker.dtype, talker.device
    prefill = inputs_embeds.shape[1]
    limit = min(MAX_STEPS, MAX_CACHE_LEN - prefill)
    his = initial_history(cfg, prompt_latents, dtype, device)
    if runner is not None:
        cache, llm_step, patch_step = runner.prepare()
    else:
        cache = StaticKVCache(cfg.llm, MAX_CACHE_LEN, 1, dtype, device)
        llm_step, patch_step = LLMStep(talker, cache), PatchStep(talker)
    step = 0
    with torch.inference_mode():
        if limit <= 0 or (cancel is not None and cancel.is_set()):
            return
        h = talker.model(inputs_embeds.to(dtype), cache)[:, -1:]
        while step < limit:
            if cancel is not None and cancel.is_set():
                return
            y0, sde = noise.draw(step, cfg.steps, cfg.patch_size, cfg.latent_dim, sde=not cfg.preview)
            y0, sde = y0.to(device, dtype), sde.to(device, dtype)
            step_trace = {} if trace is not None else None
            gen, nxt, p = patch_step(h, his, y0, sde, params, step_trace)
            p_stop = float(p.reshape(-1)[0])
            if trace is not None:
                for key, value in (("his", his), ("h", h), ("gen", gen), ("next", nxt), ("p", p), ("y0", y0)):
                    trace.setdefault(key, []).append(value.clone())
                trace.setdefault("cfm", []).append(step_trace)
            his = torch.cat([his[:, cfg.patch_size:], gen], dim=1)
            stop = step > min_steps and p_stop > STOP_THRESHOLD
            last = stop or step + 1 >= limit
            yield Patch(gen, p_stop, last, step)
            if last:
                return
            step += 1
            if trace is not None:
                trace.setdefault("cache_position", []).append(cache.length)
            h = llm_step(nxt)
