"""The 2.0 image DiT and sampling loop as the engine runs them (diffusers' ZImageTransformer2DModel driven by
engine.models.imagegen.diffusion) against tests/models/imagegen/reference_zimage.py (spec §8.5-§8.6 written out
plainly) at sizes the fixtures never use: non-square latents, captions shorter than, equal to and longer than
the 32-token padding unit, an editing reference frame, 1-5 steps, guidance off / 2 / 4.5, static and dynamic
shift, other seeds."""

import pytest
import torch

from engine.models.imagegen.diffusion import denoise, dit_velocity, latent_shape, make_scheduler, seeded_noise
from tests.models.imagegen import reference_zimage

# fp32 on both sides; attention kernels and summation orders differ: a few ulps, grown over the steps
ATOL, RTOL = 1e-4, 1e-4
VAE_FACTOR = 8

DITS = {
    "narrow_heads_two_refiners": {"in_channels": 16, "dim": 48, "n_layers": 2, "n_refiner_layers": 2, "n_heads": 3,
                                  "n_kv_heads": 3, "cap_feat_dim": 24, "axes_dims": [4, 6, 6]},
    "four_channels_wide_axes": {"in_channels": 4, "dim": 64, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 1,
                                "n_kv_heads": 1, "cap_feat_dim": 40, "axes_dims": [16, 24, 24], "rope_theta": 64.0},
}
BASE = {"_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1], "norm_eps": 1e-5,
        "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0, "axes_lens": [1024, 512, 512]}
STATIC = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
          "use_dynamic_shifting": False}
DYNAMIC = {**STATIC, "use_dynamic_shifting": True, "base_shift": 0.4, "max_shift": 1.3, "base_image_seq_len": 16,
           "max_image_seq_len": 1024}


def _random_dit(overrides: dict, seed: int = 0):
    """A DiT of this config with every tensor random (the class zero-initialises some, hiding their paths)."""
    from diffusers import ZImageTransformer2DModel

    cfg = {**BASE, **overrides}
    model = ZImageTransformer2DModel.from_config(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name
                    else torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    return model, cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", DITS)
@pytest.mark.parametrize("hw,frames,caption_len,t", [((4, 6), 1, 5, 0.3), ((10, 2), 2, 32, 0.0),
                                                     ((2, 2), 1, 33, 1.0), ((6, 8), 2, 70, 0.75)])
def test_dit_velocity_matches_the_plain_forward(name, hw, frames, caption_len, t):
    model, cfg, sd = _random_dit(DITS[name])
    gen = torch.Generator().manual_seed(hw[0] * 100 + hw[1] * 10 + caption_len)
    latent = torch.randn(1, cfg["in_channels"], *hw, generator=gen)
    ref = torch.randn(cfg["in_channels"], 1, *hw, generator=gen) if frames == 2 else None
    caption = torch.randn(caption_len, cfg["cap_feat_dim"], generator=gen)
    with torch.inference_mode():
        ours = dit_velocity(model, latent, torch.tensor([t]), [caption], ref)[0]
    frames_in = latent[0].unsqueeze(1) if ref is None else torch.cat([latent[0].unsqueeze(1), ref], dim=1)
    want = reference_zimage.dit(sd, cfg, frames_in, t, caption)
    assert ours.shape == want.shape == (cfg["in_channels"], 1, *hw)
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("size,steps,guidance,seed,scheduler,edit", [
    ((48, 80), 3, 2.0, 7, STATIC, False), ((96, 32), 1, 4.5, 123, DYNAMIC, True),
    ((32, 32), 5, 1.0, 2024, DYNAMIC, False), ((64, 48), 4, 4.5, 0, STATIC, True)])
def test_sampling_loop_matches_the_plain_loop(size, steps, guidance, seed, scheduler, edit):
    """Pixel sizes -> latent [1, C, H/8, W/8] drawn from the seeded CPU stream, then the whole CFG Euler loop."""
    model, cfg, sd = _random_dit(DITS["narrow_heads_two_refiners"], seed=1)
    shape = latent_shape(*size, cfg["in_channels"], VAE_FACTOR)
    assert shape[-2:] == (size[0] // VAE_FACTOR, size[1] // VAE_FACTOR)
    noise, gen = seeded_noise(seed, shape)
    torch.manual_seed(seed)
    assert torch.equal(noise, torch.randn(shape))
    caption = torch.randn(45, cfg["cap_feat_dim"], generator=torch.Generator().manual_seed(seed + 1))
    ref_gen = torch.Generator().manual_seed(seed + 2)
    ref = torch.randn(cfg["in_channels"], 1, *shape[-2:], generator=ref_gen) if edit else None
    sched, _ = make_scheduler(scheduler, steps, shape[-2:])
    latents = noise
    for step in denoise(model, sched, noise, caption, torch.zeros_like(caption), guidance, ref, generator=gen):
        latents = step.latents_out
    want = reference_zimage.sample(sd, cfg, scheduler, noise, caption, guidance, steps, ref)
    torch.testing.assert_close(latents, want, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(latents, noise, atol=0.1)
