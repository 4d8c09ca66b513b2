"""The image generator's condition (spec §8.2-§8.3) as the engine computes it against a plain re-derivation:
query blocks appended by hand, the plain thinker forward of tests/models/thinker/reference_llm.py (image gate on
every <imagePatch>), the last scale's final-norm hidden states, proj_in, the plain Qwen2 of
tests/models/talker/reference_qwen2.py run bidirectionally, proj_out, L2 normalisation. At query scales, connector
shapes and prompts (with and without an input image) the fixtures never use."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from engine.models.imagegen.condition import Connector, QueryHead, condition_from_prompt
from engine.models.imagegen.config import QueryHeadConfig
from engine.models.thinker.layers import Numerics
from engine.models.thinker.model import load_model
from engine.models.thinker.positions import PositionTokens, rope_index
from tests.models.talker.reference_qwen2 import qwen2_forward, qwen2_settings
from tests.models.thinker import reference_llm
from tests.models.thinker.variants import write_variant

ATOL, RTOL = 1e-5, 1e-4  # fp32 both sides; the condition is unit-norm per token
MERGE = 2

CASES = {
    "one_scale_of_3_gqa_connector": ((3,), {"hidden_size": 24, "num_attention_heads": 3, "num_key_value_heads": 1,
                                            "intermediate_size": 40, "num_hidden_layers": 2}, 20),
    "scales_1_and_5_three_layer_connector": ((1, 5), {"hidden_size": 16, "num_attention_heads": 2,
                                                      "num_key_value_heads": 2, "intermediate_size": 24,
                                                      "num_hidden_layers": 3, "rope_theta": 500.0}, 8),
    "scales_2_3_4": ((2, 3, 4), {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "intermediate_size": 48, "num_hidden_layers": 1}, 12),
}


def _random_head(scales, llm_hidden, connector_cfg, c_dim, gen):
    cfg = QueryHeadConfig(scales=scales, llm_hidden=llm_hidden, connector_hidden=connector_cfg["hidden_size"],
                          c_dim=c_dim, dit_type="zimage", use_identity_mlp=True, text_encoder_norm=True)
    head = QueryHead(cfg)
    head.load_state_dict({n: torch.randn(p.shape, generator=gen) * 0.5 for n, p in head.state_dict().items()})
    full = {"vocab_size": 8, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, **connector_cfg}
    connector = Connector(full, device="cpu")
    state = {n: (1 + 0.1 * torch.randn(p.shape, generator=gen)) if "norm" in n else
             torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5 for n, p in connector.model.named_parameters()}
    connector.model.load_state_dict(state, strict=False, assign=True)
    return head.eval(), connector.eval(), full


def _reference_condition(ckpt, head, connector, connector_cfg, prompt, image_rows, image_grid):
    """The condition from the spec's steps, built without the engine's layout, embedding or forward code."""
    config = json.loads((ckpt / "config.json").read_text())["llm_config"]
    patch, start, end = config["image_patch_token"], config["image_start_token"], config["image_patch_token"] + 2
    ids, grids, last = list(prompt), [] if image_grid is None else [image_grid], None
    for s in head.config.scales:
        last = list(range(len(ids) + 1, len(ids) + 1 + s * s))
        ids += [start] + [patch] * (s * s) + [end]
        grids.append((1, MERGE, MERGE * s * s))
    ids = torch.tensor([ids])
    sd = {k[len("model."):]: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if k.startswith("model.")}
    x = sd["model.word_embeddings.weight"][ids].clone()
    queries = torch.cat([head.query_tokens_dict[f"{s}x{s}"].detach() for s in head.config.scales])
    slots = queries if image_rows is None else torch.cat([image_rows, queries])
    x[ids == patch] = slots
    tokens = PositionTokens(image_patch=patch, video_patch=config["video_patch_token"], image_start=start,
                            video_start=config["video_start_token"], interleaved_video=True, spatial_merge_size=MERGE)
    pos, _ = rope_index(ids, tokens, torch.tensor(grids))
    hidden = reference_llm.final_hidden(sd, config, x, pos, image_mask=ids == patch)[0, last]
    x = F.linear(hidden, head.proj_in.weight.detach(), head.proj_in.bias.detach())
    conn_sd = {n: p.detach() for n, p in connector.model.state_dict().items()}
    x = qwen2_forward(x.unsqueeze(0), conn_sd, "", qwen2_settings(connector_cfg), causal=False)[0]
    return F.normalize(F.linear(x, head.proj_out.weight.detach(), head.proj_out.bias.detach()), dim=-1)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A tiny thinker checkpoint (the demo's LLM config) in one safetensors file the plain forward reads."""
    return write_variant(tmp_path_factory.mktemp("thinker"))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("with_image", [False, True])
def test_condition_matches_the_plain_steps(thinker, name, with_image):
    scales, connector_cfg, c_dim = CASES[name]
    gen = torch.Generator().manual_seed(len(name) + with_image)
    llm = load_model(thinker, dtype="fp32", device="cpu").llm
    config = json.loads((thinker / "config.json").read_text())["llm_config"]
    head, connector, full_cfg = _random_head(scales, config["hidden_size"], connector_cfg, c_dim, gen)
    prompt, rows, grid = [5, 60, 70, 80, 90, 100, 110], None, None
    if with_image:  # an input image of 2 x 3 merged tokens inside the prompt
        prompt = prompt[:3] + [config["image_start_token"]] + [config["image_patch_token"]] * 6 + [
            config["image_patch_token"] + 2] + prompt[3:]
        rows, grid = torch.randn(6, config["hidden_size"], generator=gen) * 0.05, (1, 2 * MERGE, 3 * MERGE)
    with torch.inference_mode():
        ours = condition_from_prompt(llm, Numerics(), head, connector, prompt, rows,
                                     None if grid is None else torch.tensor([grid])).condition
    want = _reference_condition(thinker, head, connector, full_cfg, prompt, rows, grid)
    assert ours.shape == (1, scales[-1] ** 2, c_dim)
    torch.testing.assert_close(ours[0], want, atol=ATOL, rtol=RTOL)
