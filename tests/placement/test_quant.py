"""Quantised routed experts (engine.placement.quant): fp8 (per-channel and 128x128 blocks), int8 and int4
(group scales, two per byte) round-trip bounds, zero rows, the quantised MoE paths (torch reference, the
CPU int8/int4 kernels) against the reference on the dequantised weights, quantised loading of the tiny
checkpoint (weights, errors, end-to-end generation) and bf16 (= unquantised) staying bit-identical."""

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
from engine.kernels.dequant import FP8_BLOCK, pack_int4, unpack_int4
from engine.kernels import native
from tests.activations import quantized_activations
from engine.kernels.moe import QuantizedCpuExperts, moe_experts_dequant_reference, moe_experts_packed
from engine.placement.quant import (FP8_MAX, QUANT_STORAGE, ExpertWeights, bank_scales, dequantize, int4_group_size,
                                    quantize, quantize_bank_, quantize_int4_rows)
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


@pytest.mark.parametrize("kind", ["fp8", "fp8-block", "int8", "int4"])
def test_a_weight_of_no_row_quantises_to_nothing_and_one_of_no_column_is_refused(kind):
    """No output row: the empty storage of the format (a matrix sliced to nothing). No input column: a clear
    ValueError (before: 'cannot reshape tensor of 0 elements' or amax()'s IndexError, by format)."""
    q, s = quantize(torch.empty(0, 256), kind)
    assert q.shape[0] == 0 and q.dtype == QUANT_STORAGE[kind] and s.dtype == torch.float32
    for w in (torch.empty(4, 0), torch.empty(2, 4, 0, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="no input columns"):
            quantize(w, kind)
    with pytest.raises(ValueError, match="no input columns"):
        quantize_int4_rows(torch.empty(4, 0), reference=True)


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
        quantize(_weights(), "fp4")


def test_int4_packing_round_trip_and_group_bound():
    vals = torch.randint(-8, 8, (3, 10))
    packed = pack_int4(vals)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5)
    assert torch.equal(unpack_int4(packed).long(), vals)
    assert int(packed[0, 0]) == (int(vals[0, 0]) + 8) | ((int(vals[0, 1]) + 8) << 4)  # low nibble first
    w = _weights(rows=8, cols=384)
    q, s = quantize(w, "int4")
    assert q.shape == (8, 192) and s.shape == (8, 3) and int4_group_size(384) == 128 and int4_group_size(40) == 8
    err = (dequantize(q, s) - w).abs()
    bound = s.repeat_interleave(128, dim=1) * 0.5 * (1 + 1e-6)
    assert bool((err <= bound).all())
    assert bool((dequantize(q, s)[5] == 0).all())  # the zero row


def test_fp8_block_scales_are_per_128x128_block():
    w = _weights(rows=200, cols=300)
    w[130:, 260:] *= 1000  # one hot block must not coarsen the others
    q, s = quantize(w, "fp8-block")
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    for r in range(2):
        for c in range(3):
            blk = w[r * FP8_BLOCK:(r + 1) * FP8_BLOCK, c * FP8_BLOCK:(c + 1) * FP8_BLOCK]
            assert float(s[r, c]) == pytest.approx(float(blk.abs().max()) / FP8_MAX, rel=1e-6)
    full = s.repeat_interleave(FP8_BLOCK, 0)[:200].repeat_interleave(FP8_BLOCK, 1)[:, :300]
    bound = torch.maximum(w.abs() * 2 ** -4, full * 2 ** -10) * (1 + 1e-6)
    assert bool(((dequantize(q, s) - w).abs() <= bound).all())


class _Cfg:
    num_experts, hidden_size, moe_intermediate_size = 6, 32, 20


class _CpuKernelCfg:  # shapes torch's int4 CPU kernel takes (rows in 16s, groups of 32 or more)
    num_experts, hidden_size, moe_intermediate_size = 6, 64, 32


def _bank(seed=0, cfg=_Cfg) -> ExpertBank:
    torch.manual_seed(seed)
    bank = ExpertBank(cfg)
    for p in bank.parameters():
        p.data.normal_(0, 0.2)
    return bank


def _routing(t=13, e=6, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[:, 0] = torch.where(ids[:, 0] == 0, 1, ids[:, 0])  # keep expert 0 rare
    return ids, torch.rand(t, k, generator=g) * 2


# max relative output error of each format against the unquantised experts (weights ~N(0, 0.2))
FORMAT_ERROR = {"fp8": 0.15, "fp8-block": 0.15, "int8": 0.03, "int4": 0.4}
KINDS = list(FORMAT_ERROR)
LOGIT_ERROR = {"fp8": 0.1, "fp8-block": 0.6, "int8": 0.1, "int4": 0.6}  # tiny model, relative to max |logit|
INT8_ACTIVATIONS_LOGIT_ERROR = 0.02  # the int4 / int8 CPU kernels' int8 activations, relative to max |logit|


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_quantized_moe_matches_reference_on_dequantized_weights(kind, act):
    bank = _bank().requires_grad_(False)
    plain = [p.detach().clone() for p in (bank.gate_proj, bank.up_proj, bank.down_proj)]
    x = torch.randn(13, 32).to(act)
    ids, w = _routing()
    quantize_bank_(bank, kind)
    assert bank.expert_dtype == kind
    deq = [dequantize(q, s, act) for q, s in zip((bank.gate_proj, bank.up_proj, bank.down_proj), bank_scales(bank))]
    got = bank(x, ids, w)
    assert torch.equal(got, kernels.moe_experts_reference(x, *deq, ids, w))
    # and it is close to the unquantised experts (error relative to the output size)
    ref = kernels.moe_experts_reference(x.float(), *plain, ids, w)
    rel = float((got.float() - ref).abs().max() / ref.abs().max())
    assert rel < FORMAT_ERROR[kind], rel
    # per-expert view gives the same expert output
    e = int(ids[0, 0])
    one = ExpertWeights(bank.gate_proj[e], bank.up_proj[e], bank.down_proj[e], *(s[e] for s in bank_scales(bank)))
    assert one.quantized and one.kind == kind
    torch.testing.assert_close(one.forward(x[:1]).float(), kernels.moe.swiglu(x[:1], *(d[e] for d in deq)).float(),
                               rtol=0, atol=0)


def test_quantized_sizes_per_format():
    sizes = {}
    for kind in KINDS:
        bank = _bank()
        quantize_bank_(bank, kind)
        sizes[kind] = ExpertWeights(*(t[0] for t in (bank.gate_proj, bank.up_proj, bank.down_proj)),
                                    *(s[0] for s in bank_scales(bank))).nbytes
    # I=20, H=32: fp8/int8 one byte per weight + fp32 per output channel; int4 half a byte + one fp32
    # per group (H=32 -> groups of 32; I=20 -> groups of 4); fp8 blocks: one fp32 per 128x128 block
    assert sizes["int8"] == sizes["fp8"] == 3 * 20 * 32 + 4 * (20 + 20 + 32)
    assert sizes["int4"] == 3 * 20 * 32 // 2 + 4 * (20 + 20 + 32 * 5)
    assert sizes["fp8-block"] == 3 * 20 * 32 + 4 * 3


# CPU kernels (int8/int4: torch's weight-only kernels, another summation order) vs the dequantised
# reference: max error relative to the largest output, per activation dtype.
CPU_KERNEL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
FP8_AS_INT8_TOLERANCE = 0.05  # fp8 experts re-quantised to int8 for the CPU kernel: one more rounding


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [_CpuKernelCfg, _Cfg])
def test_cpu_packed_quantized_experts_match_the_reference(kind, act, cfg, fp32_activations):
    """The CPU kernels with fp32 activations against the dequantised reference (their summation order; the int8
    activations' error is tested against the quantised activations in tests/kernels/test_native.py)."""
    bank = _bank(cfg=cfg).requires_grad_(False)
    quantize_bank_(bank, kind)
    weights, scales = (bank.gate_proj, bank.up_proj, bank.down_proj), bank_scales(bank)
    packed = QuantizedCpuExperts.from_weights(*weights, scales, act, kind.split("-")[0])
    assert packed.kernel == ("int4" if kind == "int4" else "int8")  # fp8: re-quantised to int8 (no CPU fp8 kernel)
    # shapes no CPU kernel takes are dequantised instead: int8 input widths in 16s (down's I = 20 here);
    # int4 groups of 32+ for torch's kernel (and rows in 16s), or groups of two vectors for the native
    # one (gate/up: groups of H = 32 here; down: groups of 4, neither kernel)
    int4_gate_up_fallback = not native.int4_group_fits(cfg.hidden_size // scales[0].shape[-1], cfg.hidden_size)
    fallbacks = (1 + int4_gate_up_fallback if kind == "int4" else 1) * cfg.num_experts if cfg is _Cfg else 0
    assert packed.dequant_fallbacks == fallbacks
    for t in (13, 1):  # prefill blocks and the one-token decode path
        x = torch.randn(t, cfg.hidden_size).to(act)
        ids, w = _routing(t=t)
        ref = moe_experts_dequant_reference(x, *weights, scales, ids, w).float()
        got = moe_experts_packed(x, packed, ids, w).float()
        tol = FP8_AS_INT8_TOLERANCE if kind.startswith("fp8") else CPU_KERNEL_TOLERANCE[act]
        assert float((got - ref).abs().max()) <= tol * float(ref.abs().max())
    # ExpertBank.pack_for_cpu installs it and drops the stacked copy
    bank.pack_for_cpu(act)
    assert bank.expert_dtype == kind and bank.gate_proj.is_meta and bank.gate_proj_scale.is_meta
    torch.testing.assert_close(bank(x, ids, w), moe_experts_packed(x, packed, ids, w), rtol=0, atol=0)


def test_dequantised_fallback_matrices_are_safe_across_cpu_worker_threads():
    """Matrices no CPU kernel takes are dequantised into a reused buffer; the offload runtime's CPU workers
    compute experts of one layer at the same time, so each thread has its own buffers: results computed
    from two threads at once are those computed alone (within 1e-5 relative: torch's GEMM may split its work
    otherwise when two threads call it; a shared buffer gives another matrix's products)."""
    from concurrent.futures import ThreadPoolExecutor

    bank = _bank().requires_grad_(False)
    quantize_bank_(bank, "int4")  # _Cfg's down matrices (groups of 4 columns): the dequantising fallback
    weights, scales = (bank.gate_proj, bank.up_proj, bank.down_proj), bank_scales(bank)
    packed = QuantizedCpuExperts.from_weights(*weights, scales, torch.float32, "int4")
    assert packed.dequant_fallbacks > 0
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(7, _Cfg.hidden_size, generator=gen) for _ in range(8)]
    alone = [[packed.forward_expert(x, e) for e in range(_Cfg.num_experts)] for x in xs]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            together = list(pool.map(lambda x: [packed.forward_expert(x, e) for e in range(_Cfg.num_experts)], xs))
            for want, got in zip(alone, together):
                for a, b in zip(want, got):
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def test_quantized_moe_rejects_bad_scales():
    bank = _bank()
    quantize_bank_(bank, "int8")
    ids, w = _routing()
    sg, su, sd = bank_scales(bank)
    with pytest.raises(ValueError, match="scales"):
        moe_experts_dequant_reference(torch.randn(13, 32), bank.gate_proj, bank.up_proj, bank.down_proj,
                                      (sg[:, :5], su, sd), ids, w)
    with pytest.raises(ValueError, match="quantised storage"):
        kernels.moe_experts(torch.randn(13, 32), bank.gate_proj.float(), bank.up_proj, bank.down_proj, ids, w,
                            scales=(sg, su, sd))


def _logits(llm, ids):
    with torch.inference_mode():
        pos, _ = rope_index(ids, PositionTokens.from_config(llm.config))
        return llm(llm.model.embed(ids), pos, FP32)


IDS = torch.tensor([[5, 60, 70, 80, 90, 100, 110, 120, 7, 9]])


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_load_matches_checkpoint_per_expert_and_runs(tiny_checkpoint, kind):
    ref = load_model(tiny_checkpoint, dtype="fp32", device="cpu", pack_cpu_experts=False)
    m = load_model(tiny_checkpoint, dtype="fp32", device="cpu", expert_dtype=kind, pack_cpu_experts=False)
    assert m.expert_dtype == kind
    # bound on |error| relative to the row's (block's, group's) largest magnitude
    tol = {"fp8": 2 ** -4, "fp8-block": 2 ** -4, "int8": 0.5 / 127, "int4": 0.5 / 7}[kind]
    for layer_ref, layer_q in zip(ref.llm.model.layers, m.llm.model.layers):
        if not layer_ref.is_moe:
            continue
        b, bq = layer_ref.mlp.experts, layer_q.mlp.experts
        assert bq.expert_dtype == kind
        for p in ("gate_proj", "up_proj", "down_proj"):
            w, q, s = getattr(b, p), getattr(bq, p), getattr(bq, f"{p}_scale")
            err = (dequantize(q, s) - w).abs()
            # expert e's rows of the quantised bank come from expert e of the checkpoint (no mix-up);
            # the tiny model's matrices fit in one fp8 block, so a block's amax is the matrix's
            amax = w.abs().amax((-2, -1) if kind == "fp8-block" else -1, keepdim=True)
            assert bool((err <= amax * tol * 1.0001).all()), p
        # non-expert weights are untouched
        assert torch.equal(layer_ref.mlp.gate.weight, layer_q.mlp.gate.weight)
    a, b = _logits(ref.llm, IDS), _logits(m.llm, IDS)
    assert bool(torch.isfinite(b).all()) and not torch.equal(a, b)
    # coarser scales (one fp8 block covers a whole tiny matrix; int4 has 15 levels) flip more near-tie
    # routing decisions of the random tiny model, hence the looser bounds
    assert float((a - b).abs().max()) < LOGIT_ERROR[kind] * float(a.abs().max()), float((a - b).abs().max())
    # the default load packs the experts for the CPU kernels: same logits up to their summation order
    # (fp8: re-quantised to int8 for the CPU kernel, one more rounding)
    packed = load_model(tiny_checkpoint, dtype="fp32", device="cpu", expert_dtype=kind)
    assert packed.llm.model.layers[1].mlp.experts.packed is not None
    bound = LOGIT_ERROR[kind] if kind.startswith("fp8") else 1e-4
    with quantized_activations("float"):
        c = _logits(packed.llm, IDS)
    assert float((c - b).abs().max()) <= bound * float(b.abs().max())
    with quantized_activations("int8") as took:  # int4's default where the CPU has AVX2; int8's with VNNI
        if took:  # int8 activations: 0.6 % of max |logit| here
            c = _logits(packed.llm, IDS)
            assert float((c - b).abs().max()) <= max(bound, INT8_ACTIVATIONS_LOGIT_ERROR) * float(b.abs().max())
    engine = Engine(packed, MingTokenizer(packed.path), is_demo=True)
    done = list(engine.chat([{"role": "user", "content": "Hello"}], GenerationParams(max_new_tokens=3)))[-1]
    assert isinstance(done, Done) and len(done.token_ids) == 3


def test_bf16_expert_dtype_is_bit_identical_to_the_stacked_path(tiny_checkpoint, monkeypatch):
    # the weights as stored (the default CPU load re-lays them out for oneDNN)
    default = load_model(tiny_checkpoint, dtype="fp32", device="cpu", pack_cpu_experts=False)
    m = load_model(tiny_checkpoint, dtype="fp32", device="cpu", expert_dtype="bf16", pack_cpu_experts=False)
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


def test_cpu_only_small_footprint_load_int4_experts_and_int8_linears(tiny_checkpoint):
    """The CPU-only configuration for small RAM: int4 experts (CPU kernels) and int8 linears. Same module
    names and parameter counts; logits close to the unquantised model (tiny random model, so loosely)."""
    ref = load_model(tiny_checkpoint, dtype="fp32", device="cpu")
    m = load_model(tiny_checkpoint, dtype="fp32", device="cpu", expert_dtype="int4", linear_dtype="int8")
    linears = [mod for mod in m.llm.modules() if isinstance(mod, torch.nn.Linear)]
    assert not linears and type(m.llm.lm_head).__name__ == "PackedLinear"
    assert sum(p.numel() for p in m.llm.parameters()) == sum(p.numel() for p in ref.llm.parameters())
    a, b = _logits(ref.llm, IDS), _logits(m.llm, IDS)
    assert bool(torch.isfinite(b).all()) and float((a - b).abs().max()) < LOGIT_ERROR["int4"] * float(a.abs().max())
    with pytest.raises(ValueError, match="CPU only"):
        load_model(tiny_checkpoint, dtype="fp32", device="meta", linear_dtype="int8")
    with pytest.raises(ValueError, match="linear dtype"):
        load_model(tiny_checkpoint, dtype="fp32", device="cpu", linear_dtype="int4")


def _int4_in_one_go(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 format as its definition reads (group amax / 7, round, nibbles value + 8, even column low)."""
    grouped = w.float().reshape(*w.shape[:-1], w.shape[-1] // group, group)
    amax = grouped.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    values = torch.round(grouped / scale.unsqueeze(-1)).clamp(-7, 7).reshape(w.shape).to(torch.int16) + 8
    return (values[..., 0::2] | (values[..., 1::2] << 4)).to(torch.uint8), scale


@pytest.mark.parametrize("shape", [(600, 256), (3, 40, 128), (5, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reference", [True, False])
def test_int4_quantisation_in_blocks_of_rows_is_the_format(shape, dtype, reference, monkeypatch):
    """quantize_int4_rows works QUANT_ROW_BLOCK rows at a time (cache-sized temporaries) and packs each byte in
    fp32 before one conversion: the result is the format's definition computed in one go (scales within 1e-6,
    each nibble within one step and equal almost everywhere), zero groups get scale 1, and the input is not
    modified (an fp32 weight is not copied by .float())."""
    from engine.placement import quant as quant_mod
    monkeypatch.setattr(quant_mod, "QUANT_ROW_BLOCK", 7)
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.05).to(dtype)
    group = int4_group_size(shape[-1])
    w.reshape(-1, shape[-1])[1, :group] = 0  # a group of zeros
    before = w.clone()
    q, scale = quant_mod.quantize_int4_rows(w, reference=reference)  # False: the native quantiser where built
    q_ref, scale_ref = _int4_in_one_go(w, group)
    assert q.dtype == torch.uint8 and q.shape == q_ref.shape and scale.shape == scale_ref.shape
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    values, values_ref = unpack_int4(q).int(), unpack_int4(q_ref).int()
    assert int((values - values_ref).abs().max()) <= 1 and (values != values_ref).float().mean().item() < 1e-3
    assert int(values.abs().max()) <= 7 and float(scale.reshape(-1, scale.shape[-1])[1, 0]) == 1.0
    torch.testing.assert_close(w, before, rtol=0, atol=0)
