"""Config parsing: both real releases, the standalone LLM layout, the known pitfalls, bad input."""

import json
import warnings

import pytest

from engine.models.thinker.config import ConfigError, MingConfig
from tests.paths import fixture_case, real_config


def test_real_2_0_config_parses_with_spec_values():
    cfg = MingConfig.from_file(real_config("ming-flash-omni-2.0"))
    llm = cfg.llm
    assert cfg.is_composite and cfg.llm_weight_prefix == "model." and cfg.release == "2.0"
    assert (llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads, llm.num_key_value_heads) == (4096, 32, 32, 4)
    assert llm.head_dim == 128 and llm.rotary_dim == 64  # head_dim derived (absent from config)
    assert (llm.num_experts, llm.num_experts_per_tok, llm.n_group, llm.topk_group) == (256, 8, 8, 4)
    assert llm.routed_scaling_factor == 2.5  # default: the shipped key is not the one the reference reads
    assert llm.rope_theta == 2400000 and llm.use_interleaved_frame_timestamp
    assert llm.eos_token_ids == (156895,) and llm.first_k_dense_replace == 1 and llm.num_moe_layers == 31
    assert llm.uses_multi_router and llm.video_start_token_is_image_end


def test_real_preview_config_parses_and_warns_about_video_start_token():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = MingConfig.from_file(real_config("ming-flash-omni-preview") / "config.json")
    assert cfg.release == "preview" and cfg.llm.rope_theta == 600000
    assert not cfg.llm.use_interleaved_frame_timestamp
    assert any("video_start_token" in str(w.message) for w in caught)


def test_standalone_llm_config_has_no_prefix():
    cfg = MingConfig.from_file(fixture_case("llm_b1"))
    assert not cfg.is_composite and cfg.llm_weight_prefix == "" and cfg.llm.head_dim == 128


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["llm_config"].pop("hidden_size"), "hidden_size"),
    (lambda c: c["llm_config"].update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda c: c["llm_config"].update(n_group=7), "n_group"),
    (lambda c: c["llm_config"].update(num_experts_per_tok=300), "num_experts_per_tok"),
    # the reference's attention reads rope_scaling["type"] and maps channels by it (spec §2.4): another
    # type is not a rotary this engine implements (none at all is plain RoPE: tests/models/thinker/test_llm.py)
    (lambda c: c["llm_config"].update(rope_scaling={"type": "m_rope"}), "rope_scaling"),
    (lambda c: c["llm_config"].update(rope_scaling={"rope_type": "video_rope"}), "rope_scaling"),
    # sizes a hand-edited config gets wrong: refused naming the key, not a torch error building the model
    (lambda c: c["llm_config"].update(hidden_size=-64), "hidden_size -64 must be at least 1"),
    (lambda c: c["llm_config"].update(num_hidden_layers=0), "num_hidden_layers 0 must be at least 1"),
    (lambda c: c["llm_config"].update(vocab_size=0), "vocab_size 0 must be at least 1"),
    (lambda c: c["llm_config"].update(first_k_dense_replace=-1), "first_k_dense_replace -1 must not be negative"),
    (lambda c: c["llm_config"].update(partial_rotary_factor=-0.5), "partial_rotary_factor"),
    (lambda c: c["llm_config"].update(rope_theta=0), "rope_theta"),
    # what int() would quietly turn into another model: 4.5 layers, true heads, "32" layers
    (lambda c: c["llm_config"].update(num_hidden_layers=4.5), "num_hidden_layers.*not an integer"),
    (lambda c: c["llm_config"].update(num_attention_heads=True), "num_attention_heads.*not an integer"),
    (lambda c: c["llm_config"].update(num_hidden_layers="32"), "num_hidden_layers.*not an integer"),
    (lambda c: c.update(mlp_depth="deep"), "config.json: key 'mlp_depth' is 'deep', not an integer"),
])
def test_bad_configs_name_the_key(mutate, message):
    cfg = json.loads((real_config("ming-flash-omni-2.0") / "config.json").read_text())
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        MingConfig.from_dict(cfg)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json found: give the folder of a Ming-flash-omni checkpoint"):
        MingConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        MingConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{\x00}")  # UTF-16, or a binary file saved under the name
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: invalid JSON .*UTF-8"):
        MingConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="neither.*another model's checkpoint; give the folder of a Ming-flash-omni"):
        MingConfig.from_file(tmp_path)


def test_single_router_and_omitted_keys_follow_bailing_moe_v2_config():
    """The reference's one-gate router is router_type "topN" (also BailingMoeV2Config's default); it was
    refused as unsupported. Keys a config omits take BailingMoeV2Config's defaults (spec §2.1 lists the
    released values; the class fills the rest): dense bias on, partial rotary 0.5, eps 1e-5."""
    d = json.loads((real_config("ming-flash-omni-2.0") / "config.json").read_text())["llm_config"]
    topn = MingConfig.from_dict({**d, "router_type": "topN"}).llm
    assert topn.router_type == "topN" and not topn.uses_multi_router
    bare = {k: v for k, v in d.items()
            if k not in ("router_type", "use_bias", "partial_rotary_factor", "rms_norm_eps", "max_position_embeddings")}
    llm = MingConfig.from_dict(bare).llm
    assert not llm.uses_multi_router and llm.use_bias and not llm.use_qkv_bias
    assert (llm.partial_rotary_factor, llm.rms_norm_eps, llm.max_position_embeddings) == (0.5, 1e-5, 16384)
    with pytest.raises(ConfigError, match="router_type"):
        MingConfig.from_dict({**d, "router_type": "noisy"})


def test_interleaved_frame_timestamp_defaults_per_release_and_rope_theta_default():
    """BailingMoeV2Config (2.0 tree) defaults use_interleaved_frame_timestamp to True: a 2.0 or standalone LLM
    config omitting it runs 2.0's interleaved video; the Preview code has no such path, so a Preview config never
    interleaves, whatever it states (spec §1.1, §3.4). An omitted rope_theta is the class default 10000."""
    v2 = json.loads((real_config("ming-flash-omni-2.0") / "config.json").read_text())
    del v2["llm_config"]["use_interleaved_frame_timestamp"]
    assert MingConfig.from_dict(v2).llm.use_interleaved_frame_timestamp
    assert MingConfig.from_dict(v2["llm_config"]).llm.use_interleaved_frame_timestamp        # standalone LLM
    v2["llm_config"]["use_interleaved_frame_timestamp"] = False
    assert not MingConfig.from_dict(v2).llm.use_interleaved_frame_timestamp
    pv = json.loads((real_config("ming-flash-omni-preview") / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not MingConfig.from_dict(pv).llm.use_interleaved_frame_timestamp
        pv["llm_config"]["use_interleaved_frame_timestamp"] = True
        assert not MingConfig.from_dict(pv).llm.use_interleaved_frame_timestamp
        del pv["llm_config"]["rope_theta"]
        assert MingConfig.from_dict(pv).llm.rope_theta == 10000.0
