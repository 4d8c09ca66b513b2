"""Routed-expert MoE: CPU paths against a naive per-token oracle, Triton (interpreter) against the reference."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import (
    PackedExperts,
    moe_experts,
    moe_experts_dequant_reference,
    moe_experts_packed,
    moe_experts_reference,
    onednn_packing_available,
)

pytest.importorskip("triton")
from engine.kernels.triton_impl.moe import (  # noqa: E402
    DIRECT_MAX_ASSIGNMENTS, align_by_expert, launch_config, moe_experts_triton)

# Max-abs error allowed, relative to the largest output magnitude, per activation dtype.
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
WEIGHT_SCALE = 0.2  # keeps activations O(1) for the tiny test shapes
TRITON_TILE = 32  # small N/K tiles keep the interpreter grids tiny


@dataclass
class MoeCase:
    """One routing scenario; ``ids`` lists each token's experts (None: random distinct experts)."""

    name: str
    tokens: int
    hidden: int
    inter: int
    experts: int
    top_k: int
    ids: list[list[int]] | None = None


CASES = [
    # expert 0 gets no token, expert 1 exactly one; H, I not multiples of the tiles
    MoeCase("edge", tokens=7, hidden=48, inter=40, experts=6, top_k=2,
            ids=[[1, 5], [2, 5], [3, 5], [2, 4], [4, 5], [3, 2], [5, 4]]),  # fmt: skip
    MoeCase("k1", tokens=5, hidden=32, inter=24, experts=4, top_k=1),
    MoeCase("decode", tokens=1, hidden=64, inter=32, experts=16, top_k=4),
    # 20 assignments on expert 2: its run spans two 16-row blocks
    MoeCase("multi_block", tokens=21, hidden=40, inter=36, experts=3, top_k=1, ids=[[2]] * 20 + [[0]]),
]


def make_inputs(case: MoeCase, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.tokens, case.hidden, generator=gen).to(dtype)
    w_gate = (torch.randn(case.experts, case.inter, case.hidden, generator=gen) * WEIGHT_SCALE).to(dtype)
    w_up = (torch.randn(case.experts, case.inter, case.hidden, generator=gen) * WEIGHT_SCALE).to(dtype)
    w_down = (torch.randn(case.experts, case.hidden, case.inter, generator=gen) * WEIGHT_SCALE).to(dtype)
    if case.ids is None:
        ids = torch.stack([torch.randperm(case.experts, generator=gen)[: case.top_k] for _ in range(case.tokens)])
    else:
        ids = torch.tensor(case.ids, dtype=torch.int64)
    weights = torch.rand(case.tokens, case.top_k, generator=gen) + 0.1
    return x, w_gate, w_up, w_down, ids, weights


def naive_moe(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Independent oracle: a per-token, per-slot loop of the spec's formula."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        row = x[t : t + 1]
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            hidden = F.silu(row @ w_gate[e].T) * (row @ w_up[e].T)
            out[t] += (hidden @ w_down[e].T)[0].float() * weights[t, j]
    return out.to(x.dtype)


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.float().abs().max().item()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= RELATIVE_TOLERANCE[want.dtype] * scale, f"max abs err {err} vs output scale {scale}"


def test_case_routing_covers_the_edges() -> None:
    counts = torch.bincount(torch.tensor(CASES[0].ids).flatten(), minlength=CASES[0].experts)
    assert counts[0] == 0 and counts[1] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_naive_loop(case: MoeCase, dtype: torch.dtype) -> None:
    args = make_inputs(case, dtype)
    assert_close_scaled(moe_experts_reference(*args), naive_moe(*args))


def test_reference_weights_sum_in_fp32_then_cast() -> None:
    # Two experts whose bf16 outputs cancel except for a tiny remainder: summing in bf16 would lose it.
    x = torch.ones(1, 16, dtype=torch.bfloat16)
    w_gate = torch.full((2, 16, 16), 0.1, dtype=torch.bfloat16)
    w_up = torch.full((2, 16, 16), 0.1, dtype=torch.bfloat16)
    w_down = torch.full((2, 16, 16), 0.1, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 1]])
    weights = torch.tensor([[1.0, -0.999]])
    got = moe_experts_reference(x, w_gate, w_up, w_down, ids, weights)
    assert_close_scaled(got, naive_moe(x, w_gate, w_up, w_down, ids, weights))
    assert got.abs().min() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_onednn", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_packed_matches_naive_loop(case: MoeCase, dtype: torch.dtype, use_onednn: bool) -> None:
    if use_onednn and not onednn_packing_available(dtype):
        pytest.skip(f"this torch build cannot pre-pack {dtype} weights for oneDNN")
    x, w_gate, w_up, w_down, ids, weights = make_inputs(case, dtype)
    packed = PackedExperts.from_weights(w_gate, w_up, w_down, use_onednn=use_onednn)
    assert packed.num_experts == case.experts and packed.onednn == use_onednn
    got = moe_experts_packed(x, packed, ids, weights)
    assert_close_scaled(got, naive_moe(x, w_gate, w_up, w_down, ids, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_forward_expert_is_the_swiglu(dtype: torch.dtype) -> None:
    x, w_gate, w_up, w_down, _, _ = make_inputs(CASES[1], dtype)
    packed = PackedExperts.from_weights(w_gate[2:3], w_up[2:3], w_down[2:3])
    want = F.linear(F.silu(F.linear(x, w_gate[2])) * F.linear(x, w_up[2]), w_down[2])
    assert_close_scaled(packed.forward_expert(x, 0), want)


@pytest.mark.parametrize("direct", [False, True], ids=["sorted", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_matches_reference(case: MoeCase, dtype: torch.dtype, direct: bool) -> None:
    args = make_inputs(case, dtype)
    got = moe_experts_triton(*args, block_n=TRITON_TILE, block_k=TRITON_TILE, direct=direct)
    assert_close_scaled(got, moe_experts_reference(*args))


@pytest.mark.parametrize("direct", [False, True], ids=["sorted", "direct"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: c.name)
def test_triton_skips_negative_ids(case: MoeCase, direct: bool) -> None:
    """The expert runtime's per-GPU call: -1 marks assignments computed elsewhere; they add nothing,
    and the fp32 result is the unrounded sum of the rest."""
    x, w_gate, w_up, w_down, ids, weights = make_inputs(case, torch.float32, seed=4)
    elsewhere = (ids % 2) == 1
    local = torch.where(elsewhere, -1, ids)
    got = moe_experts_triton(x, w_gate, w_up, w_down, local, weights, block_n=TRITON_TILE, block_k=TRITON_TILE,
                             direct=direct, skip_negative_ids=True, out_dtype=torch.float32)
    want = moe_experts_reference(x, w_gate, w_up, w_down, torch.where(elsewhere, 0, ids),
                                 torch.where(elsewhere, 0.0, weights))
    assert got.dtype == torch.float32
    assert_close_scaled(got, want)


def test_out_of_shared_memory_falls_back_to_smaller_tiles(monkeypatch) -> None:
    """A GPU with less shared memory per block (or fp32 activations) must not make the call fail:
    the launch retries with fewer stages / smaller tiles and remembers what compiled."""
    from triton.runtime.errors import OutOfResources

    import engine.kernels.triton_impl.moe as tmoe

    real_run, tried = tmoe._run, []

    def limited_run(cfg, *args):
        tried.append(cfg)
        if cfg.num_stages > 2 or cfg.block_k > 64:  # pretend these need too much shared memory
            raise OutOfResources(300_000, 232_448, "shared memory")
        return real_run(cfg, *args)

    monkeypatch.setattr(tmoe, "_run", limited_run)
    monkeypatch.setattr(tmoe, "_FITTED", {})
    args = make_inputs(CASES[2], torch.float32)  # decode: the direct config (3 stages, K tile 256)
    assert_close_scaled(moe_experts_triton(*args), moe_experts_reference(*args))
    first = tried[-1]
    assert first.num_stages == 2 and first.block_k == 64 and first.direct
    tried.clear()
    moe_experts_triton(*args)
    assert tried == [first]  # the fitted configuration is reused straight away
    assert tmoe.smaller(tmoe.LaunchConfig(16, 32, 32, num_stages=2)) is None


def test_launch_configs_cover_every_batch_size() -> None:
    assert launch_config(1).direct and launch_config(DIRECT_MAX_ASSIGNMENTS).direct
    assert not launch_config(DIRECT_MAX_ASSIGNMENTS + 1).direct
    sizes = [launch_config(n).block_m for n in (17, 1023, 1024, 10**6)]
    assert sizes == sorted(sizes)  # larger batches, taller row blocks


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["direct", "sorted"])
def test_triton_default_tiles_and_dispatch(case: MoeCase) -> None:
    args = make_inputs(case, torch.float32)
    assert_close_scaled(moe_experts(*args, impl="triton"), moe_experts(*args, impl="torch"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_align_by_expert_layout(case: MoeCase) -> None:
    block_m = 16
    _, _, _, _, ids, _ = make_inputs(case, torch.float32)
    sorted_assignments, block_expert = align_by_expert(ids, case.experts, block_m)
    n_assign = ids.numel()
    flat = ids.flatten()
    real = sorted_assignments[sorted_assignments < n_assign].long()
    assert sorted(real.tolist()) == list(range(n_assign))  # each assignment exactly once
    blocks = sorted_assignments.view(-1, block_m)
    for b, expert in enumerate(block_expert.tolist()):
        rows = blocks[b][blocks[b] < n_assign].long()
        if expert < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and bool((flat[rows] == expert).all())
    counts = torch.bincount(flat, minlength=case.experts)
    used_blocks = int((block_expert >= 0).sum())
    assert used_blocks == int(((counts + block_m - 1) // block_m).sum())


def test_argument_errors() -> None:
    x, w_gate, w_up, w_down, ids, weights = make_inputs(CASES[1], torch.float32)
    with pytest.raises(ValueError):
        moe_experts(x.bfloat16(), w_gate, w_up, w_down, ids, weights)
    with pytest.raises(ValueError):
        moe_experts(x, w_gate, w_up, w_down, ids.int(), weights)
    with pytest.raises(ValueError):
        moe_experts(x, w_gate, w_up, w_down, ids, weights.double())
    with pytest.raises(ValueError):
        moe_experts(x, w_gate, w_up, w_down.transpose(1, 2), ids, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_linear(dtype, bias, monkeypatch):
    """PackedLinear computes nn.Linear's product; without the native decode kernels (disabled here, see
    tests/kernels/test_native.py) small fp32 matrices are left unwrapped, large ones pre-packed."""
    from engine.kernels import PackedLinear, native, onednn_packing_available, pack_linears
    import engine.kernels.moe as moe_kernels

    monkeypatch.setenv(native.DISABLE_ENV, "0")
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40, bias=bias).to(dtype)
    x = torch.randn(2, 3, 48, dtype=dtype)
    packed = PackedLinear(lin)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed(x), lin(x), atol=tol, rtol=tol)
    assert packed.weight.shape == lin.weight.shape and packed.weight.device.type == "meta"
    if not onednn_packing_available(torch.float32):
        return
    seq = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 4)))
    assert pack_linears(seq) == 0  # fp32 matrices this small run faster unpacked
    monkeypatch.setattr(moe_kernels, "ONEDNN_FP32_MIN_BYTES", 0)
    assert pack_linears(seq) == 2 and isinstance(seq[1][0], PackedLinear)


# ------------------------------------------------------------------------------------------------
# Quantised experts dequantised inside the Triton kernel
# ------------------------------------------------------------------------------------------------

QUANT_KINDS = ["fp8", "fp8-block", "int8", "int4"]
# The kernel dequantises like the reference (fp32 product, one rounding to the activation dtype), so
# what remains is the dot's summation order: the tolerances of the plain kernel apply.


def quantized_inputs(case: MoeCase, dtype: torch.dtype, kind: str):
    from engine.placement.quant import quantize

    x, w_gate, w_up, w_down, ids, weights = make_inputs(case, torch.float32)
    (qg, sg), (qu, su), (qd, sd) = (quantize(w, kind) for w in (w_gate, w_up, w_down))
    return x.to(dtype), qg, qu, qd, (sg, su, sd), ids, weights


# Under the interpreter bf16 dots are upcast to fp32 (its bf16 tl.dot is wrong); fp16 and fp32 run
# the dot in the activation dtype.
@pytest.mark.parametrize("direct", [False, True], ids=["sorted", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_triton_dequantizes_in_the_kernel(kind: str, dtype: torch.dtype, direct: bool) -> None:
    case = CASES[0] if not direct else CASES[2]
    x, qg, qu, qd, scales, ids, weights = quantized_inputs(case, dtype, kind)
    want = moe_experts_dequant_reference(x, qg, qu, qd, scales, ids, weights)
    got = moe_experts_triton(x, qg, qu, qd, ids, weights, scales=scales, block_n=TRITON_TILE, block_k=TRITON_TILE,
                             direct=direct)
    assert_close_scaled(got, want)
    # and the dispatcher picks the kernel for impl="triton"
    assert_close_scaled(moe_experts(x, qg, qu, qd, ids, weights, impl="triton", scales=scales), want)


def test_triton_block_scales_across_several_blocks() -> None:
    # H 144 and I 136 span two 128-wide scale blocks each way, not multiples of the tiles
    case = MoeCase("blocks", tokens=3, hidden=144, inter=136, experts=3, top_k=2)
    x, qg, qu, qd, scales, ids, weights = quantized_inputs(case, torch.float32, "fp8-block")
    assert scales[0].shape == (3, 2, 2)
    want = moe_experts_dequant_reference(x, qg, qu, qd, scales, ids, weights)
    got = moe_experts_triton(x, qg, qu, qd, ids, weights, scales=scales, block_n=64, block_k=64)
    assert_close_scaled(got, want)


def test_triton_quantized_skips_negative_ids_and_sums_in_fp32() -> None:
    x, qg, qu, qd, scales, ids, weights = quantized_inputs(CASES[0], torch.float32, "int4")
    local = torch.where(ids % 2 == 0, ids, -1)  # odd experts live elsewhere
    kept = weights * (local >= 0)
    want = moe_experts_dequant_reference(x, qg, qu, qd, scales, torch.where(local >= 0, local, 0), kept)
    got = moe_experts_triton(x, qg, qu, qd, local, weights, scales=scales, skip_negative_ids=True,
                             out_dtype=torch.float32, block_n=TRITON_TILE, block_k=TRITON_TILE)
    assert got.dtype == torch.float32
    assert_close_scaled(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_sync_free_path_matches_the_cpu_fast_path(dtype, monkeypatch):
    """The accelerator variant of the one-token path (expert weights gathered on the device, no ids
    read on the host) against the CPU fast path, with a repeated expert id; and it makes no host sync."""
    from engine.kernels.dispatch import SYNC_FREE_ENV
    from engine.kernels.moe import moe_one_token_sync_free
    from engine.tools.host_sync import HostSyncCounter

    g = torch.Generator().manual_seed(3)
    e, h, i = 6, 40, 24
    w = [(torch.randn(s, generator=g) * WEIGHT_SCALE).to(dtype) for s in ((e, i, h), (e, i, h), (e, h, i))]
    x = torch.randn(1, h, generator=g).to(dtype)
    ids = torch.tensor([[4, 1, 4, 0]])
    weights = torch.rand(1, 4, generator=g)
    monkeypatch.delenv(SYNC_FREE_ENV, raising=False)
    want = moe_experts_reference(x, *w, ids, weights)
    with HostSyncCounter() as c:
        got = moe_one_token_sync_free(x, *w, ids, weights)
    monkeypatch.setenv(SYNC_FREE_ENV, "1")
    assert torch.equal(moe_experts_reference(x, *w, ids, weights), got)  # what the dispatch picks then
    assert c.count.total == 0
    tol = RELATIVE_TOLERANCE[dtype] * float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_shared_expert_in_the_same_pass(tokens, dtype):
    """Routed + shared experts in one Triton pass (direct decode mode and the sorted mode) against the
    reference's two steps: routed sum rounded to the activation dtype, then + shared expert."""
    from engine.kernels.moe import swiglu

    g = torch.Generator().manual_seed(tokens)
    e, h, i, k = 6, 48, 32, 2
    w = [(torch.randn(s, generator=g) * WEIGHT_SCALE).to(dtype) for s in ((e, i, h), (e, i, h), (e, h, i))]
    shared = tuple((torch.randn(s, generator=g) * WEIGHT_SCALE).to(dtype) for s in ((i, h), (i, h), (h, i)))
    x = torch.randn(tokens, h, generator=g).to(dtype)
    ids = torch.rand(tokens, e, generator=g).argsort(dim=1)[:, :k].contiguous()
    weights = torch.rand(tokens, k, generator=g)
    want = moe_experts_reference(x, *w, ids, weights) + swiglu(x, *shared)
    got = moe_experts_triton(x, *w, ids, weights, shared=shared, block_n=TRITON_TILE, block_k=TRITON_TILE)
    tol = RELATIVE_TOLERANCE[dtype] * float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)
    assert torch.equal(moe_experts(x, *w, ids, weights, shared=shared, impl="torch"), want)
    with pytest.raises(ValueError, match="shared"):
        moe_experts_triton(x, *w, ids, weights, shared=(shared[0], shared[1], shared[0]))


def test_cpu_linear_upcasts_emulated_bf16_gemms_of_many_rows(monkeypatch) -> None:
    """On a CPU without native bf16, a bf16 GEMM of BF16_UPCAST_MIN_ROWS rows or more runs in fp32 (torch
    emulates bf16 matmuls there, several times slower); a decode GEMV (one row) stays in bf16. Either way
    the result is bf16 and matches an fp64 product up to bf16 rounding."""
    import engine.kernels.moe as moe

    monkeypatch.setenv(moe.native.DISABLE_ENV, "0")  # torch's decode GEMV (the native one: test_native.py)
    real = moe.onednn_packing_available
    monkeypatch.setattr(moe, "onednn_packing_available", lambda dtype: dtype != torch.bfloat16 and real(dtype))
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=gen).bfloat16()
    seen = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, weight, *a: seen.append(weight.dtype) or linear(x, weight, *a))
    for rows, computed_in in ((1, torch.bfloat16), (moe.BF16_UPCAST_MIN_ROWS - 1, torch.bfloat16),
                              (moe.BF16_UPCAST_MIN_ROWS, torch.float32), (100, torch.float32)):
        x = torch.randn(rows, 64, generator=gen).bfloat16()
        seen.clear()
        y = moe.cpu_linear(x, w)
        assert seen == [computed_in] and y.dtype == torch.bfloat16
        want = x.double() @ w.double().T
        assert float((y.double() - want).abs().max()) <= 2 ** -7 * float(want.abs().max())
    assert moe.emulates_bf16(w) and not moe.emulates_bf16(w.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [40, 100, 517])
def test_int8_packed_linear_at_widths_the_int8_kernel_does_not_take(dtype, in_features):
    """linear_dtype "int8" on a model whose hidden or intermediate size is not a multiple of torch's int8 kernel's
    16 columns (a dense MLP of 100, a down projection of 40): PackedLinear(int8=True) and from_int8 compute
    x @ (q * scale).T by dequantising (before: an AttributeError on the first call), for a decode row, a
    few rows and a prefill block, with a bias."""
    from engine.kernels import PackedLinear
    from engine.kernels.dequant import quantize_int8_rows
    from engine.kernels.moe import INT8_CPU_COLUMN_MULTIPLE

    assert in_features % INT8_CPU_COLUMN_MULTIPLE
    gen = torch.Generator().manual_seed(in_features)
    linear = torch.nn.Linear(in_features, 72).to(dtype)
    q, scale = quantize_int8_rows(linear.weight.detach().float())
    want_w = (q.double() * scale.double()[:, None])
    for module in (PackedLinear(linear, int8=True), PackedLinear.from_int8(q, scale, dtype, linear.bias)):
        for shape in ((1, 1, in_features), (3, in_features), (2, 33, in_features)):
            x = torch.randn(shape, generator=gen).to(dtype)
            got = module(x)
            want = x.double() @ want_w.T + linear.bias.detach().double()
            assert got.dtype == dtype and got.shape == (*shape[:-1], 72)
            tol = 1e-5 if dtype == torch.float32 else 2 ** -7
            assert float((got.double() - want).abs().max()) <= tol * float(want.abs().max())


@pytest.mark.parametrize("kind", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_quantized_cpu_experts_take_fp16_activations(kind, tokens):
    """An fp16 load (launch.py --dtype fp16) on the CPU with quantised experts: the experts compute in fp16
    through torch's kernels or the dequantised fallback (the native int4 kernels take fp32 / bf16 only; before,
    int4 experts refused the first token: 'int4 experts take fp32 / bf16 CPU activations'), and agree with the
    dequantising reference within fp16 rounding (fp8: within its int8 re-quantisation, amax / 254 per row)."""
    from engine.kernels import QuantizedCpuExperts

    case = MoeCase("fp16", tokens=tokens, hidden=128, inter=64, experts=4, top_k=2)
    x, qg, qu, qd, scales, ids, weights = quantized_inputs(case, torch.float16, kind)
    packed = QuantizedCpuExperts.from_weights(qg, qu, qd, scales, torch.float16, kind)
    got = moe_experts_packed(x, packed, ids, weights)
    want = moe_experts_dequant_reference(x, qg, qu, qd, scales, ids, weights)
    assert got.dtype == torch.float16 and got.shape == want.shape
    tol = 5e-2 if kind == "fp8" else RELATIVE_TOLERANCE[torch.float16]
    assert float((got.float() - want.float()).abs().max()) <= tol * float(want.float().abs().max())


def _no_token_and_strided_rows(dtype: torch.dtype, width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Activations a caller may hand a CPU linear: an empty view with a column stride of 2 (torch counts it
    contiguous, its strides stay), an empty 3-D batch, every other column of a wider block, a transposed one."""
    wide = torch.randn(3, 2 * width, generator=gen).to(dtype)
    return {"empty strided view": wide[:0, ::2], "empty batch": torch.empty(2, 0, width, dtype=dtype),
            "strided columns": wide[:, ::2], "transposed": torch.randn(width, 5, generator=gen).to(dtype).t()}


@pytest.mark.parametrize("int8", [False, True], ids=["plain", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_takes_no_token_and_strided_activations(dtype, int8, fp32_activations):
    """PackedLinear (plain, or int8 through torch's int8 kernel / the native one, here with unquantised
    activations) gives the empty result of the right shape for no token (before: an empty strided view raised
    'A must be contiguous on the last dimension' in the int8 kernel) and x @ W.T for strided activations."""
    from engine.kernels import PackedLinear
    from engine.kernels.dequant import quantize_int8_rows

    gen = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(64, 48).to(dtype)
    module = PackedLinear(linear, int8=int8)
    weight = linear.weight.detach().double()
    if int8:
        q, scale = quantize_int8_rows(linear.weight.detach().float())
        weight = q.double() * scale.double()[:, None]
    for name, x in _no_token_and_strided_rows(dtype, 64, gen).items():
        got = module(x)
        assert got.dtype == dtype and got.shape == (*x.shape[:-1], 48), name
        if x.numel():
            want = x.double() @ weight.T + linear.bias.detach().double()
            tol = 1e-5 if dtype == torch.float32 else 2 ** -7
            assert float((got.double() - want).abs().max()) <= tol * float(want.abs().max()), name


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_cpu_experts_take_no_token_and_strided_activations(kind, dtype):
    """One expert of QuantizedCpuExperts on no token gives the empty [0, H] (before: int4 experts on the
    native kernel refused it as 'int4 experts take fp32 / bf16 CPU activations; got torch.float32', int8 ones
    raised in torch's kernel for an empty strided view), and on strided rows what it gives on a copy of them."""
    from engine.kernels import QuantizedCpuExperts

    case = MoeCase("edges", tokens=1, hidden=128, inter=64, experts=2, top_k=1)
    _, qg, qu, qd, scales, _, _ = quantized_inputs(case, dtype, kind)
    packed = QuantizedCpuExperts.from_weights(qg, qu, qd, scales, dtype, kind)
    gen = torch.Generator().manual_seed(6)
    rows = {name: x for name, x in _no_token_and_strided_rows(dtype, case.hidden, gen).items() if x.dim() == 2}
    for name, x in rows.items():  # (an expert takes [M, H])
        got = packed.forward_expert(x, 1)
        assert got.dtype == dtype and got.shape == (*x.shape[:-1], case.hidden), name
        if x.numel():
            want = packed.forward_expert(x.contiguous(), 1)
            scale = float(want.float().abs().max())
            assert float((got.float() - want.float()).abs().max()) <= RELATIVE_TOLERANCE[dtype] * scale, name
    none = torch.empty(0, case.hidden, dtype=dtype)
    routed = moe_experts_packed(none, packed, torch.empty(0, 1, dtype=torch.int64), torch.empty(0, 1))
    assert routed.shape == (0, case.hidden)


@pytest.mark.parametrize("direct", [False, True], ids=["sorted", "direct"])
@pytest.mark.parametrize("hidden, inter, block_k", [(80, 48, 32), (64, 128, 32), (128, 64, 64)],
                         ids=["groups-16-in-a-32-tile", "groups-64-and-128", "one-group-per-tile"])
def test_triton_int4_reads_groups_smaller_and_larger_than_its_tiles(hidden, inter, block_k, direct) -> None:
    # int4 tiles read the even and odd columns of their bytes as two dots; a tile within one scale group
    # loads one scale per row, a tile over several groups (here 16-column groups in a 32-deep tile) per value
    case = MoeCase("int4-groups", tokens=1 if direct else 9, hidden=hidden, inter=inter, experts=5, top_k=2)
    x, qg, qu, qd, scales, ids, weights = quantized_inputs(case, torch.float32, "int4")
    assert scales[0].shape[-1] == hidden // {80: 16, 64: 64, 128: 128}[hidden]
    want = moe_experts_dequant_reference(x, qg, qu, qd, scales, ids, weights)
    got = moe_experts_triton(x, qg, qu, qd, ids, weights, scales=scales, block_n=32, block_k=block_k, direct=direct)
    assert_close_scaled(got, want)
