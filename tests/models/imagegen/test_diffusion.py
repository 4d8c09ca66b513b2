"""The schedule as the reference really runs it (spec §8.6, §9 item 19), seeded noise, caption features."""

import math

import torch

from engine.models.imagegen.condition import CaptionMLP
from engine.models.imagegen.config import QueryHeadConfig
from engine.models.imagegen.diffusion import (caption_features, denoise, dynamic_shift_mu, initial_noise, latent_shape,
                                              make_scheduler, seeded_noise, steps_for_preview)

STATIC = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
          "use_dynamic_shifting": False}
DYNAMIC = {**STATIC, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
           "base_image_seq_len": 256, "max_image_seq_len": 4096}


def test_static_config_ignores_mu_and_ends_on_sigma_zero():
    sched, mu = make_scheduler(STATIC, 5, (128, 128))
    base = torch.linspace(1, 0, 5, dtype=torch.float64)
    expected = 3 * base / (1 + 2 * base)
    assert torch.allclose(sched.sigmas[:-1].double(), expected, atol=1e-6)
    assert sched.sigmas[-1] == 0 and sched.sigmas[-2] == 0   # the last step has Δσ = 0
    assert torch.allclose(sched.timesteps.double(), expected * 1000, atol=1e-3)
    assert math.isclose(mu, dynamic_shift_mu(64 * 64, STATIC))  # computed, then unused


def test_dynamic_config_uses_mu_with_the_exponential_shift():
    sched, mu = make_scheduler(DYNAMIC, 4, (64, 64))
    assert math.isclose(mu, 32 * 32 * (0.65 / 3840) + 0.5 - (0.65 / 3840) * 256, rel_tol=1e-12)
    base = torch.linspace(1, 0, 4, dtype=torch.float64)[:-1]
    expected = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    assert torch.allclose(sched.sigmas[:3].double(), expected, atol=1e-6) and sched.sigmas[3] == 0


def test_noise_comes_from_a_cpu_generator_seeded_like_torch_manual_seed():
    shape = latent_shape(64, 96, 16, 8)
    assert shape == (1, 16, 8, 12)
    torch.manual_seed(1234)
    reference = torch.randn(shape)
    assert torch.equal(initial_noise(1234, shape), reference)
    assert not torch.equal(initial_noise(1235, shape), reference)


def test_caption_features_normalise_times_1000_and_keep_zero_negatives():
    cfg = QueryHeadConfig(scales=(2,), llm_hidden=4, connector_hidden=4, c_dim=3, dit_type="zimage",
                          use_identity_mlp=True, text_encoder_norm=True)
    x = torch.tensor([[3.0, 4.0, 0.0]])
    assert torch.allclose(caption_features(x, cfg, None), torch.tensor([[600.0, 800.0, 0.0]]))
    assert torch.equal(caption_features(torch.zeros(2, 3), cfg, None), torch.zeros(2, 3))
    shapes = {"mlp.fc1.weight": (5, 3), "mlp.fc2.weight": (7, 5)}
    mlp = CaptionMLP(shapes)
    y = caption_features(x, cfg, mlp)
    ref = mlp.layer_norm2(mlp.fc2(torch.relu(mlp.layer_norm1(mlp.fc1(torch.tensor([[600.0, 800.0, 0.0]]))))))
    assert y.shape == (1, 7) and torch.allclose(y, ref)


def test_previews_every_k_steps_but_not_after_the_last():
    assert steps_for_preview(10, 3) == {2, 5, 8}
    assert steps_for_preview(6, 3) == {2}
    assert steps_for_preview(10, 0) == set()


class _RecordingDiT(torch.nn.Module):
    """Stands in for the Z-Image DiT: returns zeros of each latent's shape and records the timesteps."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, xs, t, captions, return_dict=False):
        self.seen.append(t.clone())
        return ([torch.zeros_like(x) for x in xs],)


def test_dit_timestep_is_the_pipelines_1000_minus_t_over_1000_at_any_num_train_timesteps():
    """The reference loop feeds (1000 - t)/1000 with 1000 written in the pipeline; a scheduler config with
    num_train_timesteps 500 has t = 500 sigma, so the DiT sees 1 - sigma/2, not 1 - sigma."""
    from engine.models.imagegen.diffusion import denoise
    sched, _ = make_scheduler({**STATIC, "num_train_timesteps": 500}, 4, (8, 8))
    dit = _RecordingDiT()
    cap = torch.ones(3, 8)
    steps = list(denoise(dit, sched, torch.zeros(1, 4, 8, 8), cap, torch.zeros_like(cap), 2.0))
    expected = (1000.0 - sched.timesteps) / 1000.0
    assert len(steps) == 4
    assert torch.allclose(torch.stack([s.dit_t[0] for s in steps]), expected)
    assert torch.allclose(torch.stack([t[0] for t in dit.seen]), expected) and dit.seen[0].shape == (2,)
    assert not torch.allclose(expected, 1 - sched.sigmas[:-1])


class _CaptionDiT(_RecordingDiT):
    """Outputs the caption's sum everywhere: the positive branch gives s, the zero negative 0."""

    def forward(self, xs, t, captions, return_dict=False):
        self.seen.append(t.clone())
        return ([torch.ones_like(x) * c.sum() for x, c in zip(xs, captions)],)


def _cfg_run(options, guidance=2.0):
    from engine.models.imagegen.diffusion import denoise
    sched, _ = make_scheduler(STATIC, 4, (8, 8))  # DiT timesteps 0, 1/7, 0.4, 1 (shift 3)
    dit = _CaptionDiT()
    cap = torch.ones(3, 8)  # positive output 24, negative 0
    steps = list(denoise(dit, sched, torch.zeros(1, 4, 8, 8), cap, torch.zeros_like(cap), guidance, None, options))
    return steps, dit


def test_cfg_truncation_runs_the_positive_branch_alone_past_the_threshold():
    """ZImagePipeline: with CFG on, a step whose DiT timestep (1000 - t)/1000 exceeds cfg_truncation runs
    without guidance (one branch, pred = pos); None or a value above 1 never truncates (spec §8.6)."""
    from engine.models.imagegen.diffusion import CfgOptions
    steps, dit = _cfg_run(CfgOptions(truncation=0.3))
    dit_t = [float(s.dit_t[0]) for s in steps]
    assert dit_t[1] < 0.3 < dit_t[2]
    assert [t.shape[0] for t in dit.seen] == [2, 2, 1, 1]
    assert [float(s.model_output.mean()) for s in steps] == [-72.0, -72.0, -24.0, -24.0]  # -(24 + 2*(24 - 0))
    for never in (CfgOptions(truncation=None), CfgOptions(truncation=1.5), CfgOptions()):
        steps, dit = _cfg_run(never)
        assert [t.shape[0] for t in dit.seen] == [2] * 4 and all(float(s.model_output.mean()) == -72.0 for s in steps)
    steps, dit = _cfg_run(CfgOptions(truncation=0.3), guidance=1.0)  # no CFG at all: unchanged
    assert [t.shape[0] for t in dit.seen] == [1] * 4


def test_cfg_normalization_caps_the_guided_norm_at_a_multiple_of_the_positive():
    """cfg_normalization True (= 1) or a factor k caps ||pred|| at k·||pos||, keeping its direction; a
    prediction already within the cap, and False, leave it as guided (spec §8.6)."""
    from engine.models.imagegen.diffusion import CfgOptions
    for options, expected in ((CfgOptions(normalization=True), -24.0), (CfgOptions(normalization=2.0), -48.0),
                              (CfgOptions(normalization=5.0), -72.0), (CfgOptions(normalization=False), -72.0)):
        steps, _ = _cfg_run(options)
        assert all(torch.allclose(s.model_output, torch.full_like(s.model_output, expected)) for s in steps), options


def test_cfg_options_refuse_what_the_pipeline_cannot_use():
    import pytest

    from engine.models.imagegen.diffusion import CfgOptions
    for bad in ({"truncation": float("nan")}, {"truncation": "0.5"}, {"normalization": -1.0},
                {"normalization": "yes"}):
        with pytest.raises(ValueError, match="cfg_"):
            CfgOptions(**bad)


def test_a_bf16_dit_gets_the_timestep_in_fp32():
    """The reference hands ZImageTransformer2DModel the float32 (1000 - t)/1000 whatever the DiT's dtype (it
    scales by t_scale and builds the sinusoid in fp32 before casting); we cast it to the weights' dtype
    first, so a bf16 DiT saw e.g. 1/7 as 0.1426 and 1000·t off by ~0.3: the cosine phase of the lowest
    frequency moved. The latents go in the DiT's dtype, the captions as they come (fp32 here)."""
    from engine.models.imagegen.diffusion import denoise

    class _DtypeDiT(_RecordingDiT):
        def forward(self, xs, t, captions, return_dict=False):
            self.seen.append((t.clone(), xs[0].dtype, captions[0].dtype))
            return ([torch.zeros_like(x) for x in xs],)

    sched, _ = make_scheduler(STATIC, 4, (8, 8))
    dit = _DtypeDiT().to(torch.bfloat16)
    cap = torch.ones(3, 8)
    list(denoise(dit, sched, torch.zeros(1, 4, 8, 8), cap, torch.zeros_like(cap), 2.0))
    expected = (1000.0 - sched.timesteps) / 1000.0
    assert all(t.dtype == c == torch.float32 and x == torch.bfloat16 for t, x, c in dit.seen)
    assert torch.equal(torch.stack([t[0] for t, _, _ in dit.seen]), expected.float())


def test_a_stochastic_scheduler_draws_its_step_noise_from_the_seeded_stream():
    """A scheduler config with stochastic_sampling draws fresh noise at every step. The reference seeds the
    global generators with torch.manual_seed(seed), draws the latents, and its steps call torch.randn_like
    on the latents' device, so on the CPU the step noise continues the stream the latents came from: the same
    seed gives the same picture. We drew it from whatever state the global RNG was in."""
    config = {**STATIC, "stochastic_sampling": True}
    shape = (1, 4, 8, 8)
    cap = torch.ones(3, 8)

    def run(latents, generator):
        sched, _ = make_scheduler(config, 4, shape[2:])
        steps = list(denoise(_CaptionDiT(), sched, latents, cap, torch.zeros_like(cap), 2.0, generator=generator))
        return torch.stack([s.latents_out for s in steps])

    torch.manual_seed(7)                  # the reference: global stream for the latents, then for every step
    expected = run(torch.randn(shape), None)
    torch.manual_seed(12345)              # whatever the global RNG holds, the seed decides the picture
    ours = run(*seeded_noise(7, shape, "cpu"))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    again = run(*seeded_noise(7, shape, "cpu"))
    torch.testing.assert_close(again, ours, rtol=0, atol=0)
    other = run(*seeded_noise(8, shape, "cpu"))
    assert not torch.allclose(other[-2], ours[-2])
