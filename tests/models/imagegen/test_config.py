"""The image head's settings come from the checkpoint's own files; unusable ones are refused clearly."""

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.models.imagegen.config import (ImageGenError, ImageGenUnsupported, QueryHeadConfig, check_dit_kind,
                                           has_image_generator)


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
    assert cfg.use_identity_mlp and cfg.dit_type == "zimage"
    with_mlp = QueryHeadConfig.from_folder(_mlp(tmp_path / "b", extra={"mlp.fc1.weight": torch.zeros(3, 5)}))
    assert not with_mlp.use_identity_mlp


@pytest.mark.parametrize("config, words", [
    ({"img_gen_scales": [16]}, "no query tokens for 16x16"),
    ({"diffusion_c_input_dim": 7}, "diffusion_c_input_dim 7"),
])
def test_inconsistent_head_is_refused(tmp_path, config, words):
    with pytest.raises(ImageGenError, match=words):
        QueryHeadConfig.from_folder(_mlp(tmp_path / "m", config=config))


def test_the_preview_sd3_dit_is_refused_with_a_clear_error(tmp_path):
    root = tmp_path / "ckpt"
    head = QueryHeadConfig.from_folder(_mlp(root / "mlp", config={"dit_type": "sd3"}))
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text('{"_class_name": "SD3Transformer2DModel"}')
    with pytest.raises(ImageGenUnsupported, match="SD3-style"):
        check_dit_kind(root, head)
    assert not has_image_generator(root)


def test_omitted_wrapper_switches_take_the_reference_defaults(tmp_path):
    """mlp/config.json without `text_encoder_norm` must run WITHOUT the ×1000 re-normalisation: the reference
    loader passes `text_encoder_norm=False` to ZImageLoss when the key is absent (ZImageModel_withMLP's
    default too), where we turned it on."""
    cfg = QueryHeadConfig.from_folder(_mlp(tmp_path / "a", config={"dit_type": "zimage", "use_identity_mlp": True}))
    assert cfg.text_encoder_norm is False and cfg.use_identity_mlp
    on = QueryHeadConfig.from_folder(_mlp(tmp_path / "b", config={"text_encoder_norm": True}))
    assert on.text_encoder_norm is True
