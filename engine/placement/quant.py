"""Quantised routed-expert weights: FP8 e4m3 (per-channel or 128x128 block scales), int8 (per-channel)
and int4 weight-only with group scales (w4a16, two values per byte).

Storage
-------
Every expert matrix ``W [out, in]`` (gate/up ``[I, H]``, down ``[H, I]``) is stored as values ``q``
plus fp32 scales in the formats of :mod:`engine.kernels.dequant` (the one definition of how they
dequantise):

* ``fp8``: ``torch.float8_e4m3fn`` ``[out, in]``, ``scale [out] = amax_row / 448`` so each row's largest
  magnitude maps to the largest finite e4m3 value. Round-to-nearest-even; the relative error of a value
  is at most 2^-4 (3 mantissa bits) and, in e4m3's subnormal range (|W|/scale < 2^-6), the absolute
  error is at most 2^-10 · scale.
* ``fp8-block``: the same values with one scale per 128x128 block, ``scale [⌈out/128⌉, ⌈in/128⌉]``
  (the layout of block-quantised fp8 checkpoints); the same bounds with the block's amax.
* ``int8``: symmetric, ``scale [out] = amax_row / 127``, ``q = round(W / scale)`` in [-127, 127]; the
  absolute error is at most scale / 2.
* ``int4``: symmetric per group of input columns (128, or the largest power of two dividing ``in``
  when 128 does not), ``scale [out, in/group] = amax_group / 7``, values ``round(W / scale)`` in
  [-7, 7] packed two per byte (``uint8 [out, in/2]``); the absolute error is at most scale / 2.

A row (block, group) that is all zeros gets scale 1 and dequantises to exact zeros. Non-finite
weights are rejected. ``"bf16"`` means *unquantised*: the experts keep the model's activation dtype
exactly as before (the name follows the planner's ``--expert-dtype``; in an fp32 model they stay fp32).

Loading quantises one expert at a time from the checkpoint's bf16/fp32 tensors (upcast to fp32 on the
target device, quantised, written into the stacked ``[E, ...]`` storage), so a layer is never held in
high precision as a whole.

Compute
-------
:func:`engine.kernels.moe_experts` with ``scales=`` runs quantised stacked experts: on CUDA the fused
Triton kernel dequantises each weight tile in registers (no bf16 copy of the weights); the torch path
dequantises one active expert at a time. On the CPU, ``ExpertBank.pack_for_cpu`` turns a quantised
bank into :class:`engine.kernels.moe.QuantizedCpuExperts` (torch's int8 / int4 weight-only kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kernels import huge_pages, native
from engine.kernels.dequant import (FP8_BLOCK, INT4_MAX, INT4_OFFSET, NIBBLE_BITS, QUANT_ROW_BLOCK, check_input_columns,
                                   dequantize, quantize_int8_rows, quantized_into)
from engine.kernels.moe import swiglu
from engine.loader import TensorReader, check_tensor, checkpoint_sources

EXPERT_DTYPES = ("bf16", "fp8", "fp8-block", "int8", "int4")
QUANT_STORAGE = {"fp8": torch.float8_e4m3fn, "fp8-block": torch.float8_e4m3fn, "int8": torch.int8,
                 "int4": torch.uint8}
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
INT4_GROUP = 128  # input columns per int4 scale (when they divide the input width)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def check_expert_dtype(expert_dtype: str) -> str:
    if expert_dtype not in EXPERT_DTYPES:
        raise ValueError(f"unknown expert dtype {expert_dtype!r}: choose one of {list(EXPERT_DTYPES)}")
    return expert_dtype


def int4_group_size(cols: int) -> int:
    """Input columns per int4 scale for a matrix of `cols` input columns."""
    if cols % 2:
        raise ValueError(f"int4 stores two input columns per byte and needs an even number of them, got {cols}: "
                         "use expert dtype int8 (or fp8) for this model")
    group = INT4_GROUP
    while cols % group:
        group //= 2
    return group


def storage_kind(t: torch.Tensor, scale: torch.Tensor | None = None) -> str:
    """'fp8' / 'fp8-block' / 'int8' / 'int4' for quantised storage, 'bf16' (= unquantised) otherwise.
    fp8 per-channel and block storage differ only by the scale's shape (pass it to tell them apart)."""
    if t.dtype == torch.float8_e4m3fn:
        return "fp8-block" if scale is not None and scale.dim() == t.dim() else "fp8"
    for name in ("int8", "int4"):
        if t.dtype == QUANT_STORAGE[name]:
            return name
    return "bf16"


def _scales(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("cannot quantise a weight with non-finite values")
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def _block_amax(w: torch.Tensor) -> torch.Tensor:
    """|W| max per 128x128 block of [..., out, in] -> [..., ⌈out/128⌉, ⌈in/128⌉]."""
    out, cols = w.shape[-2:]
    rows_b, cols_b = -(-out // FP8_BLOCK), -(-cols // FP8_BLOCK)
    padded = F.pad(w.abs(), (0, cols_b * FP8_BLOCK - cols, 0, rows_b * FP8_BLOCK - out))
    return padded.reshape(*w.shape[:-2], rows_b, FP8_BLOCK, cols_b, FP8_BLOCK).amax(dim=(-3, -1))


def quantize(w: torch.Tensor, expert_dtype: str, out: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., out, in] (any float dtype) -> (q, scale fp32) in the storage of `expert_dtype`
    (shapes in the module doc); written into `out` (q, scale) and returned when given."""
    if expert_dtype not in QUANT_STORAGE:
        raise ValueError(f"quantize: expert dtype must be one of {sorted(QUANT_STORAGE)}, got {expert_dtype!r}")
    if expert_dtype == "int4":
        return quantize_int4_rows(w, out=out)
    if expert_dtype == "int8":
        return quantize_int8_rows(w, out=out)
    if out is not None:
        return quantized_into(out, *quantize(w, expert_dtype))
    check_input_columns(w)
    w = w.float()
    rows, cols = w.shape[-2:]
    if expert_dtype == "fp8":
        scale = _scales(w.abs().amax(dim=-1), FP8_MAX)
        q = (w / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    elif expert_dtype == "fp8-block":
        scale = _scales(_block_amax(w), FP8_MAX)
        full = scale.repeat_interleave(FP8_BLOCK, -1)[..., :cols].repeat_interleave(FP8_BLOCK, -2)[..., :rows, :]
        q = (w / full).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_int4_rows(w: torch.Tensor, reference: bool = False,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 with one fp32 scale per group of int4_group_size(in) input columns: W [..., out, in] -> (packed uint8
    [..., out, in/2], scale [..., out, groups]); scale = amax_group / 7 (1 for an all-zero group), values =
    round(W / scale). Computed QUANT_ROW_BLOCK rows at a time (rows are quantised on their own: the same
    result as in one go), so the fp32 temporaries stay small enough to be cache-resident. An fp32 or bf16 CPU
    weight is quantised by the native quantiser where it is built (native.quantize_rows: the same values,
    several times faster); ``reference`` True: by these torch ops, the definition. ``out`` (q, scale of those
    shapes): the result written there (a bank's storage while loading: no second copy)."""
    check_input_columns(w)
    cols = w.shape[-1]
    group = int4_group_size(cols)
    if not reference:
        done = native.quantize_rows(w, group, out=out)
        if done is not None:
            return done
    rows = w.reshape(-1, cols)
    q = torch.empty((rows.shape[0], cols // 2), dtype=torch.uint8, device=w.device)
    scale = torch.empty((rows.shape[0], cols // group), dtype=torch.float32, device=w.device)
    for r0 in range(0, rows.shape[0], QUANT_ROW_BLOCK):
        grouped = rows[r0:r0 + QUANT_ROW_BLOCK].float().reshape(-1, cols // group, group)
        s = _scales(grouped.abs().amax(dim=-1), float(INT4_MAX))
        pairs = torch.round(grouped / s.unsqueeze(-1)).clamp_(-INT4_MAX, INT4_MAX).view(-1, cols // 2, 2)
        # each byte as dequant.pack_int4 stores it, (even + 8) | (odd + 8) << 4, computed exactly in fp32 and converted
        # once (half the conversions of converting every value; torch's float -> integer casts are the slow part)
        high = float(1 << NIBBLE_BITS)
        q[r0:r0 + QUANT_ROW_BLOCK] = (pairs[..., 1] * high).add_(pairs[..., 0]).add_(INT4_OFFSET * (high + 1)).to(torch.uint8)
        scale[r0:r0 + QUANT_ROW_BLOCK] = s
    return quantized_into(out, q.reshape(*w.shape[:-1], cols // 2), scale.reshape(*w.shape[:-1], cols // group))


def stacked_shapes(expert_dtype: str, experts: int, inter: int, hidden: int) -> dict[str, tuple[tuple, tuple]]:
    """Per projection, (q shape, scale shape) of a stacked [E, ...] bank stored as `expert_dtype`."""
    def one(out: int, cols: int) -> tuple[tuple, tuple]:
        if expert_dtype == "int4":
            return (experts, out, cols // 2), (experts, out, cols // int4_group_size(cols))
        if expert_dtype == "fp8-block":
            return (experts, out, cols), (experts, -(-out // FP8_BLOCK), -(-cols // FP8_BLOCK))
        return (experts, out, cols), (experts, out)
    return {"gate_proj": one(inter, hidden), "up_proj": one(inter, hidden), "down_proj": one(hidden, inter)}


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

    @property
    def kind(self) -> str:
        return storage_kind(self.gate, self.gate_scale)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.gate, self.up, self.down, self.gate_scale, self.up_scale, self.down_scale)
                if t is not None]

    def scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        return (self.gate_scale, self.up_scale, self.down_scale) if self.quantized else None

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
        """Build from high-precision matrices: quantised for fp8/int8/int4, cast to `dtype` for 'bf16'."""
        check_expert_dtype(expert_dtype)
        if expert_dtype == "bf16":
            return cls(gate.to(dtype), up.to(dtype), down.to(dtype))
        (qg, sg), (qu, su), (qd, sd) = (quantize(w, expert_dtype) for w in (gate, up, down))
        return cls(qg, qu, qd, sg, su, sd)


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
            check_tensor(reader, full, shapes[proj])
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


def set_meta_storage(bank, expert_dtype: str, dtype: torch.dtype) -> None:
    """Meta placeholders of the stacked storage (shapes and dtypes of `expert_dtype`) for a bank whose
    experts live elsewhere (the expert runtime, a CPU pack): parameter counts stay those of the format."""
    e_n, inter, hidden = bank_dims(bank)
    if expert_dtype == "bf16":
        for p in PROJECTIONS:
            bank._parameters[p] = torch.nn.Parameter(torch.empty(bank._parameters[p].shape, dtype=dtype,
                                                                 device="meta"), requires_grad=False)
        return
    shapes = stacked_shapes(expert_dtype, e_n, inter, hidden)
    set_bank_storage(bank, *(torch.empty(shapes[p][0], dtype=QUANT_STORAGE[expert_dtype], device="meta")
                             for p in PROJECTIONS),
                     tuple(torch.empty(shapes[p][1], device="meta") for p in PROJECTIONS))


def empty_bank(expert_dtype: str, experts: int, inter: int, hidden: int, device: torch.device | str,
               fuse_gate_up: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                    tuple[torch.Tensor, torch.Tensor] | None]:
    """Uninitialised stacked storage of a quantised bank: (values, scales) per projection, and with
    `fuse_gate_up` (not fp8-block) gate and up as the halves of one [E, 2I, ...] values / scales pair, also
    returned (else None). CPU values are on huge pages where this host gives them (engine.kernels.huge_pages)."""
    shapes = stacked_shapes(expert_dtype, experts, inter, hidden)
    storage = QUANT_STORAGE[expert_dtype]
    q = {p: huge_pages.empty(shapes[p][0], storage, device) for p in PROJECTIONS if p == "down_proj" or not fuse_gate_up}
    s = {p: torch.empty(shapes[p][1], dtype=torch.float32, device=device) for p in PROJECTIONS}
    fused = None
    if fuse_gate_up and expert_dtype != "fp8-block":
        (qe, *q_rest), (se, *s_rest) = shapes["gate_proj"]
        fused = (huge_pages.empty((qe, 2 * inter, *q_rest[1:]), storage, device),
                 torch.empty((se, 2 * inter, *s_rest[1:]), dtype=torch.float32, device=device))
        for store, whole in zip((q, s), fused):
            store["gate_proj"], store["up_proj"] = whole[:, :inter], whole[:, inter:]
    else:
        q.update({p: huge_pages.empty(shapes[p][0], storage, device) for p in PROJECTIONS if p not in q})
    return q, s, fused


def load_quantized_bank(bank, reader: TensorReader, prefix: str, bank_name: str, expert_dtype: str,
                        device: torch.device | str, progress=None, fuse_gate_up: bool = False) -> set[str]:
    """Fill `bank` (an ExpertBank, possibly on meta) with experts quantised one at a time from the
    checkpoint. Returns the checkpoint names consumed. `fuse_gate_up` (for the CPU kernels, which read gate
    and up as one matrix): gate and up (and their scales) are stored as the two halves of one [E, 2I, ...]
    tensor, kept in `bank.fused_gate_up`, so packing them makes no concatenated copy of the layer (not for
    fp8-block, whose 128-row scale blocks are not per row)."""
    if expert_dtype not in QUANT_STORAGE:
        raise ValueError(f"load_quantized_bank: expert dtype must be one of {sorted(QUANT_STORAGE)}, "
                         f"got {expert_dtype!r}")
    e_n, inter, hidden = bank.gate_proj.shape
    q, s, fused = empty_bank(expert_dtype, e_n, inter, hidden, device, fuse_gate_up)
    consumed: set[str] = set()
    for e, *mats in read_checkpoint_experts(reader, prefix, bank_name, e_n, inter, hidden, consumed):
        for proj, w in zip(PROJECTIONS, mats):
            # each format computes in fp32 (exact upcasts), written straight into the bank's storage
            quantize(w.to(device=device), expert_dtype, out=(q[proj][e], s[proj][e]))
        if progress is not None:
            progress(e + 1, e_n, f"{bank_name} ({expert_dtype})")
    set_bank_storage(bank, q["gate_proj"], q["up_proj"], q["down_proj"],
                     (s["gate_proj"], s["up_proj"], s["down_proj"]))
    bank.fused_gate_up = fused
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


def bank_dims(bank) -> tuple[int, int, int]:
    """(experts, intermediate, hidden) of an ExpertBank in any storage (int4 packs two columns per byte)."""
    return bank.gate_proj.shape[0], bank.gate_proj.shape[1], bank.down_proj.shape[1]


def bank_scales(bank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(gate, up, down) scales of a quantised ExpertBank, None for a plain one."""
    sc = tuple(getattr(bank, f"{p}_scale") for p in PROJECTIONS)
    return None if sc[0] is None else sc


def bank_expert(bank, e: int) -> ExpertWeights:
    """Expert `e` of an ExpertBank as views (no copy), quantised or plain."""
    sc = bank_scales(bank) or (None, None, None)
    return ExpertWeights(bank.gate_proj[e], bank.up_proj[e], bank.down_proj[e],
                         *(None if s is None else s[e] for s in sc))
