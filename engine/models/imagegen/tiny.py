"""The tiny demo checkpoint's image head: `mlp/`, `connector/`, `byt5/`, `transformer/`, `vae/` and
`scheduler/` in the upstream 2.0 layout, with small random weights (deterministic), written by
engine.tiny next to the tiny thinker. Loaded by the same code as the real head.

Sizes: query scales [2, 4] (16 condition tokens, the real head has 256), condition width 32, a
2-layer 32-wide Qwen2 connector, a 2-layer ByT5 encoder + 2-layer mapper (max length 32), a
Z-Image DiT of width 64 with 2 layers (+1 refiner each), a 4-block 8x VAE with 16 latent channels (as
the real one) and Z-Image's published scheduler config. The demo diffuses at the 512 bucket table
halved (config.json `studio_demo.image_gen_bucket_base` = 256), so a 30-step image takes about a
second on a CPU.

`release="preview"` writes the Preview's head instead (spec §8.10): the same mlp/ (+ the caption MLP
`mlp.*`, ToClipMLP C -> 32 -> 64), connector/ and byt5/, an SD3-style DiT (`SD3Transformer2DModel`, 2 joint
blocks of one 64-wide head, the Preview's 2+2 refiners, pooled width 32), an SD3-like VAE and scheduler.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.models.imagegen.buckets import DEMO_BASE
from engine.models.imagegen.pipeline import DEMO_BUCKET_KEY

TINY_HEAD_SEED_OFFSET = 811
SCALES = (2, 4)
C_DIM = 32
CONNECTOR = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
             "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
             "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None,
             "attention_dropout": 0.0, "torch_dtype": "float32"}
TRANSFORMER = {"_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
               "in_channels": 16, "dim": 64, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2,
               "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": C_DIM, "rope_theta": 256.0, "t_scale": 1000.0,
               "axes_dims": [8, 12, 12], "axes_lens": [1024, 512, 512]}
VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 16,
       "norm_num_groups": 8, "sample_size": 256, "scaling_factor": 0.3611, "shift_factor": 0.1159,
       "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True, "mid_block_add_attention": True}
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": False}
T5 = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64,
      "num_layers": 2, "num_decoder_layers": 1, "num_heads": 4, "relative_attention_num_buckets": 32,
      "relative_attention_max_distance": 128, "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6,
      "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True, "vocab_size": 384, "eos_token_id": 1,
      "pad_token_id": 0, "decoder_start_token_id": 0, "tie_word_embeddings": False}
BYT5 = {"byt5_config": {"byt5_ckpt_path": "google__byt5-small", "byt5_name": "google/byt5-small", "special_token": True,
                        "color_special_token": True, "font_special_token": True, "font_ann_path": "glyph/font_idx.json",
                        "color_ann_path": "glyph/color_idx.json", "multilingual": True},
        "byt5_mapper_config": {"num_layers": 2, "sdxl_channels": C_DIM}, "byt5_max_length": 32}
# The Preview head (spec §8.10): the DiT's head must be 64 wide (RoPE axes 20/22/22); the caption MLP maps the
# condition to joint_attention_dim; its pooled output is averaged down to pooled_projection_dim.
PREVIEW_MLP_HIDDEN = 32
PREVIEW_TRANSFORMER = {"_class_name": "SD3Transformer2DModel", "sample_size": 32, "patch_size": 2, "in_channels": 16,
                       "num_layers": 2, "num_refiner_layers": 2, "attention_head_dim": 64, "num_attention_heads": 1,
                       "joint_attention_dim": 64, "caption_projection_dim": 64, "pooled_projection_dim": 32,
                       "out_channels": 16, "pos_embed_max_size": 48, "dual_attention_layers": [], "qk_norm": None,
                       "vae_ref_channel_cat": False, "rope_max_index": 1024}
PREVIEW_VAE = {**VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
PREVIEW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
GLYPH_COLORS = {"white": 0, "black": 1, "red": 2}
GLYPH_FONTS = {"en-Montserrat-Bold": 0, "cn-HanyiSentyCrayon": 1, "Roboto-Regular": 2}


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _random_state(module: torch.nn.Module, gen: torch.Generator, prefix: str = "") -> dict[str, torch.Tensor]:
    from engine.tiny import _init_tensor  # the tiny checkpoint's one initialisation rule
    return {prefix + name: _init_tensor(prefix + name, tuple(t.shape), gen).contiguous()
            for name, t in module.state_dict().items()}


def write_preview_transformer(out_dir: str | Path, gen: torch.Generator, config: dict | None = None) -> None:
    """The Preview's SD3-style DiT folder `out_dir`/transformer/: `config` (PREVIEW_TRANSFORMER when None) and
    random weights drawn from `gen`."""
    from engine.models.imagegen.config import SD3DiTConfig
    from engine.models.imagegen.sd3 import SD3Transformer2DModel

    folder = Path(out_dir) / "transformer"
    _json(folder / "config.json", PREVIEW_TRANSFORMER if config is None else config)
    dit = SD3Transformer2DModel(SD3DiTConfig.from_file(folder / "config.json"))
    buffers = {n: b.clone() for n, b in dit.named_buffers()}  # PatchEmbed's sin-cos tables, as computed
    state = {n: buffers.get(n, t) for n, t in _random_state(dit, gen).items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def write_tiny_image_head(out_dir: str | Path, seed: int, release: str = "2.0") -> None:
    """Write the image-head sub-folders of `release` into the tiny checkpoint folder `out_dir` (its config.json
    already written) and record the demo bucket table in config.json's `studio_demo` block."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import ByT5Tokenizer, Qwen2Config, Qwen2ForCausalLM, T5Config
    from transformers.models.t5.modeling_t5 import T5Stack

    from engine.models.imagegen.glyph import ByT5Mapper

    out = Path(out_dir)
    config = json.loads((out / "config.json").read_text())
    config.setdefault("studio_demo", {})[DEMO_BUCKET_KEY] = DEMO_BASE
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    llm_hidden = int(config["llm_config"]["hidden_size"])
    gen = torch.Generator().manual_seed(seed + TINY_HEAD_SEED_OFFSET)
    # mlp/: query tokens per scale + proj_in / proj_out
    mlp = {f"query_tokens_dict.{s}x{s}": 0.5 * torch.randn(s * s, llm_hidden, generator=gen) for s in SCALES}
    hidden = CONNECTOR["hidden_size"]
    for name, shape in (("proj_in", (hidden, llm_hidden)), ("proj_out", (C_DIM, hidden))):
        mlp[f"{name}.weight"] = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        mlp[f"{name}.bias"] = 0.05 * torch.randn(shape[0], generator=gen)
    preview = release == "preview"
    if preview:  # the DiT wrapper's ToClipMLP (SD3Model_withMLP.mlp)
        from engine.models.imagegen.condition import CaptionMLP
        shapes = {"mlp.fc1.weight": (PREVIEW_MLP_HIDDEN, C_DIM),
                  "mlp.fc2.weight": (PREVIEW_TRANSFORMER["joint_attention_dim"], PREVIEW_MLP_HIDDEN)}
        with torch.device("meta"):
            caption_mlp = CaptionMLP(shapes)
        mlp.update(_random_state(caption_mlp, gen, "mlp."))
    (out / "mlp").mkdir(parents=True, exist_ok=True)
    save_file(mlp, str(out / "mlp" / "model.safetensors"), metadata={"format": "pt"})
    head_cfg = {"diffusion_c_input_dim": C_DIM, "img_gen_scales": list(SCALES)}
    _json(out / "mlp" / "config.json", {**head_cfg, "dit_type": "sd3"} if preview else
          {**head_cfg, "dit_type": "zimage", "use_identity_mlp": True, "text_encoder_norm": True})
    # connector/: a Qwen2ForCausalLM folder
    with torch.device("meta"):
        connector = Qwen2ForCausalLM(Qwen2Config(**CONNECTOR))
    (out / "connector").mkdir(parents=True, exist_ok=True)
    save_file(_random_state(connector, gen), str(out / "connector" / "model.safetensors"), metadata={"format": "pt"})
    _json(out / "connector" / "config.json", CONNECTOR)
    # transformer/ and vae/: diffusers folders
    if preview:
        write_preview_transformer(out, gen)
    folders = [("vae", AutoencoderKL, PREVIEW_VAE if preview else VAE)]
    if not preview:
        folders.insert(0, ("transformer", ZImageTransformer2DModel, TRANSFORMER))
    for folder, cls, cfg in folders:
        with torch.device("meta"):
            model = cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        (out / folder).mkdir(parents=True, exist_ok=True)
        save_file(_random_state(model, gen), str(out / folder / "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})
        _json(out / folder / "config.json", cfg)
    _json(out / "scheduler" / "scheduler_config.json", PREVIEW_SCHEDULER if preview else SCHEDULER)
    # byt5/: byt5.json, T5 config + ByT5 tokenizer, glyph tables, encoder and mapper weights
    byt5 = out / "byt5"
    _json(byt5 / "byt5.json", BYT5)
    _json(byt5 / "glyph" / "color_idx.json", GLYPH_COLORS)
    _json(byt5 / "glyph" / "font_idx.json", GLYPH_FONTS)
    ckpt = byt5 / BYT5["byt5_config"]["byt5_ckpt_path"]
    _json(ckpt / "config.json", T5)
    ByT5Tokenizer().save_pretrained(str(ckpt))
    t5 = T5Config(**{**T5, "vocab_size": T5["vocab_size"] + len(GLYPH_COLORS) + len(GLYPH_FONTS), "is_decoder": False})
    with torch.device("meta"):
        encoder = T5Stack(t5)
        mapper = ByT5Mapper(t5, BYT5["byt5_mapper_config"]["num_layers"], C_DIM)
    enc_state = _random_state(encoder, gen)
    (byt5 / "byt5_model").mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.text_tower.encoder.{k}": v for k, v in enc_state.items()}},
               byt5 / "byt5_model" / "base.pt")
    torch.save(enc_state, byt5 / "byt5_model" / "byt5_model.pt")
    (byt5 / "byt5_mapper").mkdir(parents=True, exist_ok=True)
    torch.save(_random_state(mapper, gen), byt5 / "byt5_mapper" / "byt5_mapper.pt")
