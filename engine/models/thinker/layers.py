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
from engine.kernels.router import GROUP_SCORE_TOP, ROUTER_NORM_EPS, route_experts  # noqa: F401 (re-exported)
from engine.placement import quant
from engine.models.thinker.config import LLMConfig

# The reference hard-codes the VideoRoPE channel split as mrope_section = [T 8, H 12, W 12]
# frequencies (spec §2.4): the highest 24 frequencies alternate H (even f) / W (odd f), the
# lowest 8 carry T. It is not in config.json.
VIDEO_ROPE_SECTION = (8, 12, 12)
# The reference assembles its cos/sin channel by channel from that split: 2 x (8 + 12 + 12) = 64
# channels at most, whatever the rotary width; channel c takes its axis from c mod 32 and its angle
# from channel c of the duplicated [f, f] table of the whole rotary width.
VIDEO_ROPE_CHANNELS = 2 * sum(VIDEO_ROPE_SECTION)


def rotated_channels(cfg: LLMConfig) -> int:
    """How many leading channels of each head the reference rotates: with the video rotary the rotary width
    capped at the 64 channels its hard-coded split describes (spec §2.4 item 3); plain RoPE (no
    rope_scaling) rotates the whole rotary width."""
    return min(cfg.rotary_dim, VIDEO_ROPE_CHANNELS) if cfg.uses_video_rope else cfg.rotary_dim


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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)`` in one fused kernel."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class VideoRotary(nn.Module):
    """Partial 3-D rotary tables: per token (p_T, p_H, p_W) -> cos/sin over the rotary channels (a config
    without rope_scaling: plain partial RoPE, every channel on p_T).

    The inverse frequencies are computed (never loaded), so the module holds no tensors and can be
    built on the meta device.
    """

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.rotary_dim = cfg.rotary_dim
        self.channels = rotated_channels(cfg)
        self.video = cfg.uses_video_rope
        self.theta = cfg.rope_theta
        self.max_positions = cfg.max_position_embeddings
        self._constants: dict[tuple, torch.Tensor] = {}  # per device: inverse frequencies, axes, decode tables

    def inv_freq(self, bf16_rounded: bool) -> torch.Tensor:
        exps = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        inv = 1.0 / (self.theta ** exps)
        return inv.to(torch.bfloat16).float() if bf16_rounded else inv

    def channel_frequencies(self) -> torch.Tensor:
        """Frequency index of each rotated channel: channel c of the duplicated [f, f] table, c mod (rotary_dim / 2)."""
        return torch.arange(self.channels) % (self.rotary_dim // 2)

    def channel_axes(self) -> torch.Tensor:
        """Axis of each rotated channel: 0 = T, 1 = H, 2 = W (spec §2.4 item 3). With j = c mod 32: H for
        even j < 24, W for odd j < 24, T for j >= 24; for a 64-wide rotary, channels c and c + 32 (one
        frequency) share an axis. Plain RoPE (no rope_scaling): every channel on T."""
        if not self.video:
            return torch.zeros(self.channels, dtype=torch.long)
        _, h_freqs, w_freqs = VIDEO_ROPE_SECTION
        j = torch.arange(self.channels) % (VIDEO_ROPE_CHANNELS // 2)
        axis = torch.zeros(self.channels, dtype=torch.long)
        hw = j < h_freqs + w_freqs
        axis[hw & (j % 2 == 0)] = 1
        axis[hw & (j % 2 == 1)] = 2
        return axis

    def _constant(self, name: str, device: torch.device, bf16_rounded: bool) -> torch.Tensor:
        """The inverse frequencies ("inv_freq") or frequency axes ("axis") on `device`, made once."""
        key = (name, device, bf16_rounded)
        if key not in self._constants:
            value = {"inv_freq": lambda: self.inv_freq(bf16_rounded), "axis": self.channel_axes,
                     "freq": self.channel_frequencies}[name]()
            self._constants[key] = value.to(device)
        return self._constants[key]

    def forward(self, position_ids: torch.Tensor, numerics: Numerics) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [3, B, L] -> (cos, sin) [B, L, channels] in the activation dtype."""
        device = position_ids.device
        inv_freq = self._constant("inv_freq", device, numerics.rope_bf16_tables)
        freq = self._constant("freq", device, numerics.rope_bf16_tables)
        angles = position_ids.float().unsqueeze(-1) * inv_freq[freq]  # [3, B, L, channels], fp32
        axis = self._constant("axis", device, numerics.rope_bf16_tables)
        emb = angles.gather(0, axis.view(1, 1, 1, -1).expand(1, *angles.shape[1:])).squeeze(0)
        return emb.cos().to(numerics.dtype), emb.sin().to(numerics.dtype)

    def decode_tables(self, device: torch.device, numerics: Numerics) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [max_positions, channels] of every position p with p_T = p_H = p_W = p (what every
        decode step uses, spec §3.3), made once per device: a step then only indexes them."""
        key = ("tables", torch.device(device), numerics.rope_bf16_tables, numerics.dtype)
        if key not in self._constants:
            p = torch.arange(self.max_positions, device=device).view(1, 1, -1).expand(3, 1, -1)
            cos, sin = self.forward(p, numerics)
            self._constants[key] = torch.stack([cos[0], sin[0]])
        table = self._constants[key]
        return table[0], table[1]


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

    def route(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, k], fp32 weights [N, k]); `bias` [N, E] gives each row its own gate's expert bias
        (default: this gate's)."""
        return route_experts(logits, self.expert_bias if bias is None else bias, self.n_group, self.topk_group,
                             self.top_k, self.scaling)


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
        # (gate and up fused per expert [E, 2I, ...], their scales or None) whose halves gate_proj and up_proj
        # (and their scales) are, when loaded that way (set_fused, quant.load_quantized_bank); until packed
        self.fused_gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def set_fused(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Plain weights given as gate and up fused per expert (gate_up [E, 2I, H], as the CPU kernels read them)
        and down [E, H, I]: gate_proj and up_proj become the two halves of gate_up (views, no copy), and
        pack_for_cpu packs gate_up as it is instead of concatenating the halves again."""
        i = gate_up.shape[1] // 2
        self.gate_proj = nn.Parameter(gate_up[:, :i], requires_grad=False)
        self.up_proj = nn.Parameter(gate_up[:, i:], requires_grad=False)
        self.down_proj = nn.Parameter(down, requires_grad=False)
        self.fused_gate_up = (gate_up, None)

    @property
    def expert_dtype(self) -> str:
        if self._packed_kind is not None:
            return self._packed_kind
        return quant.storage_kind(self.gate_proj, self.gate_proj_scale)

    @property
    def sync_free(self) -> bool:
        """True when forward() reads nothing back to the host, so a CUDA graph can capture it: the
        fused Triton path on stacked weights, plain or quantised (fp8 / int8 / int4 dequantised in the
        kernel: 0 host syncs per decode step measured at the real shape on an H200), or a runtime that
        says so (its `sync_free`). The CPU's packed layouts and the torch reference are not."""
        if self.runtime is not None:
            return bool(getattr(self.runtime, "sync_free", False))
        if self.packed is not None:
            return False
        return kernels.dispatch.use_triton("auto", self.gate_proj)

    def pack_for_cpu(self, dtype: torch.dtype | None = None) -> None:
        """Replace the stacked weights by a copy laid out for the CPU kernels (gate and up fused per
        expert): oneDNN pre-packed for plain weights, torch's int8 / int4 weight-only layouts for
        quantised ones (activations in `dtype`, default the model's). The stacked tensors become meta
        placeholders so the memory is not held twice; shapes and parameter counts are unchanged."""
        scales = quant.bank_scales(self)
        self._packed_kind = self.expert_dtype
        fused, self.fused_gate_up = self.fused_gate_up, None
        if scales is None:
            self.packed = kernels.PackedExperts.from_weights(self.gate_proj, self.up_proj, self.down_proj,
                                                             gate_up=None if fused is None else fused[0])
        else:
            self.packed = kernels.QuantizedCpuExperts.from_weights(
                self.gate_proj, self.up_proj, self.down_proj, scales, dtype or torch.get_default_dtype(),
                self._packed_kind.split("-")[0], fused=fused)
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


def native_weight(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A bias-free projection's [out, in] CPU weight as the native kernels read it: (plain weight, None) for
    an nn.Linear or a PackedLinear kept plain, (int8 weight, its per-row scales) for a PackedLinear bound
    natively in int8; None otherwise (biased, pre-packed, int4 ...)."""
    if getattr(linear, "bias", None) is not None:
        return None
    if isinstance(linear, kernels.PackedLinear):
        if linear.native is not None:
            return linear.native.weight, linear.native.scale
        w = linear.packed
    else:
        w = getattr(linear, "weight", None)
    ok = isinstance(w, torch.Tensor) and not w.is_mkldnn and w.device.type == "cpu" and w.dtype != torch.int8
    return (w, None) if ok else None


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
        shared_width = cfg.moe_intermediate_size * cfg.num_shared_experts
        # Built whenever the reference builds it (names in the checkpoint), run only when it has a width.
        self.shared_experts = SwiGLUMLP(cfg.hidden_size, shared_width) if cfg.shared_experts_built else None
        self.shared_width = shared_width if cfg.shared_experts_built else 0
        self.cpu_shared = None  # the shared expert's plain weights, run with the packed routed experts (bind_cpu_shared)

    @property
    def active_shared(self) -> SwiGLUMLP | None:
        """The shared expert when it contributes (a 0-wide one, num_shared_experts = 0, adds zeros)."""
        return self.shared_experts if self.shared_width else None

    def bind_cpu_shared(self) -> bool:
        """After kernels.pack_linears / ExpertBank.pack_for_cpu: where the routed experts have a native
        decode table (plain fp32/bf16 or int8 experts) and the shared expert's three projections hold plain
        bias-free weights of the activations' dtype that fit that table (ExpertTable.shared_fits), run the
        shared expert with them (one native pass per token, ``routed.to(dtype) + shared(x)`` as before).
        True when bound."""
        packed, mlp = self.experts.packed, self.active_shared
        table = None if mlp is None or packed is None else packed.native_table()
        if table is None or not table.shared_fits(packed.dtype):
            return False
        weights = []
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            found = native_weight(linear)
            if found is None or found[1] is not None or found[0].dtype != packed.dtype or not found[0].is_contiguous():
                return False
            weights.append(found[0].detach())
        self.cpu_shared = tuple(weights)
        return True

    def forward(self, x: torch.Tensor, numerics: Numerics, image_mask: torch.Tensor | None = None,
                audio_mask: torch.Tensor | None = None, trace: list | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        modal = self.multi_router and (image_mask is not None or audio_mask is not None)
        if modal or (trace is not None and self.multi_router):
            # All three gates are evaluated on every token; masks pick per token (spec §2.7). Each token's
            # row of logits and expert bias is taken from its gate and all rows are routed at once
            # (routing is row by row, so this is what routing each gate's tokens apart gives).
            gates = (("text", self.gate, None), ("image", self.image_gate, image_mask),
                     ("audio", self.audio_gate, audio_mask))
            logits = {name: router.logits(flat, numerics) for name, router, _ in gates}
            gate_used = torch.zeros(flat.shape[0], dtype=torch.long, device=x.device)
            for code, (_, _, mask) in zip((GATE_IMAGE, GATE_AUDIO), gates[1:]):
                if mask is not None:
                    gate_used = gate_used.masked_fill(mask.reshape(-1).to(x.device, torch.bool), code)
            pick = gate_used.view(-1, 1, 1).expand(-1, 1, self.gate.weight.shape[0])
            chosen = torch.stack([logits[name] for name, _, _ in gates], dim=1).gather(1, pick).squeeze(1)
            biases = torch.stack([router.expert_bias for _, router, _ in gates])
            ids, weights = self.gate.route(chosen, biases.index_select(0, gate_used))
        else:
            logits = {"text": self.gate.logits(flat, numerics)}
            ids, weights = self.gate.route(logits["text"])
            gate_used = None
        if trace is not None:
            if gate_used is None:
                gate_used = torch.full((flat.shape[0],), GATE_TEXT, dtype=torch.long, device=x.device)
            trace.append(RouterTrace(ids=ids.view(*shape[:-1], -1), weights=weights.view(*shape[:-1], -1),
                                     gate_used=gate_used.view(shape[:-1]),
                                     logits={k: v.float().view(*shape[:-1], -1) for k, v in logits.items()}))
        shared = self._shared_for_fused_pass()
        if shared is not None:  # routed + shared experts in one Triton pass
            bank = self.experts
            return kernels.moe_experts(flat, bank.gate_proj, bank.up_proj, bank.down_proj, ids, weights,
                                       shared=shared).view(shape)
        if self.cpu_shared is not None and self.experts.runtime is None:
            return kernels.moe_experts_packed(flat, self.experts.packed, ids, weights, shared=self.cpu_shared).view(shape)
        out = self.experts(flat, ids, weights)
        if self.active_shared is not None:
            out = out + self.active_shared(flat)
        return out.view(shape)

    def _shared_for_fused_pass(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The shared expert's weights when the routed experts run the fused Triton kernel on plain
        stacked weights and the shared expert has one routed expert's shape; else None."""
        bank, mlp = self.experts, self.active_shared
        if mlp is None or bank.runtime is not None or bank.packed is not None or bank.gate_proj_scale is not None:
            return None
        linears = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            return None
        weights = tuple(m.weight for m in linears)
        if weights[0].shape != bank.gate_proj.shape[1:] or weights[2].shape != bank.down_proj.shape[1:] or \
                weights[0].dtype != bank.gate_proj.dtype:
            return None
        return weights if kernels.dispatch.use_triton("auto", bank.gate_proj, *weights) else None
