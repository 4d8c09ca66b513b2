"""Triton fused-MoE path: expert-sorted, block-aligned assignments and two grouped GEMM kernels.

1. :func:`align_by_expert` sorts the T*k (token, slot) assignments by expert and pads every expert's
   run to a multiple of ``block_m`` (vLLM's ``moe_align_block_size`` idea, written in torch ops, no
   host sync). Each block of ``block_m`` rows belongs to exactly one expert.
2. ``_gate_up_kernel``: per (row block, I tile), ``silu(x @ gate^T) * (x @ up^T)`` with fp32 accumulation,
   rounded to the activation dtype like the reference, into an [T*k, I] buffer.
3. ``_down_kernel``: per (row block, H tile), ``h @ down^T`` rounded to the activation dtype, then
   ``.float() * routing weight`` into an fp32 [T*k, H] buffer; the k slots of a token are summed in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..moe import check_moe_args
from .common import interpreting, round_to

# Tile sizes. tl.dot needs every tile dim >= 16.
DEFAULT_BLOCK_M = 16
LARGE_BLOCK_M = 64
LARGE_BATCH_ASSIGNMENTS = 4096  # from this many (token, slot) pairs on, use LARGE_BLOCK_M rows per block
DEFAULT_BLOCK_N = 64
DEFAULT_BLOCK_K = 64


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sorted_assignments [num_blocks*block_m] int32, block_expert [num_blocks] int32).

    ``sorted_assignments`` holds flat assignment ids ``t*k + j`` grouped by expert, each expert's run
    padded to a multiple of ``block_m`` with the sentinel ``T*k``. ``block_expert[b]`` is the expert of
    block ``b``, or -1 for blocks past the end (num_blocks is an upper bound, so no host sync is needed).
    """
    flat_ids = topk_ids.reshape(-1)
    n_assign = flat_ids.numel()
    device = flat_ids.device
    counts = torch.bincount(flat_ids, minlength=num_experts)
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
def _gate_up_kernel(
    x_ptr,
    w_gate_ptr,
    w_up_ptr,
    h_ptr,
    sorted_ptr,
    block_expert_ptr,
    n_assign,
    top_k,
    hidden,
    inter,
    stride_xt,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ht,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16_RTNE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assignment = tl.load(sorted_ptr + offs_m).to(tl.int64)
    row_valid = assignment < n_assign
    token = assignment // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < inter

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < hidden
        a = tl.load(
            x_ptr + token[:, None] * stride_xt + offs_k[None, :],
            mask=row_valid[:, None] & k_valid[None, :],
            other=0.0,
        )
        w_offsets = expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        w_mask = k_valid[:, None] & n_valid[None, :]
        b_gate = tl.load(w_gate_ptr + w_offsets, mask=w_mask, other=0.0)
        b_up = tl.load(w_up_ptr + w_offsets, mask=w_mask, other=0.0)
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
    out_ptr,
    routing_weight_ptr,
    sorted_ptr,
    block_expert_ptr,
    n_assign,
    hidden,
    inter,
    stride_ht,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ot,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16_RTNE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assignment = tl.load(sorted_ptr + offs_m).to(tl.int64)
    row_valid = assignment < n_assign
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < hidden

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < inter
        a = tl.load(
            h_ptr + assignment[:, None] * stride_ht + offs_k[None, :],
            mask=row_valid[:, None] & k_valid[None, :],
            other=0.0,
        )
        b = tl.load(
            w_down_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=k_valid[:, None] & n_valid[None, :],
            other=0.0,
        )
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


def moe_experts_triton(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: int = DEFAULT_BLOCK_K,
) -> torch.Tensor:
    """Triton implementation of :func:`engine.kernels.moe_experts` (same arguments and result)."""
    check_moe_args(x, w_gate, w_up, w_down, topk_ids, topk_weights)
    num_tokens, hidden = x.shape
    num_experts, inter, _ = w_gate.shape
    top_k = topk_ids.shape[1]
    n_assign = num_tokens * top_k
    if n_assign == 0:
        return torch.zeros_like(x)
    if block_m is None:
        block_m = LARGE_BLOCK_M if n_assign >= LARGE_BATCH_ASSIGNMENTS else DEFAULT_BLOCK_M

    x = x.contiguous()
    w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    sorted_assignments, block_expert = align_by_expert(topk_ids, num_experts, block_m)
    num_blocks = block_expert.numel()
    routing_weights = topk_weights.contiguous().reshape(-1)

    # The interpreter's bf16 tl.dot is wrong (it multiplies raw bits): upcast there. fp32 inputs use IEEE fp32, not TF32.
    dot_in_fp32 = x.dtype == torch.bfloat16 and interpreting()
    dot_precision = "ieee" if (x.dtype == torch.float32 or dot_in_fp32) else None

    h = torch.empty((n_assign, inter), dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, block_n))](
        x, w_gate, w_up, h, sorted_assignments, block_expert,
        n_assign, top_k, hidden, inter,
        x.stride(0), w_gate.stride(0), w_gate.stride(1), w_gate.stride(2), h.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=dot_precision, EMULATE_BF16_RTNE=interpreting(),
    )  # fmt: skip
    slot_out = torch.empty((n_assign, hidden), dtype=torch.float32, device=x.device)
    _down_kernel[(num_blocks, triton.cdiv(hidden, block_n))](
        h, w_down, slot_out, routing_weights, sorted_assignments, block_expert,
        n_assign, hidden, inter,
        h.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), slot_out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=dot_precision, EMULATE_BF16_RTNE=interpreting(),
    )  # fmt: skip
    return slot_out.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
