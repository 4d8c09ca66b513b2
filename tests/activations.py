"""What the native CPU kernels' int4 and int8 weights meet in a test: fp32 activations (the exact path, compared
within summation-order tolerances) or int8 ones (quantised per 32 columns where the CPU has AVX-512 VNNI, the
default there), set for a block and restored after."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def quantized_activations(kind: str) -> Iterator[bool]:
    """Within the block the kernels use `kind` ("int8" or "float"); yields whether that took effect (int8 needs
    the native kernels and VNNI)."""
    from engine.kernels import native

    before = native._activations_setting
    try:
        yield native.set_quantized_activations(kind) == kind
    finally:
        native.set_quantized_activations(before)
