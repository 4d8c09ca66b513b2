"""The Preview's SD3-style DiT as the engine runs it against a plain float64 forward written from spec §8.10
(reference_sd3.py) at a size no fixture has: 2 heads of 64, 3 joint blocks (the last reading the caption only),
4 latent channels, a 6x10 latent (3x5 tokens, odd on both sides) cropped from a 12x12 position table, a 5-token
caption, two timesteps in one batch, with and without a reference latent. fp32 against float64: within 2e-4 of
outputs of order 2 (measured 2.7e-5)."""

import pytest
import torch

from engine.models.imagegen.config import SD3DiTConfig
from engine.models.imagegen.sd3 import SD3Transformer2DModel
from tests.models.imagegen.reference_sd3 import sd3_forward

TOLERANCE = 2e-4
CONFIG = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 3, "attention_head_dim": 64,
          "num_attention_heads": 2, "joint_attention_dim": 24, "caption_projection_dim": 128,
          "pooled_projection_dim": 12, "out_channels": 4, "pos_embed_max_size": 12}


def _random_dit(config: dict) -> SD3Transformer2DModel:
    model = SD3Transformer2DModel(SD3DiTConfig(**config)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised gates: every path must carry signal
            p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    return model


@pytest.fixture(scope="module")
def dit():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than the maths on a busy CPU
    yield _random_dit(CONFIG)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("with_ref", [False, True])
def test_preview_dit_matches_the_spec_forward(dit, with_ref):
    gen = torch.Generator().manual_seed(2)
    latent = torch.randn(2, 4, 6, 10, generator=gen)
    caption = torch.randn(2, 5, 24, generator=gen)
    pooled = torch.randn(2, 12, generator=gen)
    t = torch.tensor([937.5, 250.0])
    ref = torch.randn(2, 4, 6, 10, generator=gen) if with_ref else None
    with torch.no_grad():
        got = dit(latent, caption, pooled, t, ref)
    want = sd3_forward(dit.state_dict(), CONFIG, latent, caption, pooled, t, ref)
    assert got.shape == (2, 4, 6, 10)
    assert float(want.abs().max()) > 0.1  # a real signal, not a collapsed output
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE, rtol=0)


# Each field of transformer/config.json the Preview's DiT is built from (spec §8.10: its sizes, layer count and
# heads come from that file), at a value of its own. caption_projection_dim is the joint blocks' width (a
# different one is refused: test_config.py), so it moves with the heads; vae_ref_channel_cat true is refused.
FIELD_VALUES = {
    "sample_size": {"sample_size": 16},  # the position table's base grid (positions i / (max / base))
    "patch_size": {"patch_size": 1},
    "in_channels": {"in_channels": 3},
    "out_channels": {"out_channels": 5},
    "num_layers": {"num_layers": 1},
    "num_attention_heads": {"num_attention_heads": 1, "caption_projection_dim": 64},
    "joint_attention_dim": {"joint_attention_dim": 16},
    "pooled_projection_dim": {"pooled_projection_dim": 7},
    "pos_embed_max_size": {"pos_embed_max_size": 16},
    "qk_norm": {"qk_norm": "rms_norm"},
}
SAME_WEIGHT_SHAPES = ("sample_size", "pos_embed_max_size")  # fields that change the output, not the weights


@pytest.mark.parametrize("field", sorted(FIELD_VALUES))
def test_each_dit_config_field_is_followed(dit, field):
    """The DiT built from the config with `field` changed matches the spec forward reading the same config; a
    field that leaves the weights' shapes alone changes the prediction of the same weights."""
    config = {**CONFIG, **FIELD_VALUES[field]}
    model = _random_dit(config)
    gen = torch.Generator().manual_seed(3)
    latent = torch.randn(1, config["in_channels"], 6, 10, generator=gen)
    caption = torch.randn(1, 5, config["joint_attention_dim"], generator=gen)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=gen)
    t = torch.tensor([600.0])
    with torch.no_grad():
        got = model(latent, caption, pooled, t)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("pos_embed.pos_embed")}
    want = sd3_forward(state, config, latent, caption, pooled, t)
    assert got.shape == (1, config["out_channels"], 6, 10)
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE, rtol=0)
    if field in SAME_WEIGHT_SHAPES:
        assert float((want - sd3_forward(state, CONFIG, latent, caption, pooled, t)).abs().max()) > 1e-2
    if field == "qk_norm":
        assert float((want - sd3_forward(state, {**config, "qk_norm": None}, latent, caption, pooled, t))
                     .abs().max()) > 1e-2
