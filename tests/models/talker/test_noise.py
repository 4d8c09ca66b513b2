"""Seeded noise of the talker's flow matching and the AudioVAE posterior drawn as the reference draws it
(spec §7.4, §7.6): `torch.manual_seed(seed)` then randn on the model's device in the model's dtype."""

import pytest
import torch

from engine.models.talker.generate import NoiseSource
from engine.models.talker.vae import Posterior

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SEED, PATCH, CHANNELS, CFM_STEPS = 11, 3, 7, 2  # 21 values a draw: the CPU's bf16 and fp32 streams part there


def _reference_draws(device: str, dtype: torch.dtype, *shapes) -> list[torch.Tensor]:
    with torch.random.fork_rng(devices=[0] if device == "cuda" else []):
        torch.manual_seed(SEED)
        return [torch.randn(shape, device=device, dtype=dtype) for shape in shapes]


@pytest.mark.parametrize("device", DEVICES)
def test_talker_noise_from_a_seed_is_the_references_on_the_talkers_device_and_dtype(device):
    """The talker drew its seeded y0 / SDE noise on the CPU in fp32 and cast it, where the reference draws
    with randn(device=h.device, dtype=h.dtype): a bf16 talker (or one on a GPU) got other numbers."""
    source = NoiseSource(SEED, device, torch.bfloat16)
    got = [t for step in range(2) for t in source.draw(step, CFM_STEPS, PATCH, CHANNELS)]
    want = _reference_draws(device, torch.bfloat16, *[(1, PATCH, CHANNELS), (CFM_STEPS, 1, PATCH, CHANNELS)] * 2)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and g.device.type == device
        assert torch.equal(g, w)  # the same generator and kernel: the same numbers


@pytest.mark.parametrize("device", DEVICES)
def test_vae_posterior_noise_from_a_seed_is_drawn_in_the_encoders_dtype(device):
    """diffusers' Oobleck posterior draws randn_tensor(mean.shape, device, dtype=parameters.dtype), channel-major."""
    mean = torch.zeros(1, PATCH * 2 + 1, CHANNELS * 3, device=device)  # [B, T', latent]: 7 x 21 values
    got = Posterior(mean, torch.ones_like(mean), torch.bfloat16).seeded_noise(SEED)
    (want,) = _reference_draws(device, torch.bfloat16, (1, CHANNELS * 3, PATCH * 2 + 1))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.transpose(1, 2))
