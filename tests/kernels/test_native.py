"""Native CPU decode kernels (engine.kernels.native): few-row linears and one token's routed experts
against torch's paths (within a stated tolerance: sums run in another order), the build cache, and the
fallback to torch when they cannot be built or are switched off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import moe as moe_kernels
from engine.kernels import native
from engine.kernels.moe import PackedExperts, cpu_linear, moe_experts_packed, moe_experts_reference, swiglu

needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler: torch's path runs")


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """The module as in a new process, building into an empty cache; restored afterwards."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    native.reset()
    yield tmp_path
    monkeypatch.undo()
    native.reset()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k", [(1, 1, 1), (1, 7, 13), (1, 64, 2048), (3, 33, 100), (8, 130, 517),
                                      (1, 1000, 4096)])
def test_linear_matches_an_fp64_product(dtype, rows, n, k):
    """Shapes with every kind of tail (rows not a multiple of the 4-row work unit, columns not a multiple
    of the vector width): the fp32 sums agree with fp64 to 1e-5 relative; a bf16 result is the fp32 sum
    rounded once (within one bf16 step of the rounded fp64 product)."""
    assert native.available(), native.status()
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    want = x.double() @ w.double().T
    got = native.linear(x, w)
    assert got.dtype == dtype and got.shape == (rows, n)
    if dtype == torch.float32:
        assert _rel_err(got, want) <= 1e-5
    else:
        assert float((got.double() - want).abs().max()) <= 2 ** -7 * float(want.abs().max())
        torch.testing.assert_close(got.float(), F.linear(x, w).float(), atol=0.0, rtol=2 ** -7)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [100, 1100, 2048])
def test_linear_row_results_do_not_depend_on_the_batch(dtype, k):
    """Several rows share each weight row's loads (groups of up to 4 rows, k-tiles of 512: 1100 ends in a
    partial tile and a tail), but every row's sum runs as the one-row kernel runs it: a decode batch of
    1..8 gives each row what it gets alone (same kernel, same order; stated as within 1e-6 relative)."""
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(37, k, generator=gen).to(dtype)
    x = torch.randn(native.MAX_ROWS, k, generator=gen).to(dtype)
    alone = torch.cat([native.linear(x[r:r + 1], w) for r in range(native.MAX_ROWS)])
    for rows in range(2, native.MAX_ROWS + 1):
        assert _rel_err(native.linear(x[:rows], w), alone[:rows]) <= 1e-6


@needs_compiler
def test_linear_mixed_dtypes_and_batched_shapes():
    """fp32 activations on bf16 weights (the widening is exact), and leading batch dimensions."""
    assert native.available()
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(2752, 96, generator=gen).bfloat16()  # 516 KiB: above native.BIND_MIN_BYTES
    x = torch.randn(2, 3, 96, generator=gen)
    assert native.linear_applies(x, w) and not native.linear_applies(x, w[:40])  # small ones: torch's
    got = native.linear(x, w)
    assert got.shape == (2, 3, 2752) and got.dtype == torch.float32
    assert _rel_err(got, x.double() @ w.double().T) <= 1e-5


def test_linear_applies_only_where_it_should(monkeypatch):
    monkeypatch.setattr(native, "BIND_MIN_BYTES", 0)
    w = torch.randn(16, 32)
    big = torch.randn(native.MAX_ROWS + 1, 32)
    assert not native.linear_applies(big, w)  # a prefill block: torch's BLAS
    assert not native.linear_applies(torch.randn(1, 32), w.t())  # not contiguous
    assert not native.linear_applies(torch.randn(1, 32, dtype=torch.float16), w.half())
    assert not native.linear_applies(torch.randn(1, 32), torch.randn(16, 32, device="meta"))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts,hidden,inter,top_k", [(8, 64, 32, 2), (32, 256, 96, 8), (16, 100, 37, 3)])
def test_moe_decode_matches_the_reference(dtype, experts, hidden, inter, top_k):
    """One token through moe_experts_packed (the native call) against moe_experts_reference: fp32 within
    1e-5 relative; bf16 rounds where torch's bf16 expert rounds (gate, up, silu, product, expert output),
    so it agrees to within one bf16 step of the largest output."""
    assert native.available()
    gen = torch.Generator().manual_seed(experts + hidden + inter)
    wg = (torch.randn(experts, inter, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    wu = (torch.randn(experts, inter, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    wd = (torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5).to(dtype)
    packed = PackedExperts.from_weights(wg, wu, wd, use_onednn=False)  # the layout the native call reads
    assert packed.native_table() is not None
    x = torch.randn(1, hidden, generator=gen).to(dtype)
    ids = torch.randperm(experts, generator=gen)[:top_k].view(1, -1)
    weights = torch.rand(1, top_k, generator=gen)
    want = moe_experts_reference(x, wg, wu, wd, ids, weights)
    got = moe_experts_packed(x, packed, ids, weights)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert _rel_err(got, want) <= tol


def _int8_experts(gen, experts, hidden, inter):
    """Random experts quantised to int8 per row: (fused gate+up q, down q, their scales, dequantised weights)."""
    from engine.kernels.dequant import quantize_int8_rows

    wg, wu = (torch.randn(experts, inter, hidden, generator=gen) / hidden ** 0.5 for _ in range(2))
    wd = torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5
    (qgu, sgu), (qd, sd) = quantize_int8_rows(torch.cat((wg, wu), dim=1)), quantize_int8_rows(wd)
    deq_gu, deq_d = qgu.float() * sgu.unsqueeze(-1), qd.float() * sd.unsqueeze(-1)
    return qgu, qd, sgu, sd, (deq_gu[:, :inter], deq_gu[:, inter:], deq_d)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts,hidden,inter,top_k", [(8, 64, 32, 2), (16, 100, 37, 3), (32, 256, 96, 8)])
def test_int8_experts_in_one_native_call(dtype, experts, hidden, inter, top_k):
    """int8 experts with one scale per row (the CPU-only and host-expert format): each row's sum of
    q * x times its scale, as a weight-only int8 GEMM computes it, against the experts dequantised to fp32
    and run by the reference (rows of every tail length: widths 64, 100, 256; 37 and 96 for down)."""
    gen = torch.Generator().manual_seed(hidden + inter)
    qgu, qd, sgu, sd, deq = _int8_experts(gen, experts, hidden, inter)
    table = native.ExpertTable.fused(list(qgu), list(qd), (list(sgu), list(sd)))
    x = torch.randn(1, hidden, generator=gen).to(dtype)
    ids = torch.randperm(experts, generator=gen)[:top_k].view(1, -1)
    weights = torch.rand(1, top_k, generator=gen)
    assert native.moe_applies(table, x, ids)
    got = native.moe_decode(x, table, ids, weights).to(dtype)
    want = moe_experts_reference(x, *(w.to(dtype) for w in deq), ids, weights)
    # bf16: the dequantised weights are rounded to bf16 in the reference, not in the kernel (int8 x fp32
    # scale is exact in fp32): a few bf16 steps
    assert _rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 2 ** -5)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_experts_take_the_shared_expert_in_the_same_pass_and_refuse_what_does_not_fit(dtype):
    """The shared expert (plain weights of the activations' dtype) in the int8 experts' pass: the int8 rows
    read the activations in natural order, the bf16 shared rows in their even/odd layout, both made once."""
    gen = torch.Generator().manual_seed(3)
    experts, hidden, inter = 8, 64 + 36, 32
    qgu, qd, sgu, sd, deq = _int8_experts(gen, experts, hidden, inter)
    table = native.ExpertTable.fused(list(qgu), list(qd), (list(sgu), list(sd)))
    shared = tuple((torch.randn(*s, generator=gen) / 8).to(dtype) for s in ((48, hidden), (48, hidden), (hidden, 48)))
    assert table.shared_fits(torch.bfloat16) and table.shared_fits(torch.float32) and not table.shared_fits(torch.int8)
    x = torch.randn(1, hidden, generator=gen).to(dtype)
    ids, weights = torch.tensor([[5, 2]]), torch.rand(1, 2, generator=gen)
    got = native.moe_decode(x, table, ids, weights, shared).to(dtype)
    want = moe_experts_reference(x, *(w.to(dtype) for w in deq), ids, weights) + swiglu(x, *shared)
    assert _rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 2 ** -5)
    with pytest.raises(ValueError, match="cannot share"):
        native.moe_decode(x, table, ids, weights, (qgu[0][:48], qgu[0][48:96], qd[0][:, :48].contiguous()))
    with pytest.raises(ValueError, match="scales"):
        native.ExpertTable.fused(list(qgu), list(qd))
    with pytest.raises(ValueError, match="scales must be"):
        native.ExpertTable.fused(list(qgu), list(qd), (list(sgu), [t[:-1] for t in sd]))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared_inter", [32, 70])
def test_moe_decode_with_the_shared_expert_in_the_same_pass(dtype, shared_inter):
    """Routed + shared expert in one native call: ``routed.to(dtype) + swiglu(x, shared)`` as the model's
    two-step path computes it (a shared expert wider than a routed one too), within the tolerances above;
    prefill blocks (torch's path) give the same sum."""
    assert native.available()
    gen = torch.Generator().manual_seed(shared_inter)
    experts, hidden, inter, top_k = 16, 96, 32, 4
    wg, wu = ((torch.randn(experts, inter, hidden, generator=gen) / hidden ** 0.5).to(dtype) for _ in range(2))
    wd = (torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5).to(dtype)
    shared = tuple((torch.randn(*shape, generator=gen) / shape[1] ** 0.5).to(dtype)
                   for shape in ((shared_inter, hidden), (shared_inter, hidden), (hidden, shared_inter)))
    packed = PackedExperts.from_weights(wg, wu, wd)
    for tokens in (1, 5):
        x = torch.randn(tokens, hidden, generator=gen).to(dtype)
        ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, generator=gen)
        want = moe_experts_reference(x, wg, wu, wd, ids, weights) + swiglu(x, *shared)
        got = moe_experts_packed(x, packed, ids, weights, shared=shared)
        assert got.dtype == dtype and got.shape == x.shape
        assert _rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 2 ** -7)


@needs_compiler
def test_moe_decode_rejects_an_expert_id_out_of_range():
    assert native.available()
    w = torch.randn(4, 16, 8)
    packed = PackedExperts.from_weights(w, w, torch.randn(4, 8, 16))
    with pytest.raises(ValueError, match="expert ids"):
        native.moe_decode(torch.randn(1, 8), packed.native_table(), torch.tensor([[1, 4]]), torch.ones(1, 2))


@needs_compiler
def test_results_do_not_depend_on_the_thread_count():
    """Each output row is one thread's sum in a fixed order, so the team size does not change it (a
    tolerance all the same: nothing here promises bit equality)."""
    assert native.available()
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4096, 64, generator=gen)  # large enough to run on a team
    x = torch.randn(1, 64, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.linear(x, w)
        torch.set_num_threads(max(2, threads))
        many = native.linear(x, w)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, many, atol=1e-6, rtol=1e-6)


@needs_compiler
def test_build_is_cached_per_source_compiler_and_cpu(fresh_native):
    assert native.available()
    built = list((fresh_native / "kernels").glob("cpu_decode-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native.reset()
    assert native.available()  # a second process loads the cached build
    assert [p.stat().st_mtime_ns for p in (fresh_native / "kernels").glob("cpu_decode-*.so")] == [stamp]
    assert native.status().startswith("native (")


def test_a_failed_build_falls_back_to_torch(fresh_native, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    with caplog.at_level("WARNING"):
        assert not native.available()
    assert "native CPU decode kernels unavailable" in caplog.text and "failed" in native.status()
    w, x = torch.randn(8, 16), torch.randn(1, 16)
    torch.testing.assert_close(cpu_linear(x, w), F.linear(x, w))  # torch's path, same product
    assert not list(fresh_native.rglob("*.so"))  # nothing half-written left behind


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert not native.available() and native.status() == f"torch ({native.DISABLE_ENV}=0)"
    assert not moe_kernels.native_decode_applies(torch.randn(4, 4))
    monkeypatch.delenv(native.DISABLE_ENV)
    monkeypatch.setenv("MING_KERNELS_FORCE_REFERENCE", "1")
    assert not native.available() and "reference" in native.status()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 2048), (1, 16, 128), (3, 100), (7,)])
def test_rms_norm_matches_the_reference(dtype, shape):
    """Decode-sized RMSNorm, with and without the fused residual add: the residual sum and y agree with
    the reference within one step of the dtype (the mean of squares is summed in another order)."""
    from engine.kernels import rms_norm, rms_norm_reference

    assert native.available()
    gen = torch.Generator().manual_seed(len(shape))
    x, residual = (torch.randn(*shape, generator=gen).to(dtype) for _ in range(2))
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    assert native.rms_norm(x, weight, 1e-6) is not None  # the native path takes it
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    got, want = rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6)
    assert got.dtype == dtype and _rel_err(got, want) <= tol
    (got, got_h), (want, want_h) = rms_norm(x, weight, 1e-6, residual), rms_norm_reference(x, weight, 1e-6, residual)
    # x + residual is one rounded add either way: within one step of the dtype, not asserted bit for bit
    assert _rel_err(got_h, want_h) <= (2 ** -23 if dtype == torch.float32 else 2 ** -8) and _rel_err(got, want) <= tol


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot,table_batch", [(64, 1), (128, 1), (64, 2)])
def test_rotary_of_one_position_matches_the_reference(dtype, rot, table_batch):
    from engine.kernels import apply_rotary, apply_rotary_reference

    assert native.available()
    gen = torch.Generator().manual_seed(rot + table_batch)
    x = torch.randn(2, 16, 1, 128, generator=gen).to(dtype)
    cos, sin = (torch.randn(table_batch, 1, rot, generator=gen) for _ in range(2))
    assert native.rotary(x, cos, sin) is not None
    got, want = apply_rotary(x, cos, sin), apply_rotary_reference(x, cos, sin)
    assert got.dtype == dtype and _rel_err(got, want) <= (1e-6 if dtype == torch.float32 else 2 ** -7)


def test_small_ops_leave_other_inputs_to_torch():
    """Prefill-sized inputs, mixed dtypes and several positions go to torch's path (None)."""
    big = torch.randn(native.SMALL_OP_MAX_ELEMENTS + 1)
    assert native.rms_norm(big, torch.ones(big.shape[-1]), 1e-6) is None
    assert native.rms_norm(torch.randn(4, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6) is None
    x = torch.randn(1, 4, 3, 16)
    assert native.rotary(x, torch.randn(1, 3, 16), torch.randn(1, 3, 16)) is None


@needs_compiler
@pytest.mark.parametrize("floats", [4, 8, 16])
def test_every_vector_width_computes_the_same(floats, monkeypatch):
    """The SSE (4 floats), AVX (8) and AVX-512 (16 floats) layouts — tails, the bf16 even/odd permutation
    of the activations, the activations written in that layout by the MoE call, row groups of a decode
    batch, fused multiply-adds where this CPU has them at that width — built on this CPU (GCC splits
    vectors it lacks) and checked against torch on the shapes above."""
    from engine.kernels import apply_rotary_reference, rms_norm_reference

    lib = native.build_with_vector_width(floats)
    assert lib.ming_vector_floats() == floats
    assert native.available()
    monkeypatch.setattr(native, "_lib", lib)
    gen = torch.Generator().manual_seed(floats)
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7
        for rows, n, k in ((1, 7, 13), (3, 33, 100), (1, 64, 2048), (2, 130, 517), (7, 130, 517)):
            w = torch.randn(n, k, generator=gen).to(dtype)
            x = torch.randn(rows, k, generator=gen).to(dtype)
            assert _rel_err(native.linear(x, w), x.double() @ w.double().T) <= tol
        experts, hidden, inter = 8, 100, 37
        wg, wu = ((torch.randn(experts, inter, hidden, generator=gen) / 10).to(dtype) for _ in range(2))
        wd = (torch.randn(experts, hidden, inter, generator=gen) / 6).to(dtype)
        shared = tuple((torch.randn(*s, generator=gen) / 8).to(dtype) for s in ((45, hidden), (45, hidden), (hidden, 45)))
        packed = PackedExperts.from_weights(wg, wu, wd, use_onednn=False)
        x = torch.randn(1, hidden, generator=gen).to(dtype)
        ids, weights = torch.tensor([[6, 1, 3]]), torch.rand(1, 3, generator=gen)
        want = moe_experts_reference(x, wg, wu, wd, ids, weights) + swiglu(x, *shared)
        assert _rel_err(moe_experts_packed(x, packed, ids, weights, shared=shared), want) <= tol
        qgu, qd, sgu, sd, deq = _int8_experts(gen, experts, hidden, inter)
        table = native.ExpertTable.fused(list(qgu), list(qd), (list(sgu), list(sd)))
        want = moe_experts_reference(x, *(w.to(dtype) for w in deq), ids, weights)
        assert _rel_err(native.moe_decode(x, table, ids, weights).to(dtype), want) <= (tol if dtype == torch.float32 else 2 ** -5)
        h, weight = torch.randn(2, 100, generator=gen).to(dtype), (torch.rand(100, generator=gen) + 0.5).to(dtype)
        assert _rel_err(native.rms_norm(h, weight, 1e-6), rms_norm_reference(h, weight, 1e-6)) <= tol
        q, cos, sin = torch.randn(1, 4, 1, 64, generator=gen).to(dtype), torch.randn(1, 1, 32), torch.randn(1, 1, 32)
        assert _rel_err(native.rotary(q, cos, sin), apply_rotary_reference(q, cos, sin)) <= tol
