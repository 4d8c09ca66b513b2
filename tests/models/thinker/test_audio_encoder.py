"""Tests of engine/audio_encoder.py: config, full-size names, sinusoids, the whisper encoder against
torch's own pre-norm transformer layer, reference-style padded batching, bf16, and the `mm` fixture."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.models.thinker.audio_encoder import AudioEncoderConfig, WhisperAudioEncoder, sinusoids, whisper_output_length
from tests.paths import SHARED

REAL = {"v2": SHARED / "fixtures/real_configs/ming-flash-omni-2.0/config.json",
        "preview": SHARED / "fixtures/real_configs/ming-flash-omni-preview/config.json"}
FULL_NAMES = SHARED / "fixtures/ming_ref/full_names"
MM = SHARED / "fixtures/ming_ref/mm"
need_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared fixtures folder absent")

SMALL = {"ds_kernel_size": 3, "ds_stride": 2, "norm_query_embeds": True,
         "whisper_encoder_config": {"n_mels": 16, "n_ctx": 64, "n_state": 24, "n_head": 3, "n_layer": 2}}


def _encoder(seed: int = 0, d: dict = SMALL) -> WhisperAudioEncoder:
    enc = WhisperAudioEncoder(AudioEncoderConfig.from_dict(d)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return enc


def _mel(t: int, n_mels: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(t, n_mels, generator=torch.Generator().manual_seed(seed))


def _torch_layer(blk, n_state, n_head) -> torch.nn.TransformerEncoderLayer:
    """torch's pre-norm encoder layer holding the whisper block's weights (key bias = 0)."""
    layer = torch.nn.TransformerEncoderLayer(n_state, n_head, dim_feedforward=4 * n_state, dropout=0.0,
                                             activation="gelu", layer_norm_eps=1e-5, batch_first=True,
                                             norm_first=True).eval()
    a = blk.attn
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(torch.cat([a.query.weight, a.key.weight, a.value.weight]))
        layer.self_attn.in_proj_bias.copy_(torch.cat([a.query.bias, torch.zeros_like(a.query.bias), a.value.bias]))
        layer.self_attn.out_proj.weight.copy_(a.out.weight)
        layer.self_attn.out_proj.bias.copy_(a.out.bias)
        layer.norm1.load_state_dict(blk.attn_ln.state_dict())
        layer.norm2.load_state_dict(blk.mlp_ln.state_dict())
        layer.linear1.load_state_dict(blk.mlp[0].state_dict())
        layer.linear2.load_state_dict(blk.mlp[2].state_dict())
    return layer


@need_shared
@pytest.mark.parametrize("flavour", ["v2", "preview"])
def test_config_and_full_size_names(flavour):
    cfg_d = json.loads(REAL[flavour].read_text())["audio_config"]
    cfg = AudioEncoderConfig.from_dict(cfg_d)
    assert (cfg.n_mels, cfg.n_ctx, cfg.n_state, cfg.n_head, cfg.n_layer) == (128, 15000, 1280, 20, 32)
    assert (cfg.ds_kernel_size, cfg.ds_stride, cfg.norm_query_embeds, cfg.head_dim) == (3, 2, True, 64)
    with torch.device("meta"):
        enc = WhisperAudioEncoder(cfg)
    ours = [(f"audio.{k}", list(v.shape)) for k, v in enc.state_dict().items()]
    ref = []
    for line in (FULL_NAMES / flavour / "names.txt").read_text().splitlines():
        name, shape, _ = line.split("\t")
        if name.startswith("audio."):
            ref.append((name, json.loads(shape)))
    assert ours == ref
    assert "blocks.0.attn.key.bias" not in enc.state_dict()
    assert "positional_embedding" in dict(enc.named_buffers())


def test_config_rejects_bad_input():
    with pytest.raises(ValueError):
        AudioEncoderConfig.from_dict({"ds_kernel_size": 3})
    bad = {**SMALL, "whisper_encoder_config": {**SMALL["whisper_encoder_config"], "n_head": 5}}
    with pytest.raises(ValueError):
        AudioEncoderConfig.from_dict(bad)


def test_sinusoids_formula():
    pe = sinusoids(50, 32)
    p = np.arange(50)[:, None]
    k = np.arange(16)[None, :]
    rate = np.exp(-np.log(10000.0) / 15 * k)
    np.testing.assert_allclose(pe[:, :16].numpy(), np.sin(p * rate), atol=2e-6)
    np.testing.assert_allclose(pe[:, 16:].numpy(), np.cos(p * rate), atol=2e-6)


@need_shared
def test_mm_checkpoint_positional_embedding_is_the_sinusoid_table():
    from safetensors.torch import load_file
    stored = load_file(str(MM / "model.safetensors"))["audio.positional_embedding"]
    assert torch.equal(stored, sinusoids(*stored.shape))


def test_output_length():
    enc = _encoder()
    for t in (1, 2, 3, 7, 8, 59, 60, 100):
        out = enc(_mel(t))
        assert out.shape == (whisper_output_length(t), 24) == ((t - 1) // 2 + 1, 24)


def test_encoder_matches_torch_transformer_layers():
    enc = _encoder(seed=2)
    c = enc.config
    mel = torch.stack([_mel(37, seed=3), _mel(37, seed=4)])
    with torch.no_grad():
        out = enc(mel)
        x = F.gelu(F.conv1d(mel.transpose(1, 2), enc.conv1.weight, enc.conv1.bias, padding=1))
        x = F.gelu(F.conv1d(x, enc.conv2.weight, enc.conv2.bias, stride=2, padding=1)).transpose(1, 2)
        x = x + sinusoids(c.n_ctx, c.n_state)[: x.shape[1]]
        for blk in enc.blocks:
            x = _torch_layer(blk, c.n_state, c.n_head)(x)
        ref = F.layer_norm(x, (c.n_state,), enc.ln_post.weight, enc.ln_post.bias, 1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # one clip given as [T, n_mels] is the same computation without the batch dim
    torch.testing.assert_close(enc(mel[1]), out[1], atol=1e-5, rtol=0)


def test_attention_is_unmasked_and_global():
    enc = _encoder(seed=5)
    mel = _mel(40)
    with torch.no_grad():
        base = enc(mel)
        mel2 = mel.clone()
        mel2[-1] += 3.0
        out = enc(mel2)
    assert not torch.allclose(out[0], base[0])        # the first frame sees the last one


def test_padded_batch_reproduces_reference_batching():
    enc = _encoder(seed=6)
    long_clip, short_clip = _mel(50, seed=7), _mel(31, seed=8)
    with torch.no_grad():
        batch, lens = enc.encode_padded([long_clip, short_clip])
        alone_long, alone_short = enc(long_clip), enc(short_clip)
        manual = enc(torch.stack([long_clip, torch.cat([short_clip, torch.zeros(19, 16)])]))
    assert lens == [25, 16] and batch.shape == (2, 25, 24)
    with torch.no_grad():
        as_list = enc([long_clip, short_clip])
        separate = enc([long_clip, short_clip], pad_batch=False)
    assert torch.equal(as_list[1], batch[1, :16]) and as_list[1].shape == (16, 24)
    torch.testing.assert_close(separate[1], alone_short, atol=0, rtol=0)
    torch.testing.assert_close(batch, manual, atol=0, rtol=0)
    torch.testing.assert_close(batch[0], alone_long, atol=1e-5, rtol=0)
    # no mask: the shorter clip attends its zero padding, as upstream does
    assert (batch[1, :16] - alone_short).abs().max() > 1e-3


def test_a_check_runs_between_blocks_and_can_stop_the_encoder():
    """The audio encoder checks a cancelled request between its blocks, as the ViT does."""
    enc = _encoder(seed=6)
    clips = [_mel(50, seed=7), _mel(31, seed=8)]
    calls = []
    with torch.no_grad():
        plain, _ = enc.encode_padded(clips)
        checked, _ = enc.encode_padded(clips, lambda: calls.append(1))
    assert torch.equal(plain, checked) and len(calls) == enc.config.n_layer

    def stop():
        raise StopIteration
    with torch.no_grad(), pytest.raises(StopIteration):
        enc(clips, check=stop)


def test_too_long_audio_is_rejected():
    enc = _encoder()
    with pytest.raises(ValueError):
        enc(_mel(2 * 64 + 1))
    with pytest.raises(ValueError):
        enc(torch.zeros(10, 15))


def test_bf16_run_is_close_to_fp32():
    enc = _encoder(seed=9)
    mel = _mel(60)
    with torch.no_grad():
        ref = enc(mel)
        out = enc.to(torch.bfloat16)(mel.bfloat16())
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err


@need_shared
def test_mm_fixture_audio_encoder_out():
    from safetensors.torch import load_file
    cfg = json.loads((MM / "config.json").read_text())
    enc = WhisperAudioEncoder(AudioEncoderConfig.from_dict(cfg["audio_config"])).eval()
    w = load_file(str(MM / "model.safetensors"))
    enc.load_state_dict({k[6:]: v for k, v in w.items() if k.startswith("audio.")}, strict=True)
    inp, out = load_file(str(MM / "inputs.safetensors")), load_file(str(MM / "outputs.safetensors"))
    feats, lens = inp["audio_feats"][0], inp["audio_feats_lengths"][0].tolist()
    clips = list(torch.split(feats[: sum(lens)], lens))
    with torch.no_grad():
        got, t2 = enc.encode_padded(clips)
    assert t2 == [whisper_output_length(n) for n in lens]
    torch.testing.assert_close(got, out["audio_encoder_out"], atol=1e-5, rtol=0)
