"""CUDA graphs of the talker step and the CFM loop give the eager results (CUDA only; skipped on CPU)."""

import pytest
import torch

from engine.models.talker.cfm import SamplingParams
from engine.models.talker.generate import NoiseSource, generate_patches
from engine.models.talker.model import load_talker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_graphed_loop_matches_eager(tiny_talker_dir):
    from engine.models.talker.graphs import GraphRunner
    talker = load_talker(tiny_talker_dir, dtype=torch.float32, device="cuda")
    embeds = talker.model.embed_tokens(torch.arange(40, device="cuda")[None])
    params = SamplingParams(4.5, 0.3, 2.5)
    eager = list(generate_patches(talker, embeds, None, params, NoiseSource(7)))
    runner = GraphRunner(talker)
    for _ in range(2):  # the second run reuses the captured graphs
        graphed = list(generate_patches(talker, embeds, None, params, NoiseSource(7), runner=runner))
        assert len(graphed) == len(eager)
        for a, b in zip(eager, graphed):
            assert (a.latents - b.latents).abs().max() < 1e-3
