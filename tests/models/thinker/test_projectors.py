"""Tests of engine/projectors.py (linear_proj, linear_proj_audio, L2 normalisation, the encode helpers)
(the end-to-end `mm` parity lives in tests/test_parity.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.models.thinker.audio_encoder import AudioEncoderConfig, WhisperAudioEncoder, whisper_output_length
from engine.models.thinker.config import MingConfig
from engine.models.thinker.model import build_encoders
from engine.models.thinker.projectors import (
    AudioProjector,
    VisionProjector,
    audio_token_count,
    encode_audio,
    encode_audio_wrapped,
    encode_images,
    l2_normalize,
    projector_output_length,
)
from engine.models.thinker.vision import build_vision_encoder
from tests.paths import SHARED

REAL = {"v2": SHARED / "fixtures/real_configs/ming-flash-omni-2.0/config.json",
        "preview": SHARED / "fixtures/real_configs/ming-flash-omni-preview/config.json"}
FULL_NAMES = SHARED / "fixtures/ming_ref/full_names"
need_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared fixtures folder absent")

AUDIO_SMALL = {"ds_kernel_size": 3, "ds_stride": 2, "norm_query_embeds": True,
               "whisper_encoder_config": {"n_mels": 16, "n_ctx": 64, "n_state": 24, "n_head": 3, "n_layer": 1}}
VISION_SMALL = dict(model_type="qwen3_moe_vit", depth=1, hidden_size=16, num_heads=2, intermediate_size=24,
                    out_hidden_size=20, patch_size=2, temporal_patch_size=2, spatial_merge_size=2,
                    num_position_embeddings=16)


def _init(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel() if p.dim() > 1 else 20))
    return module.eval()


def _audio_pair(seed=0, llm_hidden=12):
    cfg = AudioEncoderConfig.from_dict(AUDIO_SMALL)
    return _init(WhisperAudioEncoder(cfg), seed), _init(AudioProjector.from_config(cfg, llm_hidden), seed + 1)


@need_shared
@pytest.mark.parametrize("flavour", ["v2", "preview"])
def test_full_size_projector_names_and_shapes(flavour):
    cfg = json.loads(REAL[flavour].read_text())
    enc = build_encoders(MingConfig.from_dict(cfg), "meta")
    ours = [(f"linear_proj.{k}", list(v.shape)) for k, v in enc.linear_proj.state_dict().items()]
    ours += [(f"linear_proj_audio.{k}", list(v.shape)) for k, v in enc.linear_proj_audio.state_dict().items()]
    ref = []
    for line in (FULL_NAMES / flavour / "names.txt").read_text().splitlines():
        name, shape, _ = line.split("\t")
        if name.startswith(("linear_proj.", "linear_proj_audio.")):
            ref.append((name, json.loads(shape)))
    assert ours == ref


def test_module_indices_follow_mlp_depth():
    assert list(VisionProjector(8, 6, 2).state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(AudioProjector(8, 6, 3, 2, 2).state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert [k for k in VisionProjector(8, 6, 3).state_dict() if k.endswith("weight")] == \
        ["0.weight", "2.weight", "4.weight"]
    assert [k for k in AudioProjector(8, 6, 3, 2, 3).state_dict() if k.endswith("weight")] == \
        ["0.weight", "3.weight", "5.weight"]


def test_vision_projector_maths():
    proj = _init(VisionProjector(10, 6, 2), 1)
    x = torch.randn(5, 10)
    exp = F.linear(F.gelu(F.linear(x, proj[0].weight, proj[0].bias)), proj[2].weight, proj[2].bias)
    torch.testing.assert_close(proj(x), exp)


def test_audio_projector_maths_and_lengths():
    proj = _init(AudioProjector(8, 6, kernel_size=3, stride=2), 2)
    for t2 in (1, 2, 5, 30, 31):
        x = torch.randn(2, t2, 8)                    # time-major encoder output
        conv = F.conv1d(x.transpose(1, 2), proj[0].weight, proj[0].bias, stride=2, padding=1)
        exp = F.linear(F.gelu(conv.transpose(1, 2)), proj[3].weight, proj[3].bias)
        got = proj.project_time_major(x)
        torch.testing.assert_close(got, exp)
        assert got.shape[1] == proj.output_length(t2) == (t2 - 1) // 2 + 1
        torch.testing.assert_close(proj(x.transpose(1, 2)), exp.transpose(1, 2))   # channel-first API
    assert projector_output_length(30, 5, 3) == (30 + 4 - 5) // 3 + 1
    # tokens per clip of the mm case's two clips (100 and 60 mel frames)
    assert [audio_token_count(100), audio_token_count(60), audio_token_count(61)] == [25, 15, 16]


def test_l2_normalize():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-14, 0.0]])
    y = l2_normalize(x)
    torch.testing.assert_close(y[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(y[1], torch.zeros(2))                   # zero stays zero (eps clamp)
    torch.testing.assert_close(y[2], torch.tensor([1e-14 / 1e-12, 0.0]))   # divided by eps, not the norm
    r = torch.randn(7, 33)
    torch.testing.assert_close(l2_normalize(r).norm(dim=-1), torch.ones(7))
    b = l2_normalize(r.bfloat16(), fp32=True)
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), l2_normalize(r), atol=1e-2, rtol=0)


def test_encode_images():
    vit = _init(build_vision_encoder(VISION_SMALL), 3)
    proj = _init(VisionProjector(20, 12), 4)
    grids = torch.tensor([[1, 2, 4], [2, 2, 2]])
    px = torch.randn(16, 3 * 2 * 2 * 2)
    with torch.no_grad():
        out = encode_images(vit, proj, px, grids)
        exp = proj(vit(px, grids))
    assert out.shape == (4, 12)
    torch.testing.assert_close(out, exp / exp.norm(dim=-1, keepdim=True))


def test_encode_audio_single_list_and_flags():
    enc, proj = _audio_pair(5)
    a, b = torch.randn(41, 16), torch.randn(22, 16)
    with torch.no_grad():
        one = encode_audio(enc, proj, a)
        assert one.shape == (audio_token_count(41), 12)
        torch.testing.assert_close(one.norm(dim=-1), torch.ones(one.shape[0]))
        raw = encode_audio(enc, proj, a, normalize=False)
        torch.testing.assert_close(one, raw / raw.norm(dim=-1, keepdim=True))
        padded = encode_audio(enc, proj, [a, b])
        alone = encode_audio(enc, proj, [a, b], pad_batch=False)
    assert [p.shape[0] for p in padded] == [audio_token_count(41), audio_token_count(22)]
    torch.testing.assert_close(padded[0], one, atol=1e-5, rtol=0)      # longest clip: no padding
    torch.testing.assert_close(alone[1], encode_audio(enc, proj, b))
    assert (padded[1] - alone[1]).abs().max() > 1e-4                   # reference: padding leaks in


def test_encode_audio_wrapped_layout():
    enc, proj = _audio_pair(7)
    c = [torch.randn(n, 16) for n in (30, 17, 44)]
    feats = torch.zeros(2, 61, 16)
    feats[0, :30], feats[0, 30:47] = c[0], c[1]
    feats[1, :44] = c[2]
    lengths = torch.tensor([[30, 17], [44, 0]])
    with torch.no_grad():
        embeds, lens, enc_out = encode_audio_wrapped(enc, proj, feats, lengths)
        per_clip = encode_audio(enc, proj, c)
    n = [audio_token_count(k) for k in (30, 17, 44)]
    assert lens.tolist() == [[n[0], n[1]], [n[2], 0]]
    assert embeds.shape == (2, max(n[0] + n[1], n[2]), 12)
    assert enc_out.shape == (3, whisper_output_length(44), 24)
    torch.testing.assert_close(embeds[0, : n[0] + n[1]], torch.cat(per_clip[:2]))
    torch.testing.assert_close(embeds[1, : n[2]], per_clip[2])
    assert torch.equal(embeds[1, n[2]:], torch.zeros_like(embeds[1, n[2]:]))



def test_mlp_depth_omitted_or_below_one_builds_the_single_linear_the_reference_builds():
    # BailingMM2Config(mlp_depth=1) is the upstream default, and its projectors loop range(1, mlp_depth):
    # a config without the key (or with 0) has linear_proj = [Linear] and linear_proj_audio = [conv], not depth 2
    from engine.tiny import tiny_config

    base = tiny_config("preview")
    for value in ("omitted", 0, 1):
        d = json.loads(json.dumps(base))
        if value == "omitted":
            del d["mlp_depth"]
        else:
            d["mlp_depth"] = value
        enc = build_encoders(MingConfig.from_dict(d), device="meta")
        assert [k for k, _ in enc.linear_proj.named_parameters()] == ["0.weight", "0.bias"], value
        assert [k for k, _ in enc.linear_proj_audio.named_parameters()] == ["0.weight", "0.bias"], value
    d = json.loads(json.dumps(base))
    enc = build_encoders(MingConfig.from_dict(d), device="meta")                    # stated 2: two Linears
    assert [k for k, _ in enc.linear_proj.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
