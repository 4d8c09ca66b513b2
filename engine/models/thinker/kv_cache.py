"""Per-layer key/value cache (post-RoPE, post-k_norm keys) with amortised growth."""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values of every layer as [B, n_kv, T, head_dim], plus the 2-D padding mask of the cached
    tokens and the per-sample `rope_delta` that decode positions continue from (spec §2.9)."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | list, capacity: int = 256):
        """`device`: one device for every layer, or a list with each layer's device."""
        self.num_layers = num_layers
        self.shape = (batch, num_kv_heads, head_dim)
        self.dtype = dtype
        devices = device if isinstance(device, (list, tuple)) else [device] * num_layers
        self.layer_devices = [torch.device(d) for d in devices]
        self.device = self.layer_devices[0]  # where the bookkeeping (padding mask) lives
        self.length = 0
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.attention_mask: torch.Tensor | None = None  # [B, length] 1 = real token
        self.rope_deltas: torch.Tensor | None = None  # [B, 1]
        self._grow(capacity)

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity, 16)
        b, h, d = self.shape
        for i in range(self.num_layers):
            k = torch.empty(b, h, new_cap, d, dtype=self.dtype, device=self.layer_devices[i])
            v = torch.empty_like(k)
            if self.capacity:
                k[:, :, : self.length] = self.k[i][:, :, : self.length]
                v[:, :, : self.length] = self.v[i][:, :, : self.length]
                self.k[i], self.v[i] = k, v
            else:
                self.k.append(k)
                self.v.append(v)
        self.capacity = new_cap

    def reserve(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.capacity:
            self._grow(self.length + new_tokens)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v [B, n_kv, q, d] after the cached ones; return all of them."""
        q = k.shape[2]
        end = self.length + q
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, q: int, step_mask: torch.Tensor) -> None:
        """Called once per forward after all layers wrote q tokens; step_mask [B, q]."""
        step_mask = step_mask.to(self.device, torch.long)
        self.attention_mask = step_mask if self.attention_mask is None else torch.cat(
            [self.attention_mask, step_mask], dim=1)
        self.length += q

    def free(self) -> None:
        """Release the tensors (cancelled or finished requests)."""
        self.k.clear()
        self.v.clear()
        self.capacity = self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
