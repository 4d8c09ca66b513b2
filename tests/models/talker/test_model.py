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
