"""Shared layers of the BailingMoeV2 language model: RMSNorm, 3-D video rotary, SwiGLU MLP,
the sigmoid group-limited router, the expert bank and the MoE block with its MultiRouter.

Module and parameter names mirror the upstream checkpoint (see engine.loader for the one place
where stacked expert tensors are mapped to per-expert checkpoint names). The arithmetic itself
lives in engine.kernels (torch reference on CPU, Triton on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.placement import quant
from engine.models.thinker.config import LLMConfig

# The reference hard-codes the VideoRoPE channel split as mrope_section = [T 8, H 12, W 12]
# frequencies (spec §2.4): the highest 24 frequencies alternate H (even f) / W (odd f), the
# lowest 8 carry T. It is not in config.json.
VIDEO_ROPE_SECTION = (8, 12, 12)
# Group score = sum of the two largest biased scores of the group (spec §2.6 step 4).
GROUP_SCORE_TOP = 2
# Epsilon of the routing-weight renormalisation (spec §2.6 step 5).
ROUTER_NORM_EPS = 1e-20
GATE_TEXT, GATE_IMAGE, GATE_AUDIO = 0, 1, 2


@dataclass(frozen=True)
class Numerics:
    """How the model rounds: `dtype` of weights/activations, plus the two places where the
    upstream bf16 path rounds differently from its evident fp32 intent (spec §2.11).

    rope_bf16_tables: round the rotary inverse frequencies to bf16 (reference behaviour).
    router_bf16: run the router GEMM, sigmoid and expert-bias add in bf16 (reference behaviour).
    """

    dtype: torch.dtype = torch.float32
    rope_bf16_tables: bool = False
    router_bf16: bool = False

    @classmethod
    def reference(cls, dtype: torch.dtype) -> "Numerics":
        """What the upstream HF path computes: with bf16 weights it rounds tables and router to bf16."""
        bf16 = dtype == torch.bfloat16
        return cls(dtype=dtype, rope_bf16_tables=bf16, router_bf16=bf16)

    @classmethod
    def intent(cls, dtype: torch.dtype) -> "Numerics":
        """bf16 weights, but fp32 rotary tables and router (what the code evidently intends)."""
        return cls(dtype=dtype, rope_bf16_tables=False, router_bf16=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class VideoRotary(nn.Module):
    """Partial 3-D rotary tables: per token (p_T, p_H, p_W) -> cos/sin over the rotary channels.

    The inverse frequencies are computed (never loaded), so the module holds no tensors and can be
    built on the meta device.
    """

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.rotary_dim = cfg.rotary_dim
        self.theta = cfg.rope_theta

    def inv_freq(self, bf16_rounded: bool) -> torch.Tensor:
        exps = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        inv = 1.0 / (self.theta ** exps)
        return inv.to(torch.bfloat16).float() if bf16_rounded else inv

    def frequency_axes(self) -> torch.Tensor:
        """Axis of each frequency: 0 = T, 1 = H, 2 = W (spec §2.4 item 3)."""
        n_freq = self.rotary_dim // 2
        _, h_freqs, w_freqs = VIDEO_ROPE_SECTION
        f = torch.arange(n_freq)
        axis = torch.zeros(n_freq, dtype=torch.long)
        hw = f < h_freqs + w_freqs
        axis[hw & (f % 2 == 0)] = 1
        axis[hw & (f % 2 == 1)] = 2
        return axis

    def forward(self, position_ids: torch.Tensor, numerics: Numerics) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [3, B, L] -> (cos, sin) [B, L, rotary_dim] in the activation dtype."""
        device = position_ids.device
        inv_freq = self.inv_freq(numerics.rope_bf16_tables).to(device)
        angles = position_ids.float().unsqueeze(-1) * inv_freq  # [3, B, L, F], fp32
        axis = self.frequency_axes().to(device)
        picked = angles.gather(0, axis.view(1, 1, 1, -1).expand(1, *angles.shape[1:])).squeeze(0)
        emb = torch.cat([picked, picked], dim=-1)
        return emb.cos().to(numerics.dtype), emb.sin().to(numerics.dtype)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); used for the dense layers and the shared experts."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """One gate: sigmoid scores, expert bias for selection only, group-limited top-k,
    renormalised and scaled weights (spec §2.6). Returns (ids [N,k], weights fp32 [N,k])."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.scaling = cfg.routed_scaling_factor

    def logits(self, x: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        if numerics.router_bf16:
            return F.linear(x.to(torch.bfloat16), self.weight.to(torch.bfloat16))
        return F.linear(x.float(), self.weight.float())

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(logits)
        biased = scores + self.expert_bias.to(scores.dtype)
        n, e = biased.shape
        grouped = biased.view(n, self.n_group, e // self.n_group)
        group_scores = grouped.topk(min(GROUP_SCORE_TOP, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep_groups = group_scores.topk(self.topk_group, dim=-1).indices
        group_mask = torch.zeros(n, self.n_group, dtype=torch.bool, device=logits.device)
        group_mask.scatter_(1, keep_groups, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(n, e)
        candidates = biased.masked_fill(~expert_mask, float("-inf"))
        ids = candidates.topk(self.top_k, dim=-1, sorted=False).indices
        chosen = scores.gather(1, ids)
        denom = chosen.float().sum(dim=-1, keepdim=True) + ROUTER_NORM_EPS
        weights = chosen.float() / denom * self.scaling
        return ids, weights


class ExpertBank(nn.Module):
    """The routed experts' SwiGLU weights stacked per expert: gate/up [E, I, H], down [E, H, I].

    Checkpoint names are per expert (`experts.{e}.gate_proj.weight`); engine.loader maps them.

    Storage is plain (the model dtype) or, when loaded with expert_dtype fp8/fp8-block/int8/int4
    (engine.placement.quant), quantised values with fp32 scales in `<proj>_scale` (formats: engine.kernels.dequant).
    `runtime`, when set (engine.placement.expert_runtime), executes the experts instead of the stacked weights:
    a callable (x [T, H], ids [T, k], weights [T, k]) -> [T, H] with moe_experts' semantics.
    """

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        for name in ("gate_proj_scale", "up_proj_scale", "down_proj_scale"):
            self.register_buffer(name, None, persistent=False)
        self.runtime = None
        self.packed = None  # CPU: kernels.PackedExperts (bf16, oneDNN) or QuantizedCpuExperts (see pack_for_cpu)
        self._packed_kind = None

    @property
    def expert_dtype(self) -> str:
        if self._packed_kind is not None:
            return self._packed_kind
        return quant.storage_kind(self.gate_proj, self.gate_proj_scale)

    def pack_for_cpu(self, dtype: torch.dtype | None = None) -> None:
        """Replace the stacked weights by a copy laid out for the CPU kernels (gate and up fused per
        expert): oneDNN pre-packed for plain weights, torch's int8 / int4 weight-only layouts for
        quantised ones (activations in `dtype`, default the model's). The stacked tensors become meta
        placeholders so the memory is not held twice; shapes and parameter counts are unchanged."""
        scales = quant.bank_scales(self)
        self._packed_kind = self.expert_dtype
        if scales is None:
            self.packed = kernels.PackedExperts.from_weights(self.gate_proj, self.up_proj, self.down_proj)
        else:
            self.packed = kernels.QuantizedCpuExperts.from_weights(
                self.gate_proj, self.up_proj, self.down_proj, scales, dtype or torch.get_default_dtype(),
                self._packed_kind.split("-")[0])
            for name in ("gate_proj_scale", "up_proj_scale", "down_proj_scale"):
                old = self._buffers[name]
                self._buffers[name] = torch.empty(old.shape, dtype=old.dtype, device="meta")
        e, i, h = quant.bank_dims(self)
        for name, shape in (("gate_proj", (e, i, h)), ("up_proj", (e, i, h)), ("down_proj", (e, h, i))):
            # logical shapes (int4 storage holds two columns per byte): parameter counts stay the checkpoint's
            self._parameters[name] = nn.Parameter(torch.empty(shape, dtype=self._parameters[name].dtype, device="meta"),
                                                  requires_grad=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.runtime is not None:
            return self.runtime(x, ids, weights)
        if self.packed is not None:
            return kernels.moe_experts_packed(x, self.packed, ids, weights)
        return kernels.moe_experts(x, self.gate_proj, self.up_proj, self.down_proj, ids, weights,
                                   scales=quant.bank_scales(self))


@dataclass
class RouterTrace:
    """What one MoE layer decided, recorded only when asked (parity, statistics)."""

    ids: torch.Tensor
    weights: torch.Tensor
    gate_used: torch.Tensor
    logits: dict[str, torch.Tensor]


class MoEBlock(nn.Module):
    """Routed experts + shared experts; with MultiRouter, image and audio tokens use their own gates."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.multi_router = cfg.uses_multi_router
        if self.multi_router:
            self.image_gate = Router(cfg)
            self.audio_gate = Router(cfg)
        self.experts = ExpertBank(cfg)
        self.shared_experts = (
            SwiGLUMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
            if cfg.num_shared_experts else None)

    def forward(self, x: torch.Tensor, numerics: Numerics, image_mask: torch.Tensor | None = None,
                audio_mask: torch.Tensor | None = None, trace: list | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = {"text": self.gate.logits(flat, numerics)}
        ids, weights = self.gate.route(logits["text"])
        gate_used = torch.full((flat.shape[0],), GATE_TEXT, dtype=torch.long, device=x.device)
        modal = self.multi_router and (image_mask is not None or audio_mask is not None)
        if modal or (trace is not None and self.multi_router):
            # All three gates are evaluated on every token; masks pick per token (spec §2.7).
            for name, router, mask, code in (("image", self.image_gate, image_mask, GATE_IMAGE),
                                             ("audio", self.audio_gate, audio_mask, GATE_AUDIO)):
                logits[name] = router.logits(flat, numerics)
                if mask is None:
                    continue
                m = mask.reshape(-1).bool()
                if m.any():
                    r_ids, r_w = router.route(logits[name][m])
                    ids = ids.clone()
                    weights = weights.clone()
                    ids[m], weights[m] = r_ids, r_w
                    gate_used[m] = code
        if trace is not None:
            trace.append(RouterTrace(ids=ids.view(*shape[:-1], -1), weights=weights.view(*shape[:-1], -1),
                                     gate_used=gate_used.view(shape[:-1]),
                                     logits={k: v.float().view(*shape[:-1], -1) for k, v in logits.items()}))
        out = self.experts(flat, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)
