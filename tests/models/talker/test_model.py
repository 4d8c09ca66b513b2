"""BailingTalker2 heads in the talker dtype (spec §7.5 stop rule p > 0.5)."""

import torch

from engine.models.talker.config import TalkerConfig
from engine.models.talker.model import build_talker
from engine.models.talker.tiny import tiny_llm_config, tiny_talker_config


def test_stop_probability_is_the_softmax_in_the_talker_dtype():
    """The reference takes softmax(stop_head(h)) in the talker dtype and compares it with 0.5: in bf16 a
    probability of 0.501 rounds to 0.5, which does not stop the loop; fp32 kept 0.501 and stopped."""
    cfg = TalkerConfig.from_dicts(tiny_talker_config(), tiny_llm_config())
    talker = build_talker(cfg, "cpu").to(torch.bfloat16)
    with torch.no_grad():
        talker.stop_head.weight.zero_()
        talker.stop_head.bias.copy_(torch.tensor([0.0, 0.004]))
    h = torch.randn(1, 1, cfg.llm.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        p = talker.stop_probability(h)
        p32 = float(talker.float().stop_probability(h.float()).reshape(-1)[0])
    assert float(p.reshape(-1)[0]) == 0.5  # bf16(0.501) -> not > 0.5
    assert 0.5005 < p32 < 0.5015


def test_sampler_scalars_are_held_in_the_talker_dtype():
    """The reference passes [cfg, sigma, temperature] to the CFM as one tensor in the talker dtype and
    forms the noise scale sigma * temperature ** 0.5 from it: in bf16, cfg 2.3 is 2.296875 and
    sigma 0.3, temperature 2.5 give 0.30078125 * 1.578125 -> 0.474609375."""
    from engine.models.talker.cfm import SamplingParams, sde_scalars
    from engine.models.talker.generate import PatchStep

    cfg_t, noise_t = sde_scalars(SamplingParams(2.3, 0.3, 2.5), torch.bfloat16, "cpu")
    assert cfg_t.dtype == noise_t.dtype == torch.bfloat16
    assert float(cfg_t) == 2.296875 and float(noise_t) == 0.474609375
    cfg32, noise32 = sde_scalars(SamplingParams(2.3, 0.3, 2.5), torch.float32, "cpu")
    assert abs(float(cfg32) - 2.3) < 1e-6 and abs(float(noise32) - 0.3 * 2.5 ** 0.5) < 1e-6

    talker = build_talker(TalkerConfig.from_dicts(tiny_talker_config(), tiny_llm_config()), "cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    for p in talker.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, 1, 64, generator=g).bfloat16()
    his, y0 = torch.randn(1, 32, 64, generator=g).bfloat16(), torch.randn(1, 4, 64, generator=g).bfloat16()
    sde = torch.randn(10, 1, 4, 64, generator=g).bfloat16()
    with torch.no_grad():
        gen, _, _ = PatchStep(talker)(h, his, y0, sde, SamplingParams(2.3, 0.3, 2.5))
        want = talker.cfm.sample(h, his, y0, sde, cfg_t, noise_t)
    assert torch.equal(gen, want)  # the same kernels on the same inputs
