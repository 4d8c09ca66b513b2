"""CPU benchmark of one BailingMoeV2 MoE layer (routed experts + shared expert) against memory bandwidth.

Shape (defaults = Ling-flash / Ming-flash-omni): 256 experts, hidden 4096, expert intermediate 1024,
top-8 routing plus one shared expert of intermediate 1024, bf16 weights. ``--dtype fp32`` and a
smaller ``--experts`` give quicker or lighter runs.

Method
------
* Bandwidth: in the same run, before any weights exist and again after they are freed, a 2 GiB fp32
  buffer (far above the caches) is read with ``sum`` and with a GEMV (``mv``) several times; the best
  rate seen is the machine's measured read bandwidth (the larger denominator makes the roofline
  fraction conservative, and measuring twice makes it less sensitive to other processes).
* Compute ceiling (context for prefill): best rate of a dense [512 x 4096] @ [4096 x 2048] GEMM in
  the weight dtype, with the weight staying in cache.
* Weights: one layer of ``--experts`` experts (6.4 GB in bf16 at the default shape) plus
  ``SHARED_COPIES`` distinct copies of the shared expert. Values are seeded random numbers: each
  matrix is copied from a random offset of a seeded random pool (one ``normal_`` over 6.4 GB would
  take ~25 s on 2 cores); every matrix is its own memory, so reads are real.
* Decode (1 token): each pass walks a seeded random permutation of the experts, top_k experts per
  call, so consecutive calls read disjoint experts and an expert is reused only after the whole layer
  (GBs) has streamed through the caches; the shared-expert copies are cycled the same way. The time per
  call is the mean over the timed passes after one warm-up pass.
* Prefill (512 tokens): every token picks top_k distinct experts uniformly at random (each call reads
  the experts that received tokens: at the default shape, all of them). Median of the timed calls.
* Bytes per call = weight bytes of the experts that received at least one token, each counted once,
  plus the shared expert. Achieved bytes/s = bytes / time; ``roofline_fraction`` = achieved / measured
  bandwidth. ``paired`` (decode): before each timed pass and after the last, a 2 GiB buffer is read again
  (best of ``PROBE_READS`` sums); each pass's GB/s is divided by the higher of the two reads around it, and the
  median over the passes is printed. On a VM whose memory bandwidth moves with its neighbours' load (here 35 GB/s
  one hour, 52 another) this compares the kernel with the bandwidth of its own seconds; ``roofline`` divides by
  the best read of the whole run (the more conservative figure). The router GEMM is not in the timed call
  (routing is given, to control which experts are read); activations are not counted as bytes.
* Paths: ``plain`` = ``moe_experts`` on stacked [E, I, H] weights (the reference CPU path);
  ``packed`` = ``moe_experts_packed`` on :class:`engine.kernels.PackedExperts` (gate+up concatenated;
  plain layout run by the native decode kernel with the shared expert in the same pass where it is
  built, engine.kernels.native, else oneDNN-prepacked where that pays), the engine's fast CPU path (the
  native kernel's status is printed). The headline numbers are those of the packed path
  when it runs. ``packed-native`` / ``packed-onednn`` force its plain layout (native kernel) or
  oneDNN's pre-packed one, to measure the choice ``engine.kernels.onednn_packing_pays`` makes. The
  paths are built one after the other, so peak memory is one layer's weights.
  ``int8`` / ``int4``: the same routed experts quantised (engine.placement.quant) and run by
  :class:`engine.kernels.QuantizedCpuExperts` (torch's int8 weight-only kernel, int8 decode by the native
  kernel with the shared expert in its pass where it is built; int4 read in its storage layout by the native
  kernel, decode in one native call with the shared expert; activations as the engine's default (where the CPU
  has AVX2: int8 for int4 weights, int8x2 for int8 ones' decode rows, engine.kernels.native.quantized_activations);
  ``-a8`` / ``-float`` (``int8-a8``, ``int4-float``, ...): int8 / fp32 activations whatever the default);
  ``int4-torch``: torch's int4 kernel on its own
  layout, the engine's fallback where the native kernels are not built; ``int8-torch``: int8 with fp32
  prefill blocks on torch's int8 kernel too, as before the native kernel took them), activations in
  ``--dtype``; their bytes are the quantised bytes (scales included), so ``roofline`` compares the
  bytes they really read with the bandwidth, and ``ms/call`` compares them with the bf16 paths.
  ``kt-bf16`` / ``kt-int8`` / ``kt-int4``: KTransformers' CPU MoE kernels (optional package
  ``kt-kernel``, ``pip install --no-deps kt-kernel==0.7.2``; skipped when absent): ``AMXBF16_MOE``,
  ``AMXInt8_MOE``, ``AMXInt4_MOE`` (AVX-512 variants on CPUs without AMX), quantised by kt-kernel
  itself from the same bf16 weights, on a kt worker pool of ``--threads`` threads; the shared expert
  runs on our packed path in every path. kt's ``roofline`` counts its quantised bytes without scales.
* ``--cpu-isa avx2`` / ``avx-vnni`` / ``avx512``: the native kernels as a CPU without AVX-512 (with AVX-VNNI or
  without) or with AVX-512 but no VNNI (Skylake-SP) builds them, run on this CPU (MING_NATIVE_ISA): that code's
  speed here, not that CPU's; torch's own kernels (AMX GEMMs included) are this CPU's unless limited too
  (ONEDNN_MAX_CPU_ISA=AVX2).
* ``--huge-pages``: the expert banks are stacked ``[E, 2I, H]`` / ``[E, H, I]`` tensors as the engine's load makes
  them, on transparent huge pages where the host gives them (engine.kernels.huge_pages; ``on``, the default) or on
  4 KiB pages (``off``). ``both``: decode only, both layers built (twice the memory: lower ``--experts``), measured
  interleaved ``--repeats`` times in alternating order; min / median wall ms per call, this process's CPU time
  per call (with ``--threads 1`` the per-core cost, little changed by other processes) and the 4k/huge ratios;
  ``huge MB`` is the rise of AnonHugePages (/proc/self/smaps_rollup) while the layer was built.
* Contention: the CPU time other processes used during each measurement is read from /proc/stat and
  reported as ``other_cpu_load`` (fraction of all cores). On a shared 2-core machine any other load
  ruins the numbers (OpenMP threads wait for the slowest core); the table flags such rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kernels import huge_pages, native  # noqa: E402
from engine.kernels.moe import PackedExperts, moe_experts, moe_experts_packed, onednn_packing_available, swiglu  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GIB = 1024**3
BANDWIDTH_BUFFER_BYTES = 2 * GIB
BANDWIDTH_REPEATS = 5
GEMV_COLUMNS = 4096  # the bandwidth buffer is also read as a [rows, 4096] matrix times a vector
GEMM_SHAPE = (512, 4096, 2048)  # M, K, N of the compute-ceiling GEMM
GEMM_REPEATS = 5
SHARED_COPIES = 8
ROUTED_SCALING = 2.5  # routing weights sum to 2.5 in BailingMoeV2
POOL_FACTOR = 4  # the random pool holds this many expert matrices' worth of values
WEIGHT_STD = 0.02
DECODE_WARMUP_PASSES = 1
DECODE_TIMED_PASSES = 4
PROBE_READS = 2  # a paired bandwidth probe: best of this many reads of the bandwidth buffer
PREFILL_WARMUP_CALLS = 1
PREFILL_TIMED_CALLS = 3


@dataclass
class LayerShape:
    experts: int
    hidden: int
    inter: int
    shared_inter: int
    top_k: int
    dtype: torch.dtype

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.inter * self.dtype.itemsize

    @property
    def shared_bytes(self) -> int:
        return 3 * self.hidden * self.shared_inter * self.dtype.itemsize


CONTENTION_WARNING = 0.1  # flag measurements during which other processes used this share of the CPUs
PROC_STAT_BUSY_FIELDS = slice(0, 3)  # user, nice, system jiffies of the aggregate "cpu" line
PROC_STAT_EXTRA_BUSY_FIELDS = slice(5, 8)  # irq, softirq, steal


@dataclass
class ModeResult:
    ms_per_call: float
    weight_bytes: int
    achieved_gbs: float
    roofline_fraction: float
    gflops: float
    other_cpu_load: float
    # decode: median over the timed passes of (the pass's GB/s) / (bandwidth read just before or after it, the higher)
    paired_roofline: float | None = None


def _busy_cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole machine so far (None where /proc/stat is unavailable)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(fields[PROC_STAT_BUSY_FIELDS]) + sum(fields[PROC_STAT_EXTRA_BUSY_FIELDS])
    return busy / os.sysconf("SC_CLK_TCK")


class ContentionMeter:
    """Share of all CPUs used by other processes between construction and :meth:`other_load`."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.machine = _busy_cpu_seconds()
        times = os.times()
        self.own = times.user + times.system

    def other_load(self) -> float:
        machine = _busy_cpu_seconds()
        if machine is None or self.machine is None:
            return float("nan")
        times = os.times()
        own = times.user + times.system - self.own
        wall = time.perf_counter() - self.wall
        return max(0.0, (machine - self.machine - own) / (wall * (os.cpu_count() or 1)))


class BandwidthProbe:
    """The read bandwidth of the moment (GB/s): best of PROBE_READS sums of a buffer far above the caches, taken
    between decode passes, so each pass is compared with the bandwidth of its own time (a VM's memory bandwidth
    moves with its neighbours' load)."""

    def __init__(self) -> None:
        self.buffer = torch.ones(BANDWIDTH_BUFFER_BYTES // 4, dtype=torch.float32)

    def __call__(self) -> float:
        best = 0.0
        for _ in range(PROBE_READS):
            start = time.perf_counter()
            self.buffer.sum()
            best = max(best, BANDWIDTH_BUFFER_BYTES / (time.perf_counter() - start) / 1e9)
        return best


def measure_bandwidth() -> float:
    """Best read bandwidth (GB/s) of a 2 GiB fp32 buffer, via sum and via GEMV."""
    buffer = torch.ones(BANDWIDTH_BUFFER_BYTES // 4, dtype=torch.float32)
    matrix = buffer.view(-1, GEMV_COLUMNS)
    vector = torch.ones(GEMV_COLUMNS)
    best = 0.0
    for read in (lambda: buffer.sum(), lambda: torch.mv(matrix, vector)):
        read()
        for _ in range(BANDWIDTH_REPEATS):
            start = time.perf_counter()
            read()
            best = max(best, BANDWIDTH_BUFFER_BYTES / (time.perf_counter() - start) / 1e9)
    return best


def measure_gemm_gflops(dtype: torch.dtype) -> float:
    """Best GFLOP/s of a dense cached GEMM in ``dtype`` (a compute ceiling for prefill)."""
    m, k, n = GEMM_SHAPE
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(n, k).to(dtype)
    torch.nn.functional.linear(a, b)
    best = 0.0
    for _ in range(GEMM_REPEATS):
        start = time.perf_counter()
        torch.nn.functional.linear(a, b)
        best = max(best, 2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return best


class WeightSource:
    """Seeded random matrices: copies of random windows of one seeded random pool."""

    def __init__(self, shape: LayerShape, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        matrix_elems = shape.hidden * max(shape.inter, shape.shared_inter)
        self.pool = torch.empty(POOL_FACTOR * matrix_elems, dtype=shape.dtype).normal_(0.0, WEIGHT_STD, generator=self.gen)
        self.seed = seed

    def offsets(self, count: int, numel: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + count)
        return torch.randint(0, self.pool.numel() - numel + 1, (count,), generator=gen).tolist()

    def fill(self, out: torch.Tensor, offset: int) -> None:
        out.copy_(self.pool[offset : offset + out.numel()].view(out.shape))


def expert_offsets(source: WeightSource, shape: LayerShape) -> list[int]:
    """Pool offsets of every routed-expert matrix: [gate, up, down] for each expert."""
    return source.offsets(3 * shape.experts, shape.hidden * shape.inter)


def make_shared(source: WeightSource, shape: LayerShape) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    copies = []
    offsets = source.offsets(3 * SHARED_COPIES + 1, shape.hidden * shape.shared_inter)
    for c in range(SHARED_COPIES):
        gate = torch.empty(shape.shared_inter, shape.hidden, dtype=shape.dtype)
        up = torch.empty_like(gate)
        down = torch.empty(shape.hidden, shape.shared_inter, dtype=shape.dtype)
        for i, w in enumerate((gate, up, down)):
            source.fill(w, offsets[3 * c + i])
        copies.append((gate, up, down))
    return copies


LayerCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def stacked_experts(source: WeightSource, shape: LayerShape, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Every routed expert stacked: gate, up [E, I, H] and down [E, H, I] in `dtype`."""
    w_gate = torch.empty(shape.experts, shape.inter, shape.hidden, dtype=dtype)
    w_up = torch.empty_like(w_gate)
    w_down = torch.empty(shape.experts, shape.hidden, shape.inter, dtype=dtype)
    offsets = expert_offsets(source, shape)
    for e in range(shape.experts):
        for i, w in enumerate((w_gate, w_up, w_down)):
            source.fill(w[e], offsets[3 * e + i])
    return w_gate, w_up, w_down


def build_plain(source: WeightSource, shape: LayerShape) -> LayerCall:
    """Stacked weights + ``moe_experts`` (reference CPU path) and the shared expert via ``swiglu``."""
    w_gate, w_up, w_down = stacked_experts(source, shape, shape.dtype)
    shared = make_shared(source, shape)

    def call(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shared_copy: int) -> torch.Tensor:
        routed = moe_experts(x, w_gate, w_up, w_down, ids, weights, impl="torch")
        return routed + swiglu(x, *shared[shared_copy])

    return call


def build_packed(source: WeightSource, shape: LayerShape, use_onednn: bool | None = None) -> tuple[LayerCall, bool]:
    """``PackedExperts`` read in place from a stacked bank (gate and up fused per expert, [E, 2I, H], and down
    [E, H, I], on huge pages unless --huge-pages off), as the engine's CPU load makes and runs a MoE layer,
    + ``moe_experts_packed`` with the shared expert. ``use_onednn``: None = the engine's choice; False /
    True force the plain layout (native kernel) / oneDNN's pre-packed one, to compare the two."""
    gate_up = huge_pages.empty((shape.experts, 2 * shape.inter, shape.hidden), shape.dtype)
    down = huge_pages.empty((shape.experts, shape.hidden, shape.inter), shape.dtype)
    offsets = expert_offsets(source, shape)
    for e in range(shape.experts):
        for i, w in enumerate((gate_up[e, :shape.inter], gate_up[e, shape.inter:], down[e])):
            source.fill(w, offsets[3 * e + i])
    packed = PackedExperts.from_weights(gate_up[:, :shape.inter], gate_up[:, shape.inter:], down,
                                        use_onednn=use_onednn, gate_up=gate_up)
    # the shared expert as the engine's MoE block passes it (MoEBlock.bind_cpu_shared): plain weights, run
    # in the routed experts' native pass for one token, else added after them
    shared = [tuple(w.contiguous() for w in copy) for copy in make_shared(source, shape)]

    def call(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shared_copy: int) -> torch.Tensor:
        return moe_experts_packed(x, packed, ids, weights, shared=shared[shared_copy])

    return call, packed.onednn


def _packed_shared(source: WeightSource, shape: LayerShape) -> PackedExperts:
    shared = PackedExperts(shape.hidden, shape.shared_inter, shape.dtype)
    for copy in make_shared(source, shape):
        shared.append(*copy)
    return shared


def build_quantized(source: WeightSource, shape: LayerShape, kind: str) -> tuple[LayerCall, int, str]:
    """Routed experts quantised one at a time (no stacked bf16 copy) into a stacked quantised bank as the engine's
    load makes it (quant.empty_bank: gate and up fused, on huge pages unless --huge-pages off), read in place by
    ``QuantizedCpuExperts``;
    returns the call, the bytes of one quantised expert and the kernel used."""
    from engine.kernels import native
    from engine.kernels.moe import QuantizedCpuExperts
    from engine.placement import quant
    from engine.placement.quant import quantize

    fmt = kind.split("-")[0]  # int4-torch / int8-torch: on torch's kernel
    q, s, fused = quant.empty_bank(fmt, shape.experts, shape.inter, shape.hidden, "cpu", fuse_gate_up=True)
    offsets = expert_offsets(source, shape)
    mats = [torch.empty(shape.inter, shape.hidden, dtype=shape.dtype), torch.empty(shape.inter, shape.hidden, dtype=shape.dtype),
            torch.empty(shape.hidden, shape.inter, dtype=shape.dtype)]
    for e in range(shape.experts):
        for i, (proj, w) in enumerate(zip(quant.PROJECTIONS, mats)):
            source.fill(w, offsets[3 * e + i])
            quantize(w, fmt, out=(q[proj][e], s[proj][e]))
    nbytes = sum(q[p][0].nbytes + s[p][0].nbytes for p in quant.PROJECTIONS)
    packed = QuantizedCpuExperts.from_weights(*(q[p] for p in quant.PROJECTIONS), tuple(s[p] for p in quant.PROJECTIONS),
                                              shape.dtype, fmt, native_int4=kind != "int4-torch", fused=fused)
    # the shared expert as the engine's MoE block passes it (MoEBlock.bind_cpu_shared): plain weights, in the
    # routed experts' native pass (int8 / native int4 experts), else added after them (int4-torch)
    shared = [tuple(w.contiguous() for w in copy) for copy in make_shared(source, shape)]
    # -float: fp32 activations, -a8: int8 ones (where the kernels have them), else the engine's default
    activations = {"float": "float", "a8": "int8"}.get(kind.rsplit("-", 1)[-1])

    def call(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shared_copy: int) -> torch.Tensor:
        if activations is None:
            return moe_experts_packed(x, packed, ids, weights, shared=shared[shared_copy])
        before = native._activations_setting
        native.set_quantized_activations(activations)
        try:
            return moe_experts_packed(x, packed, ids, weights, shared=shared[shared_copy])
        finally:
            native.set_quantized_activations(before)

    if kind == "int8-torch":  # fp32 blocks back on torch's int8 kernel (the decode GEMVs stay native)
        for m in (*packed.gate_up, *packed.down):
            if hasattr(m, "native"):
                m.native = None
    table = packed.native_table()
    kernel = packed.kernel + (" + native decode" if table is not None else "")
    if table is not None:
        kernel += f", {native.activations_summary() if activations is None else activations + ' activations'}"
    return call, nbytes, kernel


KT_M_STEP = 64  # kt-kernel's buffers take token counts in multiples of its row tile
# kt-kernel's class per path, first one its build has (AMX / AVX-512 builds, then its AVX2 build, which has
# bf16, fp8 and raw int4 but no int8)
KT_METHODS = {"kt-bf16": (("AMXBF16_MOE", "AVX2BF16_MOE"), 2.0), "kt-int8": (("AMXInt8_MOE",), 1.0),
              "kt-int4": (("AMXInt4_MOE", "AVX2RawInt4_MOE"), 0.5)}


def build_kt(source: WeightSource, shape: LayerShape, path: str, threads: int, max_tokens: int) -> tuple[LayerCall, int, str]:
    """KTransformers' CPU MoE (kt-kernel) on the same weights: stacked bf16 source, quantised by kt-kernel
    while loading; driven through its C++ extension directly (its Python wrapper pins host memory,
    which needs CUDA). Returns the call, bytes per expert and the backend kt-kernel picked."""
    import kt_kernel  # noqa: F401  (selects the CPU variant and registers kt_kernel_ext)
    from kt_kernel import kt_kernel_ext as kt_ext
    import kt_kernel_ext.moe as kt_moe

    candidates, bytes_per_weight = KT_METHODS[path]
    method = next((name for name in candidates if hasattr(kt_moe, name)), None)
    if method is None:
        raise RuntimeError(f"this kt-kernel build ({kt_kernel.__file__}) has none of {', '.join(candidates)}")
    g, u, d = stacked_experts(source, shape, torch.bfloat16)
    pool_cfg = kt_ext.WorkerPoolConfig()
    pool_cfg.subpool_count, pool_cfg.subpool_numa_map, pool_cfg.subpool_thread_count = 1, [0], [threads]
    cpu = kt_ext.CPUInfer(pool_cfg)
    mask = torch.zeros(shape.experts, dtype=torch.bool)  # no expert on a GPU
    cfg = kt_moe.MOEConfig(shape.experts, shape.top_k, shape.hidden, shape.inter, mask.data_ptr())
    cfg.layer_idx, cfg.pool, cfg.max_len = 0, cpu.backend_, max_tokens
    cfg.gate_proj, cfg.up_proj, cfg.down_proj = g.data_ptr(), u.data_ptr(), d.data_ptr()
    cfg.save, cfg.load, cfg.path = False, False, ""
    moe = getattr(kt_moe, method)(cfg)
    expert_map = torch.arange(shape.experts, dtype=torch.long)
    cpu.submit(moe.load_weights_task(expert_map.data_ptr()))
    cpu.sync()
    shared = _packed_shared(source, shape)
    keep = (g, u, d, mask, cfg, cpu, moe, expert_map)  # kt keeps raw pointers: hold everything alive

    def call(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shared_copy: int) -> torch.Tensor:
        xb = x.to(torch.bfloat16).contiguous()
        ids_c, w_c = ids.contiguous(), weights.float().contiguous()
        out = torch.empty_like(xb)
        bsz = torch.tensor([x.shape[0]], dtype=torch.int32)
        keep[5].submit(keep[6].forward_task(bsz.data_ptr(), ids_c.shape[1], ids_c.data_ptr(), w_c.data_ptr(),
                                            xb.data_ptr(), out.data_ptr(), False))
        keep[5].sync()
        return out.to(x.dtype) + shared.forward_expert(x, shared_copy)

    nbytes = int(3 * shape.hidden * shape.inter * bytes_per_weight)
    return call, nbytes, method


def routing_weights(ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    raw = torch.rand(ids.shape, generator=gen) + 0.05
    return raw / raw.sum(-1, keepdim=True) * ROUTED_SCALING


def expert_flops(shape: LayerShape, tokens: int) -> float:
    return 2.0 * 3 * shape.hidden * (tokens * shape.top_k * shape.inter + tokens * shape.shared_inter)


def bench_decode(call: LayerCall, shape: LayerShape, bandwidth: float, seed: int,
                 expert_bytes: int | None = None, probe: BandwidthProbe | None = None) -> ModeResult:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, shape.hidden, generator=gen).to(shape.dtype)
    calls_per_pass = shape.experts // shape.top_k
    nbytes = shape.top_k * (expert_bytes or shape.expert_bytes) + shape.shared_bytes
    meter = ContentionMeter()
    pass_seconds: list[float] = []
    probes: list[float] = []
    step = 0
    for p in range(DECODE_WARMUP_PASSES + DECODE_TIMED_PASSES):
        timed = p >= DECODE_WARMUP_PASSES
        if timed and probe is not None:
            probes.append(probe())
        order = torch.randperm(shape.experts, generator=gen)
        elapsed = 0.0
        for c in range(calls_per_pass):
            ids = order[c * shape.top_k : (c + 1) * shape.top_k].view(1, -1)
            weights = routing_weights(ids, gen)
            start = time.perf_counter()
            call(x, ids, weights, step % SHARED_COPIES)
            elapsed += time.perf_counter() - start
            step += 1
        if timed:
            pass_seconds.append(elapsed / calls_per_pass)
    paired = None
    if probe is not None:
        probes.append(probe())
        paired = statistics.median(nbytes / s / 1e9 / max(probes[i], probes[i + 1]) for i, s in enumerate(pass_seconds))
    seconds = statistics.fmean(pass_seconds)
    gbs = nbytes / seconds / 1e9
    return ModeResult(seconds * 1e3, nbytes, gbs, gbs / bandwidth, expert_flops(shape, 1) / seconds / 1e9,
                      meter.other_load(), paired)


def bench_prefill(call: LayerCall, shape: LayerShape, tokens: int, bandwidth: float, seed: int,
                  expert_bytes: int | None = None) -> ModeResult:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, shape.hidden, generator=gen).to(shape.dtype)
    ids = torch.rand(tokens, shape.experts, generator=gen).topk(shape.top_k, dim=-1).indices
    weights = routing_weights(ids, gen)
    meter = ContentionMeter()
    times = []
    for i in range(PREFILL_WARMUP_CALLS + PREFILL_TIMED_CALLS):
        start = time.perf_counter()
        call(x, ids, weights, i % SHARED_COPIES)
        if i >= PREFILL_WARMUP_CALLS:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    nbytes = int(ids.unique().numel()) * (expert_bytes or shape.expert_bytes) + shape.shared_bytes
    gbs = nbytes / seconds / 1e9
    return ModeResult(seconds * 1e3, nbytes, gbs, gbs / bandwidth, expert_flops(shape, tokens) / seconds / 1e9, meter.other_load())


def _fraction(value: object) -> str:
    return "-" if value is None else f"{float(value):.2f}"  # type: ignore[arg-type]


def _flag(other_load: float) -> str:
    return "  <- CONTENDED: other processes were running" if other_load > CONTENTION_WARNING else ""


def build_path(path: str, shape: LayerShape, args: argparse.Namespace
               ) -> tuple[LayerCall, int | None, dict[str, object]] | None:
    """One path's layer: (call, bytes per expert where not the dtype's, details); None when it is skipped here."""
    source = WeightSource(shape, args.seed)
    info: dict[str, object] = {}
    nbytes = None
    if path == "plain":
        call = build_plain(source, shape)
    elif path.startswith("packed"):
        if path == "packed-onednn" and not onednn_packing_available(shape.dtype):
            print(f"{path}: skipped, this torch build cannot pre-pack {shape.dtype} for oneDNN", file=sys.stderr)
            return None
        force = {"packed": None, "packed-native": False, "packed-onednn": True}[path]
        call, onednn = build_packed(source, shape, force)
        info["onednn_prepacked"] = onednn
    elif path.split("-")[0] in ("int8", "int4"):
        call, nbytes, kernel = build_quantized(source, shape, path)
        info["kernel"] = kernel
    else:
        try:
            call, nbytes, kernel = build_kt(source, shape, path, torch.get_num_threads(),
                                            -(-max(args.prefill_tokens, 1) // KT_M_STEP) * KT_M_STEP)
        except ImportError as e:
            print(f"{path}: skipped, kt-kernel is not installed ({e})", file=sys.stderr)
            return None
        info["kernel"] = kernel
    return call, nbytes, info


def huge_page_ab(paths: tuple[str, ...], shape: LayerShape, bandwidth: float, args: argparse.Namespace) -> None:
    """Decode of each path with its weights on huge pages and on 4 KiB pages: both layers built, then their
    measurements interleaved (order alternating) ``--repeats`` times; min / median ms per call and the ratio."""
    status = huge_pages.status()
    print(f"huge pages: {status.reason}")
    if not status.applies:
        print("huge-page A/B skipped: both layers would be on 4 KiB pages")
        return
    # cpu ms: this process's CPU time per call (all passes), the per-core cost whatever else runs (with --threads 1)
    print(f"{'path':<11} {'pages':<6} {'min ms':>8} {'median ms':>10} {'min cpu ms':>11} {'roofline':>9} {'huge MB':>8} "
          f"{'max other load':>15}")
    for path in paths:
        layers: dict[str, tuple[LayerCall, int | None]] = {}
        huge_mb: dict[str, float] = {}
        for pages in ("huge", "4k"):
            huge_pages.set_enabled(pages == "huge")
            before = huge_pages.anon_huge_page_bytes() or 0
            built = build_path(path, shape, args)
            if built is None:
                break
            layers[pages] = built[:2]
            huge_mb[pages] = ((huge_pages.anon_huge_page_bytes() or 0) - before) / 1e6
        huge_pages.set_enabled(None)
        if len(layers) < 2:
            continue
        runs: dict[str, list[ModeResult]] = {"huge": [], "4k": []}
        cpu_ms: dict[str, list[float]] = {"huge": [], "4k": []}
        calls = (DECODE_WARMUP_PASSES + DECODE_TIMED_PASSES) * (shape.experts // shape.top_k)
        for rep in range(args.repeats):
            for pages in (("huge", "4k") if rep % 2 == 0 else ("4k", "huge")):
                call, nbytes = layers[pages]
                start = time.process_time()
                runs[pages].append(bench_decode(call, shape, bandwidth, args.seed + 1 + rep, nbytes))
                cpu_ms[pages].append((time.process_time() - start) / calls * 1e3)
        wall = {pages: [r.ms_per_call for r in results] for pages, results in runs.items()}
        for pages, results in runs.items():
            best = min(results, key=lambda r: r.ms_per_call)
            print(f"{path:<11} {pages:<6} {min(wall[pages]):>8.3f} {statistics.median(wall[pages]):>10.3f} "
                  f"{min(cpu_ms[pages]):>11.3f} {best.roofline_fraction:>9.2f} {huge_mb[pages]:>8.0f} "
                  f"{max(r.other_cpu_load for r in results):>15.2f}")
        ratios = {name: (f(times["4k"]) / f(times["huge"])) for times, kind in ((wall, "wall"), (cpu_ms, "cpu"))
                  for name, f in ((f"{kind} min", min), (f"{kind} median", statistics.median))}
        print(f"{path:<11} 4k/huge time ratio: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
              + " (>1: huge pages faster)")
        del layers
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=1024, help="routed expert intermediate size")
    parser.add_argument("--shared-inter", type=int, default=1024, help="shared expert intermediate size")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--path", default="both",
                        help="comma-separated paths: plain, packed, packed-native, packed-onednn, int8, int8-a8, int8-float, int8-torch, int4, int4-a8, int4-float, int4-torch, "
                             "kt-bf16, kt-int8, kt-int4 "
                             "(default 'both' = plain,packed; 'all' = every path)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cpu-isa", choices=("native", *native.EMULATED_ISAS), default="native",
                        help="the native kernels as built for this CPU (default) or as an older CPU builds them "
                             "(AVX2, AVX2 + AVX-VNNI, AVX-512 without VNNI), run on this one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--huge-pages", choices=("on", "off", "both"), default="on",
                        help="expert weights on transparent huge pages where the kernel gives them (on, the engine's "
                             "default), on 4 KiB pages (off), or both: decode only, the two layers measured "
                             "interleaved --repeats times (min / median and their ratio)")
    parser.add_argument("--repeats", type=int, default=5, help="--huge-pages both: measurements per layer")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cpu_isa != "native":  # before the kernels first load
        os.environ[native.ISA_ENV] = args.cpu_isa
        native.reset()
    shape = LayerShape(args.experts, args.hidden, args.inter, args.shared_inter, args.top_k, DTYPES[args.dtype])
    if shape.experts < shape.top_k:
        parser.error("--experts must be >= --top-k")

    meter = ContentionMeter()
    bandwidth = measure_bandwidth()
    gemm_gflops = measure_gemm_gflops(shape.dtype)
    baseline_other_load = meter.other_load()
    gc.collect()

    results: dict[str, dict[str, object]] = {}
    known = ("plain", "packed", "packed-native", "packed-onednn", "int8", "int8-a8", "int8-float", "int8-torch", "int4",
             "int4-a8", "int4-float", "int4-torch", *KT_METHODS)
    paths = {"both": ("plain", "packed"), "all": known}.get(args.path) or tuple(args.path.split(","))
    unknown = [p for p in paths if p not in known]
    if unknown:
        parser.error(f"unknown path(s) {unknown}: choose from {list(known)}")
    if args.huge_pages == "both":
        huge_page_ab(paths, shape, bandwidth, args)
        return
    huge_pages.set_enabled(args.huge_pages == "on")
    probe = BandwidthProbe()
    for path in paths:
        built = build_path(path, shape, args)
        if built is None:
            continue
        call, nbytes, info = built
        decode = bench_decode(call, shape, bandwidth, args.seed + 1, nbytes, probe)
        results[path] = {"decode": asdict(decode), **info}
        if args.prefill_tokens > 0:  # 0: decode only
            results[path]["prefill"] = asdict(bench_prefill(call, shape, args.prefill_tokens, bandwidth, args.seed + 2,
                                                             nbytes))
        del call, built
        gc.collect()
    del probe

    modes = ("decode", "prefill") if args.prefill_tokens > 0 else ("decode",)
    meter = ContentionMeter()
    bandwidth_end = measure_bandwidth()
    if bandwidth_end > bandwidth:
        bandwidth = bandwidth_end
        baseline_other_load = meter.other_load()
        for res in results.values():
            for mode in modes:
                r = res[mode]
                assert isinstance(r, dict)
                r["roofline_fraction"] = float(r["achieved_gbs"]) / bandwidth

    headline_path = next((p for p in ("packed", "packed-native", "packed-onednn", "plain") if p in results),
                         next(iter(results)))
    head = results[headline_path]
    decode_r = head["decode"]
    prefill_r = head.get("prefill") or {k: None for k in ("roofline_fraction", "ms_per_call", "weight_bytes",
                                                           "achieved_gbs", "gflops")}
    assert isinstance(decode_r, dict) and isinstance(prefill_r, dict)
    summary = {
        "path": headline_path,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "experts": shape.experts,
        "hidden": shape.hidden,
        "inter": shape.inter,
        "top_k": shape.top_k,
        "prefill_tokens": args.prefill_tokens,
        "bandwidth_gbs": bandwidth,
        "bandwidth_other_cpu_load": baseline_other_load,
        "gemm_peak_gflops": gemm_gflops,
        "roofline_fraction_decode": decode_r["roofline_fraction"],
        "paired_roofline_decode": decode_r["paired_roofline"],
        "roofline_fraction_prefill": prefill_r["roofline_fraction"],
        "decode_ms": decode_r["ms_per_call"],
        "prefill_ms": prefill_r["ms_per_call"],
        "decode_weight_bytes": decode_r["weight_bytes"],
        "prefill_weight_bytes": prefill_r["weight_bytes"],
        "decode_gbs": decode_r["achieved_gbs"],
        "prefill_gbs": prefill_r["achieved_gbs"],
        "prefill_gflops": prefill_r["gflops"],
        "prefill_compute_fraction": (None if prefill_r["gflops"] is None
                                     else float(prefill_r["gflops"]) / gemm_gflops),  # type: ignore[arg-type]
        "paths": results,
    }
    if args.json:
        print(json.dumps(summary))
        return

    print(
        f"MoE layer on CPU: {shape.experts} experts x (H={shape.hidden}, I={shape.inter}), top-{shape.top_k} + shared "
        f"(I={shape.shared_inter}), {args.dtype}, {torch.get_num_threads()} threads"
    )
    print(
        f"measured read bandwidth: {bandwidth:.1f} GB/s; dense GEMM {GEMM_SHAPE}: {gemm_gflops:.0f} GFLOP/s "
        f"(other processes' CPU load meanwhile: {baseline_other_load:.2f}){_flag(baseline_other_load)}"
    )
    header = f"{'path':<11} {'mode':<8} {'ms/call':>9} {'weight MB':>10} {'GB/s':>7} {'roofline':>9} {'paired':>7} {'GFLOP/s':>8} {'other load':>11}"
    print(header)
    print("-" * len(header))
    for path, res in results.items():
        for mode in modes:
            r = res[mode]
            assert isinstance(r, dict)
            print(
                f"{path:<11} {mode:<8} {r['ms_per_call']:>9.2f} {r['weight_bytes'] / 1e6:>10.1f} "
                f"{r['achieved_gbs']:>7.1f} {r['roofline_fraction']:>9.2f} {_fraction(r.get('paired_roofline')):>7} "
                f"{r['gflops']:>8.1f} "
                f"{r['other_cpu_load']:>11.2f}{_flag(float(r['other_cpu_load']))}"  # type: ignore[arg-type]
            )
    if any(p.startswith("packed") for p in results):
        print(f"native decode kernel: {native.status()}")
    for path, res in results.items():
        if path.startswith("packed"):
            print(f"{path} path uses oneDNN prepacked weights: {res.get('onednn_prepacked')}")
    for path, res in results.items():
        if "kernel" in res:
            print(f"{path} path kernel: {res['kernel']}")
    prefill_line = ("" if "prefill" not in modes else
                    f", prefill {summary['roofline_fraction_prefill']:.2f} (prefill at "
                    f"{summary['prefill_compute_fraction']:.2f} of the dense GEMM rate)")
    print(f"headline ({headline_path}): roofline_fraction decode {summary['roofline_fraction_decode']:.2f} "
          f"(paired {_fraction(summary['paired_roofline_decode'])}){prefill_line}")


if __name__ == "__main__":
    main()
