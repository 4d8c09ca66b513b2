"""The thinker LLM against tests/models/thinker/reference_llm.py (the spec's §2 rules written out plainly, sharing
no code with the engine) at configs unlike the tiny checkpoint's and the fixtures': other expert counts, top-k
and group limits, 0 / 2 / no shared experts, 0 / 2 dense layers, other rotary widths, head_dim != hidden /
heads, tied embeddings, biases, a single router; a left-padded batch of two of odd length, with 3-D positions
and image / audio spans routed by their own gates."""

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.models.thinker.layers import Numerics
from engine.models.thinker.model import load_model
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
