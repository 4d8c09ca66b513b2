"""What the native CPU kernels' int4 and int8 weights meet in a test: fp32 activations (the exact path, compared
within summation-order tolerances) or int8 ones (quantised per 32 columns: int4 weights' where the CPU has AVX2, the
default there; int8 weights' too where it has VNNI), set for a block and restored after."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def quantized_activations(kind: str) -> Iterator[tuple[str, ...] | bool]:
    """Within the block the kernels use `kind` ("int8", "auto" or "float"); yields whether that took effect: for
    "float" True or False, else the weight kinds that now meet int8 activations (engine.kernels.native.
    int8_activation_kinds; empty, so false, without the native kernels or AVX2)."""
    from engine.kernels import native

    before = native._activations_setting
    try:
        took = native.set_quantized_activations(kind) == kind
        yield (native.int8_activation_kinds() if took else ()) if kind != "float" else took
    finally:
        native.set_quantized_activations(before)
