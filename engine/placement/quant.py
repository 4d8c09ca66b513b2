"""Quantised routed-expert weights: FP8 (e4m3) and int8, one fp32 scale per output channel.

Storage
-------
Every expert matrix ``W [out, in]`` (gate/up ``[I, H]``, down ``[H, I]``) is stored as ``q [out, in]``
plus ``scale [out]`` (fp32) with ``W ≈ q · scale[:, None]``:

* ``fp8``: ``torch.float8_e4m3fn``; ``scale = amax_row / 448`` so each row's largest magnitude maps to
  the largest finite e4m3 value. Rounding is round-to-nearest-even; the relative error of a value is at
  most 2^-4 (3 mantissa bits) and, for values in e4m3's subnormal range (|W|/scale < 2^-6), the
  absolute error is at most 2^-10 · scale.
* ``int8``: symmetric, ``scale = amax_row / 127``, ``q = round(W / scale)`` in [-127, 127]; the
  absolute error is at most scale / 2.

A row that is all zeros gets ``scale = 1`` (and q = 0), so it dequantises to exact zeros. Non-finite
weights are rejected. ``"bf16"`` means *unquantised*: the experts keep the model's activation dtype
exactly as before (the name follows the planner's ``--expert-dtype``; in an fp32 model they stay fp32).

Loading quantises one expert at a time from the checkpoint's bf16/fp32 tensors (upcast to fp32 on the
target device, quantised, written into the stacked ``[E, ...]`` storage), so a layer is never held in
high precision as a whole.

Compute
-------
:func:`moe_experts_quantized` has the semantics of :func:`engine.kernels.moe_experts`: assignments are
grouped by expert, each active expert's three matrices are dequantised on the fly (``q.float() · scale``
cast to the activation dtype) and one SwiGLU GEMM block runs over its tokens; weighted results are
combined in fp32 with ``index_add_`` and cast back. The same code runs on CPU and CUDA (no fp8 kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels.moe import check_routing, group_by_expert, swiglu
from engine.loader import CheckpointError, TensorReader, checkpoint_sources

EXPERT_DTYPES = ("bf16", "fp8", "int8")
QUANT_STORAGE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
INT8_MAX = 127.0
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def check_expert_dtype(expert_dtype: str) -> str:
    if expert_dtype not in EXPERT_DTYPES:
        raise ValueError(f"unknown expert dtype {expert_dtype!r}: choose one of {list(EXPERT_DTYPES)}")
    return expert_dtype


def storage_kind(t: torch.Tensor) -> str:
    """'fp8' / 'int8' for quantised storage, 'bf16' (= unquantised) otherwise."""
    for name, dt in QUANT_STORAGE.items():
        if t.dtype == dt:
            return name
    return "bf16"


def _row_scales(w: torch.Tensor, qmax: float) -> torch.Tensor:
    amax = w.abs().amax(dim=-1)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("cannot quantise a weight with non-finite values")
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize(w: torch.Tensor, expert_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., out, in] (any float dtype) -> (q [..., out, in] in fp8/int8, scale [..., out] fp32)."""
    if expert_dtype not in QUANT_STORAGE:
        raise ValueError(f"quantize: expert dtype must be one of {sorted(QUANT_STORAGE)}, got {expert_dtype!r}")
    w = w.float()
    if expert_dtype == "fp8":
        scale = _row_scales(w, FP8_MAX)
        q = (w / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        scale = _row_scales(w, INT8_MAX)
        q = torch.round(w / scale.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., out, in], scale [..., out] -> q · scale in fp32, then cast to `dtype`."""
    return (q.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)


@dataclass
class ExpertWeights:
    """One routed expert: gate/up [I, H], down [H, I], either plain (scales None) or quantised."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_scale: torch.Tensor | None = None
    up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.gate_scale is not None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.gate, self.up, self.down, self.gate_scale, self.up_scale, self.down_scale)
                if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.gate.device

    def map(self, fn) -> "ExpertWeights":
        """A copy with `fn` applied to every tensor present (moves, pinning)."""
        f = lambda t: None if t is None else fn(t)  # noqa: E731
        return ExpertWeights(f(self.gate), f(self.up), f(self.down), f(self.gate_scale), f(self.up_scale),
                             f(self.down_scale))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ExpertWeights":
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) in `dtype`, dequantised when quantised (plain weights of that dtype are
        returned as they are)."""
        if not self.quantized:
            return self.gate.to(dtype), self.up.to(dtype), self.down.to(dtype)
        return (dequantize(self.gate, self.gate_scale, dtype), dequantize(self.up, self.up_scale, dtype),
                dequantize(self.down, self.down_scale, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of this expert on x [M, H] in x's dtype (dequantising on the fly)."""
        return swiglu(x, *self.materialize(x.dtype))

    @classmethod
    def from_float(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, expert_dtype: str,
                   dtype: torch.dtype) -> "ExpertWeights":
        """Build from high-precision matrices: quantised for fp8/int8, cast to `dtype` for 'bf16'."""
        check_expert_dtype(expert_dtype)
        if expert_dtype == "bf16":
            return cls(gate.to(dtype), up.to(dtype), down.to(dtype))
        (qg, sg), (qu, su), (qd, sd) = (quantize(w, expert_dtype) for w in (gate, up, down))
        return cls(qg, qu, qd, sg, su, sd)


def moe_experts_quantized(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                          s_gate: torch.Tensor, s_up: torch.Tensor, s_down: torch.Tensor,
                          topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """:func:`engine.kernels.moe_experts` on quantised stacked weights: w_gate, w_up [E, I, H] and
    w_down [E, H, I] in fp8/int8 with scales [E, I], [E, I], [E, H]. Each active expert is dequantised
    to x's dtype just before its GEMM block; the combine is fp32 as in the reference."""
    if x.dim() != 2 or w_gate.dim() != 3 or w_gate.shape != w_up.shape or w_gate.shape[2] != x.shape[1] \
            or w_down.shape != (w_gate.shape[0], w_gate.shape[2], w_gate.shape[1]):
        raise ValueError(f"inconsistent shapes: x {tuple(x.shape)}, w_gate {tuple(w_gate.shape)}, "
                         f"w_down {tuple(w_down.shape)}")
    if s_gate.shape != w_gate.shape[:2] or s_up.shape != w_up.shape[:2] or s_down.shape != w_down.shape[:2]:
        raise ValueError("scales must be one fp32 value per output channel: [E, I], [E, I], [E, H]")
    check_routing(topk_ids, topk_weights, x.shape[0])
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
# Loading
# ---------------------------------------------------------------------------------------------


def read_checkpoint_experts(reader: TensorReader, prefix: str, bank_name: str, num_experts: int,
                            inter: int, hidden: int, consumed: set[str]):
    """Yield (e, gate, up, down) for each expert of the bank `bank_name` (e.g. 'model.layers.1.mlp.experts'),
    read one expert at a time as stored (memory-mapped, checkpoint dtype, on the host). Names come from
    :func:`engine.loader.checkpoint_sources` (the one place that maps stacked to per-expert names);
    missing or mis-shaped tensors raise CheckpointError. Consumed checkpoint names are added to `consumed`."""
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    names = {proj: checkpoint_sources(f"{bank_name}.{proj}", (num_experts, *shapes[proj])) for proj in PROJECTIONS}
    for e in range(num_experts):
        mats = []
        for proj in PROJECTIONS:
            src = names[proj][e]
            full = prefix + src.name
            if full not in reader.files.weight_map:
                raise CheckpointError(f"{reader.files.root}: tensor '{full}' is missing from the checkpoint")
            got = reader.shape(full)
            if got != shapes[proj]:
                raise CheckpointError(f"{reader.files.root / reader.files.weight_map[full]}: tensor '{full}' "
                                      f"has shape {list(got)}, expected {list(shapes[proj])}")
            mats.append(reader.get(full))
            consumed.add(full)
        yield (e, *mats)


def set_bank_storage(bank, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                     scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
    """Install stacked storage on an engine.models.thinker.layers.ExpertBank (parameters frozen; scales as buffers)."""
    for name, value in zip(PROJECTIONS, (gate, up, down)):
        bank._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    for name, value in zip(PROJECTIONS, scales if scales is not None else (None, None, None)):
        bank._buffers[f"{name}_scale"] = value


def load_quantized_bank(bank, reader: TensorReader, prefix: str, bank_name: str, expert_dtype: str,
                        device: torch.device | str, progress=None) -> set[str]:
    """Fill `bank` (an ExpertBank, possibly on meta) with fp8/int8 experts quantised one at a time
    from the checkpoint. Returns the checkpoint names consumed."""
    if expert_dtype not in QUANT_STORAGE:
        raise ValueError(f"load_quantized_bank: expert dtype must be fp8 or int8, got {expert_dtype!r}")
    e_n, inter, hidden = bank.gate_proj.shape
    store = QUANT_STORAGE[expert_dtype]
    q = {p: torch.empty(shape, dtype=store, device=device)
         for p, shape in (("gate_proj", (e_n, inter, hidden)), ("up_proj", (e_n, inter, hidden)),
                          ("down_proj", (e_n, hidden, inter)))}
    s = {p: torch.empty(shape, dtype=torch.float32, device=device)
         for p, shape in (("gate_proj", (e_n, inter)), ("up_proj", (e_n, inter)), ("down_proj", (e_n, hidden)))}
    consumed: set[str] = set()
    for e, *mats in read_checkpoint_experts(reader, prefix, bank_name, e_n, inter, hidden, consumed):
        for proj, w in zip(PROJECTIONS, mats):
            qe, se = quantize(w.to(device=device, dtype=torch.float32), expert_dtype)
            q[proj][e].copy_(qe)
            s[proj][e].copy_(se)
        if progress is not None:
            progress(e + 1, e_n, f"{bank_name} ({expert_dtype})")
    set_bank_storage(bank, q["gate_proj"], q["up_proj"], q["down_proj"],
                     (s["gate_proj"], s["up_proj"], s["down_proj"]))
    return consumed


def quantize_bank_(bank, expert_dtype: str) -> None:
    """Quantise an already loaded (unquantised) ExpertBank in place, expert by expert."""
    if expert_dtype == "bf16":
        return
    if bank.gate_proj_scale is not None:
        raise ValueError("expert bank is already quantised")
    parts = {p: [quantize(w, expert_dtype) for w in getattr(bank, p)] for p in PROJECTIONS}
    stacked = {p: (torch.stack([q for q, _ in v]), torch.stack([s for _, s in v])) for p, v in parts.items()}
    set_bank_storage(bank, *(stacked[p][0] for p in PROJECTIONS), tuple(stacked[p][1] for p in PROJECTIONS))


def bank_expert(bank, e: int) -> ExpertWeights:
    """Expert `e` of an ExpertBank as views (no copy), quantised or plain."""
    sc = [getattr(bank, f"{p}_scale") for p in PROJECTIONS]
    return ExpertWeights(bank.gate_proj[e], bank.up_proj[e], bank.down_proj[e],
                         *(None if s is None else s[e] for s in sc))
