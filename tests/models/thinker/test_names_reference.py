"""Checkpoint tensor names and shapes against the spec's §1.3 tables written out plainly here (sharing no code with
the engine): a thinker checkpoint is written from those tables alone, at configs the fixtures never use (two
dense layers, two shared experts, other head counts and widths, deepstack mergers, the Preview's ViT at another
depth, 80 mel bins), and the engine's strict loader must take every tensor (a missing, unexpected or mis-shaped
name is an error) and put each where its name says: the three routers, q / k norms, each expert, the key
without bias, the projectors' module indices."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from engine.models.thinker.model import load_model
from engine.tiny import tiny_config


def llm_shapes(c: dict) -> dict[str, tuple]:
    h, v, d = c["hidden_size"], c["vocab_size"], c["head_dim"]
    n_h, n_kv, e, i_e = c["num_attention_heads"], c["num_key_value_heads"], c["num_experts"], c["moe_intermediate_size"]
    s, dense = c["num_shared_experts"], c["first_k_dense_replace"]
    out = {"model.model.word_embeddings.weight": (v, h), "model.model.norm.weight": (h,), "model.lm_head.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.model.layers.{i}."
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "attention.query_key_value.weight": ((n_h + 2 * n_kv) * d, h),
                p + "attention.q_norm.weight": (d,), p + "attention.k_norm.weight": (d,),
                p + "attention.dense.weight": (h, n_h * d)}
        if i < dense:
            out |= {p + "mlp.gate_proj.weight": (c["intermediate_size"], h),
                    p + "mlp.up_proj.weight": (c["intermediate_size"], h),
                    p + "mlp.down_proj.weight": (h, c["intermediate_size"])}
            continue
        for gate in ("gate", "image_gate", "audio_gate"):
            out |= {p + f"mlp.{gate}.weight": (e, h), p + f"mlp.{gate}.expert_bias": (e,)}
        for k in range(e):
            out |= {p + f"mlp.experts.{k}.gate_proj.weight": (i_e, h), p + f"mlp.experts.{k}.up_proj.weight": (i_e, h),
                    p + f"mlp.experts.{k}.down_proj.weight": (h, i_e)}
        out |= {p + "mlp.shared_experts.gate_proj.weight": (i_e * s, h),
                p + "mlp.shared_experts.up_proj.weight": (i_e * s, h),
                p + "mlp.shared_experts.down_proj.weight": (h, i_e * s)}
    return out


def _linear(name: str, rows: int, cols: int) -> dict[str, tuple]:
    return {name + ".weight": (rows, cols), name + ".bias": (rows,)}


def qwen3_vit_shapes(c: dict) -> dict[str, tuple]:
    w, p, m, t = c["hidden_size"], c["patch_size"], c["spatial_merge_size"], c["temporal_patch_size"]
    merged = w * m * m
    out = {"vision.patch_embed.proj.weight": (w, 3, t, p, p), "vision.patch_embed.proj.bias": (w,),
           "vision.pos_embed.weight": (c["num_position_embeddings"], w)}
    for i in range(c["depth"]):
        b = f"vision.blocks.{i}."
        out |= {b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "norm2.weight": (w,), b + "norm2.bias": (w,)}
        out |= _linear(b + "attn.qkv", 3 * w, w) | _linear(b + "attn.proj", w, w)
        out |= _linear(b + "mlp.linear_fc1", c["intermediate_size"], w) | _linear(b + "mlp.linear_fc2", w, c["intermediate_size"])
    for head, norm in [("vision.merger.", w)] + [(f"vision.deepstack_merger_list.{k}.", merged)
                                                 for k in range(len(c["deepstack_visual_indexes"]))]:
        out |= {head + "norm.weight": (norm,), head + "norm.bias": (norm,)}
        out |= _linear(head + "linear_fc1", merged, merged) | _linear(head + "linear_fc2", c["out_hidden_size"], merged)
    return out


def qwen25_vit_shapes(c: dict) -> dict[str, tuple]:
    w, p, m, t = c["hidden_size"], c["patch_size"], c["spatial_merge_size"], c["temporal_patch_size"]
    out = {"vision.patch_embed.proj.weight": (w, 3, t, p, p), "vision.merger.ln_q.weight": (w,)}
    for i in range(c["depth"]):
        b = f"vision.blocks.{i}."
        out |= {b + "norm1.weight": (w,), b + "norm2.weight": (w,)}
        out |= _linear(b + "attn.qkv", 3 * w, w) | _linear(b + "attn.proj", w, w)
        out |= _linear(b + "mlp.gate_proj", c["intermediate_size"], w) | _linear(b + "mlp.up_proj", c["intermediate_size"], w)
        out |= _linear(b + "mlp.down_proj", w, c["intermediate_size"])
    return out | _linear("vision.merger.mlp.0", w * m * m, w * m * m) | _linear("vision.merger.mlp.2", c["out_hidden_size"], w * m * m)


def whisper_shapes(c: dict) -> dict[str, tuple]:
    n, mels = c["n_state"], c["n_mels"]
    out = {"audio.conv1.weight": (n, mels, 3), "audio.conv1.bias": (n,), "audio.conv2.weight": (n, n, 3),
           "audio.conv2.bias": (n,), "audio.positional_embedding": (c["n_ctx"], n),
           "audio.ln_post.weight": (n,), "audio.ln_post.bias": (n,)}
    for i in range(c["n_layer"]):
        b = f"audio.blocks.{i}."
        out |= _linear(b + "attn.query", n, n) | {b + "attn.key.weight": (n, n)} | _linear(b + "attn.value", n, n)
        out |= _linear(b + "attn.out", n, n) | _linear(b + "mlp.0", 4 * n, n) | _linear(b + "mlp.2", n, 4 * n)
        out |= {b + "attn_ln.weight": (n,), b + "attn_ln.bias": (n,), b + "mlp_ln.weight": (n,), b + "mlp_ln.bias": (n,)}
    return out


def projector_shapes(h: int, vision_out: int, audio_state: int) -> dict[str, tuple]:
    return (_linear("linear_proj.0", h, vision_out) | _linear("linear_proj.2", h, h)
            | {"linear_proj_audio.0.weight": (h, audio_state, 3), "linear_proj_audio.0.bias": (h,)}
            | _linear("linear_proj_audio.3", h, h))


SMALL_LLM = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "num_hidden_layers": 4, "first_k_dense_replace": 2, "intermediate_size": 20, "num_experts": 6,
             "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "num_shared_experts": 2,
             "moe_intermediate_size": 12}
WHISPER = {"n_mels": 80, "n_ctx": 50, "n_state": 16, "n_head": 2, "n_layer": 2}
CASES = {
    "v2_vit_deepstack_two_dense_two_shared": ("2.0", {"depth": 3, "hidden_size": 24, "num_heads": 2,
                                                      "intermediate_size": 40, "patch_size": 8,
                                                      "spatial_merge_size": 3, "num_position_embeddings": 49,
                                                      "out_hidden_size": 20, "deepstack_visual_indexes": [0, 2]}),
    "preview_vit_depth3": ("preview", {"depth": 3, "hidden_size": 24, "num_heads": 2, "intermediate_size": 28,
                                       "fullatt_block_indexes": [2], "out_hidden_size": 40}),
}


def _write(folder, release: str, vision: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    config = copy.deepcopy(tiny_config(release))
    config["llm_config"].update(SMALL_LLM)
    config["vision_config"].update(vision)
    config["audio_config"]["whisper_encoder_config"].update(WHISPER)
    vc, ac = config["vision_config"], config["audio_config"]["whisper_encoder_config"]
    shapes = (llm_shapes(config["llm_config"]) | whisper_shapes(ac)
              | (qwen3_vit_shapes(vc) if release == "2.0" else qwen25_vit_shapes(vc))
              | projector_shapes(SMALL_LLM["hidden_size"], vc["out_hidden_size"], ac["n_state"]))
    # every tensor its own values (its index, then a ramp), so one landing in another's place shows
    tensors = {name: k + torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) * 1e-4
               for k, (name, shape) in enumerate(sorted(shapes.items()))}
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return config, tensors


@pytest.mark.filterwarnings("ignore:.*video_start_token")  # the Preview config's known pitfall (§1.4), said at load
@pytest.mark.parametrize("release,vision", CASES.values(), ids=CASES.keys())
def test_a_checkpoint_named_by_the_spec_tables_loads_and_each_tensor_lands_where_its_name_says(tmp_path, release, vision):
    config, file = _write(tmp_path / "ckpt", release, vision)
    model = load_model(tmp_path / "ckpt", dtype="fp32", device="cpu", pack_cpu_experts=False)  # strict names and shapes
    llm, enc = model.llm.model, model.encoders
    moe, dense = llm.layers[3].mlp, llm.layers[1].mlp
    landed = {
        "model.model.word_embeddings.weight": llm.word_embeddings.weight,
        "model.model.layers.2.attention.q_norm.weight": llm.layers[2].attention.q_norm.weight,
        "model.model.layers.2.attention.k_norm.weight": llm.layers[2].attention.k_norm.weight,
        "model.model.layers.1.mlp.down_proj.weight": dense.down_proj.weight,
        "model.model.layers.3.mlp.gate.weight": moe.gate.weight,
        "model.model.layers.3.mlp.image_gate.expert_bias": moe.image_gate.expert_bias,
        "model.model.layers.3.mlp.audio_gate.weight": moe.audio_gate.weight,
        "model.model.layers.3.mlp.experts.4.up_proj.weight": moe.experts.up_proj[4],
        "model.model.layers.3.mlp.experts.5.down_proj.weight": moe.experts.down_proj[5],
        "model.model.layers.3.mlp.shared_experts.gate_proj.weight": moe.shared_experts.gate_proj.weight,
        "model.lm_head.weight": model.llm.lm_head.weight,
        "vision.blocks.2.attn.qkv.weight": enc.vision.blocks[2].attn.qkv.weight,
        "audio.blocks.1.attn.key.weight": enc.audio.blocks[1].attn.key.weight,
        "audio.blocks.1.attn.value.bias": enc.audio.blocks[1].attn.value.bias,
        "linear_proj.2.weight": enc.linear_proj.state_dict()["2.weight"],
        "linear_proj_audio.3.weight": enc.linear_proj_audio.state_dict()["3.weight"],
    }
    for name, tensor in landed.items():
        assert torch.equal(tensor.detach(), file[name]), name
    assert enc.audio.blocks[1].attn.key.bias is None
    if release == "2.0":
        assert len(enc.vision.deepstack_merger_list) == 2
