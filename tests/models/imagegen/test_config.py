"""The image head's settings come from the checkpoint's own files; unusable ones are refused clearly."""

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.models.imagegen.config import (SD3, ZIMAGE, ImageGenError, ImageGenUnsupported, QueryHeadConfig,
                                           SD3DiTConfig, check_dit_kind, dit_kind, has_image_generator)


def _mlp(folder, scales=(2, 4), config=None, extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    t = {f"query_tokens_dict.{s}x{s}": torch.zeros(s * s, 8) for s in scales}
    t.update({"proj_in.weight": torch.zeros(6, 8), "proj_in.bias": torch.zeros(6),
              "proj_out.weight": torch.zeros(5, 6), "proj_out.bias": torch.zeros(5), **(extra or {})})
    save_file(t, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_scales_and_widths_from_the_files(tmp_path):
    cfg = QueryHeadConfig.from_folder(_mlp(tmp_path / "a"))
    assert cfg.scales == (2, 4) and cfg.query_tokens == 16 and (cfg.llm_hidden, cfg.connector_hidden, cfg.c_dim) == (8, 6, 5)
    assert cfg.use_identity_mlp and cfg.dit_type == ""  # omitted: transformer/config.json's class decides
    with_mlp = QueryHeadConfig.from_folder(_mlp(tmp_path / "b", extra={"mlp.fc1.weight": torch.zeros(3, 5)}))
    assert not with_mlp.use_identity_mlp


@pytest.mark.parametrize("config, words", [
    ({"img_gen_scales": [16]}, "no query tokens for 16x16"),
    ({"diffusion_c_input_dim": 7}, "diffusion_c_input_dim 7"),
])
def test_inconsistent_head_is_refused(tmp_path, config, words):
    with pytest.raises(ImageGenError, match=words):
        QueryHeadConfig.from_folder(_mlp(tmp_path / "m", config=config))


def _transformer(root, cfg):
    (root / "transformer").mkdir(parents=True, exist_ok=True)
    (root / "transformer" / "config.json").write_text(json.dumps(cfg))


def test_the_dit_kind_comes_from_the_transformer_class(tmp_path):
    """The Preview's SD3-style DiT (spec §8.10) is chosen by transformer/config.json's class (the Preview's
    mlp/config.json, if any, is not read upstream); its wrapper always runs the caption MLP; another DiT class
    is refused naming both implemented ones."""
    root = tmp_path / "ckpt"
    mlp_w = {"mlp.fc1.weight": torch.zeros(3, 5), "mlp.fc2.weight": torch.zeros(4, 3)}
    head = QueryHeadConfig.from_folder(_mlp(root / "mlp", extra=mlp_w))
    _transformer(root, {"_class_name": "SD3Transformer2DModel"})
    assert dit_kind(root, head) == SD3
    assert not has_image_generator(root)
    bare = QueryHeadConfig.from_folder(_mlp(tmp_path / "bare" / "mlp"))  # no mlp.* weights: the SD3 wrapper cannot run
    with pytest.raises(ImageGenError, match="caption MLP"):
        dit_kind(root, bare)
    zimage_head = QueryHeadConfig.from_folder(_mlp(tmp_path / "z" / "mlp", config={"dit_type": "zimage"}, extra=mlp_w))
    with pytest.raises(ImageGenUnsupported, match="dit_type 'zimage'"):
        dit_kind(root, zimage_head)
    _transformer(root, {"_class_name": "SanaTransformer2DModel"})
    with pytest.raises(ImageGenUnsupported, match="SanaTransformer2DModel.*ZImageTransformer2DModel.*SD3Transformer2DModel"):
        check_dit_kind(root, head)
    _transformer(root, {"_class_name": "ZImageTransformer2DModel"})
    assert dit_kind(root, QueryHeadConfig.from_folder(_mlp(tmp_path / "a"))) == ZIMAGE


@pytest.mark.parametrize("cfg, words", [
    ({"attention_head_dim": 128}, "RoPE axes"),
    ({"vae_ref_channel_cat": True}, "vae_ref_channel_cat"),
    ({"num_layers": "two"}, "'num_layers'"),
])
def test_sd3_settings_the_preview_cannot_run_are_refused(tmp_path, cfg, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": "SD3Transformer2DModel", "num_attention_heads": 2,
                                "caption_projection_dim": 128, **cfg}))
    with pytest.raises(ImageGenError, match=words):
        SD3DiTConfig.from_file(path)


def test_sd3_config_keys_a_file_omits_or_nulls_take_diffusers_values(tmp_path):
    """transformer/config.json is read as diffusers' SD3Transformer2DModel reads it (spec §1.2, §8.10 [L]): an
    omitted key takes the class default, and an explicit null out_channels means as many channels out as in (a
    4-channel DiT with out_channels null predicted 16 channels and its proj_out did not load)."""
    # SD3Transformer2DModel.__init__'s defaults (diffusers 0.33, the Preview's pin, as in 0.36 and 0.42)
    defaults = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
                "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
                "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96,
                "dual_attention_layers": (), "qk_norm": None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    cfg = SD3DiTConfig.from_file(path)
    assert {k: getattr(cfg, k) for k in defaults} == defaults
    path.write_text(json.dumps({"in_channels": 4, "out_channels": None}))
    assert SD3DiTConfig.from_file(path).out_channels == 4
    path.write_text(json.dumps({"in_channels": 4}))
    assert SD3DiTConfig.from_file(path).out_channels == 16  # diffusers' default, not in_channels


def test_omitted_wrapper_switches_take_the_reference_defaults(tmp_path):
    """mlp/config.json without `text_encoder_norm` must run WITHOUT the ×1000 re-normalisation: the reference
    loader passes `text_encoder_norm=False` to ZImageLoss when the key is absent (ZImageModel_withMLP's
    default too), where we turned it on."""
    cfg = QueryHeadConfig.from_folder(_mlp(tmp_path / "a", config={"dit_type": "zimage", "use_identity_mlp": True}))
    assert cfg.text_encoder_norm is False and cfg.use_identity_mlp
    on = QueryHeadConfig.from_folder(_mlp(tmp_path / "b", config={"text_encoder_norm": True}))
    assert on.text_encoder_norm is True


def test_a_component_folder_without_its_config_is_named_before_diffusers_reads_it(tmp_path):
    """A vae/ without config.json: diffusers fell back to the checkpoint's own (Ming's) config.json and failed on a
    weight shape, saying nothing of the missing file. The load names the file and what to do, before reading any."""
    from engine.models.imagegen.pipeline import ImageGenerator

    for folder in ("mlp", "connector", "transformer", "vae", "scheduler"):
        (tmp_path / folder).mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(ImageGenError, match=r"no vae/config.json, scheduler/scheduler_config.json \(download"):
        ImageGenerator.load(tmp_path, torch.float32, "cpu")
