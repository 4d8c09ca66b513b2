"""The ByT5 glyph path (spec §8.4) as the engine loads and runs it (GlyphEncoder from a `byt5/` folder) against
tests/models/imagegen/reference_byt5.py, at a T5 / mapper shape and max length the fixtures never use, for
rendered texts shorter than, exactly at and longer than the padding length, and with multi-byte characters."""

import json

import pytest
import torch

from engine.models.imagegen.glyph import BASE_CKPT_PREFIX, GlyphEncoder, glyph_text_from_prompt
from tests.models.imagegen import reference_byt5

T5 = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 24, "d_kv": 6, "d_ff": 40,
      "num_layers": 3, "num_decoder_layers": 1, "num_heads": 3, "relative_attention_num_buckets": 16,
      "relative_attention_max_distance": 20, "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6,
      "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True, "vocab_size": 384, "eos_token_id": 1,
      "pad_token_id": 0, "decoder_start_token_id": 0, "tie_word_embeddings": False}
MAX_LENGTH, MAPPER_LAYERS, CHANNELS = 40, 1, 20
ATOL, RTOL = 1e-5, 1e-4  # fp32 both sides


def _random(module, gen) -> dict:
    return {n: (1 + 0.1 * torch.randn(t.shape, generator=gen)) if "norm" in n
            else torch.randn(t.shape, generator=gen) / (t.shape[-1] ** 0.5 if t.dim() > 1 else 1.0)
            for n, t in module.state_dict().items()}


def _write_byt5(folder, t5: dict) -> tuple:
    """A byt5/ folder of T5 config `t5` without glyph special tokens; base.pt holds every encoder tensor under the
    training prefix and byt5_model.pt overrides part of them (spec §8.4). Returns (folder, encoder state, mapper
    state)."""
    from transformers import ByT5Tokenizer, T5Config
    from transformers.models.t5.modeling_t5 import T5Stack

    from engine.models.imagegen.glyph import ByT5Mapper

    settings = {"byt5_config": {"byt5_ckpt_path": "t5", "special_token": False},
                "byt5_mapper_config": {"num_layers": MAPPER_LAYERS, "sdxl_channels": CHANNELS},
                "byt5_max_length": MAX_LENGTH}
    (folder / "byt5.json").write_text(json.dumps(settings))
    (folder / "t5").mkdir()
    (folder / "t5" / "config.json").write_text(json.dumps(t5))
    ByT5Tokenizer().save_pretrained(str(folder / "t5"))
    config = T5Config(**{**t5, "is_decoder": False})
    gen = torch.Generator().manual_seed(5)
    encoder = _random(T5Stack(config), gen)
    mapper = _random(ByT5Mapper(config, MAPPER_LAYERS, CHANNELS), gen)
    base = {BASE_CKPT_PREFIX + k: torch.randn(v.shape, generator=gen) for k, v in encoder.items()}
    override = {k: v for k, v in encoder.items() if "block.1." not in k}  # block 1 keeps base.pt's values
    encoder.update({k: base[BASE_CKPT_PREFIX + k] for k in encoder if k not in override})
    for name, state in (("byt5_model/base.pt", base), ("byt5_model/byt5_model.pt", override),
                        ("byt5_mapper/byt5_mapper.pt", mapper)):
        (folder / name).parent.mkdir(exist_ok=True)
        torch.save(state, folder / name)
    return folder, encoder, mapper


@pytest.fixture(scope="module")
def byt5(tmp_path_factory):
    return _write_byt5(tmp_path_factory.mktemp("byt5"), T5)


@pytest.mark.parametrize("quoted", ["A", "Hello, glyphs", "x" * 30, "a much longer sign that will not fit at all",
                                    "你好，世界", "Café ☕ öffnet"])
def test_glyph_embeddings_match_the_plain_path(byt5, quoted):
    folder, encoder_sd, mapper_sd = byt5
    text = glyph_text_from_prompt(f'a poster that says "{quoted}"')
    assert text == f'Text "{quoted}". '
    glyph = GlyphEncoder.load(folder, torch.float32, "cpu")
    with torch.inference_mode():
        out = glyph([text])
    ids, mask = reference_byt5.byte_ids(text, MAX_LENGTH)
    assert out.input_ids.tolist() == ids.tolist() and out.attention_mask.tolist() == mask.tolist()
    want = reference_byt5.glyph_embeds(text, encoder_sd, mapper_sd, T5, MAPPER_LAYERS, MAX_LENGTH)
    assert out.embeds.shape == (1, MAX_LENGTH, CHANNELS)
    torch.testing.assert_close(out.embeds[0], want, atol=ATOL, rtol=RTOL)


# What else a held-out byt5/t5/config.json may set: T5's other feed-forward kinds (a dense `wi` + activation, or a
# gated `wi_0` / `wi_1` pair with another activation); the encoder and the mapper's blocks both follow it.
@pytest.mark.parametrize("feed_forward", ["relu", "gated-silu", "gelu"])
def test_glyph_embeddings_follow_the_configs_feed_forward_kind(tmp_path, feed_forward):
    t5 = {**T5, "feed_forward_proj": feed_forward}
    folder, encoder_sd, mapper_sd = _write_byt5(tmp_path, t5)
    text = 'Text "Open 24/7". '
    glyph = GlyphEncoder.load(folder, torch.float32, "cpu")
    with torch.inference_mode():
        out = glyph([text])
    want = reference_byt5.glyph_embeds(text, encoder_sd, mapper_sd, t5, MAPPER_LAYERS, MAX_LENGTH)
    torch.testing.assert_close(out.embeds[0], want, atol=ATOL, rtol=RTOL)
    # the same weights through another kind of the same layout differ: the kind is what the result follows
    other = "gated-gelu" if feed_forward.startswith("gated") else ("gelu" if feed_forward == "relu" else "relu")
    assert not torch.allclose(want, reference_byt5.glyph_embeds(text, encoder_sd, mapper_sd,
                                                                {**t5, "feed_forward_proj": other}, MAPPER_LAYERS,
                                                                MAX_LENGTH), atol=1e-3)
