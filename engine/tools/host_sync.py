"""Counting host synchronisations: which torch calls make the CPU wait for the device.

A decode step that never waits for the GPU lets the host queue the next step while the current one
runs (and is what a CUDA graph can capture). `HostSyncCounter` records, through a
`TorchDispatchMode`, every dispatched op that needs the host to see device data:

* reading a value: ``aten._local_scalar_dense`` / ``aten.item`` / ``aten.is_nonzero`` (``.item()``,
  ``int(t)``, ``bool(t)``, ``if t:``; under inference mode they dispatch as ``item`` / ``is_nonzero``);
* ops whose output size depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``,
  ``unique``, ``repeat_interleave`` without ``output_size``, CUDA ``bincount``);
* host data turned into a tensor (``aten.lift_fresh``: ``torch.tensor([...])``, a CPU tensor built
  and, on a GPU, copied over every step);

and, patched on ``torch.Tensor`` for the duration (they do not dispatch on CPU tensors, so a CPU-only
run would not see them otherwise), ``tolist``, ``numpy`` and ``__array__``.

Because the ops are counted wherever the tensors live, a run on the CPU shows the syncs the same
code would make on a GPU.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops that read device data on the host or whose output shape depends on it
_SYNC_PACKETS = ("_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2",
                 "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount", "lift_fresh",
                 "equal", "is_nonzero", "histc", "argwhere")
_HOST_METHODS = ("tolist", "numpy", "__array__")


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()) if i is not None)


def sync_reason(func, args, kwargs) -> str | None:
    """The name under which a dispatched call counts as a host sync, or None."""
    packet = func.overloadpacket.__name__
    if packet in _SYNC_PACKETS:
        return packet
    if packet in ("index", "index_put", "index_put_", "_index_put_impl_") and _has_bool_index(args):
        return f"{packet}[bool mask]"
    if packet == "repeat_interleave" and kwargs.get("output_size") is None and \
            isinstance(args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor)):
        return "repeat_interleave[no output_size]"
    return None


@dataclass
class SyncCount:
    """Host syncs by reason, and all ops dispatched (a proxy for kernels launched)."""

    syncs: Counter = field(default_factory=Counter)
    ops: int = 0

    @property
    def total(self) -> int:
        return sum(self.syncs.values())


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as c: ...`` then ``c.count.total`` / ``c.count.syncs`` / ``c.count.ops``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = SyncCount()
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count.ops += 1
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            self.count.syncs[reason] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for name in _HOST_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *a, _original=original, _name=name, **k):
                self.count.syncs[_name] += 1
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)
