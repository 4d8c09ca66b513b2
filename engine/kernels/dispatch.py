"""Backend selection for the kernels package: Triton on CUDA tensors, the torch reference otherwise.

Each public kernel takes an ``impl`` argument:

* ``"auto"`` (default): Triton when every tensor is on a CUDA device, Triton imports, and the
  environment variable ``MING_KERNELS_FORCE_REFERENCE`` is not set to a true value; else torch.
* ``"torch"``: always the torch reference (the CPU path).
* ``"triton"``: always the Triton kernel (tests use this on CPU tensors under ``TRITON_INTERPRET=1``).

``keep_attention_off_cudnn()`` keeps scaled_dot_product_attention off cuDNN (its per-shape plans).

Separately, ``prefer_sync_free(*tensors)`` tells a torch path to take its variant that never reads
device data on the host (what a GPU needs for an asynchronous, graph-capturable decode step) rather
than the one that is fastest on a CPU: true for tensors off the CPU, and on the CPU when the
environment variable ``MING_KERNELS_SYNC_FREE`` is set (tests count the GPU path's host syncs there).

The Triton kernel modules (``engine.kernels.triton_impl``) are imported lazily by the callers,
never at package import, because ``@triton.jit`` reads ``TRITON_INTERPRET`` when it decorates.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

Impl = Literal["auto", "torch", "triton"]

FORCE_REFERENCE_ENV = "MING_KERNELS_FORCE_REFERENCE"
SYNC_FREE_ENV = "MING_KERNELS_SYNC_FREE"
_TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
_VALID_IMPLS: frozenset[str] = frozenset({"auto", "torch", "triton"})


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def reference_forced() -> bool:
    """True when the environment asks every kernel to use the torch reference."""
    return os.environ.get(FORCE_REFERENCE_ENV, "").strip().lower() in _TRUE_VALUES


def use_triton(impl: Impl, *tensors: torch.Tensor | None) -> bool:
    """Decide whether a call with these tensors runs the Triton kernel."""
    if impl not in _VALID_IMPLS:
        raise ValueError(f"impl must be one of {sorted(_VALID_IMPLS)}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' was requested but triton is not installed")
        return True
    present = [t for t in tensors if t is not None]
    if not present or not all(t.is_cuda for t in present):  # first: CPU calls skip the environment look-up
        return False
    return not reference_forced() and triton_available()


def prefer_sync_free(*tensors: torch.Tensor | None) -> bool:
    """True when a torch path should avoid host syncs (see the module doc)."""
    if os.environ.get(SYNC_FREE_ENV, "").strip().lower() in _TRUE_VALUES:
        return True
    return any(t is not None and t.device.type != "cpu" for t in tensors)


def keep_attention_off_cudnn() -> None:
    """Take cuDNN out of scaled_dot_product_attention's CUDA backends, for this process (flash, memory-efficient
    and math remain). cuDNN builds an execution plan for every new shape it sees, which torch 2.11 picks first
    for bf16 on Hopper: a decode step that is not a CUDA graph replay has a new key length every token, and on an
    H200 each such step cost ~60 ms of plan building (GPU busy 1 %; fp32, which cuDNN does not take, and graph
    replays, whose windows are a few fixed buckets, were unaffected). Called when a thinker or talker is built;
    a flag only, so it costs nothing without CUDA."""
    if torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
