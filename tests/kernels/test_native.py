"""Native CPU decode kernels (engine.kernels.native): few-row linears and one token's routed experts
against torch's paths (within a stated tolerance: sums run in another order), the build cache, and the
fallback to torch when they cannot be built or are switched off."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import moe as moe_kernels
from engine.kernels import native
from engine.kernels.moe import PackedExperts, cpu_linear, moe_experts_packed, moe_experts_reference, swiglu
from tests.activations import quantized_activations

# every test here compares the native kernels with exact fp32 activations unless it asks for `activations`, and
# runs them on every CPU as on one whose torch has no AMX GEMMs unless it sets native._amx itself (the hand-offs to
# those GEMMs are tested on their own)
pytestmark = pytest.mark.usefixtures("fp32_activations", "no_amx_handoffs")


@pytest.fixture
def no_amx_handoffs(monkeypatch):
    monkeypatch.setattr(native, "_amx", False)

needs_native = pytest.mark.skipif(native._compiler() is None or native._disabled() is not None,
                                  reason="no C compiler, or the native kernels switched off by the environment: "
                                         "torch's path runs")


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """The module as in a new process, building into an empty cache; restored afterwards."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    native.reset()
    yield tmp_path
    monkeypatch.undo()
    native.reset()


def _cpu_flags() -> set[str]:
    try:
        return {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                for f in line.split(":", 1)[1].split()}
    except OSError:
        return set()


VECTOR_WIDTHS = (4, 8, 16)  # floats: the SSE, AVX and AVX-512 layouts
OLDER_CPUS = [  # isa, the CPU flags it needs to run here, its vector width in floats, int8-activation kinds
    ("avx2", {"avx2", "fma"}, 8, ("int4", "int8")), ("avx-vnni", {"avx2", "fma", "avx_vnni"}, 8, ("int4", "int8")),
    ("avx512", {"avx512f", "avx512bw"}, 16, ("int4", "int8"))]


@pytest.fixture(scope="module")
def variant_builds() -> dict[str | None, Path]:
    """Every build of this file (this CPU's, each vector width, each older CPU this one can run) compiled at once
    into the session's build cache, one compiler per core (each is a compiler run of 5-20 s); the tests then
    build them as a user would and find them there. A build that fails is left for its test to say. Gives the
    files of this CPU's build (key None) and of each older CPU's."""
    cc = native._compiler()
    isas = {None: ()} | {isa: native.EMULATED_ISAS[isa] for isa, needs, *_ in OLDER_CPUS if needs <= _cpu_flags()}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        files = {isa: pool.submit(native._build, cc, flags) for isa, flags in isas.items()}
        wait([pool.submit(native.build_with_vector_width, floats) for floats in VECTOR_WIDTHS] + list(files.values()))
    return {isa: built.result() for isa, built in files.items() if built.exception() is None}


@pytest.fixture
def fresh_native_holding(variant_builds, fresh_native):
    """`fresh_native` with the session's builds for these `isas` (None: this CPU's) copied in (building itself is
    tested by test_build_is_cached_per_source_compiler_and_cpu; this saves compiling them again)."""
    def holding(*isas: str | None) -> None:
        (fresh_native / "kernels").mkdir(exist_ok=True)
        for isa in isas:
            if isa in variant_builds:
                shutil.copy(variant_builds[isa], fresh_native / "kernels")
    return holding


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


@needs_native
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


@needs_native
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


@needs_native
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


@needs_native
@pytest.mark.parametrize("amx", [False, True])
def test_bf16_blocks_go_to_torch_where_its_gemm_uses_amx(monkeypatch, amx):
    """Where torch's bf16 GEMMs run on AMX tiles, bf16 blocks of more than a few rows (fewer the longer the rows)
    leave the native kernel for torch's GEMM, through the unbound and the bound linear alike; one row, fp32
    blocks and fp32 activations on bf16 weights stay native up to MAX_ROWS. The result is the product either way
    (within bf16 rounding of the output)."""
    monkeypatch.setattr(native, "_amx", amx)
    bf16, fp32 = torch.bfloat16, torch.float32
    want_rows = {1024: 4, 4096: 3, 8192: 1} if amx else {1024: 8, 4096: 8, 8192: 8}
    assert {k: native.max_rows(bf16, bf16, k) for k in want_rows} == want_rows
    assert native.max_rows(fp32, fp32, 4096) == native.max_rows(fp32, bf16, 4096) == native.MAX_ROWS
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(64, 4096, generator=gen).to(bf16)  # 512 KiB: binds
    bound = native.bind_linear(w)
    for rows in range(1, native.MAX_ROWS + 1):
        x = torch.randn(rows, 4096, generator=gen).to(bf16)
        native_takes = rows <= want_rows[4096]
        assert native.linear_applies(x, w) == native_takes and (bound(x) is not None) == native_takes
        assert native.linear_applies(x.float(), w) and bound(x.float()) is not None
        assert _rel_err(cpu_linear(x, w), x.double() @ w.double().T) <= 1e-2


@needs_native
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


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts,hidden,inter,top_k", [(8, 64, 32, 2), (16, 100, 37, 3), (32, 256, 96, 8)])
def test_int8_experts_in_one_native_call(dtype, experts, hidden, inter, top_k, activations):
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
    # scale is exact in fp32): a few bf16 steps; int8 activations (widths of a multiple of 64): their error
    tol = 1e-5 if dtype == torch.float32 else 2 ** -5
    assert _rel_err(got, want) <= _activations_tolerance(tol, native.activations_take(hidden), native.activations_take(inter))


@needs_native
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


@needs_native
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


@needs_native
def test_moe_decode_rejects_an_expert_id_out_of_range():
    assert native.available()
    w = torch.randn(4, 16, 8)
    packed = PackedExperts.from_weights(w, w, torch.randn(4, 8, 16))
    with pytest.raises(ValueError, match="expert ids"):
        native.moe_decode(torch.randn(1, 8), packed.native_table(), torch.tensor([[1, 4]]), torch.ones(1, 2))


@needs_native
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


@needs_native
def test_build_is_cached_per_source_compiler_and_cpu(fresh_native):
    assert native.available()
    built = list((fresh_native / "kernels").glob("cpu_decode-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native.reset()
    assert native.available()  # a second process loads the cached build
    assert [p.stat().st_mtime_ns for p in (fresh_native / "kernels").glob("cpu_decode-*.so")] == [stamp]
    assert native.status().startswith("native (")


@needs_native
def test_the_environment_builds_the_kernels_as_an_older_cpu_does(fresh_native, fresh_native_holding, monkeypatch,
                                                                  caplog):
    """MING_NATIVE_ISA=avx2 builds the kernels as a CPU without AVX-512 or VNNI does (8-float vectors at most; int8
    activations for int4 and int8 weights, without VNNI's instructions) into a cache entry of their own, and says
    so; an unknown value is named once in the log and this CPU's build loads."""
    fresh_native_holding(None, "avx2")
    monkeypatch.delenv(native.ISA_ENV, raising=False)  # this CPU's build first, whatever this shell says
    assert native.available()
    own = native._lib.ming_vector_floats()
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    native.reset()
    assert native.available() and native._lib.ming_vector_floats() == min(own, 8)
    assert set(native.int8_kernel_kinds()) in (set(), {"int4", "int8"})
    assert f"built as for avx2 ({native.ISA_ENV})" in native.status()
    assert len(list((fresh_native / "kernels").glob("cpu_decode-*.so"))) == 2  # its flags: a key of its own
    monkeypatch.setenv(native.ISA_ENV, "sse9")
    native.reset()
    with caplog.at_level("WARNING"):
        assert native.available() and native._lib.ming_vector_floats() == own
        native.status(), native.status()
    assert caplog.text.count("is not one of native, avx2, avx-vnni") == 1 and "built as for" not in native.status()


def test_a_failed_build_falls_back_to_torch(fresh_native, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    for switch in (native.DISABLE_ENV, "MING_KERNELS_FORCE_REFERENCE"):  # a build is tried, whatever this shell says
        monkeypatch.delenv(switch, raising=False)
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


@needs_native
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


@needs_native
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


@needs_native
@pytest.mark.usefixtures("variant_builds")
@pytest.mark.parametrize("floats", VECTOR_WIDTHS)
def test_every_vector_width_computes_the_same(floats, monkeypatch):
    """The SSE (4 floats), AVX (8) and AVX-512 (16 floats) layouts — tails, the bf16 even/odd permutation
    of the activations, the activations written in that layout by the MoE call and the attention, row
    groups of a decode batch, fused multiply-adds where this CPU has them at that width — built on this
    CPU (GCC splits vectors it lacks) and checked against torch on the shapes above."""
    from engine.kernels import apply_rotary_reference, rms_norm_reference

    lib = native.build_with_vector_width(floats)
    assert lib.ming_vector_floats() == floats
    assert native.available()
    monkeypatch.setattr(native, "_lib", lib)
    monkeypatch.setattr(native, "_activations_setting", native._activations_setting)
    native.set_quantized_activations("float")  # int4 against fp32 activations: the path every width has
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
        # the two halves of a decoder layer (head_dim 24: the attention's dot products have a tail at every width)
        _check_attention_decode(dtype, 100, 4, 2, 24, 12, 33, False, seed=floats)
        _check_attention_decode(dtype, 100, 4, 2, 24, 12, 33, True, seed=floats, int8=True)
        _check_mlp_decode(dtype, 12, 100, 37, 4, 3, 2, 45, seed=floats)
        # int4: pairs (groups of 32 or 64) and, at 16 floats, octets (groups of 128); decode and prefill rows
        for rows, n, k in ((1, 33, 256), (3, 40, 384), (9, 17, 128), (1, 64, 192)):
            _check_int4_linear(dtype, rows, n, k, gen)
        _check_int4_experts(dtype, 6, 256, 64, 3, gen)


def _attention_half_reference(x, residual, w, k_cache, v_cache, slot, cos, sin, eps, n_heads, n_kv, head_dim):
    """The attention half of a decoder layer for one token as torch's modules compute it (in x's dtype)."""
    from engine.kernels import apply_rotary_reference, rms_norm_reference

    if residual is None:
        h, res = rms_norm_reference(x, w["in_norm"], eps), x
    else:
        h, res = rms_norm_reference(x, w["in_norm"], eps, residual)
    qkv = F.linear(h, w["qkv"]).view(1, 1, n_heads + 2 * n_kv, head_dim)
    q, k, v = qkv.split([n_heads, n_kv, n_kv], dim=2)
    q = apply_rotary_reference(rms_norm_reference(q, w["q_norm"], eps).transpose(1, 2), cos, sin)
    k = apply_rotary_reference(rms_norm_reference(k, w["k_norm"], eps).transpose(1, 2), cos, sin)
    k_cache[:, :, slot:slot + 1], v_cache[:, :, slot:slot + 1] = k, v.transpose(1, 2)
    att = F.scaled_dot_product_attention(q.reshape(1, n_kv, n_heads // n_kv, head_dim), k_cache[:, :, :slot + 1],
                                         v_cache[:, :, :slot + 1])
    o = F.linear(att.reshape(1, 1, n_heads * head_dim), w["o"])
    return rms_norm_reference(o, w["post_norm"], eps, res)


def _attention_weights(gen, dtype, hidden, n_heads, n_kv, head_dim):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)
    return {"in_norm": (torch.rand(hidden, generator=gen) + 0.5).to(dtype),
            "post_norm": (torch.rand(hidden, generator=gen) + 0.5).to(dtype),
            "qkv": rnd((n_heads + 2 * n_kv) * head_dim, hidden, scale=hidden ** -0.5),
            "o": rnd(hidden, n_heads * head_dim, scale=(n_heads * head_dim) ** -0.5),
            "q_norm": (torch.rand(head_dim, generator=gen) + 0.5).to(dtype),
            "k_norm": (torch.rand(head_dim, generator=gen) + 0.5).to(dtype)}


def _check_attention_decode(dtype, hidden, n_heads, n_kv, head_dim, rot, past, first_layer, seed, int8=False,
                            q_gain=1.0, activations="float"):
    from engine.kernels.dequant import quantize_int8_rows

    gen = torch.Generator().manual_seed(seed)
    w = _attention_weights(gen, dtype, hidden, n_heads, n_kv, head_dim)
    w["q_norm"] = (w["q_norm"].float() * q_gain).to(dtype)  # q_gain > 1: peaked softmax, most e^x underflow
    eps = 1e-6
    proj = {"qkv": w["qkv"], "o": w["o"]}
    if int8:  # int8 projections with per-row scales; the reference multiplies the same values back out
        (proj["qkv"], proj["qkv_scale"]), (proj["o"], proj["o_scale"]) = (quantize_int8_rows(w[n]) for n in ("qkv", "o"))
        w = {**w, "qkv": (proj["qkv"] * proj["qkv_scale"][:, None]).to(dtype),
             "o": (proj["o"] * proj["o_scale"][:, None]).to(dtype)}
    bound = native.AttentionDecode(input_norm=w["in_norm"], post_norm=w["post_norm"], eps=eps, **proj,
                                   q_norm=w["q_norm"], k_norm=w["k_norm"], head_eps=eps, n_heads=n_heads, n_kv=n_kv,
                                   head_dim=head_dim, rotary_dim=rot)
    capacity = past + 3
    k_cache = torch.randn(1, n_kv, capacity, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(1, n_kv, capacity, head_dim, generator=gen).to(dtype)
    x = torch.randn(1, 1, hidden, generator=gen).to(dtype)
    residual = None if first_layer else torch.randn(1, 1, hidden, generator=gen).to(dtype)
    angles = torch.rand(1, 1, rot // 2, generator=gen) * 50
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    kr, vr = k_cache.clone(), v_cache.clone()
    before = k_cache.clone(), v_cache.clone()
    want_y, want_res = _attention_half_reference(x, residual, w, kr, vr, past, cos.to(dtype), sin.to(dtype), eps,
                                                 n_heads, n_kv, head_dim)
    y, res = bound(x, residual, cos, sin, k_cache, v_cache, past)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6
    if hidden % 64 == 0:  # the projections' inputs quantised (activations_take): their error, not rounding's
        tol = _activations_tolerance(tol, activations)
    assert y.dtype == dtype and y.shape == x.shape and res.shape == x.shape
    others = [j for j in range(capacity) if j != past]
    for got, want, old in ((k_cache, kr, before[0]), (v_cache, vr, before[1])):
        assert torch.equal(got[:, :, others], old[:, :, others])  # only the token's slot is written
        assert _rel_err(got[:, :, past], want[:, :, past]) <= tol
    assert _rel_err(res, want_res) <= tol
    assert _rel_err(y, want_y) <= (tol if dtype == torch.float32 else 2 ** -5)
    assert float((y.double() - want_y.double()).abs().mean()) <= tol * float(want_y.double().abs().mean()) * 4


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,n_heads,n_kv,head_dim,rot,past,first_layer", [
    (64, 4, 2, 16, 8, 5, False), (96, 6, 6, 16, 16, 0, True), (128, 8, 2, 32, 16, 40, False),
    (100, 4, 1, 24, 12, 300, True), (160, 10, 1, 16, 8, 70, False), (96, 4, 2, 48, 24, 130, False),
    (128, 8, 1, 32, 16, 600, True)])
def test_attention_decode_matches_the_torch_modules(dtype, hidden, n_heads, n_kv, head_dim, rot, past, first_layer):
    """The attention half of a decoder layer in one native call (norm + residual, qkv, q/k norms, partial
    rotary, the KV cache write, GQA attention over every cached slot, output projection, post norm) against
    torch's modules: fp32 within 1e-5 of the largest value; bf16 within the roundings both make (a few
    ulps: the attention's softmax runs in another order than torch's flash kernel). The kernel takes the
    query heads of a KV head together, at most 8 at a time (10 heads of one KV head: two passes), keys in
    blocks of 64 (70, 130, 600 cached slots: several blocks) and a head's values in slices of two vectors,
    one, and the tail (head_dim 48 at 16 floats: a pair and a single; 24: a single and a tail)."""
    _check_attention_decode(dtype, hidden, n_heads, n_kv, head_dim, rot, past, first_layer, seed=hidden + past)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_decode_with_peaked_scores(dtype):
    """Scores spread over hundreds (q norm weights x 40): the kernel's vector exponential underflows to 0
    where e^x is below fp32's normal range, as torch's softmax effectively does; same tolerances."""
    _check_attention_decode(dtype, 128, 8, 2, 32, 16, 200, False, seed=7, q_gain=40.0)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,n_heads,n_kv,head_dim,rot,past", [(64, 4, 2, 16, 8, 5), (128, 8, 2, 32, 16, 40)])
def test_attention_decode_with_int8_projections(dtype, hidden, n_heads, n_kv, head_dim, rot, past, activations):
    """The no-GPU format's int8 linears (one fp32 scale per output row) in the attention half: the same
    results as the attention with the dequantised projections, within the tolerances above; with int8
    activations (the normed input and the attention's output quantised for the projections), within their
    error."""
    _check_attention_decode(dtype, hidden, n_heads, n_kv, head_dim, rot, past, False, seed=past, int8=True,
                            activations=native.activations_take(hidden))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k", [(1, 7, 13), (1, 64, 2048), (3, 33, 100), (8, 130, 517), (2, 40, 192)])
def test_linear_with_int8_weights_and_row_scales(dtype, rows, n, k, activations):
    """A bound int8 linear (PackedLinear(int8=True)'s decode GEMV): x @ (q * scale).T within the tolerance
    of the plain kernels; an int8 weight without its scales is refused. int8 activations (rows of a multiple of
    64 columns): the quantised activations' product within that tolerance, the exact one within their error."""
    from engine.kernels.dequant import quantize_int8_rows

    gen = torch.Generator().manual_seed(rows * n + k)
    q, scale = quantize_int8_rows(torch.randn(n, k, generator=gen))
    x = torch.randn(rows, k, generator=gen).to(dtype)
    bound = native.bind_linear(q, min_bytes=0, scale=scale)
    got = bound(x)
    assert got.dtype == dtype and got.shape == (rows, n)
    want = x.double() @ (q.double() * scale.double()[:, None]).T
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    mode = native.activations_take(k, rows=rows)
    if mode != "float":  # the quantised activations' product within the plain tolerance, the exact one within theirs
        assert activations == {"int8": "int8", "int8x2": "auto"}[mode] and k % 64 == 0
        assert _rel_err(got, _seen_activations(x, k).double() @ (q.double() * scale.double()[:, None]).T) <= tol
        assert _rel_err(got, want) <= _activations_tolerance(tol, mode)
    else:
        assert _rel_err(got, want) <= tol
    assert native.bind_linear(q, min_bytes=0) is None
    with pytest.raises(ValueError):
        native.BoundLinear(q, native._lib)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k", [(9, 33, 100), (21, 130, 517), (64, 64, 2048)])
def test_int8_linears_bound_for_blocks_take_any_number_of_rows(dtype, rows, n, k, activations):
    """Bound with ``blocks`` (prefill blocks in fp32, which torch's int8 kernel does not vectorise), an int8
    linear takes more than MAX_ROWS rows, each row's result as it would be alone (within 1e-6; within int8x2
    activations' error where a row alone meets them and a block fp32 ones); bound
    without, it leaves them to torch (None)."""
    from engine.kernels.dequant import quantize_int8_rows

    gen = torch.Generator().manual_seed(rows + n + k)
    q, scale = quantize_int8_rows(torch.randn(n, k, generator=gen))
    x = torch.randn(rows, k, generator=gen).to(dtype)
    assert rows > native.MAX_ROWS and native.bind_linear(q, min_bytes=0, scale=scale)(x) is None
    got = native.bind_linear(q, min_bytes=0, scale=scale, blocks=True)(x)
    x_seen = _seen_activations(x, k)  # int8 or int8x2 activations: each row quantised on its own
    want = x_seen.double() @ (q.double() * scale.double()[:, None]).T
    assert got.dtype == dtype and _rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 2 ** -7)
    alone = torch.cat([native.bind_linear(q, min_bytes=0, scale=scale)(x[r:r + 1]) for r in range(rows)])
    # int8x2 ("auto"): a row alone meets int8x2 activations, a block fp32 ones (ming_int8x2_max_rows)
    same = native.activations_take(k, rows=rows) == native.activations_take(k)
    assert _rel_err(got, alone.double()) <= (1e-6 if same else INT8X2_ACTIVATIONS_REL_ERR if dtype == torch.float32
                                             else 2 ** -7)  # bf16: outputs a rounding step apart


@needs_native
@pytest.mark.parametrize("amx", [False, True])
def test_fp32_int8_blocks_never_reach_torchs_unvectorised_int8_kernel(monkeypatch, amx):
    """fp32 prefill blocks of int8 linears and experts run natively (torch's int8 kernel computes fp32 at
    1-2 GMAC/s); bf16 ones keep torch's kernel, which is faster there, unless torch's bf16 GEMMs use AMX: then
    they go through bf16 panels (the product within bf16 rounding either way)."""
    monkeypatch.setattr(native, "_amx", amx)
    from engine.kernels.dequant import quantize_int8_rows

    if not moe_kernels.int8_cpu_kernel_available():
        pytest.skip("this torch has no int8 weight-only kernel")
    gen = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(256, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 256, generator=gen))
    packed = moe_kernels.PackedLinear(linear, int8=True)
    x = torch.randn(3, 40, 256, generator=gen)  # 120 rows
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a) or real(*a))
    got = packed(x)
    q, scale = quantize_int8_rows(linear.weight.detach())
    want = x.double() @ (q.double() * scale.double()[:, None]).T
    assert not calls and got.shape == (3, 40, 96) and _rel_err(got, want) <= 1e-5
    packed_bf16 = moe_kernels.PackedLinear(linear.to(torch.bfloat16), int8=True)
    got = packed_bf16(x.bfloat16())
    assert bool(calls) != (amx and native.available())  # bf16 blocks: torch's int8 kernel, or panels
    assert _rel_err(got, x.bfloat16().double() @ (q.double() * scale.bfloat16().double()[:, None]).T) <= 1e-2


def _int4(gen, n: int, k: int):
    """A random [n, k] matrix in the engine's int4 storage (uint8 [n, k / 2], fp32 group scales) and its
    dequantised fp32 values."""
    from engine.kernels.dequant import dequantize
    from engine.placement.quant import quantize

    q, scale = quantize(torch.randn(n, k, generator=gen) / 8, "int4")
    return q, scale, dequantize(q, scale, torch.float32)


@pytest.fixture(params=["float", "int8", "auto"])
def activations(request, fp32_activations):
    """What the int4 / int8 kernels' weights meet in the test: fp32 activations; int8 ones (quantised per 32
    columns, byte dot products: int4 weights' on CPUs with AVX2, int8 weights' too with VNNI) where the kernels
    have them; the default there, int8 for int4 weights only."""
    with quantized_activations(request.param) as took:
        if not took:
            pytest.skip("int8 activations need the native kernels and AVX2, which this CPU lacks")
        yield request.param


# Error the int8 activations add to int4 dot products of random normal activations, relative to the largest
# output (each element within half a step, max / 254 of its 32-column block; measured 0.35-1 % on these
# shapes, 0.5-0.66 % on 8 x 64 outputs)
INT8_ACTIVATIONS_REL_ERR = 2e-2


def _int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the int4 x int8 kernel sees it: per 32 columns, scale max|x| / 127, x * (127 / max) rounded to
    nearest even (fp32 arithmetic), times the scale."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv).clamp(-127, 127) * (amax / 127.0)).reshape(x.shape)


# Error of int8x2 activations (two int8 parts: each element within max / 65 024 of its block) relative to the
# largest output: measured 2.6e-5 - 4.3e-5 on int8 linears of random normal activations
INT8X2_ACTIVATIONS_REL_ERR = 2e-4


def _int8x2_activations(x: torch.Tensor) -> torch.Tensor:
    """x as int8 weights' kernel sees it with int8x2 activations: per 32 columns, y = x * (127 / max) (fp32), q =
    round(y), l = round((y - q) * 256) (at most 127), the value (q + l / 256) * max / 127."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    y = blocks * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(y)
    low = torch.round((y - q) * 256).clamp(-128, 127)
    return ((q.double() + low.double() / 256) * (amax.double() / 127.0)).reshape(x.shape)


def _seen_activations(x: torch.Tensor, k: int, int4_group: int = 0) -> torch.Tensor:
    """The activations a native int8 (int4_group 0) or int4 matrix of k columns meets now in a block of x's rows
    (activations_take)."""
    mode = native.activations_take(k, int4_group, rows=x.reshape(-1, x.shape[-1]).shape[0])
    return {"int8": _int8_activations, "int8x2": _int8x2_activations}.get(mode, lambda v: v)(x)


def _activations_tolerance(tol: float, *modes: str) -> float:
    """The tolerance of a result whose matrices met these activations (activations_take), against exact ones."""
    if "int8" in modes:
        return max(tol, INT8_ACTIVATIONS_REL_ERR)
    return max(tol, INT8X2_ACTIVATIONS_REL_ERR) if "int8x2" in modes else tol


def _int8_activations_apply(group: int, k: int) -> bool:
    """Whether an int4 matrix of k columns in groups of `group` meets int8 activations now."""
    return native.int8_activations_take(k, group)


def _check_int4_linear(dtype, rows, n, k, gen):
    q, scale, w = _int4(gen, n, k)
    group = k // scale.shape[1]
    bound = native.bind_linear(q, min_bytes=0, scale=scale)
    assert (bound is not None) == native.int4_group_fits(group, k)
    if bound is None:
        return
    x = torch.randn(rows, k, generator=gen).to(dtype)
    got = bound(x)  # int4 takes any number of rows, MAX_ROWS at a time
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    exact = x.double() @ w.double().T
    if _int8_activations_apply(group, k):
        # the integer sums are exact: the quantised activations' product within the plain kernels' tolerance,
        # and within the quantisation's error of the exact product
        assert _rel_err(got, _int8_activations(x).double() @ w.double().T) <= tol
        assert _rel_err(got, exact) <= INT8_ACTIVATIONS_REL_ERR
        return
    # the dequantised weights are exact in fp32 (what dequantize() computes), so only the sum's order and
    # the output's rounding remain: the plain kernels' tolerance
    assert _rel_err(got, exact) <= tol


def _check_int4_experts(dtype, experts, hidden, inter, top_k, gen):
    mats = [[_int4(gen, *shape) for _ in range(experts)] for shape in ((2 * inter, hidden), (hidden, inter))]
    (gu, d) = mats
    table = native.ExpertTable.fused([m[0] for m in gu], [m[0] for m in d], ([m[1] for m in gu], [m[1] for m in d]))
    shared = tuple((torch.randn(*s, generator=gen) / 8).to(dtype) for s in ((48, hidden), (48, hidden), (hidden, 48)))
    x = torch.randn(1, hidden, generator=gen).to(dtype)
    ids = torch.randperm(experts, generator=gen)[:top_k].view(1, -1)
    weights = torch.rand(1, top_k, generator=gen)
    assert native.moe_applies(table, x, ids) and table.shared_fits(dtype)
    wg = torch.stack([m[2][:inter] for m in gu]).to(dtype)
    wu = torch.stack([m[2][inter:] for m in gu]).to(dtype)
    wd = torch.stack([m[2] for m in d]).to(dtype)
    want = moe_experts_reference(x, wg, wu, wd, ids, weights).to(dtype) + swiglu(x, *shared)
    got = native.moe_decode(x, table, ids, weights, shared).to(dtype)
    # bf16: the reference rounds the dequantised weights to bf16, the kernel keeps them in fp32; int8
    # activations (gate and up, or down too, with groups of 128): their quantisation's error
    tol = 1e-5 if dtype == torch.float32 else 2 ** -5
    int8 = _int8_activations_apply(hidden // gu[0][1].shape[1], hidden)
    assert _rel_err(got, want) <= (max(tol, INT8_ACTIVATIONS_REL_ERR) if int8 else tol)
    # threads split the gate / up rows by their bytes (an int4 row a quarter of a bf16 shared one): every row
    # computed once, each output the same sum whatever the team (stated as within 1e-6 relative)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = native.moe_decode(x, table, ids, weights, shared)
    finally:
        torch.set_num_threads(threads)
    assert _rel_err(native.moe_decode(x, table, ids, weights, shared), alone) <= 1e-6


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k", [(1, 7, 128), (1, 64, 2048), (3, 33, 256), (8, 130, 512), (21, 40, 384),
                                      (2, 16, 96)])
def test_linear_with_int4_weights_and_group_scales(dtype, rows, n, k, activations):
    """A bound int4 linear (the CPU-only format's experts, read in their storage layout): x @ W.T within
    the plain kernels' tolerance for decode rows and prefill blocks of any size; groups of 128 columns
    (2048, 512, 384: one 64-byte load per 128 columns on AVX-512), of 64 or 32 (96: groups of 32); a row
    gets the same sum in a block of any size (stated as within 1e-6 relative): fp32 rows what each gets
    alone; bf16 blocks, which take the bf16 dot-product kernel where the CPU has one (weights rounded to
    bf16, as the reference rounds them; a single row keeps fp32 weights), what they get in blocks of two."""
    gen = torch.Generator().manual_seed(rows * n + k)
    _check_int4_linear(dtype, rows, n, k, gen)
    q, scale, _ = _int4(gen, n, k)
    bound = native.bind_linear(q, min_bytes=0, scale=scale)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    y = bound(x)
    if dtype == torch.float32 or rows == 1:
        assert _rel_err(y, torch.cat([bound(x[r:r + 1]) for r in range(rows)])) <= 1e-6
    else:
        pairs = torch.cat([bound(x[r:r + 2]) for r in range(0, rows - 1, 2)])
        assert _rel_err(y[:pairs.shape[0]], pairs) <= 1e-6


@needs_native
def test_activation_settings_choose_by_weight_kind(fp32_activations):
    """"auto" (the default): int4 weights meet int8 activations, int8 weights int8x2 ones (two int8 parts, where
    the kernels have int8 weights': AVX2 or newer; else fp32 ones); "int8": int8 activations for both
    (int8 weights where the kernels have them); "float": neither. Each against what its kernel sees, a NaN
    making its row NaN; unknown settings are refused."""
    from engine.kernels.dequant import quantize_int8_rows

    gen = torch.Generator().manual_seed(11)
    q4, s4, w4 = _int4(gen, 16, 256)
    q8, s8 = quantize_int8_rows(torch.randn(16, 256, generator=gen))
    w8 = q8.double() * s8.double()[:, None]
    int4, int8 = native.bind_linear(q4, min_bytes=0, scale=s4), native.bind_linear(q8, min_bytes=0, scale=s8)
    x = torch.randn(2, 256, generator=gen)
    for setting in ("float", "auto", "int8"):
        with quantized_activations(setting) as took:
            if not took:
                pytest.skip("int8 activations need the native kernels and AVX2, which this CPU lacks")
            int8_weights = "int8" in native.int8_kernel_kinds()
            modes = (native.activations_take(256, 128), native.activations_take(256))
            assert modes == {"float": ("float", "float"), "auto": ("int8", "int8x2" if int8_weights else "float"),
                             "int8": ("int8", "int8" if int8_weights else "float")}[setting]
            assert native.int8_activation_kinds() == tuple(k for k, m in zip(("int4", "int8"), modes) if m == "int8")
            assert _rel_err(int4(x), _seen_activations(x, 256, 128).double() @ w4.double().T) <= 1e-5
            assert _rel_err(int8(x), _seen_activations(x, 256).double() @ w8.T) <= 1e-5
            if modes[1] == "int8x2":  # near the fp32 activations' product, unlike int8 ones
                assert 0 < _rel_err(int8(x), x.double() @ w8.T) <= INT8X2_ACTIVATIONS_REL_ERR
            bad = x.clone()
            bad[1, 70] = float("nan")  # a non-finite activation spoils its row, not the other
            for got in (int4(bad), int8(bad)):
                assert bool(torch.isnan(got[1]).all()) and bool(torch.isfinite(got[0]).all())
    with pytest.raises(ValueError, match="activations must be one of"):
        native.set_quantized_activations("int4")



@needs_native
@pytest.mark.usefixtures("variant_builds")
@pytest.mark.parametrize("isa,needs,floats,kinds", OLDER_CPUS)
def test_older_cpus_builds_meet_int4_weights_with_int8_activations(isa, needs, floats, kinds, monkeypatch):
    """The kernels as a CPU without AVX-512 builds them (8-float vectors; a 64-byte unit in two halves; byte dot
    products by vpmaddubsw + vpmaddwd, or AVX-VNNI's vpdpbusd), or one with AVX-512 but without VNNI (vpmaddubsw +
    vpmaddwd on 64 bytes; int8 weights without VNNI: their magnitudes against the activations given their signs),
    run here: int4 and int8 weights against int8 activations (int8 weights: int8x2 ones too) give the quantised
    activations' exact products within the plain kernels' tolerance, for decode rows, prefill blocks and one
    token's experts beside a bf16 shared one; a block of zeros stays zero, a NaN makes its row NaN."""
    from engine.kernels.dequant import quantize_int8_rows

    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU lacks {', '.join(sorted(needs - _cpu_flags()))}")
    lib = native.build_for_isa(isa)
    assert lib.ming_vector_floats() == floats
    monkeypatch.setattr(native, "_lib", lib)
    monkeypatch.setattr(native, "_activations_setting", native._activations_setting)
    assert native.set_quantized_activations("int8") == "int8" and native.int8_activation_kinds() == kinds
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, n, k in ((1, 33, 256), (3, 40, 384), (9, 17, 512), (1, 64, 2048)):
            assert _int8_activations_apply(128, k)
            _check_int4_linear(dtype, rows, n, k, gen)
        _check_int4_experts(dtype, 6, 256, 128, 3, gen)
    q, scale = quantize_int8_rows(torch.randn(24, 512, generator=gen))
    x = torch.randn(3, 512, generator=gen)
    for setting in ("int8", "auto"):  # int8 weights: int8 activations, int8x2 ones (with VNNI; else fp32 ones)
        native.set_quantized_activations(setting)
        assert native.activations_take(512) == ({"int8": "int8", "auto": "int8x2"}[setting] if "int8" in kinds
                                                else "float")
        got = native.bind_linear(q, min_bytes=0, scale=scale)(x)
        assert _rel_err(got, _seen_activations(x, 512).double() @ (q.double() * scale.double()[:, None]).T) <= 1e-5
    # int8x2: a remainder of exactly -1/2 step (3.5 in a block of scale 1 rounds to 4: -128/256, which signed
    # activations without VNNI hold as -127/256) against a negative weight
    q = torch.zeros(1, 64, dtype=torch.int8)
    q[0, 0], q[0, 1] = 50, -100
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1] = 127.0, 3.5
    got = native.bind_linear(q, min_bytes=0, scale=torch.ones(1))(x)
    assert abs(float(got) - 6000.0) <= 6000.0 * INT8X2_ACTIVATIONS_REL_ERR
    q, scale, w = _int4(gen, 24, 512)
    x = torch.randn(2, 512, generator=gen)
    x[:, :32] = 0.0
    x[1, 100] = float("nan")
    got = native.bind_linear(q, min_bytes=0, scale=scale)(x)
    assert _rel_err(got[:1], _int8_activations(x[:1]).double() @ w.double().T) <= 1e-5
    assert bool(torch.isnan(got[1]).all())
    native.set_quantized_activations("float")  # the fp32-activation path of that build, for comparison
    assert _rel_err(native.bind_linear(q, min_bytes=0, scale=scale)(x[:1]), x[:1].double() @ w.double().T) <= 1e-5


@needs_native
def test_int8_activations_of_int4_weights_keep_zero_blocks_and_outliers(activations):
    """The int4 x int8 path quantises each 32-column block on its own: a block of zeros stays zero (scale 0,
    no division by it), a block with an outlier 10^6 times its other values loses those values to the
    outlier's step but leaves its neighbours' blocks exact to their own steps. fp32 activations: exact. A NaN
    or an infinity in a row's activations makes that row's outputs non-finite on either path."""
    gen = torch.Generator().manual_seed(3)
    q, scale, w = _int4(gen, 24, 512)
    x = torch.randn(2, 512, generator=gen) * 1e-3
    x[:, :32] = 0.0
    x[0, 40] = 1e3
    x[1, 300:332] = -x[1, 300:332].abs()  # a block of one sign
    bound = native.bind_linear(q, min_bytes=0, scale=scale)
    got = bound(x)
    want = (_int8_activations(x) if native.int8_activations_take(512, 128) else x).double() @ w.double().T
    assert _rel_err(got, want) <= 1e-5
    assert torch.isfinite(got).all()
    x[1, 100], x[0, 7] = float("nan"), float("inf")  # non-finite activations give non-finite sums, not numbers
    got = bound(x)
    assert bool(torch.isnan(got[1]).all()) and not bool(torch.isfinite(got[0]).any())


@needs_native
def test_int4_refuses_what_it_cannot_run():
    """int4 groups that are not whole vector pairs (or do not divide the row) are not bound (the caller
    keeps torch's int4 kernel or dequantises), nor is an int4 weight without its group scales."""
    from engine.placement.quant import quantize

    q, scale = quantize(torch.randn(8, 40), "int4")  # groups of 8 columns
    assert native.bind_linear(q, min_bytes=0, scale=scale) is None
    with pytest.raises(ValueError, match="int4 groups"):
        native.BoundLinear(q, native._lib, scale)
    q, scale = quantize(torch.randn(8, 256), "int4")
    assert native.bind_linear(q, min_bytes=0) is None
    with pytest.raises(ValueError, match="int4 groups"):  # 3 groups do not divide 256 columns
        native.BoundLinear(q, native._lib, scale[:, :1].expand(8, 3).contiguous())
    with pytest.raises(ValueError, match="scales"):  # scales of another row count
        native.BoundLinear(q, native._lib, scale[:4].contiguous())
    with pytest.raises(ValueError, match="256 features"):  # activations of another width are refused, not read
        native.BoundLinear(q, native._lib, scale)(torch.randn(2, 128))
    q, scale = quantize(torch.randn(8, 2048), "int4")
    with pytest.raises(ValueError, match="int4 groups"):  # 63 groups would read as 64 groups of 32 columns
        native.BoundLinear(q, native._lib, torch.ones(8, 63))
    gate, down = torch.zeros(64, 1024, dtype=torch.uint8), torch.zeros(2048, 32, dtype=torch.uint8)
    down_scale = [torch.ones(2048, 2)]  # groups of 32 of I = 64: fits
    native.ExpertTable([gate], [gate], [down], ([torch.ones(64, 64)], [torch.ones(64, 64)], down_scale))
    with pytest.raises(ValueError, match="int4 expert groups"):  # nor do expert tables take 63 groups of H = 2048
        native.ExpertTable([gate], [gate], [down], ([torch.ones(64, 63)], [torch.ones(64, 63)], down_scale))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts,hidden,inter,top_k", [(8, 128, 64, 2), (16, 256, 128, 4), (6, 96, 32, 3)])
def test_int4_experts_in_one_native_call(dtype, experts, hidden, inter, top_k, activations):
    """int4 experts (group scales, two values a byte) and the shared expert in one native pass, against the
    experts dequantised and run by the reference (groups of 128 and of 64 / 32 columns)."""
    _check_int4_experts(dtype, experts, hidden, inter, top_k, torch.Generator().manual_seed(hidden + inter))


@needs_native
def test_attention_decode_refuses_what_it_cannot_run():
    gen = torch.Generator().manual_seed(0)
    w = _attention_weights(gen, torch.float32, 64, 4, 2, 16)
    kwargs = dict(input_norm=w["in_norm"], post_norm=w["post_norm"], eps=1e-6, qkv=w["qkv"], o=w["o"],
                  q_norm=w["q_norm"], k_norm=w["k_norm"], head_eps=1e-6, n_heads=4, n_kv=2, head_dim=16, rotary_dim=8)
    bound = native.AttentionDecode(**kwargs)
    with pytest.raises(ValueError):  # 4 query heads do not share 3 KV heads
        native.AttentionDecode(**{**kwargs, "n_kv": 3})
    with pytest.raises(ValueError):  # a bf16 projection beside fp32 norms
        native.AttentionDecode(**{**kwargs, "qkv": w["qkv"].bfloat16()})
    k_cache, cos = torch.zeros(1, 2, 4, 16), torch.ones(8)
    x = torch.randn(1, 1, 64)
    with pytest.raises(ValueError, match="slot 4"):  # past the cache's end: refused, nothing written
        bound(x, None, cos, cos, k_cache, k_cache.clone(), 4)
    with pytest.raises(ValueError):
        bound(x.bfloat16(), None, cos, cos, k_cache, k_cache.clone(), 0)
    with pytest.raises(ValueError):
        bound(x, None, cos, cos, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 0)


def _ties_at_boundary(logits, bias, n_group: int, topk_group: int, top_k: int) -> bool:
    """True when a router's choice for this one row of logits ties at its boundary (in the logits' dtype, as
    engine.kernels.router selects): a group left out scores as the last kept one, or an expert left out as
    the last chosen one."""
    biased = (torch.sigmoid(logits) + bias.to(logits.dtype))[0]
    grouped = biased.view(n_group, -1)
    group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1).sort(descending=True).values
    if topk_group < n_group and group_scores[topk_group - 1] == group_scores[topk_group]:
        return True
    kept = grouped.sum(-1).new_zeros(n_group, dtype=torch.bool)
    kept[grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1).topk(topk_group).indices] = True
    candidates = torch.where(kept[:, None], grouped, float("-inf")).flatten().sort(descending=True).values
    return top_k < candidates.numel() and bool(candidates[top_k - 1] == candidates[top_k])


def _check_mlp_decode(dtype, experts, hidden, inter, top_k, n_group, topk_group, shared_inter, seed, router_bf16=False):
    from engine.kernels.router import route_experts_reference

    gen = torch.Generator().manual_seed(seed)
    wg, wu = ((torch.randn(experts, inter, hidden, generator=gen) / 10).to(dtype) for _ in range(2))
    wd = (torch.randn(experts, hidden, inter, generator=gen) / 6).to(dtype)
    shared = None if not shared_inter else tuple(
        (torch.randn(*s, generator=gen) / 8).to(dtype) for s in ((shared_inter, hidden),) * 2 + ((hidden, shared_inter),))
    router = torch.randn(experts, hidden, generator=gen).to(dtype)
    bias = torch.randn(experts, generator=gen) / 4
    packed = PackedExperts.from_weights(wg, wu, wd, use_onednn=False)
    bound = native.MlpDecode(dtype, hidden, shared=shared, router_weight=router, expert_bias=bias,
                             table=packed.native_table(), n_group=n_group, topk_group=topk_group, top_k=top_k,
                             scaling=2.5)
    x = torch.randn(1, hidden, generator=gen).to(dtype)
    routing = torch.empty(top_k, dtype=torch.int64), torch.empty(top_k, dtype=torch.float32)
    got = bound(x, routing, router_bf16=router_bf16)
    logits = F.linear(x.bfloat16(), router.bfloat16()) if router_bf16 else F.linear(x.float(), router.float())
    ids, weights = route_experts_reference(logits, bias, n_group, topk_group, top_k, 2.5)
    if got is None:  # left to torch's router: only where the choice ties at its boundary
        assert _ties_at_boundary(logits, bias, n_group, topk_group, top_k)
        return
    order, got_order = ids[0].argsort(), routing[0].argsort()
    assert routing[0][got_order].tolist() == ids[0][order].tolist()  # the same experts
    assert _rel_err(routing[1][got_order], weights[0][order]) <= 1e-5
    want = moe_experts_reference(x, wg, wu, wd, ids, weights)
    if shared is not None:
        want = want + swiglu(x, *shared)
    assert got.dtype == dtype and got.shape == x.shape
    assert _rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 2 ** -7)


@needs_native
@pytest.mark.parametrize("dtype,router_bf16", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("experts,hidden,inter,top_k,n_group,topk_group,shared_inter", [
    (8, 64, 32, 2, 1, 1, 32), (32, 256, 96, 8, 4, 2, 96), (16, 100, 37, 3, 8, 3, 0), (12, 48, 20, 4, 3, 3, 50)])
def test_mlp_decode_routes_and_runs_the_experts_as_the_reference(dtype, experts, hidden, inter, top_k, n_group,
                                                                  topk_group, shared_inter, router_bf16):
    """A MoE layer's router (fp32 logits, group-limited sigmoid top-k with the expert bias for selection
    only, renormalised and scaled weights; or selecting in bf16 as the reference's bf16 router does) and its
    experts with the shared one, in one native call: the same experts as engine.kernels.router, weights
    within 1e-5, the output within the experts' tolerance."""
    _check_mlp_decode(dtype, experts, hidden, inter, top_k, n_group, topk_group, shared_inter,
                      seed=experts * hidden + top_k, router_bf16=router_bf16)


@needs_native
@pytest.mark.parametrize("dtype,router_bf16", [(torch.float32, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("n_group,topk_group,top_k", [(1, 1, 2), (4, 2, 3), (4, 2, 2)])
def test_mlp_decode_leaves_a_tied_choice_to_torchs_router(dtype, router_bf16, n_group, topk_group, top_k):
    """Experts whose selection scores tie at the boundary (frequent with a bf16 router: 2^-8 apart near 1):
    torch.topk keeps whichever its selection algorithm reaches (here not the lowest ids), so the native kernel,
    which took the lowest, chose other experts than the reference's router for the same token. It now computes
    nothing for such a token (None) and the decoder layer routes it with torch; a choice without a tie runs."""
    from engine.kernels.router import route_experts_reference

    experts, hidden, inter = 8, 64, 32
    gen = torch.Generator().manual_seed(1)
    wg, wu = ((torch.randn(experts, inter, hidden, generator=gen) / 10).to(dtype) for _ in range(2))
    wd = (torch.randn(experts, hidden, inter, generator=gen) / 6).to(dtype)
    table = PackedExperts.from_weights(wg, wu, wd, use_onednn=False).native_table()
    router, bias = torch.zeros(experts, hidden, dtype=dtype), torch.zeros(experts)  # every score 0.5: all tie
    x = torch.randn(1, hidden, generator=gen).to(dtype)
    bound = native.MlpDecode(dtype, hidden, shared=None, router_weight=router, expert_bias=bias, table=table,
                             n_group=n_group, topk_group=topk_group, top_k=top_k, scaling=1.0)
    assert bound(x, router_bf16=router_bf16) is None
    ids, _ = route_experts_reference(torch.zeros(1, experts, dtype=dtype), bias, n_group, topk_group, top_k, 1.0)
    assert sorted(ids[0].tolist()) != list(range(top_k))  # torch's choice is not the lowest ids
    bias[torch.arange(experts)] = torch.arange(experts, dtype=torch.float32) / 64  # distinct scores: no tie
    untied = native.MlpDecode(dtype, hidden, shared=None, router_weight=router, expert_bias=bias, table=table,
                              n_group=n_group, topk_group=topk_group, top_k=top_k, scaling=1.0)
    routing = torch.empty(top_k, dtype=torch.int64), torch.empty(top_k, dtype=torch.float32)
    assert untied(x, routing, router_bf16=router_bf16) is not None
    want, _ = route_experts_reference(torch.zeros(1, experts, dtype=dtype), bias, n_group, topk_group, top_k, 1.0)
    assert sorted(routing[0].tolist()) == sorted(want[0].tolist())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_decode_of_a_dense_layer_is_its_swiglu(dtype):
    gen = torch.Generator().manual_seed(3)
    w = tuple((torch.randn(*s, generator=gen) / 8).to(dtype) for s in ((70, 96), (70, 96), (96, 70)))
    x = torch.randn(1, 1, 96, generator=gen).to(dtype)
    got = native.MlpDecode(dtype, 96, shared=w)(x)
    assert got.shape == x.shape and _rel_err(got, swiglu(x, *w)) <= (1e-5 if dtype == torch.float32 else 2 ** -7)
    from engine.kernels.dequant import quantize_int8_rows

    q = [quantize_int8_rows(t) for t in w]  # int8 linears: their per-row scales go with them
    deq = tuple((qi * si[:, None]).to(dtype) for qi, si in q)
    got = native.MlpDecode(dtype, 96, shared=tuple(qi for qi, _ in q), shared_scales=tuple(si for _, si in q))(x)
    assert _rel_err(got, swiglu(x, *deq)) <= (1e-5 if dtype == torch.float32 else 2 ** -7)
    with pytest.raises(ValueError):  # int8 without its scales
        native.MlpDecode(dtype, 96, shared=tuple(qi for qi, _ in q))
    with pytest.raises(ValueError):  # a router without its experts
        native.MlpDecode(dtype, 96, shared=w, router_weight=torch.zeros(4, 96, dtype=dtype), expert_bias=torch.zeros(4))
    with pytest.raises(ValueError):  # neither a router nor an MLP
        native.MlpDecode(dtype, 96, shared=None)
    packed = PackedExperts.from_weights(*(torch.zeros(4, 70, 96, dtype=dtype),) * 2, torch.zeros(4, 96, 70, dtype=dtype),
                                        use_onednn=False)
    moe = native.MlpDecode(dtype, 96, shared=w, router_weight=torch.zeros(4, 96), expert_bias=torch.zeros(4),
                           table=packed.native_table(), top_k=2)
    assert not moe.can_route_in_bf16  # an fp32 router: the bf16 router's rounding is torch's to do
    with pytest.raises(ValueError, match="bf16 router"):
        moe(x, router_bf16=True)
    with pytest.raises(ValueError, match="routing"):  # too small to receive the top-2: refused, nothing written
        moe(x, (torch.empty(1, dtype=torch.int64), torch.empty(1)))


def _quantisers_agree(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], int4: bool) -> None:
    """Two quantisations of one weight: the same dtypes and shapes, scales within 1e-6, each value within one
    step and equal almost everywhere (they divide as the definition does; the tolerance is the policy for two
    kernel paths)."""
    from engine.kernels.dequant import unpack_int4

    (q, scale), (q_ref, scale_ref) = got, want
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape and scale.shape == scale_ref.shape
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    values, values_ref = (unpack_int4(q).int(), unpack_int4(q_ref).int()) if int4 else (q.int(), q_ref.int())
    assert int((values - values_ref).abs().max()) <= 1 and (values != values_ref).float().mean().item() < 1e-3


def _weights_to_quantise(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows of different magnitudes, with an all-zero row, a zero group and a subnormal-sized value."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.rand(*shape[:-1], 1, generator=gen) * 0.05
    flat = w.view(-1, shape[-1])
    flat[0] = 0
    if flat.shape[0] > 2:
        flat[1, : shape[-1] // 2] = 0
        flat[2, -1] = 1e-30
    return w.to(dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 4096), (3, 40, 256), (5, 100), (1, 2)])
def test_quantisers_give_the_torch_definitions_values(dtype, shape):
    """The load's native int8 and int4 quantisers against the torch definitions (reference=True) on rows with
    tails (100 columns: int4 groups of 4), zero rows and groups, 3-D banks; the input is not modified."""
    from engine.kernels.dequant import quantize_int8_rows
    from engine.placement.quant import int4_group_size, quantize_int4_rows

    w = _weights_to_quantise(shape, dtype, seed=shape[-1])
    before = w.clone()
    int8 = native.quantize_rows(w)
    assert int8 is not None
    _quantisers_agree(int8, quantize_int8_rows(w, reference=True), int4=False)
    int4 = native.quantize_rows(w, int4_group_size(shape[-1]))
    assert int4 is not None
    _quantisers_agree(int4, quantize_int4_rows(w, reference=True), int4=True)
    assert float(int8[1].reshape(-1)[0]) == 1.0 and float(int4[1].reshape(-1)[0]) == 1.0  # the zero row
    # the entry points take the native quantiser by default: the same values
    _quantisers_agree(quantize_int8_rows(w), int8, int4=False)
    _quantisers_agree(quantize_int4_rows(w), int4, int4=True)
    torch.testing.assert_close(w, before, rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("column", [5, 4095])
def test_quantisers_reject_non_finite_weights(bad, column):
    w = torch.randn(64, 4096)
    w[17, column] = bad
    for group in (0, 128):
        with pytest.raises(ValueError, match="non-finite"):
            native.quantize_rows(w, group)
        with pytest.raises(ValueError, match="non-finite"):
            native.quantize_rows(w.bfloat16(), group)


@needs_native
def test_quantisers_leave_what_they_do_not_take_to_torch():
    w = torch.randn(8, 256)
    assert native.quantize_rows(w.half()) is None
    assert native.quantize_rows(w.t()) is None  # not contiguous
    assert native.quantize_rows(w, group=3) is None and native.quantize_rows(w, group=96) is None
    from engine.kernels.dequant import quantize_int8_rows

    q, scale = quantize_int8_rows(w.t())  # torch's definition takes it
    assert q.shape == (256, 8) and scale.shape == (256,)


@needs_native
@pytest.mark.usefixtures("variant_builds")
def test_quantisers_scalar_path_gives_the_same_values(monkeypatch):
    """The quantisers' scalar loops (CPUs without AVX-512, and a build of another vector width here)."""
    from engine.kernels.dequant import quantize_int8_rows
    from engine.placement.quant import int4_group_size, quantize_int4_rows

    monkeypatch.setattr(native, "_lib", native.build_with_vector_width(8))
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((40, 256), (6, 100)):
            w = _weights_to_quantise(shape, dtype, seed=7)
            _quantisers_agree(native.quantize_rows(w), quantize_int8_rows(w, reference=True), int4=False)
            _quantisers_agree(native.quantize_rows(w, int4_group_size(shape[-1])),
                              quantize_int4_rows(w, reference=True), int4=True)
    w = torch.randn(4, 256)
    w[2, 200] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        native.quantize_rows(w, 128)


@needs_native
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantised_weights_dequantise_to_bf16_as_dequantize_does(kind):
    """ming_dequantize_bf16 gives each weight value * scale computed in fp32 and rounded once to bf16, the value
    dequantize() gives (stated as within half a bf16 step), for any run of rows."""
    from engine.kernels.dequant import dequantize, quantize_int8_rows
    from engine.placement.quant import quantize

    gen = torch.Generator().manual_seed(17)
    w = torch.randn(40, 512, generator=gen)
    q, scale = quantize(w, "int4") if kind == "int4" else quantize_int8_rows(w)
    bound = native.bind_linear(q, min_bytes=0, scale=scale, blocks=True)
    want = dequantize(q, scale, torch.bfloat16).float()
    out = torch.empty(13, 512, dtype=torch.bfloat16)
    assert native._lib.ming_dequantize_bf16(bound.ptr, bound.kind, bound.scale_ptr, bound.group, bound.k, 20, 13,
                                             out.data_ptr(), 2) == 0
    assert ((out.float() - want[20:33]).abs() <= want[20:33].abs() * 2.0**-9).all()
    assert native._lib.ming_dequantize_bf16(bound.ptr, 0, None, 0, bound.k, 0, 1, out.data_ptr(), 1) == -4  # fp32


@needs_native
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("amx", [False, True])
def test_bf16_blocks_of_quantised_weights_take_bf16_panels_where_gemms_use_amx(monkeypatch, kind, amx):
    """Where torch's bf16 GEMMs use AMX, int4 / int8 weights meet bf16 blocks of AMX_QUANT_MIN_ROWS rows or more
    as bf16 panels (small panels here: several per matrix, the last one partial) through torch's GEMM: the
    product with the dequantised weights, within bf16 rounding; fewer rows, fp32 blocks and other CPUs keep the
    native kernel."""
    from engine.kernels.dequant import dequantize, quantize_int8_rows
    from engine.placement.quant import quantize

    monkeypatch.setattr(native, "_amx", amx)
    monkeypatch.setattr(native, "AMX_PANEL_BYTES", 7 * 512 * 2)  # 7 rows a panel: 100 rows in 15 panels
    gen = torch.Generator().manual_seed(19)
    w = torch.randn(100, 512, generator=gen)
    q, scale = quantize(w, "int4") if kind == "int4" else quantize_int8_rows(w)
    bound = native.bind_linear(q, min_bytes=0, scale=scale, blocks=True)
    x = torch.randn(2, native.AMX_QUANT_MIN_ROWS // 2, 512, generator=gen).to(torch.bfloat16)
    want = x.double() @ dequantize(q, scale, torch.bfloat16).double().T
    assert bound.takes_bf16_panels(x) == amx
    assert not bound.takes_bf16_panels(x[:, :-1]) and not bound.takes_bf16_panels(x.float())
    got = bound(x)
    assert got.shape == (2, native.AMX_QUANT_MIN_ROWS // 2, 100) and got.dtype == torch.bfloat16
    assert _rel_err(got, want) <= 1e-2


@needs_native
@pytest.mark.parametrize("dtype,router_bf16", [(torch.float32, False), (torch.bfloat16, True)])
def test_mlp_decode_top_1_weight_is_the_score_times_the_scale(dtype, router_bf16):
    """With num_experts_per_tok = 1 the reference does not renormalise (spec §2.6 as the reference runs
    it): the weight is sigmoid(logit) x scale, not the scale itself; the native router agrees."""
    _check_mlp_decode(dtype, 8, 64, 32, 1, 2, 1, 32, seed=11, router_bf16=router_bf16)
    gen = torch.Generator().manual_seed(12)
    wg, wu = ((torch.randn(8, 32, 64, generator=gen) / 10).to(dtype) for _ in range(2))
    wd = (torch.randn(8, 64, 32, generator=gen) / 6).to(dtype)
    router = torch.randn(8, 64, generator=gen).to(dtype)
    bias = torch.randn(8, generator=gen) / 4
    packed = PackedExperts.from_weights(wg, wu, wd, use_onednn=False)
    bound = native.MlpDecode(dtype, 64, shared=None, router_weight=router, expert_bias=bias, table=packed.native_table(),
                             n_group=2, topk_group=1, top_k=1, scaling=2.5)
    x = torch.randn(1, 64, generator=gen).to(dtype)
    routing = torch.empty(1, dtype=torch.int64), torch.empty(1, dtype=torch.float32)
    bound(x, routing, router_bf16=router_bf16)
    logit = F.linear(x.float(), router.float())[0, routing[0][0]]
    assert abs(float(routing[1][0]) - float(torch.sigmoid(logit)) * 2.5) < 2e-2
    assert float(routing[1][0]) < 2.5
