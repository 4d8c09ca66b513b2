"""Routed-expert computation of the BailingMoeV2 MoE block (spec §2.6), without router and shared expert.

For each token t and each selected expert j: ``e_j = down_j(silu(gate_j(x_t)) * up_j(x_t))`` computed in
the activation dtype; ``out_t = sum_j e_j.float() * w_j`` summed in fp32, then cast to x's dtype.

CPU paths (torch):

* :func:`moe_experts_reference` takes stacked ``[E, I, H]`` / ``[E, H, I]`` weights. Assignments are
  sorted by expert and each expert that received tokens runs one GEMM over its token block; the
  weighted results are combined with ``index_add_`` in fp32.
* :func:`moe_experts_packed` runs the same algorithm on :class:`PackedExperts`: gate and up are
  concatenated into one ``[2I, H]`` matrix per expert and, where oneDNN is available, every expert
  matrix is reordered once into oneDNN's blocked layout. On a 2-core AVX-512 machine that lifts the
  bf16 one-token GEMV from ~13 GB/s to ~20 GB/s of weight reads (the plain layout makes oneDNN
  re-pack the weight on every call), and is also the faster choice for prefill blocks.

* :func:`moe_experts_dequant_reference` runs quantised stacked weights (formats of
  :mod:`engine.kernels.dequant`): each active expert is dequantised to the activation dtype just
  before its GEMM block (the reference of the fused quantised kernels).
* :class:`QuantizedCpuExperts`: quantised experts prepared for the CPU. int8 (per-channel) runs
  torch's int8 weight-only GEMM (``_weight_int8pack_mm``), int4 torch's group-wise int4 kernel
  (``_weight_int4pack_mm_for_cpu``, weights converted once to its layout); both read the quantised
  bytes only. fp8 has no CPU kernel: fp8 experts are re-quantised to int8 per row once (adding at
  most amax/254 per row; dequantising on every call would be ~100x slower). Shapes a kernel does not
  take are dequantised per call into a reused buffer.

The Triton path (CUDA) lives in ``engine.kernels.triton_impl.moe`` and is picked by :func:`moe_experts`;
with ``scales`` it dequantises each weight tile inside the kernel.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from . import native
from .dequant import dequantize, matrix_in_features, quantize_int8_rows, scale_layout, unpack_int4
from .dispatch import Impl, prefer_sync_free, use_triton

Scales = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
QUANTIZED_STORAGE_DTYPES = (torch.float8_e4m3fn, torch.int8, torch.uint8)


def check_moe_args(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> None:
    """Raise ValueError unless the arguments of :func:`moe_experts` have consistent shapes and dtypes."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H]; got {tuple(x.shape)}")
    num_tokens, hidden = x.shape
    if w_gate.dim() != 3 or w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate/w_up must both be [E, I, H]; got {tuple(w_gate.shape)}, {tuple(w_up.shape)}")
    num_experts, inter, w_hidden = w_gate.shape
    if w_hidden != hidden or w_down.shape != (num_experts, hidden, inter):
        raise ValueError(
            f"inconsistent expert shapes: x {tuple(x.shape)}, w_gate {tuple(w_gate.shape)}, w_down {tuple(w_down.shape)}"
        )
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise ValueError(f"{name} dtype {w.dtype} differs from x dtype {x.dtype}")
    check_routing(topk_ids, topk_weights, num_tokens)


def check_routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int) -> None:
    """Raise ValueError unless topk_ids (int64) and topk_weights (fp32) are both [T, k]."""
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.shape != topk_weights.shape:
        raise ValueError(f"topk_ids/topk_weights must be [T={num_tokens}, k]; got {tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}")
    if topk_ids.dtype != torch.int64:
        raise ValueError(f"topk_ids must be int64; got {topk_ids.dtype}")
    if topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_weights must be float32; got {topk_weights.dtype}")


@dataclass(frozen=True)
class ExpertGroups:
    """Token assignments sorted by expert: ``token_index[start:end]`` are the tokens of one expert."""

    token_index: torch.Tensor  # [T*k] int64 token of each assignment, grouped by expert
    weights: torch.Tensor  # [T*k] fp32 routing weight of each assignment, same order
    experts: list[int]  # experts that received at least one token, ascending
    offsets: list[int]  # len(experts) + 1 boundaries into token_index


def group_by_expert(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                    host_ids: list[int] | None = None) -> ExpertGroups:
    """Sort the (token, slot) assignments by expert id (stable) and list the non-empty experts.

    `host_ids`: topk_ids flattened, already read on the host by the caller: the experts and their
    boundaries are counted from them, and the device is not read again (without it: a bincount, a
    nonzero and two reads back, each a host sync on a GPU)."""
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    if host_ids is None:
        counts = torch.bincount(flat_ids, minlength=num_experts)
        active = torch.nonzero(counts).flatten()
        experts = active.tolist()
        offsets = [0] + torch.cumsum(counts[active], 0).tolist()
    else:
        sizes = Counter(host_ids)
        experts = sorted(sizes)
        if experts and not (0 <= experts[0] and experts[-1] < num_experts):
            raise ValueError(f"expert ids must be in [0, {num_experts}); got {experts[0]}..{experts[-1]}")
        offsets = list(accumulate((sizes[e] for e in experts), initial=0))
    return ExpertGroups(
        token_index=order // top_k,
        weights=topk_weights.reshape(-1)[order],
        experts=experts,
        offsets=offsets,
    )


# bf16 GEMMs of at least this many rows run in fp32 on a CPU without native bf16 (no avx512_bf16 / AMX),
# where torch emulates bf16 matmuls. One SwiGLU expert [rows, 4096] x 1024 on an AVX2 EPYC, 2 threads,
# emulated bf16 vs both operands upcast: 8 rows 0.63x (the weight's conversion dominates), 16 rows
# 1.18x, 24 rows 1.6x, 32 rows 1.9x, 64 rows 3.0x. Decode (one row) stays in bf16, a GEMV reading half
# the bytes. The products are summed in fp32 either way; only the order differs.
BF16_UPCAST_MIN_ROWS = 24


def emulates_bf16(weight: torch.Tensor) -> bool:
    """True for a bf16 CPU weight on a CPU whose bf16 matmuls are emulated (no native bf16 instructions)."""
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not onednn_packing_available(torch.bfloat16)


def cpu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` on the CPU: up to native.MAX_ROWS rows (decode) by the native GEMV where it
    is built (:mod:`engine.kernels.native`); a bf16 GEMM of at least BF16_UPCAST_MIN_ROWS rows on a CPU
    that emulates bf16 in fp32 (result in x's dtype); else torch's."""
    if native.linear_applies(x, weight):
        return native.linear(x, weight)
    if x.numel() >= BF16_UPCAST_MIN_ROWS * x.shape[-1] and emulates_bf16(weight):
        return F.linear(x.float(), weight.float()).to(x.dtype)
    return F.linear(x, weight)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with [I, H] / [I, H] / [H, I] weights, in x's dtype."""
    return cpu_linear(F.silu(cpu_linear(x, w_gate)) * cpu_linear(x, w_up), w_down)


def moe_experts_reference(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Torch reference (and plain-weight CPU path) of :func:`moe_experts`: one GEMM block per active expert."""
    check_moe_args(x, w_gate, w_up, w_down, topk_ids, topk_weights)
    if x.shape[0] == 1 and prefer_sync_free(x):
        return moe_one_token_sync_free(x, w_gate, w_up, w_down, topk_ids, topk_weights)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if x.shape[0] == 1:
        # Decode fast path on the CPU: one token, its k experts in ascending order (the same sums as
        # below) without the sort/bincount of the grouping; reads the k ids on the host.
        ids = topk_ids[0].tolist()
        for slot in sorted(range(len(ids)), key=ids.__getitem__):
            e = ids[slot]
            out += swiglu(x, w_gate[e], w_up[e], w_down[e]).float() * topk_weights[0, slot]
        return out.to(x.dtype)
    groups = group_by_expert(topk_ids, topk_weights, w_gate.shape[0])
    for i, expert in enumerate(groups.experts):
        start, end = groups.offsets[i], groups.offsets[i + 1]
        tokens = groups.token_index[start:end]
        y = swiglu(x.index_select(0, tokens), w_gate[expert], w_up[expert], w_down[expert])
        out.index_add_(0, tokens, y.float() * groups.weights[start:end, None])
    return out.to(x.dtype)


def moe_one_token_sync_free(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """One token [1, H] without reading its expert ids on the host: the k experts' weights are gathered
    on the device (in ascending expert order, as the reference sums) and run as batched GEMVs. Reads
    each expert's weights twice (gather, then GEMV), so it is the torch fallback for accelerators, not
    the CPU's choice."""
    top_k = topk_ids.shape[1]
    ids, order = topk_ids[0].sort()
    weights = topk_weights[0].gather(0, order)
    xk = x.expand(top_k, -1).unsqueeze(1)  # [k, 1, H]
    gate = torch.bmm(xk, w_gate.index_select(0, ids).transpose(1, 2))
    up = torch.bmm(xk, w_up.index_select(0, ids).transpose(1, 2))
    y = torch.bmm(F.silu(gate) * up, w_down.index_select(0, ids).transpose(1, 2)).squeeze(1)  # [k, H]
    return (y.float() * weights[:, None]).sum(dim=0, keepdim=True).to(x.dtype)


def moe_experts(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    impl: Impl = "auto",
    scales: Scales | None = None,
) -> torch.Tensor:
    """Weighted sum of the selected experts' SwiGLU outputs per token: [T, H] in x's dtype.

    x [T, H]; w_gate, w_up [E, I, H]; w_down [E, H, I]; topk_ids [T, k] int64; topk_weights [T, k] fp32.
    ``scales`` (gate, up, down): the weights are quantised (engine.kernels.dequant formats) and are
    dequantised to x's dtype inside the kernel (Triton) or one expert at a time (torch).
    ``shared``: a shared expert's (gate [I, H], up [I, H], down [H, I]) whose output is added to every
    token (the Triton path computes it in the same pass; the torch path adds it after, as the reference).
    """
    if scales is not None:
        check_quantized_moe_args(x, w_gate, w_up, w_down, scales, topk_ids, topk_weights)
        if use_triton(impl, x, w_gate, w_up, w_down, *scales, topk_ids, topk_weights):
            from .triton_impl.moe import moe_experts_triton

            out = moe_experts_triton(x, w_gate, w_up, w_down, topk_ids, topk_weights, scales=scales)
        else:
            out = moe_experts_dequant_reference(x, w_gate, w_up, w_down, scales, topk_ids, topk_weights)
        return out if shared is None else out + swiglu(x, *shared)  # (the fused pass folds plain weights only)
    if use_triton(impl, x, w_gate, w_up, w_down, topk_ids, topk_weights):
        from .triton_impl.moe import moe_experts_triton

        return moe_experts_triton(x, w_gate, w_up, w_down, topk_ids, topk_weights, shared=shared)
    out = moe_experts_reference(x, w_gate, w_up, w_down, topk_ids, topk_weights)
    return out if shared is None else out + swiglu(x, *shared)


def check_quantized_moe_args(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                             scales: Scales, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """Raise ValueError unless quantised stacked weights, their scales and the routing are consistent."""
    if x.dim() != 2 or w_gate.dim() != 3 or w_gate.shape != w_up.shape or w_down.dim() != 3:
        raise ValueError(f"inconsistent shapes: x {tuple(x.shape)}, w_gate {tuple(w_gate.shape)}, "
                         f"w_down {tuple(w_down.shape)}")
    num_experts, inter = w_gate.shape[:2]
    if matrix_in_features(w_gate) != x.shape[1] or w_down.shape[:2] != (num_experts, x.shape[1]) \
            or matrix_in_features(w_down) != inter:
        raise ValueError(f"inconsistent expert shapes: x {tuple(x.shape)}, w_gate {tuple(w_gate.shape)} "
                         f"({w_gate.dtype}), w_down {tuple(w_down.shape)}")
    if len(scales) != 3:
        raise ValueError("scales must be (gate, up, down)")
    for name, w, s in (("gate", w_gate, scales[0]), ("up", w_up, scales[1]), ("down", w_down, scales[2])):
        if w.dtype not in QUANTIZED_STORAGE_DTYPES:
            raise ValueError(f"w_{name} dtype {w.dtype} is not a quantised storage dtype")
        if s.dtype != torch.float32 or s.shape[0] != num_experts:
            raise ValueError(f"{name} scales must be fp32 with one entry per expert; got {s.dtype} {tuple(s.shape)}")
        scale_layout(w, s)  # raises on a shape that matches no format
    check_routing(topk_ids, topk_weights, x.shape[0])


def moe_experts_dequant_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                                  scales: Scales, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`moe_experts` on quantised stacked weights: each active expert's three
    matrices are dequantised to x's dtype just before its GEMM block; the combine is fp32."""
    check_quantized_moe_args(x, w_gate, w_up, w_down, scales, topk_ids, topk_weights)
    s_gate, s_up, s_down = scales
    groups = group_by_expert(topk_ids, topk_weights, w_gate.shape[0])
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for i, e in enumerate(groups.experts):
        start, end = groups.offsets[i], groups.offsets[i + 1]
        tokens = groups.token_index[start:end]
        y = swiglu(x.index_select(0, tokens), dequantize(w_gate[e], s_gate[e], x.dtype),
                   dequantize(w_up[e], s_up[e], x.dtype), dequantize(w_down[e], s_down[e], x.dtype))
        out.index_add_(0, tokens, y.float() * groups.weights[start:end, None])
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Pre-packed CPU expert weights
# ---------------------------------------------------------------------------------------------

_ONEDNN_PACK_BATCH_HINT = 1  # pack for the one-token GEMV (decode); larger blocks still run well


def onednn_packing_available(dtype: torch.dtype) -> bool:
    """True when this torch build can pre-pack linear weights of ``dtype`` for oneDNN on CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return bool(ops._is_mkldnn_bf16_supported())
    return dtype == torch.float32


# Without the native kernels: fp32 matrices smaller than this run faster through torch's plain GEMV than
# through oneDNN's pre-packed one, whose fixed cost per call dominates (measured on an AMD EPYC, 1 and 2
# threads: crossover between 1 and 4 MiB with the weights in cache; bf16 packing wins at every size).
# Larger ones read 1.2-3x faster.
ONEDNN_FP32_MIN_BYTES = 2 << 20


def onednn_packing_pays(weight: torch.Tensor) -> bool:
    """True when pre-packing this [out, in] CPU weight for oneDNN makes it faster. Never where the native
    decode kernels are built: they read the plain layout at or above oneDNN's packed rate (fp32 on an
    AVX2 EPYC, bench/cpu_gemv.py; bf16 on an avx512_bf16 Xeon: one MoE layer's decode 0.95 of the memory
    roofline plain vs 0.63 pre-packed, bench/moe_layer_cpu.py --path packed-native,packed-onednn), and
    torch's GEMMs run prefill on the plain layout within a few per cent of the packed one at 128+ rows.
    Without them: bf16 (where the CPU has native bf16) always; fp32 from ONEDNN_FP32_MIN_BYTES."""
    if not onednn_packing_available(weight.dtype) or native.available():
        return False
    if weight.dtype != torch.float32:
        return True
    return weight.numel() * weight.element_size() >= ONEDNN_FP32_MIN_BYTES


def native_decode_applies(weight: torch.Tensor) -> bool:
    """True when the native decode kernels run this plain-layout CPU weight: a linear's [out, in] matrix
    (native.binds: large enough to gain), or a stacked [E, ., .] expert bank (one native call per token's
    experts, whatever their size)."""
    if weight.dim() == 3:
        return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and native.available()
    return native.binds(weight)


def _pack_matrix(weight: torch.Tensor, use_onednn: bool) -> torch.Tensor:
    """One [out, in] linear weight in the layout :func:`_packed_linear` expects."""
    weight = weight.contiguous()
    if use_onednn:
        return torch.ops.mkldnn._reorder_linear_weight(weight, _ONEDNN_PACK_BATCH_HINT)
    return weight


def _packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a weight produced by :func:`_pack_matrix` (x must be 2-D)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")
    return cpu_linear(x, weight)


class PackedLinear(torch.nn.Module):
    """Drop-in for an ``nn.Linear`` whose weight was prepared once for the CPU: kept plain and bound to
    the native decode GEMV (:func:`native.bind_linear`; larger blocks through :func:`cpu_linear`),
    pre-packed for oneDNN (see :func:`_pack_matrix`), or with ``int8=True`` quantised to int8 with one fp32 scale per output
    channel (``dequant.quantize_int8_rows``) and run by torch's int8 weight-only kernel (half the bytes
    of bf16; activations stay in the weight's dtype), its decode GEMVs by the native kernel where bound.

    Built from an ``nn.Linear`` (see :func:`pack_linears`); keeps ``weight`` (and ``bias``) as meta placeholders of the
    original shapes so module names, shapes and parameter counts stay those of the checkpoint.
    """

    def __init__(self, linear: torch.nn.Linear, int8: bool = False) -> None:
        weight = linear.weight.detach()
        if int8:
            q, scale = quantize_int8_rows(weight)
            self._setup(weight.shape, weight.dtype, linear.bias, int8=(q, scale))
        else:
            self._setup(weight.shape, weight.dtype, linear.bias, packed=_pack_matrix(weight, onednn_packing_pays(weight)))

    @classmethod
    def from_int8(cls, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                  bias: torch.Tensor | None = None) -> "PackedLinear":
        """From weights already quantised as ``quantize_int8_rows`` does (q int8 [out, in], scale fp32 [out]),
        e.g. a block of rows at a time while they are read (engine.models.thinker.model): the same module as
        ``PackedLinear(linear, int8=True)`` of a linear in `dtype`."""
        module = cls.__new__(cls)
        module._setup(q.shape, dtype, bias, int8=(q, scale))
        return module

    def _setup(self, shape, dtype: torch.dtype, bias, *, packed=None, int8=None) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        if int8 is not None:
            q, scale = int8
            packed = (_Int8Matrix(q, scale, dtype) if int8_cpu_kernel_available()
                      and self.in_features % INT8_CPU_COLUMN_MULTIPLE == 0 else _DequantMatrix(q, scale, dtype, _Buffers()))
        self.packed = packed
        # decode GEMVs of a plain fp32/bf16 weight, or of an int8 one with its scales: the native kernel, bound
        # once (None where it does not apply)
        if isinstance(self.packed, torch.Tensor):
            self.native = native.bind_linear(self.packed)
        elif isinstance(self.packed, _Int8Matrix):
            self.native = native.bind_linear(self.packed.q, scale=self.packed.scale)
        else:
            self.native = None
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        self.weight = torch.nn.Parameter(torch.empty(tuple(shape), dtype=dtype, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            y = self.native(x)
            if y is not None:
                return y if self.bias is None else y + self.bias
        flat = x.reshape(-1, self.in_features)
        y = self.packed(flat) if callable(self.packed) else _packed_linear(flat, self.packed)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def pack_linears(module: torch.nn.Module, int8: bool = False) -> int:
    """Replace every ``nn.Linear`` under ``module`` by a :class:`PackedLinear` (int8, pre-packed where
    :func:`onednn_packing_pays`, or plain run by :func:`cpu_linear`: the native decode GEMV, and fp32
    prefill GEMMs where the CPU emulates bf16); returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear) and (int8 or onednn_packing_pays(child.weight)
                                                   or emulates_bf16(child.weight)
                                                   or native_decode_applies(child.weight)):
            setattr(module, name, PackedLinear(child, int8))
            count += 1
        else:
            count += pack_linears(child, int8)
    return count


class PackedExperts:
    """SwiGLU expert weights prepared once for fast CPU inference.

    Per expert: gate and up concatenated into one ``[2I, H]`` matrix and down ``[H, I]``, each reordered
    into oneDNN's blocked layout when this build supports it (``onednn`` tells which). The packed copy
    replaces the plain weights: drop those after packing to keep memory flat. Also usable for the
    shared expert (a single-expert pack) through :meth:`forward_expert`.
    """

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, *, use_onednn: bool | None = None) -> None:
        self.hidden = hidden
        self.intermediate = intermediate
        self.dtype = dtype
        if use_onednn is None:  # as pack_linears decides for a matrix of an expert's size
            use_onednn = onednn_packing_pays(torch.empty((hidden, intermediate), dtype=dtype, device="meta"))
        self.onednn = use_onednn
        self.gate_up: list[torch.Tensor] = []
        self.down: list[torch.Tensor] = []
        self._native_table: native.ExpertTable | None = None

    @property
    def num_experts(self) -> int:
        return len(self.gate_up)

    def append(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
               w_gate_up: torch.Tensor | None = None) -> None:
        """Pack one expert: w_gate, w_up [I, H]; w_down [H, I]. `w_gate_up` [2I, H], when the caller has gate and
        up fused already (w_gate and w_up its halves): packed as it is, no concatenated copy."""
        expected_in = (self.intermediate, self.hidden)
        if w_gate.shape != expected_in or w_up.shape != expected_in or w_down.shape != expected_in[::-1]:
            raise ValueError(f"expert shapes {tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)} do not match I={self.intermediate}, H={self.hidden}")
        if not (w_gate.dtype == w_up.dtype == w_down.dtype == self.dtype):
            raise ValueError(f"expert weights must all be {self.dtype}")
        if w_gate_up is None:
            w_gate_up = torch.cat((w_gate, w_up), dim=0)
        elif not (w_gate_up.is_contiguous() and w_gate_up.shape == (2 * self.intermediate, self.hidden)
                  and w_gate.data_ptr() == w_gate_up.data_ptr()
                  and w_up.data_ptr() == w_gate_up[self.intermediate:].data_ptr()):
            raise ValueError("w_gate_up must be a contiguous [2I, H] matrix whose halves are w_gate and w_up")
        self.gate_up.append(_pack_matrix(w_gate_up, self.onednn))
        self.down.append(_pack_matrix(w_down, self.onednn))
        self._native_table = None

    def native_table(self) -> native.ExpertTable | None:
        """The experts' data pointers for native.moe_decode (plain layout only; built on first use)."""
        if self.onednn or not self.gate_up or self.dtype not in (torch.float32, torch.bfloat16):
            return None
        if self._native_table is None:
            self._native_table = native.ExpertTable.fused(self.gate_up, self.down)
        return self._native_table

    @classmethod
    def from_weights(
        cls, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *, use_onednn: bool | None = None,
        gate_up: torch.Tensor | None = None,
    ) -> PackedExperts:
        """Pack stacked weights: w_gate, w_up [E, I, H]; w_down [E, H, I]; `gate_up` [E, 2I, H] when w_gate and
        w_up are its halves (then read in place: no second copy of the layer's gate and up weights)."""
        num_experts, inter, hidden = w_gate.shape
        packed = cls(hidden, inter, w_gate.dtype, use_onednn=use_onednn)
        for expert in range(num_experts):
            packed.append(w_gate[expert], w_up[expert], w_down[expert],
                          None if gate_up is None else gate_up[expert])
        return packed

    def forward_expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """SwiGLU of expert ``expert`` on x [M, H] -> [M, H] in x's dtype."""
        gate_up = _packed_linear(x, self.gate_up[expert])
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return _packed_linear(F.silu(gate) * up, self.down[expert])


def moe_experts_packed(
    x: torch.Tensor, packed: "PackedExperts | QuantizedCpuExperts", topk_ids: torch.Tensor, topk_weights: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`moe_experts` on CPU with :class:`PackedExperts` or :class:`QuantizedCpuExperts` weights (same
    semantics, faster; one token's experts in one native call where their table is built). With
    ``shared`` (a shared expert's plain gate, up [I_s, H] and down [H, I_s] weights): ``routed.to(x.dtype)
    + swiglu(x, *shared)``, for one token in the same native pass as the routed experts."""
    if x.dim() != 2 or x.shape[1] != packed.hidden:
        raise ValueError(f"x must be [T, {packed.hidden}]; got {tuple(x.shape)}")
    if x.dtype != packed.dtype:
        raise ValueError(f"x dtype {x.dtype} differs from packed weights dtype {packed.dtype}")
    check_routing(topk_ids, topk_weights, x.shape[0])
    if x.shape[0] == 1:  # decode: all the token's experts in one native call
        table = packed.native_table()
        if native.moe_applies(table, x, topk_ids):
            if shared is None or table.shared_fits(shared[0].dtype):
                return native.moe_decode(x, table, topk_ids, topk_weights, shared).to(x.dtype)
            return native.moe_decode(x, table, topk_ids, topk_weights).to(x.dtype) + swiglu(x, *shared)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if x.shape[0] == 1:  # decode fast path, same sums as below (see moe_experts_reference)
        ids = topk_ids[0].tolist()
        for slot in sorted(range(len(ids)), key=ids.__getitem__):
            out += packed.forward_expert(x, ids[slot]).float() * topk_weights[0, slot]
    else:
        groups = group_by_expert(topk_ids, topk_weights, packed.num_experts)
        for i, expert in enumerate(groups.experts):
            start, end = groups.offsets[i], groups.offsets[i + 1]
            tokens = groups.token_index[start:end]
            y = packed.forward_expert(x.index_select(0, tokens), expert)
            out.index_add_(0, tokens, y.float() * groups.weights[start:end, None])
    return out.to(x.dtype) if shared is None else out.to(x.dtype) + swiglu(x, *shared)


# ---------------------------------------------------------------------------------------------
# Quantised CPU expert weights
# ---------------------------------------------------------------------------------------------

INT4_CPU_INNER_K_TILES = 1  # argument of torch's int4 CPU weight conversion (its layout ignores it)
INT4_CPU_ROW_MULTIPLE = 16  # torch's int4 CPU layout packs output rows in blocks of 16
INT4_CPU_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 CPU kernel accepts
NATIVE_INT4_DTYPES = (torch.float32, torch.bfloat16)  # activations the native int4 kernels take (fp16: torch's)
# torch's int8 CPU kernel reads input columns 16 at a time: other widths crash it in bf16 (torch 2.13)
INT8_CPU_COLUMN_MULTIPLE = 16


def int8_cpu_kernel_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def int4_cpu_kernel_available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def _unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """x laid out as torch's int8 / int4 CPU kernels require (unit stride along the last dimension):
    ``x.contiguous()``, and for an empty x a fresh empty tensor (torch counts an empty view as contiguous
    whatever its strides, and those kernels refuse it)."""
    return x.contiguous() if x.numel() else torch.empty(x.shape, dtype=x.dtype, device=x.device)


class _Int8Matrix:
    """int8 [out, in] with per-channel scales, for ``torch._weight_int8pack_mm`` (scales in x's dtype) and the
    native decode kernel (the same scale values, widened to fp32). fp32 activations take the native kernel
    for any number of rows where it is built: torch's int8 kernel has no vectorised fp32 path (1-2 GMAC/s
    against the native kernel's 35-60 on a 2-core AVX-512 host, bench/cpu_gemv.py); bf16 blocks too where the
    native kernel quantises them to int8 (native.int8_activations_take: MING_CPU_ACTIVATIONS=int8 on CPUs with
    AVX2, widths of a multiple of 64; VNNI byte dot products, ~1.6x torch's bf16 kernel on 2 cores,
    bench/moe_layer_cpu.py --path int8-a8,int8), and bf16 blocks of native.AMX_QUANT_MIN_ROWS or more where torch's
    bf16 GEMMs use AMX (bf16 panels of the dequantised weights through that GEMM); else they stay on torch's int8
    kernel, which uses bf16 dot products."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self.q, self.scale = q.contiguous(), scale.to(dtype).contiguous()
        self.native = native.bind_linear(self.q, 0, self.scale, blocks=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None and (x.dtype == torch.float32 or native.int8_activations_take(self.q.shape[1])
                                        or self.native.takes_bf16_panels(x)):
            y = self.native(x)
            if y is not None:
                return y
        return torch._weight_int8pack_mm(_unit_stride_rows(x), self.q, self.scale)


class _Int4Matrix:
    """int4 [out, in/2] with group scales, converted once to torch's CPU int4 layout."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        values = unpack_int4(q).to(torch.int32) + 8  # torch's kernel computes (v - 8) * scale + zero
        self.group = matrix_in_features(q) // scale.shape[-1]
        self.packed = torch._convert_weight_to_int4pack_for_cpu(values.contiguous(), INT4_CPU_INNER_K_TILES)
        s = scale.t().contiguous()  # [groups, out]
        self.scales_zeros = torch.stack((s, torch.zeros_like(s)), dim=-1).to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(_unit_stride_rows(x), self.packed, self.group, self.scales_zeros)


class _Buffers(threading.local):
    """Dequantised-weight buffers reused across calls, one set per thread (the offload runtime's CPU workers
    compute experts of one layer at the same time), keyed by shape and dtype."""

    def __init__(self) -> None:
        self.by_shape: dict[tuple, torch.Tensor] = {}

    def get(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        buf = self.by_shape.get((shape, dtype))
        if buf is None:
            buf = self.by_shape[(shape, dtype)] = torch.empty(shape, dtype=dtype)
        return buf


class _NativeInt4Matrix:
    """int4 [out, in/2] with group scales, read in place by the native int4 kernel (dequantised in registers,
    no copy in another layout) for any number of activation rows. Against torch's int4 kernel on this
    matrix's own layout (bench/moe_layer_cpu.py, int4 vs int4-torch): faster for one row (decode) in bf16,
    and by tens of times in fp32 (torch's fp32 int4 path is not vectorised); level for bf16 prefill blocks on
    CPUs with AVX-512 bf16 dot products, which take a kernel of their own (weights dequantised to bf16 into a
    cache-resident panel; 0.6x torch's before it), slower for them on other CPUs (fp32 sums). Where torch's bf16
    GEMMs use AMX, bf16 blocks of native.AMX_QUANT_MIN_ROWS or more go through that GEMM on bf16 panels."""

    def __init__(self, bound: native.BoundLinear):
        self.bound = bound
        self.q, self.scale = bound.weight, bound.scale  # what the native expert table reads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bound(x)
        if y is None:
            raise ValueError(f"int4 experts take fp32 / bf16 CPU activations; got {x.dtype} on {x.device}")
        return y


class _DequantMatrix:
    """A quantised matrix no CPU kernel takes (shape limits): dequantised per call into a reused buffer."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, buffers: _Buffers):
        self.q, self.scale, self.dtype, self.buffers = q, scale, dtype, buffers
        self.shape = (q.shape[0], matrix_in_features(q))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(self.shape, self.dtype)
        buf.copy_(dequantize(self.q, self.scale, self.dtype))
        return F.linear(x, buf)


class _Stacked:
    """Two matrices applied to the same input, outputs concatenated (gate and up when their scales
    cannot be concatenated: block scales whose row blocks straddle the two)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.first(x), self.second(x)), dim=-1)


class QuantizedCpuExperts:
    """Quantised SwiGLU experts prepared for the CPU (same interface as :class:`PackedExperts`).

    Per expert, gate and up are concatenated into one ``[2I, H]`` matrix (one kernel call) and each
    matrix is held in the layout of the CPU kernel of its format (``kernel`` says which: "int8",
    "int4" or "dequant"; int4 matrices are read in their storage layout by the native kernels where they
    are built and take the matrix's groups, else converted once to torch's int4 layout). int8 and int4 keep
    only the quantised bytes; the results match :func:`moe_experts_dequant_reference` up to the kernels'
    summation order and rounding.
    """

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, kind: str, fuse_gate_up: bool = True,
                 native_int4: bool = True):
        """``fuse_gate_up`` False keeps gate and up as two matrices (no concatenated copy: int8 experts
        then share the caller's storage). ``native_int4`` False keeps int4 on torch's kernel even where the
        native one takes it (bench/moe_layer_cpu.py compares the two)."""
        self.hidden, self.intermediate, self.dtype, self.kind = hidden, intermediate, dtype, kind
        self.fuse_gate_up, self.native_int4 = fuse_gate_up, native_int4
        if kind in ("int8", "fp8") and int8_cpu_kernel_available():
            self.kernel = "int8"  # fp8 (no CPU kernel) is re-quantised to int8 per row, see _matrix
        elif kind == "int4" and int4_cpu_kernel_available():
            self.kernel = "int4"
        else:
            self.kernel = "dequant"
        self._buffers = _Buffers()
        self.dequant_fallbacks = 0  # matrices the kernel cannot take (computed by dequantising instead)
        self.gate_up: list = []
        self.down: list = []
        self._native_table: native.ExpertTable | None = None
        self._native_layout: bool | None = None  # every matrix in a layout native_table reads

    @property
    def num_experts(self) -> int:
        return len(self.gate_up)

    def _matrix(self, q: torch.Tensor, scale: torch.Tensor):
        cols = matrix_in_features(q)
        if self.kernel == "int8" and q.dtype != torch.int8:
            q, scale = quantize_int8_rows(dequantize(q, scale))
        if self.kernel == "int8" and cols % INT8_CPU_COLUMN_MULTIPLE == 0:
            return _Int8Matrix(q, scale, self.dtype)
        if self.kernel == "int4" and self.native_int4 and scale.dim() == 2 and self.dtype in NATIVE_INT4_DTYPES:
            bound = native.bind_linear(q.contiguous(), 0, scale)  # None: no native kernels, or groups they do not take
            if bound is not None:
                return _NativeInt4Matrix(bound)
        if self.kernel == "int4" and q.shape[0] % INT4_CPU_ROW_MULTIPLE == 0 \
                and cols // scale.shape[-1] in INT4_CPU_GROUPS:
            return _Int4Matrix(q, scale, self.dtype)
        if self.kernel != "dequant":
            self.dequant_fallbacks += 1  # a shape torch's kernel does not take
        return _DequantMatrix(q, scale, self.dtype, self._buffers)

    def append(self, q_gate: torch.Tensor, q_up: torch.Tensor, q_down: torch.Tensor, scales: Scales,
               fused: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add one expert: quantised gate/up [I, H(/2)], down [H, I(/2)] and their scales. `fused` (q [2I, ...],
        scale [2I, ...]): gate and up already fused, q_gate / q_up and their scales its halves (no concatenated
        copy)."""
        s_gate, s_up, s_down = scales
        if not self.fuse_gate_up or scale_layout(q_gate, s_gate).block_out > 1:
            self.gate_up.append(_Stacked(self._matrix(q_gate, s_gate), self._matrix(q_up, s_up)))
        elif fused is not None:
            q_fused, s_fused = fused
            if not (q_gate.data_ptr() == q_fused.data_ptr() and q_up.data_ptr() == q_fused[self.intermediate:].data_ptr()
                    and s_gate.data_ptr() == s_fused.data_ptr() and s_up.data_ptr() == s_fused[self.intermediate:].data_ptr()):
                raise ValueError("fused gate/up storage must hold q_gate, q_up and their scales as its two halves")
            self.gate_up.append(self._matrix(q_fused, s_fused))
        else:
            self.gate_up.append(self._matrix(torch.cat((q_gate, q_up)), torch.cat((s_gate, s_up))))
        self.down.append(self._matrix(q_down, s_down))
        self._native_table, self._native_layout = None, None

    @classmethod
    def from_weights(cls, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, scales: Scales,
                     dtype: torch.dtype, kind: str, native_int4: bool = True,
                     fused: tuple[torch.Tensor, torch.Tensor] | None = None) -> "QuantizedCpuExperts":
        """From a stacked quantised bank (``kind``: the storage format name, e.g. "int8"); `fused` ([E, 2I, ...]
        values and scales) when the bank's gate and up are its halves (engine.placement.quant.load_quantized_bank)."""
        num_experts, inter = w_gate.shape[:2]
        packed = cls(w_down.shape[1], inter, dtype, kind, native_int4=native_int4)
        for e in range(num_experts):
            packed.append(w_gate[e], w_up[e], w_down[e], tuple(s[e] for s in scales),
                          None if fused is None else (fused[0][e], fused[1][e]))
        return packed

    def native_table(self) -> native.ExpertTable | None:
        """int8 experts (gate and up fused, every matrix in torch's int8 layout, which is the plain one) or
        int4 ones (gate and up fused, every matrix read natively in its storage layout) as a table for
        native.moe_decode, built on first use (int8: the fp32 copies of the scales, 4 bytes a row); None for
        other formats or where the native kernels are not built."""
        if self._native_table is None and self.kernel in ("int8", "int4") and self.gate_up and native.available():
            if self._native_layout is None:  # checked once per set of experts, not on every decode step
                self._native_layout = all(
                    isinstance(m, _Int8Matrix) and m.scale.dim() == 1 if self.kernel == "int8"
                    else isinstance(m, _NativeInt4Matrix) for m in (*self.gate_up, *self.down))
            if self._native_layout:
                self._native_table = native.ExpertTable.fused(
                    [m.q for m in self.gate_up], [m.q for m in self.down],
                    ([m.scale for m in self.gate_up], [m.scale for m in self.down]))
        return self._native_table

    def forward_expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """SwiGLU of expert ``expert`` on x [M, H] -> [M, H] in x's dtype."""
        gate, up = self.gate_up[expert](x).split(self.intermediate, dim=-1)
        return self.down[expert](F.silu(gate) * up)
