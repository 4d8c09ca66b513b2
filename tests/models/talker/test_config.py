"""Talker / VAE configs parse from the checkpoint's files; what we do not implement is refused clearly."""

import json

import pytest

from engine.models.talker.config import AudioVAEConfig, TalkerConfig, TalkerConfigError
from engine.models.talker.model import load_talker
from tests.paths import fixture_case


def test_fixture_configs_parse():
    cfg = TalkerConfig.from_folder(fixture_case("talker"))
    assert (cfg.steps, cfg.patch_size, cfg.history_patch_size, cfg.latent_dim) == (10, 4, 32, 64)
    assert cfg.flow.llm_cond_dim == cfg.llm.hidden_size and cfg.flow.head_dim == 12
    vae = AudioVAEConfig.from_folder(fixture_case("audio_vae"))
    assert vae.sample_rate == 44100 and vae.n_fft == 4 * vae.hop
    assert vae.decoder.layer_types == ("full_attention", "sliding_attention")
    assert vae.encoder.with_layers(4).layer_types == vae.encoder.layer_types[:4]


@pytest.mark.parametrize("patch, message", [
    ({"architectures": ["BailingTalker"]}, "Preview talker"),
    ({"flowmodel": {"qk_norm": "layer_norm"}}, "qk_norm"),
    ({"steps": 0}, "steps"),
    ({"flowmodel": {"hidden_size": 60, "num_heads": 4}}, "even"),
    ({"history_patch_size": 2}, "history_patch_size"),  # upstream's loop raises NotImplementedError
])
def test_unsupported_talker_configs_are_refused(patch, message):
    base = json.loads((fixture_case("talker") / "config.json").read_text())
    llm = json.loads((fixture_case("talker") / "llm" / "config.json").read_text())
    for key, value in patch.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    with pytest.raises(TalkerConfigError, match=message):
        TalkerConfig.from_dicts(base, llm)


def test_rope_scaling_and_condition_width_are_refused(tmp_path):
    llm = json.loads((fixture_case("talker") / "llm" / "config.json").read_text())
    with pytest.raises(TalkerConfigError, match="rope_scaling"):
        TalkerConfig.from_dicts({}, {**llm, "rope_scaling": {"rope_type": "yarn", "factor": 4}})
    folder = tmp_path / "talker"
    (folder / "llm").mkdir(parents=True)
    cfg = json.loads((fixture_case("talker") / "config.json").read_text())
    cfg["flowmodel"]["llm_cond_dim"] = 896
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "llm" / "config.json").write_text(json.dumps(llm))
    with pytest.raises(TalkerConfigError, match="llm_cond_dim 896"):
        load_talker(folder)


def test_qwen2_backbone_fills_omitted_sliding_keys_as_transformers_does():
    """Upstream builds every Qwen2 stack with Qwen2Config.from_dict (spec §7.1, §7.8), so keys a backbone
    dict omits take transformers' defaults: with use_sliding_window on, sliding_window 4096 and
    max_window_layers 28. A 30-layer backbone without those keys made every layer full attention."""
    from engine.models.talker.config import Qwen2BackboneConfig

    base = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1,
            "num_hidden_layers": 30, "use_sliding_window": True}
    cfg = Qwen2BackboneConfig.from_dict(base, "backbone")
    assert cfg.sliding_window == 4096
    assert cfg.layer_types == ("full_attention",) * 28 + ("sliding_attention",) * 2
    small = Qwen2BackboneConfig.from_dict({**base, "num_hidden_layers": 3, "max_window_layers": 1, "sliding_window": 8}, "b")
    assert small.sliding_window == 8 and small.layer_types == ("full_attention",) + ("sliding_attention",) * 2
    off = Qwen2BackboneConfig.from_dict({**base, "use_sliding_window": False}, "b")
    assert off.sliding_window is None and set(off.layer_types) == {"full_attention"}


def test_audio_vae_config_takes_upstream_defaults_for_omitted_keys():
    """AudioVAEconfig defaults sample_rate to 16000 and the encoder reads hop_size with default 320; the
    encoder hop need not equal the decoder's output_dim (frames of input_dim samples every hop_size)."""
    base = json.loads((fixture_case("audio_vae") / "config.json").read_text())
    d = json.loads(json.dumps(base))
    del d["sample_rate"]
    del d["enc_kwargs"]["hop_size"]
    cfg = AudioVAEConfig.from_dict(d)
    assert cfg.sample_rate == 16000 and cfg.enc_hop == 320 and cfg.dec_hop == 16
    d = json.loads(json.dumps(base))
    d["enc_kwargs"].update(hop_size=8, input_dim=16)
    cfg = AudioVAEConfig.from_dict(d)
    assert (cfg.enc_hop, cfg.enc_input_dim, cfg.dec_hop) == (8, 16, 16)
    # prompt audio is padded to whole talker patches of *encoder* frames (spec §7.4: hop_size * VAE patch * patch)
    assert cfg.encoder_samples_per_latent == 8 * 4 and cfg.samples_per_latent == 16 * 4


def test_qwen2_backbone_fills_omitted_sizes_with_qwen2config_defaults():
    """Qwen2Config.from_dict fills omitted keys with Qwen2Config's defaults (vocab 151936, intermediate
    22016, 32 layers / heads / kv heads, rope_theta 10000); an explicit null kv-head count means MHA."""
    from engine.models.talker.config import Qwen2BackboneConfig

    cfg = Qwen2BackboneConfig.from_dict({"hidden_size": 64, "num_attention_heads": 32}, "b")
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (151936, 22016, 32, 32)
    assert cfg.rope_theta == 10000.0 and cfg.max_position_embeddings == 32768
    mha = Qwen2BackboneConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": None,
                                         "vocab_size": 8, "intermediate_size": 8, "num_hidden_layers": 1}, "b")
    assert mha.num_key_value_heads == 4


def test_the_real_preview_config_selects_the_preview_talker_of_spec_7_11():
    """The released Preview config.json (no weights) read by our loader names the release whose talker spec §7.11
    describes; that release's talker and VAE configs then hold §7.11's fields: history = the last talker patch (a
    history_patch_size key is not read), no speaker head input, CFG strength from the config, a 16 kHz VAE
    (AudioVAEconfig's default when omitted) with no latent patching (one latent per VAE frame)."""
    from engine.models.talker.tiny import tiny_llm_config, tiny_talker_config, tiny_vae_config
    from engine.models.thinker.config import MingConfig
    from tests.paths import real_config

    release = MingConfig.from_file(real_config("ming-flash-omni-preview") / "config.json").release
    assert release == "preview"
    assert MingConfig.from_file(real_config("ming-flash-omni-2.0") / "config.json").release == "2.0"
    talker = TalkerConfig.from_dicts({**tiny_talker_config("preview"), "history_patch_size": 32, "cfg_strength": 3.0},
                                     tiny_llm_config(), release=release)
    assert (talker.preview, talker.history_patch_size, talker.patch_size, talker.cfg_strength) == (True, 4, 4, 3.0)
    vae = {**tiny_vae_config("preview")}
    del vae["sample_rate"], vae["patch_size"]
    vae_cfg = AudioVAEConfig.from_dict(vae)
    assert (vae_cfg.sample_rate, vae_cfg.patch_size, vae_cfg.frames_per_latent) == (16000, -1, 1)
