"""Executes a placement plan for the routed experts: experts live on several devices, tokens travel.

Model
-----
* A *slot* is a logical device of the plan: GPU index 0, 1, … or ``CPU`` (-1, host memory computed by
  the CPU). A :class:`DeviceMap` binds slots to torch devices: ``DeviceMap.cuda(n)`` on a real machine,
  ``DeviceMap.simulated(n)`` (every slot is ``torch.device("cpu")``) to exercise the same logic on a
  CPU-only machine. All decisions are made on slots, never on ``device.type``, so the simulated map
  follows exactly the code path a GPU machine follows, copies included.
* :class:`ExpertPlacement` says which slot holds each expert of each MoE layer, and on which GPU slot
  a layer's hot-expert cache copies live (the GPU of that layer's attention in a :class:`engine.placement.planner.Plan`).
  Build it from a Plan (:meth:`ExpertPlacement.from_plan`) or directly from lists.
* :class:`MoERuntime` installs one :class:`LayerRuntime` per MoE layer as the ``runtime`` hook of the
  layer's :class:`engine.models.thinker.layers.ExpertBank`. Expert weights (plain or fp8/int8, see engine.placement.quant) are
  held per expert on their slot's device; host-resident ones are in pinned memory when the map has CUDA
  devices. The bank's stacked tensors become meta placeholders (shapes and dtypes kept for counting).

Per forward of a layer (x [T, H] on the layer's home device, routing ids/weights)
--------------------------------------------------------------------------------
1. Assignments are grouped by expert (as ``moe_experts``); the per-expert token counts feed the
   hot-expert cache's statistics (LFU with exponential decay of the router's selection counts).
2. Each active expert gets a site:
   * GPU-resident: computed on that GPU. Where the GPU runs Triton (``fused_gpu_experts="auto"``), all
     of a layer's experts resident on one GPU are stacked at load time and run as one fused Triton
     call over the whole token batch (other experts' assignments get local id -1 and are skipped),
     returning an fp32 partial sum; otherwise (CPU-simulated devices, ``"off"``, fp8/int8 experts)
     each expert's token block is sent to the GPU, computed there and the result sent back;
   * CPU-resident and in the hot cache: computed on the cache GPU from the cached copy (a hit);
   * CPU-resident, not cached: copied host→GPU (pinned source, ``non_blocking``, on a side CUDA stream
     per GPU, ordered before use with an event) when the cache admits it (free slot, or its decayed
     score beats the least-frequently-used resident by the hysteresis factor; experts active in this
     step are never evicted) or when more tokens than ``fetch_threshold`` are routed to it (then the
     copy is transient unless admitted); otherwise its tokens go to the host and the CPU computes it.
3. Work is issued copies first, then the fused GPU calls and GPU blocks (asynchronous on CUDA), then
   CPU blocks (the host works while the GPUs do), then the blocks that waited for a copy.
4. Results are combined on the home device: the fused partial sums, then the per-expert blocks in
   ascending expert order with ``out.index_add_(tokens, y.float() * w)``, all in fp32, cast to x's
   dtype once. Without fused slots this is the same arithmetic, in the same order, as
   :func:`engine.kernels.moe_experts_reference`, so on one device type the outputs are bit-identical;
   with them it matches the Triton path up to fp32 summation order.

The fetch threshold
-------------------
Copying an expert of B bytes costs ``B / pcie + hop``; computing n tokens of it on the CPU costs
``B / host + n · 6HI / cpu_flops + 2 hops + n · 2 · H · act_bytes / pcie`` (weights streamed once, the
token block sent to the host and back). The runtime copies when the CPU would be slower, i.e. when
``n > fetch_threshold = floor((B/pcie − B/host − hop) / (6HI/cpu_flops + 2·H·act_bytes/pcie))`` with
all bandwidths scaled by ``efficiency``. Defaults (:class:`TransferModel`): the planner's PCIe 25 GB/s,
host 50 GB/s, 10 µs hops, efficiency 0.7, and ``DEFAULT_CPU_GFLOPS`` = 500 GFLOP/s of bf16 GEMM on the
host. At the Ming-flash shape (H 4096, I 1024) that gives 9 tokens for bf16 experts and 4 for fp8/int8:
decode steps compute cold experts on the CPU, prefill chunks pull the busy ones to the GPU. Pass
``RuntimeOptions(fetch_threshold=N)`` to override (``None``: derived).

Not done here: non-expert modules stay where load_model put them (one device); the runtime places only
routed experts. No expert-weight prefetch ahead of the router, no multi-threaded CPU/GPU overlap beyond
CUDA's asynchronous launches, no Triton fp8 kernel (quantised experts are dequantised per block).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.kernels.moe import check_routing, group_by_expert
from engine.loader import TensorReader
from engine.placement.planner import CPU, DEFAULT_EFFICIENCY, DEFAULT_HOP_LATENCY_US, DEFAULT_HOST_GBS, DEFAULT_PCIE_GBS
from engine.placement.quant import (ExpertWeights, bank_dims, bank_expert, check_expert_dtype, read_checkpoint_experts,
                                    set_meta_storage)

DEFAULT_CPU_GFLOPS = 500.0   # host bf16 GEMM throughput (a 16-32 core AVX-512/AMX server; 2 cores: ~100)
DEFAULT_CACHE_DECAY = 0.9    # per-step decay of the routing-count scores (~10-step memory)
DEFAULT_CACHE_HYSTERESIS = 0.25  # a candidate must beat the LFU resident's score by 25% to replace it
FUSED_MODES = ("auto", "off", "triton")


# ----------------------------------------------------------------------------------------------
# Devices, placement, options
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceMap:
    """Torch device of each slot: `gpus[i]` for GPU slot i, `host` for the CPU slot (-1)."""

    gpus: tuple[torch.device, ...]
    host: torch.device = torch.device("cpu")

    def __post_init__(self):
        object.__setattr__(self, "gpus", tuple(torch.device(d) for d in self.gpus))
        object.__setattr__(self, "host", torch.device(self.host))

    @classmethod
    def cuda(cls, n: int | None = None) -> "DeviceMap":
        avail = torch.cuda.device_count() if torch.cuda.is_available() else 0
        n = avail if n is None else n
        if n > avail:
            raise ValueError(f"the placement needs {n} GPU(s) but torch sees {avail}; "
                             f"pass RuntimeOptions(device_map=DeviceMap.simulated({n})) to simulate them on the CPU")
        return cls(tuple(torch.device("cuda", i) for i in range(n)))

    @classmethod
    def simulated(cls, n: int) -> "DeviceMap":
        """n GPU slots and the host, all on torch.device('cpu') (tests, CPU-only machines)."""
        return cls(tuple(torch.device("cpu") for _ in range(n)))

    @property
    def n_gpus(self) -> int:
        return len(self.gpus)

    @property
    def uses_cuda(self) -> bool:
        return any(d.type == "cuda" for d in self.gpus)

    def device(self, slot: int) -> torch.device:
        if slot == CPU:
            return self.host
        if not 0 <= slot < len(self.gpus):
            raise ValueError(f"slot {slot} is not a GPU of this device map ({len(self.gpus)} GPU(s))")
        return self.gpus[slot]

    @staticmethod
    def name(slot: int) -> str:
        return "cpu" if slot == CPU else f"gpu{slot}"


@dataclass(frozen=True)
class ExpertPlacement:
    """slots[layer][e]: GPU index holding expert e of MoE layer `layer`, or CPU (-1).
    cache_slot[layer]: GPU slot where that layer's cached/fetched experts run (None: no GPU side)."""

    slots: Mapping[int, tuple[int, ...]]
    cache_slot: Mapping[int, int | None] = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan) -> "ExpertPlacement":
        """From an engine.placement.planner.Plan: its expert map, and each layer's attention GPU for the cache."""
        return cls({le.layer: tuple(le.device) for le in plan.experts},
                   {le.layer: int(plan.layer_home[le.layer]) for le in plan.experts})

    @classmethod
    def uniform(cls, layers: Sequence[int], num_experts: int, slot: int, cache_slot: int | None = 0) -> "ExpertPlacement":
        return cls({l: (slot,) * num_experts for l in layers}, {l: cache_slot for l in layers})

    def cache_slot_of(self, layer: int) -> int | None:
        return self.cache_slot.get(layer, 0)


@dataclass(frozen=True)
class TransferModel:
    """Bandwidths (GB/s, peaks scaled by `efficiency`) and host compute behind the fetch threshold."""

    pcie_gbs: float = DEFAULT_PCIE_GBS
    host_gbs: float = DEFAULT_HOST_GBS
    cpu_gflops: float = DEFAULT_CPU_GFLOPS
    hop_latency_us: float = DEFAULT_HOP_LATENCY_US
    efficiency: float = DEFAULT_EFFICIENCY

    def fetch_threshold(self, expert_bytes: int, hidden: int, inter: int, act_bytes: int) -> int:
        """Copy a CPU-resident expert to the GPU when more tokens than this are routed to it."""
        pcie, host = self.pcie_gbs * 1e9 * self.efficiency, self.host_gbs * 1e9 * self.efficiency
        cpu = self.cpu_gflops * 1e9 * self.efficiency
        hop = self.hop_latency_us * 1e-6
        saved = expert_bytes / pcie - expert_bytes / host - hop  # fixed cost the CPU path avoids
        per_token = 6 * hidden * inter / cpu + 2 * hidden * act_bytes / pcie
        return max(0, math.floor(saved / per_token)) if saved > 0 else 0


@dataclass
class RuntimeOptions:
    """device_map: None = real CUDA devices for the plan's GPUs. cache_capacity: experts (all layers
    together) held in the GPU-side hot cache; 0 turns the cache off. fetch_threshold: tokens (None =
    derived from `transfer`, see the module doc); a negative value never fetches. fused_gpu_experts:
    "auto" runs each GPU's resident (unquantised) experts of a layer as one fused Triton call when that
    GPU can run Triton; "off" computes them one expert at a time; "triton" always fuses (tests run it
    under the Triton interpreter on simulated devices)."""

    device_map: DeviceMap | None = None
    cache_capacity: int = 0
    cache_decay: float = DEFAULT_CACHE_DECAY
    cache_hysteresis: float = DEFAULT_CACHE_HYSTERESIS
    fetch_threshold: int | None = None
    transfer: TransferModel = field(default_factory=TransferModel)
    fused_gpu_experts: str = "auto"

    def __post_init__(self):
        if self.fused_gpu_experts not in FUSED_MODES:
            raise ValueError(f"fused_gpu_experts must be one of {FUSED_MODES}, got {self.fused_gpu_experts!r}")


@dataclass
class RuntimeStats:
    """Counters since the last reset: token-expert assignments and expert blocks per site
    ('gpu0', 'gpu1', 'cpu'; cache hits and fetched experts count on their GPU), copies and cache events."""

    tokens: dict[str, int] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    fetches: int = 0
    fetched_bytes: int = 0
    transient_fetches: int = 0
    cache_inserts: int = 0
    evictions: int = 0

    def record(self, site: str, n_tokens: int) -> None:
        self.tokens[site] = self.tokens.get(site, 0) + n_tokens
        self.blocks[site] = self.blocks.get(site, 0) + 1


# ----------------------------------------------------------------------------------------------
# Hot-expert cache
# ----------------------------------------------------------------------------------------------


class HotExpertCache:
    """GPU-side copies of CPU-resident experts, keyed (layer, expert), at most `capacity` of them.

    Scores are the router's selection counts with exponential decay: every forward of layer l does
    ``score[l] = decay · score[l] + counts``. Replacement is LFU on these scores: a candidate takes a
    free slot, or replaces the lowest-scored resident (ties: the oldest) when its score is higher by the
    hysteresis factor; residents used in the current step are protected."""

    def __init__(self, capacity: int, decay: float = DEFAULT_CACHE_DECAY, hysteresis: float = DEFAULT_CACHE_HYSTERESIS):
        if capacity < 0 or not 0 <= decay <= 1 or hysteresis < 0:
            raise ValueError("cache capacity must be >= 0, decay in [0, 1], hysteresis >= 0")
        self.capacity, self.decay, self.hysteresis = capacity, decay, hysteresis
        self.scores: dict[int, torch.Tensor] = {}
        self.resident: dict[tuple[int, int], ExpertWeights] = {}  # insertion order = age

    def observe(self, layer: int, counts: torch.Tensor) -> None:
        counts = counts.to("cpu", torch.float64)
        prev = self.scores.get(layer)
        self.scores[layer] = counts if prev is None else prev * self.decay + counts

    def score(self, key: tuple[int, int]) -> float:
        s = self.scores.get(key[0])
        return 0.0 if s is None else float(s[key[1]])

    def lookup(self, key: tuple[int, int]) -> ExpertWeights | None:
        return self.resident.get(key)

    def admission(self, key: tuple[int, int], protect: set[tuple[int, int]]) -> tuple[bool, tuple[int, int] | None]:
        """(admit, victim): whether `key` should enter the cache and which resident it replaces."""
        if self.capacity == 0 or key in self.resident:
            return False, None
        if len(self.resident) < self.capacity:
            return True, None
        candidates = [k for k in self.resident if k not in protect]
        if not candidates:
            return False, None
        victim = min(candidates, key=self.score)  # min keeps the first (oldest) among equal scores
        if self.score(key) > self.score(victim) * (1 + self.hysteresis):
            return True, victim
        return False, None

    def insert(self, key: tuple[int, int], weights: ExpertWeights, victim: tuple[int, int] | None) -> None:
        if victim is not None:
            del self.resident[victim]
        self.resident[key] = weights


# ----------------------------------------------------------------------------------------------
# Runtime
# ----------------------------------------------------------------------------------------------


def _owned(t: torch.Tensor, base: set[int]) -> torch.Tensor:
    """A tensor that does not share storage with the released stacked bank tensors."""
    return t.clone() if t.untyped_storage().data_ptr() in base else t


@dataclass
class FusedSlot:
    """One GPU's resident experts of a layer, stacked for the fused Triton kernel. ``local_index[e]``:
    the expert's row in the stacks, -1 for experts that live elsewhere."""

    local_index: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # quantised experts: dequantised in the kernel


class LayerRuntime:
    """Routed experts of one MoE layer spread over slots; the ExpertBank.runtime hook (see module doc)."""

    def __init__(self, owner: "MoERuntime", layer: int, experts: list[ExpertWeights], slots: tuple[int, ...],
                 cache_slot: int | None, hidden: int, inter: int):
        self.owner, self.layer, self.experts, self.slots = owner, layer, experts, slots
        self.cache_slot, self.hidden, self.inter = cache_slot, hidden, inter
        self.fused: dict[int, FusedSlot] = {}

    def build_fused(self, mode: str) -> None:
        """Stack each GPU slot's resident experts (mode "auto": where Triton runs; "triton": always).
        The experts become views into the stacks, so the weights are not held twice; while one slot of
        one layer is being stacked, its weights briefly exist twice."""
        if mode == "off":
            return
        from engine.kernels.dispatch import use_triton

        by_slot: dict[int, list[int]] = {}
        for e, slot in enumerate(self.slots):
            if slot != CPU:
                by_slot.setdefault(slot, []).append(e)
        for slot, resident in by_slot.items():
            first = self.experts[resident[0]]
            if len({self.experts[e].kind for e in resident}) != 1:
                continue  # mixed storage formats cannot share one stacked call
            if mode == "auto" and not use_triton("auto", first.gate):
                continue
            stacks = [torch.empty((len(resident), *t.shape), dtype=t.dtype, device=t.device) for t in first.tensors()]
            for j, e in enumerate(resident):
                for stack, t in zip(stacks, self.experts[e].tensors()):
                    stack[j].copy_(t)
                self.experts[e] = ExpertWeights(*(stack[j] for stack in stacks))
            local = torch.full((len(self.slots),), -1, dtype=torch.long)
            local[resident] = torch.arange(len(resident))
            self.fused[slot] = FusedSlot(local.to(first.gate.device), *stacks[:3],
                                         tuple(stacks[3:]) if first.quantized else None)

    def _run_fused(self, slot: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """fp32 [T, H] sum over the assignments whose expert lives in this fused slot (on its device)."""
        from engine.kernels.triton_impl.moe import moe_experts_triton

        f = self.fused[slot]
        dev = f.gate.device
        local = f.local_index[ids.to(dev)]
        return moe_experts_triton(x.to(dev), f.gate, f.up, f.down, local, weights.to(dev),
                                  skip_negative_ids=True, out_dtype=torch.float32, scales=f.scales)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x must be [T, {self.hidden}]; got {tuple(x.shape)}")
        check_routing(ids, weights, x.shape[0])
        rt, dm, stats = self.owner, self.owner.device_map, self.owner.stats
        home = x.device
        groups = group_by_expert(ids, weights, self.num_experts)
        counts = torch.zeros(self.num_experts, dtype=torch.long)
        sizes = [groups.offsets[i + 1] - groups.offsets[i] for i in range(len(groups.experts))]
        if groups.experts:
            counts[groups.experts] = torch.tensor(sizes)
        rt.cache.observe(self.layer, counts)
        threshold = rt.threshold(self, x.element_size())
        protect = {(self.layer, e) for e in groups.experts}

        # Decide a site per active expert and start the copies.
        gpu_jobs, cpu_jobs, fetched_jobs = [], [], []
        fused_active: set[int] = set()
        for i, e in enumerate(groups.experts):
            job = (i, e)
            slot = self.slots[e]
            if slot in self.fused:  # computed below, with the slot's other experts, in one fused call
                fused_active.add(slot)
                stats.record(dm.name(slot), sizes[i])
                continue
            if slot != CPU:
                gpu_jobs.append((job, slot, self.experts[e], None))
                continue
            key = (self.layer, e)
            cached = rt.cache.lookup(key) if self.cache_slot is not None else None
            if cached is not None:
                stats.cache_hits += 1
                gpu_jobs.append((job, self.cache_slot, cached, None))
                continue
            admit, victim = (rt.cache.admission(key, protect) if self.cache_slot is not None else (False, None))
            if self.cache_slot is not None and (admit or (threshold >= 0 and sizes[i] > threshold)):
                copy, event = rt.copy_to(self.experts[e], self.cache_slot)
                stats.fetches += 1
                stats.fetched_bytes += copy.nbytes
                if admit:
                    if victim is not None:
                        stats.evictions += 1
                    stats.cache_inserts += 1
                    rt.cache.insert(key, copy, victim)
                else:
                    stats.transient_fetches += 1
                fetched_jobs.append((job, self.cache_slot, copy, event))
            else:
                cpu_jobs.append((job, CPU, self.experts[e], None))

        # Fused GPU calls first: they run asynchronously while the host computes the CPU blocks.
        partials = [self._run_fused(slot, x, ids, weights) for slot in sorted(fused_active)]
        results: dict[int, torch.Tensor] = {}
        for (i, e), slot, w, event in gpu_jobs + cpu_jobs + fetched_jobs:
            start, end = groups.offsets[i], groups.offsets[i + 1]
            dev = dm.device(slot)
            if event is not None:
                rt.wait_for_copy(event, w, dev)
            block = x.index_select(0, groups.token_index[start:end])
            block = block.to(dev, non_blocking=block.is_cuda and dev.type == "cuda")
            results[i] = w.forward(block)
            stats.record(dm.name(slot), end - start)

        # Combine on the home device in ascending expert order (fp32, as moe_experts_reference).
        out = torch.zeros(x.shape, dtype=torch.float32, device=home)
        for part in partials:
            out += part.to(home, non_blocking=part.is_cuda and home.type == "cuda")
        for i in range(len(groups.experts)):
            if i not in results:  # a fused slot's expert, already in `out`
                continue
            start, end = groups.offsets[i], groups.offsets[i + 1]
            y = results[i]
            y = y.to(home, non_blocking=y.is_cuda and home.type == "cuda")
            out.index_add_(0, groups.token_index[start:end], y.float() * groups.weights[start:end, None])
        return out.to(x.dtype)


class MoERuntime:
    """The routed experts of every MoE layer executed per an ExpertPlacement (see module doc)."""

    def __init__(self, placement: ExpertPlacement, options: RuntimeOptions | None = None):
        self.options = options or RuntimeOptions()
        self.placement = placement
        n_gpus = 1 + max([s for slots in placement.slots.values() for s in slots] +
                         [c for c in placement.cache_slot.values() if c is not None] + [-1])
        self.device_map = self.options.device_map or DeviceMap.cuda(n_gpus)
        if self.device_map.n_gpus < n_gpus:
            raise ValueError(f"the placement uses {n_gpus} GPU slot(s) but the device map has {self.device_map.n_gpus}")
        self.cache = HotExpertCache(self.options.cache_capacity, self.options.cache_decay,
                                    self.options.cache_hysteresis)
        self.stats = RuntimeStats()
        self.layers: dict[int, LayerRuntime] = {}
        self._streams: dict[torch.device, object] = {}
        self._thresholds: dict[tuple[int, int], int] = {}
        self._pin = self.device_map.uses_cuda and torch.cuda.is_available()

    # -- building -------------------------------------------------------------------------------
    @staticmethod
    def _as_placement(placement) -> ExpertPlacement:
        return placement if isinstance(placement, ExpertPlacement) else ExpertPlacement.from_plan(placement)

    @staticmethod
    def _moe_layers(llm: nn.Module) -> dict[int, nn.Module]:
        return {i: layer.mlp.experts for i, layer in enumerate(llm.model.layers) if layer.is_moe}

    def _checked_slots(self, layer: int, num_experts: int) -> tuple[int, ...]:
        if layer not in self.placement.slots:
            raise ValueError(f"the placement has no entry for MoE layer {layer}")
        slots = tuple(int(s) for s in self.placement.slots[layer])
        if len(slots) != num_experts:
            raise ValueError(f"layer {layer}: placement lists {len(slots)} experts, the model has {num_experts}")
        for s in set(slots):
            self.device_map.device(s)  # raises on an unknown slot
        return slots

    def _place(self, w: ExpertWeights, slot: int) -> ExpertWeights:
        w = w.to(self.device_map.device(slot))
        if slot == CPU and self._pin:
            w = w.map(lambda t: t.pin_memory())
        return w

    def _install(self, llm: nn.Module, layer: int, bank: nn.Module, experts: list[ExpertWeights],
                 slots: tuple[int, ...]) -> None:
        e_n, inter, hidden = bank_dims(bank)
        lr = LayerRuntime(self, layer, experts, slots, self.placement.cache_slot_of(layer), hidden, inter)
        # Stacked tensors become meta placeholders (shape/dtype kept: parameter counts stay right).
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = bank._parameters[name]
            bank._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
            sc = bank._buffers.get(f"{name}_scale")
            if sc is not None:
                bank._buffers[f"{name}_scale"] = torch.empty(sc.shape, dtype=sc.dtype, device="meta")
        lr.build_fused(self.options.fused_gpu_experts)
        bank.runtime = lr
        self.layers[layer] = lr

    @classmethod
    def attach(cls, llm: nn.Module, placement, options: RuntimeOptions | None = None) -> "MoERuntime":
        """Take over the experts of an already loaded model (plain or quantised banks): each expert moves
        to its slot's device; the banks then run through the runtime."""
        rt = cls(cls._as_placement(placement), options)
        for layer, bank in cls._moe_layers(llm).items():
            if bank.runtime is not None:
                raise ValueError(f"layer {layer} already has an expert runtime")
            if getattr(bank, "packed", None) is not None:
                raise ValueError(f"layer {layer}'s experts were pre-packed for the CPU: load with "
                                 "load_model(..., plan=...) or pack_cpu_experts=False to place them")
            slots = rt._checked_slots(layer, bank_dims(bank)[0])
            base = {t.untyped_storage().data_ptr() for t in bank.parameters()} | \
                   {t.untyped_storage().data_ptr() for t in bank.buffers()}
            experts = [rt._place(bank_expert(bank, e), slots[e]).map(lambda t: _owned(t, base))
                       for e in range(len(slots))]
            rt._install(llm, layer, bank, experts, slots)
        return rt

    @classmethod
    def load(cls, llm: nn.Module, reader: TensorReader, prefix: str, placement, expert_dtype: str,
             dtype: torch.dtype, options: RuntimeOptions | None = None, progress=None) -> tuple["MoERuntime", set[str]]:
        """Read every MoE layer's experts from the checkpoint one at a time, quantise or cast each on
        its target device and keep it there (the stacked layer is never materialised)."""
        check_expert_dtype(expert_dtype)
        rt = cls(cls._as_placement(placement), options)
        consumed: set[str] = set()
        for layer, bank in cls._moe_layers(llm).items():
            e_n, inter, hidden = bank_dims(bank)
            slots = rt._checked_slots(layer, e_n)
            experts = []
            name = f"model.layers.{layer}.mlp.experts"
            for e, g, u, d in read_checkpoint_experts(reader, prefix, name, e_n, inter, hidden, consumed):
                dev = rt.device_map.device(slots[e])
                # copy=True: the reader hands out views of the memory-mapped file, whose tensors start
                # only 8-byte aligned; CPU GEMV kernels (oneDNN/MKL on AVX-512) take another summation
                # order for misaligned weights, so an owned (64-byte aligned) copy computes exactly as
                # the plainly loaded parameters do (and keeps no file mapping alive).
                g, u, d = (t.to(device=dev, dtype=torch.float32, copy=True) for t in (g, u, d))
                experts.append(rt._place(ExpertWeights.from_float(g, u, d, expert_dtype, dtype), slots[e]))
                if progress is not None:
                    progress(e + 1, e_n, f"{name} ({expert_dtype})")
            set_meta_storage(bank, expert_dtype, dtype)
            rt._install(llm, layer, bank, experts, slots)
        return rt, consumed

    # -- execution helpers ----------------------------------------------------------------------
    def threshold(self, layer: LayerRuntime, act_bytes: int) -> int:
        if self.options.fetch_threshold is not None:
            return int(self.options.fetch_threshold)
        key = (layer.layer, act_bytes)
        if key not in self._thresholds:
            self._thresholds[key] = self.options.transfer.fetch_threshold(
                layer.experts[0].nbytes, layer.hidden, layer.inter, act_bytes)
        return self._thresholds[key]

    def _side_stream(self, dev: torch.device):
        if dev not in self._streams:
            self._streams[dev] = torch.cuda.Stream(device=dev)
        return self._streams[dev]

    def copy_to(self, w: ExpertWeights, slot: int) -> tuple[ExpertWeights, object | None]:
        """Copy an expert's weights to a GPU slot: on CUDA asynchronously on that GPU's side stream from
        pinned host memory, returning the event that marks completion; elsewhere a plain copy."""
        dev = self.device_map.device(slot)
        if dev.type == "cuda":
            stream = self._side_stream(dev)
            with torch.cuda.stream(stream):
                out = w.map(lambda t: t.to(dev, non_blocking=True))
                event = torch.cuda.Event()
                event.record(stream)
            return out, event
        return w.map(lambda t: t.to(dev, copy=True)), None

    @staticmethod
    def wait_for_copy(event, w: ExpertWeights, dev: torch.device) -> None:
        """Order the compute stream after a side-stream copy; tell the allocator the tensors are used there."""
        current = torch.cuda.current_stream(dev)
        current.wait_event(event)
        for t in w.tensors():
            t.record_stream(current)

    def reset_stats(self) -> None:
        self.stats = RuntimeStats()
