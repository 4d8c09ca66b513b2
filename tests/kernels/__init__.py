"""Tests of engine.kernels (Triton kernels run under the Triton interpreter on CPU)."""
