"""This host's weight-streaming rates, measured at start-up for the planner's CPU prediction.

A decode step of a model in host memory reads every weight it uses once from memory, so its time is
bytes / the rate at which the CPU kernel streams weights that are not in cache. That rate is below
the memory's datasheet peak by an amount that depends on the CPU, the weight format and the
activation dtype (bench/cpu_gemv.py: int4 with its unpacking reads slower than int8 or bf16), so
instead of a peak times a guessed efficiency the planner can take rates measured here: the engine's
own native GEMV (engine.kernels.native) over a matrix of each format several times the last-level
cache, one activation row, torch's threads, best of a few passes.

`measure_rates` returns them as a HostRates (GB/s of weight bytes, scales included) for
`RooflineParams(cpu_expert_gbs=..., cpu_weight_gbs=...)`; `python -m engine.plan --host-gbs measure`
and a CPU load of a large model (engine.runtime) use it. None where the native kernels are not built
(torch's fallback paths have other rates; the planner then keeps its peak x efficiency model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.kernels import native

COLUMNS = 4096              # the measured matrices' row length (the real model's hidden size)
INT4_GROUP = 128            # int4 scales per 128 columns, as the engine quantises (engine.placement.quant)
CACHE_MULTIPLE = 4          # each matrix spans this many last-level caches, so that no pass is served by it
MIN_MATRIX_BYTES = 256 << 20
MAX_MATRIX_BYTES = 1 << 30
PASSES = 3                  # timed passes per format (after one warm-up); the fastest counts
# Formats of the CPU kernels by the planner's names: expert dtypes (fp8 experts are re-quantised to int8
# per row on a CPU, see engine.models.thinker.model.load_model) and load dtypes of what is not quantised.
KERNEL_FORMAT = {"int4": "int4", "int8": "int8", "fp8": "int8", "fp8-block": "int8",
                 "bf16": "bf16", "fp16": "bf16", "fp32": "fp32"}
ACTIVATIONS = {"bf16": torch.bfloat16, "fp16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class HostRates:
    """GB/s (10^9 bytes/s) at which this host's CPU kernels stream routed experts and the other weights,
    measured over `matrix_bytes`-byte matrices with `threads` threads."""

    cpu_expert_gbs: float
    cpu_weight_gbs: float
    expert_format: str
    weight_format: str
    matrix_bytes: int
    threads: int

    def describe(self) -> str:
        return (f"measured on this host: {self.expert_format} experts stream at {self.cpu_expert_gbs:.1f} GB/s, "
                f"{self.weight_format} weights at {self.cpu_weight_gbs:.1f} GB/s ({self.threads} threads)")


def last_level_cache_bytes() -> int:
    """The largest CPU cache sysfs reports (0 when it reports none)."""
    best = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best


def matrix_bytes_for(available: int | None = None) -> int:
    """CACHE_MULTIPLE last-level caches, within [MIN_MATRIX_BYTES, MAX_MATRIX_BYTES] and an eighth of
    `available` memory."""
    want = min(max(CACHE_MULTIPLE * last_level_cache_bytes(), MIN_MATRIX_BYTES), MAX_MATRIX_BYTES)
    return want if available is None else max(1 << 20, min(want, available // 8))


def stream_gbs(fmt: str, activations: torch.dtype, nbytes: int, passes: int = PASSES) -> float | None:
    """GB/s at which the native GEMV reads a [rows, COLUMNS] matrix of `fmt` ("int4" | "int8" | "bf16" |
    "fp32") of about `nbytes` (scales included) against one row of `activations`; None without the kernels."""
    if not native.available():
        return None
    scale = None
    if fmt == "int4":
        rows = max(1, nbytes // (COLUMNS // 2 + 4 * COLUMNS // INT4_GROUP))
        weight = torch.full((rows, COLUMNS // 2), 0x97, dtype=torch.uint8)  # written: every page is real memory
        scale = torch.full((rows, COLUMNS // INT4_GROUP), 1e-2)
    elif fmt == "int8":
        rows = max(1, nbytes // (COLUMNS + 4))
        weight, scale = torch.full((rows, COLUMNS), 3, dtype=torch.int8), torch.full((rows,), 1e-2)
    elif fmt in ("bf16", "fp32"):
        dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
        rows = max(1, nbytes // (COLUMNS * dtype.itemsize))
        weight = torch.full((rows, COLUMNS), 1e-2, dtype=dtype)
    else:
        raise ValueError(f"unknown weight format {fmt!r}: choose int4, int8, bf16 or fp32")
    linear = native.bind_linear(weight, min_bytes=0, scale=scale)
    if linear is None:
        return None
    moved = weight.numel() * weight.element_size() + (0 if scale is None else scale.numel() * scale.element_size())
    x = torch.randn(1, COLUMNS).to(activations)
    linear(x)  # warm-up: first touch of the output, the threads' start
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        linear(x)
        best = min(best, time.perf_counter() - t)
    return moved / best / 1e9


def measure_rates(expert_dtype: str, linear_dtype: str, dtype: str, available: int | None = None) -> HostRates | None:
    """This host's rates for a CPU load of routed experts in `expert_dtype`, the other linears in
    `linear_dtype` ("bf16": as loaded) and everything else in `dtype` (activations too); None without
    the native kernels. About a second: two matrices of matrix_bytes_for(available) written and read."""
    act = ACTIVATIONS.get(dtype)
    if act is None:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {sorted(ACTIVATIONS)}")
    expert_fmt = KERNEL_FORMAT[dtype] if expert_dtype == "bf16" else KERNEL_FORMAT[expert_dtype]
    weight_fmt = KERNEL_FORMAT[dtype] if linear_dtype == "bf16" else KERNEL_FORMAT[linear_dtype]
    nbytes = matrix_bytes_for(available)
    experts = stream_gbs(expert_fmt, act, nbytes)
    weights = experts if weight_fmt == expert_fmt else stream_gbs(weight_fmt, act, nbytes)
    if experts is None or weights is None:
        return None
    return HostRates(experts, weights, expert_fmt, weight_fmt, nbytes, torch.get_num_threads())


__all__ = ["HostRates", "last_level_cache_bytes", "matrix_bytes_for", "measure_rates", "stream_gbs"]
