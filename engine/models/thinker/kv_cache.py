"""Per-layer key/value cache (post-RoPE, post-k_norm keys) in preallocated buffers.

Every layer's keys and values live in one [B, n_kv, capacity, head_dim] buffer each (on that layer's
device); slots are written in order. Two kinds of step write to it:

* host steps (prefill chunks, and the plain `forward` of the model): the host knows `length`; q new
  tokens go to slots length..length+q-1 and attention reads slots 0..length+q-1. The buffers grow
  (amortised doubling) when a step needs more room, unless the cache is `static`.
* device steps (the decode step, see engine.generate): the slot to write is `positions[device]`, a
  [1] int64 tensor on each layer device that the step itself advances, and attention reads a fixed
  `window` of slots (masked beyond the position). Nothing in such a step depends on a host value but
  the window, so one CUDA graph per window size replays every step that fits it.

The padding mask of the cached slots (`key_mask`, [B, capacity] bool, False = padding) exists once a
host step brought padding, or always in a static cache (whose tensors must keep their addresses);
`padded` says on the host whether any slot is padding.
"""

from __future__ import annotations

import torch


def indexed_device(device: torch.device | str) -> torch.device:
    """`device` as a layer's parameters report theirs: "cuda" is "cuda:<current device>". The per-device
    bookkeeping (`positions`, the copies of the masks) is keyed by the layers' devices, so a cache made
    for "cuda" must key "cuda:0" (an eager decode step on a model loaded with device="cuda" found no slot)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class KVCache:
    """Keys/values of every layer, the slots' padding mask and the per-sample `rope_deltas` [B, 1] that
    decode positions continue from (spec §2.9)."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | list, capacity: int = 256, static: bool = False):
        """`device`: one device for every layer, or a list with each layer's device. `static`: the
        buffers never move (no growth; `key_mask`, `positions` and `rope_deltas` are tensors updated in
        place), as a captured CUDA graph needs."""
        self.num_layers = num_layers
        self.batch = batch
        self.shape = (batch, num_kv_heads, head_dim)
        self.dtype = dtype
        devices = device if isinstance(device, (list, tuple)) else [device] * num_layers
        self.layer_devices = [indexed_device(d) for d in devices]
        self.device = self.layer_devices[0]  # where the bookkeeping (padding mask, deltas) lives
        self.static = static
        self.length = 0
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.key_mask: torch.Tensor | None = None
        self.padded = False
        self._rope_deltas: torch.Tensor | None = None
        self.positions: dict[torch.device, torch.Tensor] = {}  # device steps: the slot to write next
        # ... and on the host for CPU layer devices (kept with it by start_device_steps / advance_slot), so the
        # CPU's native decode kernels take the slot as a number without reading the tensor
        self.cpu_slots: dict[torch.device, int] = {}
        self._copies: dict[tuple[str, torch.device], torch.Tensor] = {}  # key_mask / rope_deltas per device
        self._stale = False  # key_mask or rope_deltas changed since the copies were made
        self._grow(capacity)
        if static:
            self.key_mask = torch.ones(batch, self.capacity, dtype=torch.bool, device=self.device)
            self._rope_deltas = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            for dev in self.devices:
                self.positions[dev] = torch.zeros(1, dtype=torch.long, device=dev)
                for name in ("key_mask", "rope_deltas"):
                    if dev != self.device:
                        self._copies[(name, dev)] = getattr(self, name).to(dev)

    @property
    def rope_deltas(self) -> torch.Tensor | None:
        return self._rope_deltas

    @rope_deltas.setter
    def rope_deltas(self, deltas: torch.Tensor | None) -> None:
        if self.static:
            self._rope_deltas.copy_(deltas.view(self.batch, 1))
        else:
            self._rope_deltas = None if deltas is None else deltas.to(self.device)
        self._stale = True

    @property
    def devices(self) -> list[torch.device]:
        """The distinct layer devices, in layer order."""
        return list(dict.fromkeys(self.layer_devices))

    # ------------------------------------------------------------------ storage
    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity, 16)
        b, h, d = self.shape
        for i in range(self.num_layers):
            # zeros, not empty: device steps read a fixed window whose not-yet-written slots are masked
            # out, and a masked slot holding NaN/inf garbage would still turn 0 * garbage into NaN
            k = torch.zeros(b, h, new_cap, d, dtype=self.dtype, device=self.layer_devices[i])
            v = torch.zeros_like(k)
            if self.capacity:
                k[:, :, : self.length] = self.k[i][:, :, : self.length]
                v[:, :, : self.length] = self.v[i][:, :, : self.length]
                self.k[i], self.v[i] = k, v
            else:
                self.k.append(k)
                self.v.append(v)
        if self.key_mask is not None:
            mask = torch.ones(b, new_cap, dtype=torch.bool, device=self.device)
            mask[:, : self.length] = self.key_mask[:, : self.length]
            self.key_mask = mask
            self._stale = True
        self.capacity = new_cap

    def reserve(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.capacity:
            if self.static or not self.k:
                raise ValueError(f"the KV cache holds {self.capacity} tokens; {self.length} + {new_tokens} do not fit")
            self._grow(self.length + new_tokens)

    def reset(self) -> None:
        """Empty the cache for a new sequence, keeping its buffers (a static cache's tensors in place)."""
        self.length = 0
        self.padded = False
        if self.static:
            self.key_mask.fill_(True)
            self._rope_deltas.zero_()
        else:
            self.key_mask, self._rope_deltas = None, None
        self._stale = True

    def free(self) -> None:
        """Release the tensors (cancelled or finished requests)."""
        self.k.clear()
        self.v.clear()
        self.key_mask = self._rope_deltas = None
        self.padded = False
        self.positions.clear()
        self.cpu_slots.clear()
        self._copies.clear()
        self.capacity = self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # ------------------------------------------------------------------ host steps
    def note_padding(self, step_mask: torch.Tensor) -> None:
        """Record the padding of the q tokens a host step is about to write (step_mask [B, q], 1 = real)."""
        q = step_mask.shape[1]
        if self.key_mask is None:
            self.key_mask = torch.ones(self.batch, self.capacity, dtype=torch.bool, device=self.device)
        self.key_mask[:, self.length: self.length + q] = step_mask.to(self.device, torch.bool)
        self.padded = True
        self._stale = True

    def advance(self, q: int) -> None:
        """Called once per host step after all layers wrote q tokens."""
        self.length += q

    # ------------------------------------------------------------------ device steps
    def start_device_steps(self) -> None:
        """Set each layer device's slot counter to `length` (after the prefill, before decode steps)."""
        for dev in self.devices:
            if dev in self.positions:
                self.positions[dev].fill_(self.length)
            else:
                self.positions[dev] = torch.full((1,), self.length, dtype=torch.long, device=dev)
            if dev.type == "cpu":
                self.cpu_slots[dev] = self.length

    def advance_slot(self, device: torch.device) -> None:
        """After a device step's layers on `device` wrote their slot: the next slot."""
        self.positions[device].add_(1)
        if device in self.cpu_slots:
            self.cpu_slots[device] += 1

    def on(self, name: str, device: torch.device) -> torch.Tensor | None:
        """`key_mask` or `rope_deltas` on `device`: copied when they changed (host steps), never by a device
        step. A static cache refreshes its copies in place, so captured graphs keep reading them."""
        if self._stale:
            for (n, dev), old in list(self._copies.items()):
                value = getattr(self, n)
                if self.static:
                    old.copy_(value)
                elif value is None:
                    del self._copies[(n, dev)]
                else:
                    self._copies[(n, dev)] = value.to(dev)
            self._stale = False
        value = getattr(self, name)
        if value is None or value.device == device:
            return value
        if (name, device) not in self._copies:
            self._copies[(name, device)] = value.to(device)
        return self._copies[(name, device)]

    # ------------------------------------------------------------------ attention's view
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, write_at: int | torch.Tensor | None = None,
               read_upto: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v [B, n_kv, q, d] at slot `write_at` (an int: slots write_at.., default
        `length`; a tensor [q]: those slots, on the layer's device) and return slots 0..read_upto-1
        (default: up to the last one written)."""
        q = k.shape[2]
        if write_at is None:
            write_at = self.length
        if isinstance(write_at, int):
            end = write_at + q
            self.k[layer][:, :, write_at:end] = k
            self.v[layer][:, :, write_at:end] = v
        else:
            self.k[layer].index_copy_(2, write_at, k)
            self.v[layer].index_copy_(2, write_at, v)
            end = None
        upto = read_upto if read_upto is not None else end
        return self.k[layer][:, :, :upto], self.v[layer][:, :, :upto]
