"""FP8 / int8 routed experts (engine.placement.quant): per-channel round-trip bounds, zero rows, the quantised
MoE path against the reference on the dequantised weights, quantised loading of the tiny checkpoint
(weights, errors, end-to-end generation) and bf16 (= unquantised) staying bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import kernels
from engine.events import Done
from engine.models.thinker.layers import ExpertBank, Numerics
from engine.loader import CheckpointError
from engine.models.thinker.positions import PositionTokens, rope_index
from engine.placement.quant import (FP8_MAX, ExpertWeights, dequantize, moe_experts_quantized, quantize, quantize_bank_)
from engine.runtime import Engine
from engine.sampling import GenerationParams
from engine.models.thinker.model import load_model
from engine.models.thinker.tokenizer import MingTokenizer

FP32 = Numerics()


def _weights(rows=24, cols=40, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes (per-channel scales matter), one zero row, one tiny row
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows).unsqueeze(1)
    w[5] = 0.0
    w[7, :] = 1e-30 * torch.randn(cols, generator=g)
    return w


def test_int8_round_trip_is_within_half_a_step_per_channel():
    w = _weights()
    q, s = quantize(w, "int8")
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (w.shape[0],)
    assert int(q.abs().max()) <= 127
    amax = w.abs().amax(1)
    nz = amax > 0
    torch.testing.assert_close(s[nz], amax[nz] / 127, rtol=0, atol=0)
    # every non-zero row uses the full range: its largest element maps to +-127
    assert torch.equal(q.abs().amax(1)[nz].long(), torch.full((int(nz.sum()),), 127))
    err = (dequantize(q, s) - w).abs()
    assert bool((err <= s.unsqueeze(1) * 0.5 * (1 + 1e-6)).all())


def test_fp8_round_trip_relative_error_bound():
    w = _weights()
    q, s = quantize(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn and s.shape == (w.shape[0],)
    deq = dequantize(q, s)
    err = (deq - w).abs()
    # 3 mantissa bits: |error| <= 2^-4 |w|; subnormal range: <= 2^-10 * scale
    bound = torch.maximum(w.abs() * 2 ** -4, s.unsqueeze(1) * 2 ** -10) * (1 + 1e-6)
    assert bool((err <= bound).all())
    # the largest element of each non-zero row maps to the largest finite e4m3 value
    nz = w.abs().amax(1) > 0
    assert torch.equal(q.float().abs().amax(1)[nz], torch.full((int(nz.sum()),), FP8_MAX))
    assert bool(torch.isfinite(deq).all())


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_zero_rows_and_independent_channel_scales(kind):
    w = _weights()
    q, s = quantize(w, kind)
    assert float(s[5]) == 1.0 and bool((q[5].float() == 0).all()) and bool((dequantize(q, s)[5] == 0).all())
    # scaling one output channel by a power of two changes only that channel's scale
    w2 = w.clone()
    w2[3] *= 1024
    q2, s2 = quantize(w2, kind)
    assert torch.equal(q2.float(), q.float())
    assert float(s2[3]) == float(s[3]) * 1024
    assert torch.equal(torch.cat([s2[:3], s2[4:]]), torch.cat([s[:3], s[4:]]))
    # stacked [E, out, in] input gives [E, out] scales, identical to per-matrix quantisation
    qs, ss = quantize(torch.stack([w, w2]), kind)
    assert ss.shape == (2, w.shape[0]) and torch.equal(ss[1], s2) and torch.equal(qs[0].float(), q.float())


def test_rejects_non_finite_and_unknown_kinds():
    w = _weights()
    w[2, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(w, "int8")
    with pytest.raises(ValueError):
        quantize(_weights(), "int4")


class _Cfg:
    num_experts, hidden_size, moe_intermediate_size = 6, 32, 20


def _bank(seed=0) -> ExpertBank:
    torch.manual_seed(seed)
    bank = ExpertBank(_Cfg)
    for p in bank.parameters():
        p.data.normal_(0, 0.2)
    return bank


def _routing(t=13, e=6, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[:, 0] = torch.where(ids[:, 0] == 0, 1, ids[:, 0])  # keep expert 0 rare
    return ids, torch.rand(t, k, generator=g) * 2


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_quantized_moe_matches_reference_on_dequantized_weights(kind, act):
    bank = _bank().requires_grad_(False)
    plain = [p.detach().clone() for p in (bank.gate_proj, bank.up_proj, bank.down_proj)]
    x = torch.randn(13, 32).to(act)
    ids, w = _routing()
    quantize_bank_(bank, kind)
    assert bank.expert_dtype == kind and bank.gate_proj_scale.shape == (6, 20) and bank.down_proj_scale.shape == (6, 32)
    deq = [dequantize(q, s, act) for q, s in ((bank.gate_proj, bank.gate_proj_scale), (bank.up_proj, bank.up_proj_scale),
                                              (bank.down_proj, bank.down_proj_scale))]
    got = bank(x, ids, w)
    assert torch.equal(got, kernels.moe_experts_reference(x, *deq, ids, w))
    # and it is close to the unquantised experts (error relative to the output size)
    ref = kernels.moe_experts_reference(x.float(), *plain, ids, w)
    rel = float((got.float() - ref).abs().max() / ref.abs().max())
    assert rel < (0.15 if kind == "fp8" else 0.03), rel
    # per-expert view gives the same expert output
    e = int(ids[0, 0])
    one = ExpertWeights(bank.gate_proj[e], bank.up_proj[e], bank.down_proj[e], bank.gate_proj_scale[e],
                        bank.up_proj_scale[e], bank.down_proj_scale[e])
    assert one.quantized and one.nbytes == 3 * 20 * 32 + 4 * (20 + 20 + 32)
    torch.testing.assert_close(one.forward(x[:1]).float(), kernels.moe.swiglu(x[:1], *(d[e] for d in deq)).float(),
                               rtol=0, atol=0)


def test_quantized_moe_rejects_bad_scales():
    bank = _bank()
    quantize_bank_(bank, "int8")
    ids, w = _routing()
    with pytest.raises(ValueError, match="scales"):
        moe_experts_quantized(torch.randn(13, 32), bank.gate_proj, bank.up_proj, bank.down_proj,
                              bank.gate_proj_scale[:, :5], bank.up_proj_scale, bank.down_proj_scale, ids, w)


def _logits(llm, ids):
    with torch.inference_mode():
        pos, _ = rope_index(ids, PositionTokens.from_config(llm.config))
        return llm(llm.model.embed(ids), pos, FP32)


IDS = torch.tensor([[5, 60, 70, 80, 90, 100, 110, 120, 7, 9]])


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_quantized_load_matches_checkpoint_per_expert_and_runs(tiny_checkpoint, kind):
    ref = load_model(tiny_checkpoint, dtype="fp32", device="cpu")
    m = load_model(tiny_checkpoint, dtype="fp32", device="cpu", expert_dtype=kind)
    assert m.expert_dtype == kind
    tol = {"fp8": 2 ** -4, "int8": 0.5 / 127}[kind]
    for layer_ref, layer_q in zip(ref.llm.model.layers, m.llm.model.layers):
        if not layer_ref.is_moe:
            continue
        b, bq = layer_ref.mlp.experts, layer_q.mlp.experts
        assert bq.expert_dtype == kind
        for p in ("gate_proj", "up_proj", "down_proj"):
            w, q, s = getattr(b, p), getattr(bq, p), getattr(bq, f"{p}_scale")
            err = (dequantize(q, s) - w).abs()
            # expert e's rows of the quantised bank come from expert e of the checkpoint (no mix-up)
            assert bool((err <= w.abs().amax(-1, keepdim=True) * tol * 1.0001).all()), p
        # non-expert weights are untouched
        assert torch.equal(layer_ref.mlp.gate.weight, layer_q.mlp.gate.weight)
    a, b = _logits(ref.llm, IDS), _logits(m.llm, IDS)
    assert bool(torch.isfinite(b).all()) and not torch.equal(a, b)
    assert float((a - b).abs().max()) < 0.1 * float(a.abs().max())
    engine = Engine(m, MingTokenizer(m.path), is_demo=True)
    done = list(engine.chat([{"role": "user", "content": "Hello"}], GenerationParams(max_new_tokens=3)))[-1]
    assert isinstance(done, Done) and len(done.token_ids) == 3


def test_bf16_expert_dtype_is_bit_identical_to_the_stacked_path(tiny_checkpoint, monkeypatch):
    default = load_model(tiny_checkpoint, dtype="fp32", device="cpu")
    m = load_model(tiny_checkpoint, dtype="fp32", device="cpu", expert_dtype="bf16")
    assert m.expert_dtype == "bf16" and m.moe_runtime is None
    sd_a, sd_b = default.llm.state_dict(), m.llm.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    got = _logits(m.llm, IDS)
    # what ExpertBank computed before the quantisation/runtime hooks existed
    monkeypatch.setattr(ExpertBank, "forward", lambda self, x, ids, w: kernels.moe_experts(
        x, self.gate_proj, self.up_proj, self.down_proj, ids, w))
    assert torch.equal(got, _logits(m.llm, IDS))
    # bf16 model dtype: the experts stay bf16 and the output matches the historical path exactly too
    mb = load_model(tiny_checkpoint, dtype="bf16", device="cpu", expert_dtype="bf16")
    assert mb.llm.model.layers[1].mlp.experts.gate_proj.dtype == torch.bfloat16


def test_quantized_load_reports_a_missing_expert(tiny_checkpoint, tmp_path):
    import shutil
    for f in tiny_checkpoint.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    victim = "model.model.layers.2.mlp.experts.7.down_proj.weight"
    index = tiny_checkpoint / "model.safetensors.index.json"
    for shard in sorted(tiny_checkpoint.glob("*.safetensors")):
        sd = load_file(str(shard))
        sd.pop(victim, None)
        save_file(sd, str(tmp_path / shard.name))
    if index.is_file():
        meta = json.loads(index.read_text())
        del meta["weight_map"][victim]
        (tmp_path / index.name).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="experts.7.down_proj"):
        load_model(tmp_path, dtype="fp32", device="cpu", expert_dtype="int8")
    with pytest.raises(ValueError, match="expert dtype"):
        load_model(tiny_checkpoint, dtype="fp32", device="cpu", expert_dtype="fp4")
