"""The talker's Qwen2 stack with a sliding window on some layers (spec §7.1: the LLM is built from
talker/llm/config.json, whose use_sliding_window / sliding_window / max_window_layers upstream keeps):
the static-cache decode the AR loop runs must equal a whole-sequence forward with the window mask."""

import torch

from engine.models.talker.backbone import Qwen2Backbone, StaticKVCache
from engine.models.talker.config import Qwen2BackboneConfig

ATOL = 1e-5


def _sliding_llm(window: int) -> Qwen2Backbone:
    cfg = Qwen2BackboneConfig.from_dict({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8,
                                         "use_sliding_window": True, "sliding_window": window,
                                         "max_window_layers": 1, "rope_theta": 10000.0}, "llm")
    assert cfg.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    torch.manual_seed(11)
    model = Qwen2Backbone(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_static_cache_decode_applies_the_sliding_window():
    model = _sliding_llm(window=5)
    x = torch.randn(1, 14, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        full = model(x)  # whole sequence: causal + window mask on the sliding layers
        cache = StaticKVCache(model.config, 64, 1, torch.float32, "cpu")
        steps = [model(x[:, :8], cache)]
        for i in range(8, 14):
            steps.append(model(x[:, i:i + 1], cache))
    got = torch.cat(steps, dim=1)
    assert cache.length == 14
    assert (got - full).abs().max() <= ATOL
    # the window matters here: without it the last positions differ
    wide = _sliding_llm(window=64)
    with torch.no_grad():
        assert (wide(x)[:, -1] - full[:, -1]).abs().max() > 1e-3


def test_static_cache_full_view_masks_the_window():
    """The CUDA-graph path reads the whole buffer behind a position mask; the window must be in it."""
    model = _sliding_llm(window=4)
    x = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        full = model(x)
        cache = StaticKVCache(model.config, 16, 1, torch.float32, "cpu")
        model(x[:, :6], cache)
        cache.full_view = True
        steps = [model(x[:, i:i + 1], cache) for i in range(6, 9)]
    assert (torch.cat(steps, 1) - full[:, 6:]).abs().max() <= ATOL


def test_rope_inverse_frequencies_are_rounded_to_the_model_dtype(tiny_talker_dir):
    """The reference casts the whole talker and VAE with .to(bfloat16), which also rounds the Qwen2
    stacks' (non-persistent) RoPE inv_freq buffers; in bf16 our tables must use the rounded values."""
    from engine.models.talker.model import load_talker
    from engine.models.talker.vae import load_audio_vae

    talker = load_talker(tiny_talker_dir, dtype=torch.bfloat16)
    cfg = talker.config.llm
    exact = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    inv = talker.model.rotary.inv_freq
    assert inv.dtype == torch.float32 and torch.equal(inv, exact.to(torch.bfloat16).float())
    assert not torch.equal(inv, exact)
    vae = load_audio_vae(tiny_talker_dir / "vae", dtype=torch.bfloat16)
    for stack in (vae.encoder.encoder, vae.encoder.aggregator, vae.decoder.decoder):
        assert torch.equal(stack.rotary.inv_freq, stack.rotary.inv_freq.to(torch.bfloat16).float())
    assert torch.equal(load_talker(tiny_talker_dir).model.rotary.inv_freq, exact)  # fp32: exact


def test_backbone_mlp_takes_the_configured_activation():
    """transformers' Qwen2MLP runs ACT2FN[config.hidden_act]: a talker LLM or AudioVAE backbone config naming
    'gelu' (or 'relu', 'gelu_pytorch_tanh', ...) runs that activation, written out here from its formula;
    an activation transformers does not know is refused naming it."""
    import pytest
    import torch.nn.functional as F

    from engine.models.talker.config import TalkerConfigError

    d = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1, "vocab_size": 8, "hidden_act": "gelu"}
    mlp = Qwen2Backbone(Qwen2BackboneConfig.from_dict(d, "test")).layers[0].mlp
    x = torch.randn(3, 16)
    gate = mlp.gate_proj(x)
    expect = mlp.down_proj(0.5 * gate * (1 + torch.erf(gate / 2 ** 0.5)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expect, atol=ATOL, rtol=ATOL)
    assert not torch.allclose(mlp(x), mlp.down_proj(F.silu(gate) * mlp.up_proj(x)), atol=ATOL)
    with pytest.raises(TalkerConfigError, match="hidden_act 'bogus'"):
        Qwen2BackboneConfig.from_dict({**d, "hidden_act": "bogus"}, "test")
