"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl

BF16_DROPPED_BITS = 16  # an fp32 value's low 16 bits are what bf16 drops
BF16_HALF_ULP_MINUS_ONE = 0x7FFF


def interpreting() -> bool:
    """True when kernels run under the Triton CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype`` with round-to-nearest-even, like torch.

    On GPUs ``.to(tl.bfloat16)`` already rounds to nearest even. The interpreter truncates
    fp32 -> bf16, so there (``EMULATE_BF16_RTNE``) the rounding is done on the fp32 bits first,
    after which the truncating cast is exact. NaN/inf inputs are not special-cased.
    """
    if EMULATE_BF16_RTNE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            lsb = (bits >> BF16_DROPPED_BITS) & 1
            bits = ((bits + BF16_HALF_ULP_MINUS_ONE + lsb) >> BF16_DROPPED_BITS) << BF16_DROPPED_BITS
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
