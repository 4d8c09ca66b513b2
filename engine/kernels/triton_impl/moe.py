"""Triton fused-MoE path: expert-sorted, block-aligned assignments and two grouped GEMM kernels.

1. :func:`align_by_expert` sorts the T*k (token, slot) assignments by expert and pads every expert's
   run to a multiple of ``block_m`` (vLLM's ``moe_align_block_size`` idea, written in torch ops, no
   host sync). Each block of ``block_m`` rows belongs to exactly one expert.
2. ``_gate_up_kernel``: per (row block, I tile), ``silu(x @ gate^T) * (x @ up^T)`` with fp32 accumulation,
   rounded to the activation dtype like the reference, into an [T*k, I] buffer.
3. ``_down_kernel``: per (row block, H tile), ``h @ down^T`` rounded to the activation dtype, then
   ``.float() * routing weight`` into an fp32 [T*k, H] buffer; the k slots of a token are summed in fp32.

Direct mode (decode, up to ``DIRECT_MAX_ASSIGNMENTS`` assignments): step 1 is skipped and each
program of the two kernels computes one assignment, reading its expert id straight from ``topk_ids``.
An expert picked twice is then read twice, which costs nothing when a token's k experts are distinct.
Tiles per batch size come from an H100 sweep (``LAUNCH_CONFIGS``).

Quantised experts (``scales=``; formats of :mod:`engine.kernels.dequant`): every weight tile is loaded
as stored (fp8 / int8 bytes, or int4 nibbles two per byte), multiplied by its scales in fp32 and
rounded to the activation dtype in registers, exactly as ``dequantize(q, s, x.dtype)`` does, before
the ``tl.dot``. No dequantised copy of the weights exists in memory. int4 tiles are read as their bytes,
contiguous along k, and go to two dots of half the tile's depth (the low nibbles with the even columns
of the activations, the high ones with the odd). A tile that lies in one int4 group or 128x128 block
loads one scale per output row; otherwise a scale per value.

Shared expert in the same pass (``shared=(gate, up, down)``, each [I, H] / [H, I] like one routed
expert, plain weights in the activation dtype): every token gets one more assignment, to expert id E
with weight 1, whose programs read the shared weights instead of the stack. The routed sum and the
shared output are then added in fp32 and rounded once (the reference rounds the routed sum to the
activation dtype first: at most one rounding step apart in bf16, identical in fp32), and the separate
shared-expert GEMMs, activation and add go.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..dequant import INT4_OFFSET, NIBBLE_BITS, NIBBLE_MASK, scale_layout
from ..moe import Scales, check_moe_args, check_quantized_moe_args
from .common import interpreting, round_to

# How the kernels read a weight tile: as stored, or dequantised with per-channel scales (fp8/int8),
# int4 group scales, or 128x128 block scales (fp8-block).
QUANT_NONE, QUANT_CHANNEL, QUANT_INT4, QUANT_BLOCK = 0, 1, 2, 3
# Globals read inside @triton.jit code must be constexpr objects (plain ints only work in the interpreter).
_NIBBLE_BITS = tl.constexpr(NIBBLE_BITS)
_NIBBLE_MASK = tl.constexpr(NIBBLE_MASK)
_INT4_OFFSET = tl.constexpr(INT4_OFFSET)

# Tile sizes. tl.dot needs every tile dim >= 16.
DEFAULT_BLOCK_M = 16
LARGE_BATCH_ASSIGNMENTS = 8192  # from this many (token, slot) pairs on, the large-batch tiles
DIRECT_MAX_ASSIGNMENTS = 16  # up to this many (decode of one or two tokens), the direct mode


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sorted_assignments [num_blocks*block_m] int32, block_expert [num_blocks] int32).

    ``sorted_assignments`` holds flat assignment ids ``t*k + j`` grouped by expert, each expert's run
    padded to a multiple of ``block_m`` with the sentinel ``T*k``. ``block_expert[b]`` is the expert of
    block ``b``, or -1 for blocks past the end (num_blocks is an upper bound, so no host sync is needed).
    """
    flat_ids = topk_ids.reshape(-1)
    n_assign = flat_ids.numel()
    device = flat_ids.device
    # scatter_add_ rather than bincount: CUDA bincount reads the max id back to the host (a sync that
    # stalls the launch queue every MoE layer and makes the call impossible to capture in a CUDA graph).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat_ids, torch.ones_like(flat_ids))
    blocks_per_expert = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks_per_expert, 0)
    block_start = block_end - blocks_per_expert
    expert_start = torch.cumsum(counts, 0) - counts

    order = torch.argsort(flat_ids, stable=True)
    sorted_experts = flat_ids[order]
    rank_in_expert = torch.arange(n_assign, device=device) - expert_start[sorted_experts]
    destination = block_start[sorted_experts] * block_m + rank_in_expert

    # Every non-empty expert adds at most one partially filled block.
    max_blocks = triton.cdiv(n_assign, block_m) + min(num_experts, n_assign)
    sorted_assignments = torch.full((max_blocks * block_m,), n_assign, dtype=torch.int32, device=device)
    sorted_assignments[destination] = order.to(torch.int32)
    block_ids = torch.arange(max_blocks, device=device)
    block_expert = torch.searchsorted(block_end, block_ids, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_assignments, block_expert


@triton.jit
def _weight_tile(w_ptr, s_ptr, expert, k0, offs_n, offs_k, n_valid, mask, stride_we, stride_wn, stride_wk,
                 stride_se, stride_sn, stride_sk, group_n, group_k, act_dtype: tl.constexpr,
                 QUANT: tl.constexpr, SCALE_PER_TILE: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile W[n, k]^T (k from k0) of one expert in the activation dtype: loaded as
    is (QUANT_NONE) or dequantised in registers: value * scale in fp32, rounded once to the activation
    dtype. QUANT_CHANNEL: fp8/int8 values, one scale per output row n; QUANT_BLOCK: fp8 values,
    scale[n // group_n, k // group_k] (SCALE_PER_TILE: the tile lies in one block column, so its scales
    are one per n, loaded once). int4 tiles are _int4_tiles'."""
    values = tl.load(w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                     mask=mask, other=0.0)
    if QUANT == 0:  # QUANT_NONE
        return values
    if QUANT == 1:  # QUANT_CHANNEL: one scale per column of the tile
        scale = tl.load(s_ptr + expert * stride_se + offs_n * stride_sn, mask=n_valid, other=0.0)[None, :]
    elif SCALE_PER_TILE:
        scale = tl.load(s_ptr + expert * stride_se + (offs_n // group_n) * stride_sn + (k0 // group_k) * stride_sk,
                        mask=n_valid, other=0.0)[None, :]
    else:
        scale = tl.load(s_ptr + expert * stride_se + (offs_n[None, :] // group_n) * stride_sn
                        + (offs_k[:, None] // group_k) * stride_sk, mask=mask, other=0.0)
    return round_to(values.to(tl.float32) * scale, act_dtype, EMULATE_BF16_RTNE)


@triton.jit
def _even_and_odd_columns(ptr, rows, stride, offs_p, mask):
    """Activation rows' columns 2p and 2p + 1 (the halves an int4 tile's low and high nibbles multiply)."""
    base = ptr + rows[:, None] * stride + 2 * offs_p[None, :]
    return tl.load(base, mask=mask, other=0.0), tl.load(base + 1, mask=mask, other=0.0)


@triton.jit
def _int4_tiles(w_ptr, s_ptr, expert, k0, offs_n, offs_p, n_valid, p_valid, stride_we, stride_wn, stride_wk,
                stride_se, stride_sn, stride_sk, group_k, act_dtype: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
                EMULATE_BF16_RTNE: tl.constexpr):
    """An int4 weight tile as two [BLOCK_K / 2, BLOCK_N] tiles in the activation dtype: W[n, k]^T at the
    even k = 2p (low nibbles) and at the odd k = 2p + 1 (high nibbles) of the packed byte columns
    ``offs_p``, each value * scale[n, k // group_k] in fp32 rounded once, as dequantize() does. The
    bytes are read once each, contiguous along k (one byte per k read as ``k // 2`` addresses made
    every load a scalar gather: 0.01 of the H200's bandwidth); SCALE_PER_TILE: the tile lies in one
    group, its scales are one per n."""
    mask = p_valid[:, None] & n_valid[None, :]
    raw = tl.load(w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_p[:, None] * stride_wk,
                  mask=mask, other=0).to(tl.int32)
    low = ((raw & _NIBBLE_MASK) - _INT4_OFFSET).to(tl.float32)
    high = (((raw >> _NIBBLE_BITS) & _NIBBLE_MASK) - _INT4_OFFSET).to(tl.float32)
    if SCALE_PER_TILE:
        scale_low = tl.load(s_ptr + expert * stride_se + offs_n * stride_sn + (k0 // group_k) * stride_sk,
                            mask=n_valid, other=0.0)[None, :]
        scale_high = scale_low
    else:
        base = s_ptr + expert * stride_se + offs_n[None, :] * stride_sn
        scale_low = tl.load(base + ((2 * offs_p[:, None]) // group_k) * stride_sk, mask=mask, other=0.0)
        scale_high = tl.load(base + ((2 * offs_p[:, None] + 1) // group_k) * stride_sk, mask=mask, other=0.0)
    return (round_to(low * scale_low, act_dtype, EMULATE_BF16_RTNE),
            round_to(high * scale_high, act_dtype, EMULATE_BF16_RTNE))


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_gate_ptr,
    w_up_ptr,
    s_gate_ptr,
    s_up_ptr,
    shared_gate_ptr,
    shared_up_ptr,
    num_experts,
    h_ptr,
    sorted_ptr,
    block_expert_ptr,
    ids_ptr,
    n_assign,
    top_k,
    hidden,
    inter,
    stride_xt,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_sk,
    group_n,
    group_k,
    stride_ht,
    QUANT: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16_RTNE: tl.constexpr,
    DIRECT: tl.constexpr,
    HAS_SHARED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if DIRECT:  # program pid_m computes assignment pid_m alone (row 0 of its tile)
        expert = tl.load(ids_ptr + pid_m).to(tl.int64)
        lane = tl.arange(0, BLOCK_M)
        assignment = pid_m + lane
        row_valid = lane == 0
    else:
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        assignment = tl.load(sorted_ptr + offs_m).to(tl.int64)
        row_valid = assignment < n_assign
    if expert < 0:
        return
    token = assignment // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < inter
    gate_src = w_gate_ptr
    up_src = w_up_ptr
    slot = expert
    if HAS_SHARED:
        if expert == num_experts:  # the shared expert's assignment (plain weights: QUANT is none)
            gate_src = shared_gate_ptr
            up_src = shared_up_ptr
            slot = expert * 0

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if QUANT == 2:  # QUANT_INT4: the even and the odd k of the tile as two dots of half its depth
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            p_valid = offs_p < hidden // 2
            a_mask = row_valid[:, None] & p_valid[None, :]
            a_even, a_odd = _even_and_odd_columns(x_ptr, token, stride_xt, offs_p, a_mask)
            g_even, g_odd = _int4_tiles(gate_src, s_gate_ptr, slot, k0, offs_n, offs_p, n_valid, p_valid, stride_we,
                                        stride_wn, stride_wk, stride_se, stride_sn, stride_sk, group_k,
                                        x_ptr.dtype.element_ty, SCALE_PER_TILE, EMULATE_BF16_RTNE)
            u_even, u_odd = _int4_tiles(up_src, s_up_ptr, slot, k0, offs_n, offs_p, n_valid, p_valid, stride_we,
                                        stride_wn, stride_wk, stride_se, stride_sn, stride_sk, group_k,
                                        x_ptr.dtype.element_ty, SCALE_PER_TILE, EMULATE_BF16_RTNE)
            if DOT_IN_FP32:
                a_even, a_odd = a_even.to(tl.float32), a_odd.to(tl.float32)
                g_even, g_odd = g_even.to(tl.float32), g_odd.to(tl.float32)
                u_even, u_odd = u_even.to(tl.float32), u_odd.to(tl.float32)
            acc_gate = tl.dot(a_even, g_even, acc_gate, input_precision=DOT_PRECISION)
            acc_gate = tl.dot(a_odd, g_odd, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a_even, u_even, acc_up, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a_odd, u_odd, acc_up, input_precision=DOT_PRECISION)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_valid = offs_k < hidden
            a = tl.load(
                x_ptr + token[:, None] * stride_xt + offs_k[None, :],
                mask=row_valid[:, None] & k_valid[None, :],
                other=0.0,
            )
            w_mask = k_valid[:, None] & n_valid[None, :]
            b_gate = _weight_tile(gate_src, s_gate_ptr, slot, k0, offs_n, offs_k, n_valid, w_mask, stride_we, stride_wn,
                                  stride_wk, stride_se, stride_sn, stride_sk, group_n, group_k, x_ptr.dtype.element_ty,
                                  QUANT, SCALE_PER_TILE, EMULATE_BF16_RTNE)
            b_up = _weight_tile(up_src, s_up_ptr, slot, k0, offs_n, offs_k, n_valid, w_mask, stride_we, stride_wn,
                                stride_wk, stride_se, stride_sn, stride_sk, group_n, group_k, x_ptr.dtype.element_ty,
                                QUANT, SCALE_PER_TILE, EMULATE_BF16_RTNE)
            if DOT_IN_FP32:
                a = a.to(tl.float32)
                b_gate = b_gate.to(tl.float32)
                b_up = b_up.to(tl.float32)
            acc_gate = tl.dot(a, b_gate, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)

    act_dtype = h_ptr.dtype.element_ty
    # Same roundings as the reference: gate/up outputs, silu and the product each in the activation dtype.
    gate = round_to(acc_gate, act_dtype, EMULATE_BF16_RTNE).to(tl.float32)
    up = round_to(acc_up, act_dtype, EMULATE_BF16_RTNE).to(tl.float32)
    silu = round_to(gate / (1.0 + tl.exp(-gate)), act_dtype, EMULATE_BF16_RTNE).to(tl.float32)
    h = round_to(silu * up, act_dtype, EMULATE_BF16_RTNE)
    tl.store(
        h_ptr + assignment[:, None] * stride_ht + offs_n[None, :],
        h,
        mask=row_valid[:, None] & n_valid[None, :],
    )


@triton.jit
def _down_kernel(
    h_ptr,
    w_down_ptr,
    s_down_ptr,
    shared_down_ptr,
    num_experts,
    out_ptr,
    routing_weight_ptr,
    sorted_ptr,
    block_expert_ptr,
    ids_ptr,
    n_assign,
    hidden,
    inter,
    stride_ht,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_sk,
    group_n,
    group_k,
    stride_ot,
    QUANT: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16_RTNE: tl.constexpr,
    DIRECT: tl.constexpr,
    HAS_SHARED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if DIRECT:
        expert = tl.load(ids_ptr + pid_m).to(tl.int64)
        lane = tl.arange(0, BLOCK_M)
        assignment = pid_m + lane
        row_valid = lane == 0
    else:
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        assignment = tl.load(sorted_ptr + offs_m).to(tl.int64)
        row_valid = assignment < n_assign
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < hidden
    down_src = w_down_ptr
    slot = expert
    if HAS_SHARED:
        if expert == num_experts:  # the shared expert's assignment
            down_src = shared_down_ptr
            slot = expert * 0

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if QUANT == 2:  # QUANT_INT4 (see _gate_up_kernel)
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            p_valid = offs_p < inter // 2
            a_mask = row_valid[:, None] & p_valid[None, :]
            a_even, a_odd = _even_and_odd_columns(h_ptr, assignment, stride_ht, offs_p, a_mask)
            b_even, b_odd = _int4_tiles(down_src, s_down_ptr, slot, k0, offs_n, offs_p, n_valid, p_valid, stride_we,
                                        stride_wn, stride_wk, stride_se, stride_sn, stride_sk, group_k,
                                        h_ptr.dtype.element_ty, SCALE_PER_TILE, EMULATE_BF16_RTNE)
            if DOT_IN_FP32:
                a_even, a_odd = a_even.to(tl.float32), a_odd.to(tl.float32)
                b_even, b_odd = b_even.to(tl.float32), b_odd.to(tl.float32)
            acc = tl.dot(a_even, b_even, acc, input_precision=DOT_PRECISION)
            acc = tl.dot(a_odd, b_odd, acc, input_precision=DOT_PRECISION)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_valid = offs_k < inter
            a = tl.load(
                h_ptr + assignment[:, None] * stride_ht + offs_k[None, :],
                mask=row_valid[:, None] & k_valid[None, :],
                other=0.0,
            )
            b = _weight_tile(down_src, s_down_ptr, slot, k0, offs_n, offs_k, n_valid, k_valid[:, None] & n_valid[None, :],
                             stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, group_n, group_k,
                             h_ptr.dtype.element_ty, QUANT, SCALE_PER_TILE, EMULATE_BF16_RTNE)
            if DOT_IN_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    expert_out = round_to(acc, h_ptr.dtype.element_ty, EMULATE_BF16_RTNE).to(tl.float32)
    routing_weight = tl.load(routing_weight_ptr + assignment, mask=row_valid, other=0.0)
    tl.store(
        out_ptr + assignment[:, None] * stride_ot + offs_n[None, :],
        expert_out * routing_weight[:, None],
        mask=row_valid[:, None] & n_valid[None, :],
    )


@dataclass(frozen=True)
class LaunchConfig:
    """Tiles and launch options of the two kernels. ``direct``: one program per (token, slot)
    assignment, no expert sort (``align_by_expert`` is a dozen small launches, a third of a decode
    step's MoE time on an H100)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int | None = None
    num_stages: int | None = None
    direct: bool = False


# Picked by `bench/moe_layer_gpu.py --tune` on an H100 at the Ming-flash shape (H 4096, I 1024, top-8,
# bf16); the sweep and its numbers are in that script's output. Keys: upper bound on T*k (exclusive).
LAUNCH_CONFIGS: tuple[tuple[float, LaunchConfig], ...] = (
    (DIRECT_MAX_ASSIGNMENTS + 1, LaunchConfig(16, 32, 256, num_warps=4, num_stages=3, direct=True)),
    (1024, LaunchConfig(16, 128, 128, num_warps=8, num_stages=3)),
    (LARGE_BATCH_ASSIGNMENTS, LaunchConfig(32, 128, 128, num_warps=8, num_stages=3)),
    (float("inf"), LaunchConfig(64, 256, 64, num_warps=8, num_stages=3)),
)


# Quantised weights are dequantised tile by tile in registers (values and scales in fp32 beside the tile), where
# bf16's tiles do not fit: compiled for sm_90 (ptxas -v), int4 with them spilled 0.6-2.8 KB per thread to local
# memory, fp8-block up to 2.2 KB, fp8 / int8 up to 468 B; on an H200 the int4 layer then ran 0.98 / 25 / 49 ms at
# 1 / 16 / 128 tokens against bf16's 0.23 / 1.4 / 2.6. These tiles compile with no spill in either kernel
# (bench/moe_compile_check.py prints registers and spills of each; tests/bench/test_moe_compile_check.py checks
# them). Chosen by register fit, next to bf16's shapes; not yet timed on a GPU (bench/moe_layer_gpu.py --quant
# fp8,int4 --tune does).
_FITTING_BLOCK: tuple[tuple[float, LaunchConfig], ...] = (
    (DIRECT_MAX_ASSIGNMENTS + 1, LaunchConfig(16, 32, 128, num_warps=8, num_stages=3, direct=True)),
    (1024, LaunchConfig(16, 64, 64, num_warps=8, num_stages=3)),
    (float("inf"), LaunchConfig(32, 64, 64, num_warps=8, num_stages=2)),
)
# int4 reads its bytes contiguously and its scales once per tile (_int4_tiles): K tiles of one 128-column
# group; the H200 ran the earlier per-element layout at 0.01 of its bandwidth (1.03 ms at one token).
_INT4: tuple[tuple[float, LaunchConfig], ...] = (
    (DIRECT_MAX_ASSIGNMENTS + 1, LaunchConfig(16, 32, 128, num_warps=4, num_stages=4, direct=True)),
    (1024, LaunchConfig(16, 64, 128, num_warps=4, num_stages=3)),
    (float("inf"), LaunchConfig(64, 64, 128, num_warps=8, num_stages=3)),
)
QUANT_LAUNCH_CONFIGS: dict[int, tuple[tuple[float, LaunchConfig], ...]] = {
    QUANT_CHANNEL: (
        (DIRECT_MAX_ASSIGNMENTS + 1, LaunchConfig(16, 32, 256, num_warps=4, num_stages=3, direct=True)),
        (1024, LaunchConfig(16, 64, 128, num_warps=8, num_stages=3)),
        (float("inf"), LaunchConfig(32, 64, 64, num_warps=8, num_stages=3)),
    ),
    QUANT_INT4: _INT4,
    QUANT_BLOCK: _FITTING_BLOCK,
}


def launch_config(n_assign: int, quant: int = QUANT_NONE) -> LaunchConfig:
    """The tuned configuration for this many (token, slot) assignments and this weight storage (QUANT_*)."""
    return next(cfg for bound, cfg in QUANT_LAUNCH_CONFIGS.get(quant, LAUNCH_CONFIGS) if n_assign < bound)


def smaller(cfg: LaunchConfig) -> LaunchConfig | None:
    """The next configuration to try when ``cfg`` needs more shared memory than the GPU has (fp32
    activations, or GPUs with less shared memory per block than an H100): fewer pipeline stages
    first, then shorter K, then narrower N, then shorter M tiles. None when nothing is left."""
    if cfg.num_stages is not None and cfg.num_stages > 2:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_k > 32:
        return replace(cfg, block_k=cfg.block_k // 2)
    if cfg.block_n > 32:
        return replace(cfg, block_n=cfg.block_n // 2)
    if cfg.block_m > 16:
        return replace(cfg, block_m=cfg.block_m // 2)
    return None


_FITTED: dict[tuple, LaunchConfig] = {}  # (device, dtype, requested config) -> the one that compiled


def moe_experts_triton(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    direct: bool | None = None,
    skip_negative_ids: bool = False,
    out_dtype: torch.dtype | None = None,
    scales: Scales | None = None,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Triton implementation of :func:`engine.kernels.moe_experts` (same arguments and result).
    Tiles, launch options and the direct (unsorted) mode default to :func:`launch_config`; they are
    keywords so that tests and benchmarks can pin them. Never reads anything back to the host, so a
    call can be captured in a CUDA graph.

    ``skip_negative_ids``: assignments whose id is negative contribute nothing (the expert runtime
    passes the experts of one GPU with local ids, -1 for the experts that live elsewhere).
    ``out_dtype``: the dtype of the summed result (default x's; fp32 keeps the partial sums of several
    devices unrounded until they are combined).
    ``scales``: (gate, up, down) scales of quantised weights, dequantised tile by tile in the kernels.
    ``shared``: the shared expert's plain (gate, up, down) weights, added to every token in the same
    pass (see the module doc; not with ``scales`` or ``skip_negative_ids``)."""
    if scales is None:
        check_moe_args(x, w_gate, w_up, w_down, topk_ids, topk_weights)
    else:
        check_quantized_moe_args(x, w_gate, w_up, w_down, scales, topk_ids, topk_weights)
    num_tokens, hidden = x.shape
    if shared is not None:
        num_experts, inter = w_gate.shape[0], w_gate.shape[1]
        if skip_negative_ids or scales is not None:
            raise ValueError("shared= cannot be combined with skip_negative_ids= or scales=")
        if tuple(t.shape for t in shared) != ((inter, hidden), (inter, hidden), (hidden, inter)) or \
                any(t.dtype != x.dtype for t in shared):
            raise ValueError(f"shared expert weights must be [{inter}, {hidden}] x2 and [{hidden}, {inter}] in {x.dtype}")
        shared = tuple(t.contiguous() for t in shared)
        # one more assignment per token: the shared expert (id E, weight 1)
        topk_ids = torch.cat([topk_ids, topk_ids.new_full((num_tokens, 1), num_experts)], dim=1)
        topk_weights = torch.cat([topk_weights, topk_weights.new_ones((num_tokens, 1))], dim=1)
    top_k = topk_ids.shape[1]
    n_assign = num_tokens * top_k
    if n_assign == 0:
        return torch.zeros(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    tuned = launch_config(n_assign, QUANT_NONE if scales is None else _scale_args(w_gate, scales[0])[0])
    direct = tuned.direct if direct is None else direct
    cfg = LaunchConfig(block_m or (DEFAULT_BLOCK_M if direct else tuned.block_m), block_n or tuned.block_n,
                       block_k or tuned.block_k, num_warps or tuned.num_warps, num_stages or tuned.num_stages, direct)

    x = x.contiguous()
    w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    if scales is not None:
        scales = tuple(s.contiguous() for s in scales)
    key = (x.device, x.dtype, w_gate.dtype, cfg)
    cfg = _FITTED.get(key, cfg)
    while True:
        try:
            out = _run(cfg, x, w_gate, w_up, w_down, topk_ids, topk_weights, skip_negative_ids, scales, shared)
        except OutOfResources:
            fallback = smaller(cfg)
            if fallback is None:
                raise
            cfg = fallback
            continue
        _FITTED[key] = cfg
        return out.to(out_dtype or x.dtype)


def _scale_args(w: torch.Tensor, scale: torch.Tensor | None) -> tuple:
    """(QUANT mode, scale tensor, stride_se, stride_sn, stride_sk, group_n, group_k) of one stacked weight."""
    if scale is None:
        return QUANT_NONE, w, 0, 0, 0, 1, 1
    layout = scale_layout(w, scale)
    if layout.block_in == 0:  # per channel: [E, out]
        return QUANT_CHANNEL, scale, scale.stride(0), scale.stride(1), 0, 1, 1
    mode = QUANT_INT4 if layout.packed_int4 else QUANT_BLOCK
    return mode, scale, scale.stride(0), scale.stride(1), scale.stride(2), layout.block_out, layout.block_in


def scale_per_tile(quant: int, group_k: int, block_k: int) -> bool:
    """Whether a BLOCK_K-deep weight tile lies in one scale group / block column (group_k a multiple of
    BLOCK_K; tiles start at multiples of BLOCK_K), so that its scales are one per output row."""
    return quant in (QUANT_INT4, QUANT_BLOCK) and group_k % block_k == 0


def _run(cfg: LaunchConfig, x, w_gate, w_up, w_down, topk_ids, topk_weights, skip_negative_ids=False,
         scales: Scales | None = None, shared=None) -> torch.Tensor:
    """Both kernels with one configuration; the fp32 sum over each token's slots."""
    num_tokens, hidden = x.shape
    num_experts, inter = w_gate.shape[:2]
    gate_q = _scale_args(w_gate, None if scales is None else scales[0])
    up_q = _scale_args(w_up, None if scales is None else scales[1])
    down_q = _scale_args(w_down, None if scales is None else scales[2])
    top_k = topk_ids.shape[1]
    n_assign = num_tokens * top_k
    block_m, block_n, block_k, direct = cfg.block_m, cfg.block_n, cfg.block_k, cfg.direct
    flat_ids = topk_ids.reshape(-1).contiguous()
    if direct:
        sorted_assignments = block_expert = flat_ids  # unused by the direct kernels
        num_blocks = n_assign
    elif skip_negative_ids:  # negative ids go to an extra bucket whose blocks are marked empty (-1)
        bucketed = torch.where(topk_ids < 0, num_experts, topk_ids)
        sorted_assignments, block_expert = align_by_expert(bucketed, num_experts + 1, block_m)
        block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
        num_blocks = block_expert.numel()
    else:  # (the shared expert, when given, is expert id num_experts)
        sorted_assignments, block_expert = align_by_expert(topk_ids, num_experts + (shared is not None), block_m)
        num_blocks = block_expert.numel()
    s_gate, s_up, s_down = shared if shared is not None else (w_gate, w_up, w_down)  # (unused without)
    routing_weights = topk_weights.contiguous().reshape(-1)

    # The interpreter's bf16 tl.dot is wrong (it multiplies raw bits): upcast there. fp32 inputs use IEEE fp32, not TF32.
    dot_in_fp32 = x.dtype == torch.bfloat16 and interpreting()
    dot_precision = "ieee" if (x.dtype == torch.float32 or dot_in_fp32) else None

    launch = {k: v for k, v in (("num_warps", cfg.num_warps), ("num_stages", cfg.num_stages)) if v is not None}
    h = torch.empty((n_assign, inter), dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, block_n))](
        x, w_gate, w_up, gate_q[1], up_q[1], s_gate, s_up, num_experts, h, sorted_assignments, block_expert, flat_ids,
        n_assign, top_k, hidden, inter,
        x.stride(0), w_gate.stride(0), w_gate.stride(1), w_gate.stride(2), *gate_q[2:], h.stride(0),
        QUANT=gate_q[0], SCALE_PER_TILE=scale_per_tile(gate_q[0], gate_q[6], block_k), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=dot_precision, EMULATE_BF16_RTNE=interpreting(), DIRECT=direct,
        HAS_SHARED=shared is not None, **launch,
    )  # fmt: skip
    # Skipped assignments leave their rows unwritten: zeros then, so that the sum stays right.
    slot_out = (torch.zeros if skip_negative_ids else torch.empty)((n_assign, hidden), dtype=torch.float32,
                                                                   device=x.device)
    _down_kernel[(num_blocks, triton.cdiv(hidden, block_n))](
        h, w_down, down_q[1], s_down, num_experts, slot_out, routing_weights, sorted_assignments, block_expert, flat_ids,
        n_assign, hidden, inter,
        h.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), *down_q[2:], slot_out.stride(0),
        QUANT=down_q[0], SCALE_PER_TILE=scale_per_tile(down_q[0], down_q[6], block_k), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=dot_precision, EMULATE_BF16_RTNE=interpreting(), DIRECT=direct,
        HAS_SHARED=shared is not None, **launch,
    )  # fmt: skip
    return slot_out.view(num_tokens, top_k, hidden).sum(dim=1)
