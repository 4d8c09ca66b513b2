"""The thinker LLM against tests/models/thinker/reference_llm.py (the spec's §2 rules written out plainly, sharing
no code with the engine) at configs unlike the tiny checkpoint's and the fixtures': other expert counts, top-k
and group limits, 0 / 2 / no shared experts, 0 / 2 dense layers, other rotary widths, head_dim != hidden /
heads, tied embeddings, biases, a single router; a left-padded batch of two of odd length, with 3-D positions
and image / audio spans routed by their own gates."""

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.generate import DecodeStep, prefill
from engine.models.thinker.layers import Numerics
from engine.models.thinker.model import load_model
from engine.models.thinker.positions import decode_positions
from tests.models.thinker import reference_llm
from tests.models.thinker.variants import OMIT, write_variant

FP32 = Numerics()
# fp32 on both sides, summed in different orders (fused experts, batched heads): a few ulps of the logits
ATOL, RTOL = 2e-4, 1e-4

CONFIGS = {
    "one_expert_per_token_one_group": {"num_experts": 8, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1},
    "three_groups_two_shared_no_dense": {"num_experts": 24, "num_experts_per_tok": 3, "n_group": 3, "topk_group": 2,
                                         "num_shared_experts": 2, "first_k_dense_replace": 0},
    "no_shared_two_dense_head48_rotary36": {"num_experts": 12, "num_experts_per_tok": 6, "n_group": 2,
                                            "topk_group": 2, "num_shared_experts": 0, "first_k_dense_replace": 2,
                                            "head_dim": 48, "partial_rotary_factor": 0.75},
    "head16_full_rotary_one_kv_head_tied": {"num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 16,
                                            "partial_rotary_factor": 1.0, "tie_word_embeddings": True},
    "head_dim_from_hidden_quarter_rotary_mha": {"head_dim": OMIT, "num_key_value_heads": 4,
                                                "partial_rotary_factor": 0.25, "num_shared_experts": None},
    "single_router_biases_defaults": {"router_type": "topN", "use_qkv_bias": True, "use_bias": True,
                                      "rms_norm_eps": OMIT, "rope_theta": OMIT, "num_experts": 32,
                                      "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4},
    "wide_head_full_rotary_128": {"head_dim": 160, "partial_rotary_factor": 0.8, "rope_theta": 10000.0,
                                  "first_k_dense_replace": 3, "num_hidden_layers": 5},
}


def _batch(config: dict):
    """Two rows of 11 tokens, the first left-padded by 4; the second holds a 2 x 3 image block (T one value, H / W
    offset around it, as §3.1 lays them out) and a 2-token audio span."""
    length, pad = 11, 4
    ids = torch.tensor([[0] * pad + [11, 23, 35, 47, 59, 61, 73],
                        [5, 17, config["image_start_token"]] + [config["image_patch_token"]] * 6 + [31, 43]])
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :pad] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1).unsqueeze(0).repeat(3, 1, 1)
    image = ids == config["image_patch_token"]
    rows, cols = torch.arange(6) // 3, torch.arange(6) % 3
    pos[:, 1, 3:9] = 3
    pos[1, 1, 3:9] += rows
    pos[2, 1, 3:9] += cols - 1
    pos[:, 1, 9:] = torch.arange(4, 6)
    audio = torch.zeros_like(image)
    audio[0, 8:10] = True
    return ids, mask, pos, image, audio


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_match_the_plain_reference_forward(tmp_path, overrides):
    ckpt = write_variant(tmp_path / "ckpt", llm=overrides)
    config = json.loads((ckpt / "config.json").read_text())["llm_config"]
    ids, mask, pos, image, audio = _batch(config)
    llm = load_model(ckpt, dtype="fp32", device="cpu").llm
    with torch.inference_mode():
        ours = llm(llm.model.embed(ids), pos, FP32, step_mask=mask, image_mask=image, audio_mask=audio)
    ref = reference_llm.logits(load_file(str(ckpt / "model.safetensors")), config, ids, pos, mask,
                               image_mask=image, audio_mask=audio, prefix="model.")
    assert ours.shape == ref.shape == (2, ids.shape[1], config["vocab_size"])
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("native_layers", [False, True], ids=["torch_decode", "native_decode"])
@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_prefill_in_chunks_then_decode_steps_match_the_plain_forward(tmp_path, overrides, native_layers, monkeypatch):
    """The image row's prompt (image and audio gates) prefilled in chunks of 4, then 3 tokens decoded through the
    KV cache (text gate, positions cache length + rope delta on all axes, spec §2.9), by torch's modules or by
    the native CPU decode layers a large model binds (bound here by lowering their size threshold); the
    reference sees the whole sequence at once with those positions."""
    if native_layers:
        from engine.kernels import native
        if not native.available():
            pytest.skip(f"no native CPU kernels here ({native.status()})")
        monkeypatch.setattr(native, "BIND_MIN_BYTES", 0)
    ckpt = write_variant(tmp_path / "ckpt", llm=overrides)
    config = json.loads((ckpt / "config.json").read_text())["llm_config"]
    ids, _, pos, image, audio = _batch(config)
    ids, pos, image, audio = ids[1:], pos[:, 1:], image[1:], audio[1:]  # the image row, no padding
    prompt, new = ids.shape[1], torch.tensor([[101, 7, 250]])
    delta = pos[0, :, :].max(dim=-1, keepdim=True).values + 1 - prompt
    full_ids = torch.cat([ids, new], dim=1)
    full_pos = torch.cat([pos, decode_positions(prompt, delta, new.shape[1])], dim=-1)
    llm = load_model(ckpt, dtype="fp32", device="cpu").llm
    if native_layers:  # every layer's decode is one native call per half (not for biased projections) + lm_head
        biased = bool(config.get("use_qkv_bias") or config.get("use_bias"))
        assert llm.lm_head.native is not None
        assert all((layer.cpu_decode is not None) != biased for layer in llm.model.layers)
    with torch.inference_mode():
        cache = llm.new_cache(1, FP32, "cpu", capacity=16)
        cache.rope_deltas = delta
        steps = [prefill(llm, FP32, cache, llm.model.embed(ids), pos, image_mask=image, audio_mask=audio,
                         chunk_tokens=4).logits]
        step = DecodeStep(llm, FP32, cache)
        for i in range(new.shape[1] - 1):
            step.feed(new[:, i])
            steps.append(step.step())
    ours = torch.stack(steps, dim=1)
    none = torch.zeros(1, new.shape[1], dtype=torch.bool)
    ref = reference_llm.logits(load_file(str(ckpt / "model.safetensors")), config, full_ids, full_pos,
                               image_mask=torch.cat([image, none], 1), audio_mask=torch.cat([audio, none], 1),
                               prefix="model.")
    torch.testing.assert_close(ours, ref[:, prompt - 1:-1], atol=ATOL, rtol=RTOL)
