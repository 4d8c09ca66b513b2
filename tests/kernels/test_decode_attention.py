"""One-token grouped attention as two GEMMs (engine.kernels.decode_attention) against torch's fused
attention: boolean and additive masks, padding, fp32 and bf16, and where the model takes it."""

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import decode_attention


def _inputs(dtype, b=2, kv=4, group=8, t=600, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for shape in
               ((b, kv, group, d), (b, kv, t, d), (b, kv, t, d)))
    allowed = torch.arange(t) <= torch.tensor([t - 1, t // 3]).view(-1, 1)  # row 1 attends to its first third only
    allowed[0, 5:40] = False  # and row 0 has padding inside its window
    return q, k, v, allowed.view(b, 1, 1, t)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("additive", [False, True], ids=["bool-mask", "additive-mask"])
def test_matches_the_fused_attention(dtype, tol, additive):
    q, k, v, allowed = _inputs(dtype)
    mask = allowed
    if additive:
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask if not additive else mask.float())
    got = decode_attention.grouped_decode_attention(q, k, v, mask)
    assert got.dtype == dtype and got.shape == q.shape
    assert float((got.float() - want).abs().max()) <= tol * float(want.abs().max())
    # masked keys do not count: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 5:40], v2[1, :, 300:] = 100.0, -100.0
    assert torch.equal(decode_attention.grouped_decode_attention(q, k2, v2, mask), got)


def test_no_mask_attends_everything():
    q, k, v, _ = _inputs(torch.float32)
    want = F.scaled_dot_product_attention(q, k, v)
    got = decode_attention.grouped_decode_attention(q, k, v, None)
    assert float((got - want).abs().max()) <= 2e-6 * float(want.abs().max())


def test_only_long_windows_on_a_gpu_take_it():
    q = torch.zeros(1, 4, 8, 32)
    assert not decode_attention.applies(q, 4096)  # (the CPU's decode has its own kernels)
    if torch.cuda.is_available():
        assert decode_attention.applies(q.cuda(), decode_attention.MIN_KEYS)
        assert not decode_attention.applies(q.cuda(), decode_attention.MIN_KEYS - 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_it_matches_the_fused_attention_and_decodes_the_same_tokens(monkeypatch, tiny_checkpoint):
    q, k, v, allowed = (t.cuda() for t in _inputs(torch.bfloat16, t=2048))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    got = decode_attention.grouped_decode_attention(q, k, v, allowed)
    assert float((got.float() - want.float()).abs().max()) <= 1e-2 * float(want.float().abs().max())
    from engine.generate import generate
    from engine.runtime import Engine
    from engine.sampling import GenerationParams

    engine = Engine.load(tiny_checkpoint, dtype="fp32", device="cuda")
    prompt = engine.processor.build([{"role": "user", "content": "Tell me about the Ming dynasty."}]).ids

    def tokens():
        return list(list(generate(engine.model, engine.tokenizer, prompt, GenerationParams(max_new_tokens=24),
                                  eos_ids=set(), cuda_graphs=True))[-1].token_ids)

    fused = tokens()
    monkeypatch.setattr(decode_attention, "MIN_KEYS", 1)  # every decode step takes the GEMMs
    gemms = tokens()  # (two kernel paths: the same greedy tokens for a while, not necessarily bit for bit)
    assert gemms[:16] == fused[:16], (gemms, fused)
