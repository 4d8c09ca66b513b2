"""Compute kernels of the engine, kept apart from the model graphs (llama.cpp style).

Every public function dispatches (see :mod:`engine.kernels.dispatch`): Triton kernels for CUDA
tensors, the torch reference on CPU or when forced (``impl="torch"`` or the env var
``MING_KERNELS_FORCE_REFERENCE=1``). The Triton modules are imported lazily on first use. On the CPU,
decode GEMVs and one token's routed experts run native kernels where they build (:mod:`.native`), on weights
the load puts on transparent huge pages where the host gives them (:mod:`.huge_pages`).
"""

from .dispatch import FORCE_REFERENCE_ENV, Impl
from .moe import (PackedExperts, PackedLinear, QuantizedCpuExperts, cpu_linear, emulates_bf16, moe_experts,
                  moe_experts_dequant_reference, moe_experts_packed, moe_experts_reference, native_decode_applies,
                  onednn_packing_available, onednn_packing_pays, pack_linears)
from .rmsnorm import rms_norm, rms_norm_reference
from .rotary import apply_rotary, apply_rotary_reference

__all__ = [
    "FORCE_REFERENCE_ENV",
    "Impl",
    "PackedExperts",
    "PackedLinear",
    "QuantizedCpuExperts",
    "cpu_linear",
    "emulates_bf16",
    "moe_experts_dequant_reference",
    "pack_linears",
    "apply_rotary",
    "apply_rotary_reference",
    "moe_experts",
    "moe_experts_packed",
    "moe_experts_reference",
    "native_decode_applies",
    "onednn_packing_available",
    "onednn_packing_pays",
    "rms_norm",
    "rms_norm_reference",
]
