"""Triton kernels of the kernels package. Imported lazily: ``@triton.jit`` reads ``TRITON_INTERPRET`` at import."""
