"""A tiny random talker for the demo checkpoint: `write_tiny_talker(ckpt_dir)` writes `talker/`
(config.json, model.safetensors, llm/ config + byte-level tokenizer, vae/ config + weights, and a tiny
`campplus.onnx` built here with the onnx package) deterministically. `release="preview"` writes the
Preview's talker (spec §7.11) instead: no `spk_head` and no CAM++, a config without `history_patch_size`,
and a 16 kHz VAE without latent patching (hop 320, AudioVAEconfig's encoder default).

Kept from the real model: 44.1 kHz, 64-d latents, VAE patch 4, hop 882 (one talker patch = 0.32 s),
talker patch 4, history 32, 10 CFM steps, the 192-d speaker vector. Only widths and depths shrink.
The weights are random (meaningless sound); the stop head is drawn so the AR loop usually stops a few
patches after the earliest allowed step, and the ISTFT head's log-magnitude bias keeps the output
below full scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from engine.loader import checkpoint_entries
from engine.models.talker.config import AudioVAEConfig, TalkerConfig
from engine.models.talker.model import build_talker
from engine.models.talker.vae import AudioVAE
from engine.models.thinker.tokenizer import byte_level_alphabet

TINY_TALKER_SEED = 20261210
SAMPLE_RATE = 44100
HOP = 882
PREVIEW_SAMPLE_RATE = 16000
PREVIEW_HOP = 320
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<audio>", "<audioPatch>"]
VOCAB = 288
LOG_MAGNITUDE_BIAS = 0.5
CAMPPLUS_HIDDEN = 32


def tiny_llm_config() -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "vocab_size": VOCAB, "max_position_embeddings": 4096, "hidden_act": "silu",
            "use_sliding_window": False, "sliding_window": None, "tie_word_embeddings": True,
            "bos_token_id": 256, "eos_token_id": 258, "torch_dtype": "float32"}


def tiny_talker_config(release: str = "2.0") -> dict:
    dit = {"in_channels": 64, "hidden_size": 48, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0, "attn_backend": "torch",
           "attn_mask_enabled": False, "dropout": 0.0, "qk_norm": None, "pe_attn_head": None, "llm_cond_dim": 64}
    agg = {"in_channels": 64, "hidden_size": 40, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0, "attn_backend": "torch",
           "attn_mask_enabled": False, "dropout": 0.0, "qk_norm": None, "pe_attn_head": None}
    if release == "preview":  # the keys the Preview's BailingTalker2 reads (no history_patch_size)
        return {"architectures": ["BailingTalker2"], "flowmodel": dit, "aggregator": agg, "steps": 10,
                "patch_size": 4, "cfg_strength": 2.0, "torch_dtype": "float32"}
    return {"architectures": ["BailingTalker2"], "flowmodel": dit, "aggregator": agg, "steps": 10, "patch_size": 4,
            "history_patch_size": 32, "cfg_strength": 2.0, "torch_dtype": "float32"}


def _backbone(layers: int, window: int | None = None, window_from: int = 0) -> dict:
    return {"vocab_size": 1, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 65536, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "hidden_act": "silu", "use_sliding_window": window is not None,
            "sliding_window": window or 4096, "max_window_layers": window_from, "attention_dropout": 0.0,
            "tie_word_embeddings": False}


def tiny_vae_config(release: str = "2.0") -> dict:
    rate, hop, patch = (PREVIEW_SAMPLE_RATE, PREVIEW_HOP, -1) if release == "preview" else (SAMPLE_RATE, HOP, 4)
    return {"architectures": ["AudioVAE"], "sample_rate": rate, "patch_size": patch,
            "enc_kwargs": {"input_dim": hop, "hop_size": hop, "latent_dim": 64, "backbone": _backbone(4)},
            "dec_kwargs": {"output_dim": hop, "latent_dim": 64, "backbone": _backbone(2, window=64, window_from=1)},
            "torch_dtype": "float32"}


def _random_state(module: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Parameters drawn like the thinker's tiny weights (engine.tiny); persistent buffers keep their values."""
    from engine.tiny import _init_tensor as _init  # noqa: PLC0415  (engine.tiny imports this module)
    buffers = dict(module.named_buffers())
    return {name: (buffers[name].clone() if name in buffers else _init(name, shape, gen)).float().contiguous()
            for name, shape in checkpoint_entries(module)}


def tiny_tokenizer_files() -> dict[str, dict]:
    """Byte-level BPE without merges: ids 0..255 bytes, Qwen2 specials + <audio>, <audioPatch> from 256."""
    vocab = dict(byte_level_alphabet())
    added = []
    for i, tok in enumerate(QWEN2_SPECIALS):
        vocab[tok] = 256 + i
        added.append({"id": 256 + i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                 "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
                 "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                           "ignore_merges": False, "vocab": vocab, "merges": []}}
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "model_max_length": 32768, "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                                                  for a in added}}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def write_campplus_onnx(path: Path, seed: int = TINY_TALKER_SEED) -> None:
    """A stand-in speaker encoder with CAM++'s interface: features [1, T, 80] -> embedding [1, 192]
    (per-frame MatMul + ReLU, mean over time, MatMul + bias)."""
    import onnx  # noqa: PLC0415  (only needed to write the demo checkpoint)
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((80, CAMPPLUS_HIDDEN)) / math.sqrt(80)).astype(np.float32)
    w2 = (rng.standard_normal((CAMPPLUS_HIDDEN, 192)) / math.sqrt(CAMPPLUS_HIDDEN)).astype(np.float32)
    b2 = (0.05 * rng.standard_normal(192)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["feats", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["pooled", "w2"], ["m"]), helper.make_node("Add", ["m", "b2"], ["embs"])]
    graph = helper.make_graph(nodes, "tiny_campplus",
                              [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, "T", 80])],
                              [helper.make_tensor_value_info("embs", TensorProto.FLOAT, [1, 192])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(b2, "b2")])
    model = helper.make_model(graph, producer_name="engine.models.talker.tiny", opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString(deterministic=True))


def write_tiny_talker(ckpt_dir: str | Path, release: str = "2.0") -> Path:
    """Write `<ckpt_dir>/talker/` of `release` (deterministic bytes for a given version of this file)."""
    folder = Path(ckpt_dir) / "talker"
    (folder / "llm").mkdir(parents=True, exist_ok=True)
    (folder / "vae").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(TINY_TALKER_SEED)
    talker_cfg, llm_cfg, vae_cfg = tiny_talker_config(release), tiny_llm_config(), tiny_vae_config(release)
    talker = build_talker(TalkerConfig.from_dicts(talker_cfg, llm_cfg, release=release), "cpu")
    state = _random_state(talker, gen)
    # stop logits (keep, stop) nearly balanced: the loop ends a few patches after step 10
    state["stop_head.weight"] = 0.3 * torch.randn(state["stop_head.weight"].shape, generator=gen)
    state["stop_head.bias"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with torch.device("cpu"):
        vae = AudioVAE(AudioVAEConfig.from_dict(vae_cfg))
    vstate = _random_state(vae, gen)
    bias = vstate["decoder.head.out.bias"]
    bias[: bias.shape[0] // 2] += LOG_MAGNITUDE_BIAS
    save_file(vstate, str(folder / "vae" / "model.safetensors"), metadata={"format": "pt"})
    for path, content in ((folder / "config.json", talker_cfg), (folder / "llm" / "config.json", llm_cfg),
                          (folder / "vae" / "config.json", vae_cfg), *((folder / "llm" / k, v)
                                                                        for k, v in tiny_tokenizer_files().items())):
        path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if release != "preview":  # the Preview takes no speaker vector
        write_campplus_onnx(folder / "campplus.onnx")
    return folder
