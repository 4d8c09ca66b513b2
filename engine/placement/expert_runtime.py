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
0. A layer whose experts all sit in one fused GPU slot (below) is that slot's one fused call, nothing else:
   no read of the device, so on a single GPU it is ``sync_free`` and a decode step of such layers can be a
   CUDA graph (engine.decode_graphs).
1. Otherwise the routing ids are read to the host, once (the layer's one host sync on a GPU); assignments
   are grouped by expert (as ``moe_experts``; the experts and their boundaries counted from those ids, with
   no further read) and the per-expert token counts feed the hot-expert cache's statistics (LFU with
   exponential decay of the router's selection counts; plain Python on host numbers).
2. Each active expert gets a site:
   * GPU-resident: computed on that GPU. Where the GPU runs Triton (``fused_gpu_experts="auto"``), all
     of a layer's experts resident on one GPU are stacked at load time (quantised ones with their
     scales: the kernel dequantises the tiles) and run as one fused Triton call over the whole token
     batch (other experts' assignments get local id -1 and are skipped), returning an fp32 partial
     sum; otherwise (CPU-simulated devices, ``"off"``) each expert's token block is sent to the GPU,
     computed there and the result sent back;
   * CPU-resident and in the hot cache: computed on the cache GPU from the cached copy (a hit);
   * CPU-resident, not cached: copied host→GPU (pinned source, ``non_blocking``, on a side CUDA stream
     per GPU, ordered before use with an event) when the cache admits it (free slot, or its decayed
     score beats the least-frequently-used resident by the hysteresis factor; experts active in this
     step are never evicted) or when more tokens than ``fetch_threshold`` are routed to it (then the
     copy is transient unless admitted); otherwise its tokens go to the host and the CPU computes it.
3. Work is issued CPU first: the rows of all host-computed experts are gathered on the home device
   and copied once into the layer's reused (pinned on CUDA) host buffer; ``cpu_workers`` threads
   compute those experts (no synchronisation per expert: one event orders the copy) while the
   calling thread issues the fused GPU calls and GPU blocks, then streams the fetched experts to the
   cache GPU ``fetch_window`` copies ahead of their compute (double buffering by default, so a
   prefill that pulls a whole layer holds only a few transient experts); the CPU results come back
   in one copy.
4. Results are combined on the home device: the fused partial sums, then the per-expert blocks in
   ascending expert order with ``out.index_add_(tokens, y.float() * w)``, all in fp32, cast to x's
   dtype once. Without fused slots this is the same arithmetic, in the same order, as
   :func:`engine.kernels.moe_experts_reference`, so on one device type the outputs are bit-identical;
   with them it matches the Triton path up to fp32 summation order.

The fetch threshold
-------------------
Copying an expert of B bytes costs ``B / pcie + hop``; computing n tokens of it on the CPU costs
``B / host + (n − 1) · 6HI / cpu_flops + 2 hops + n · 2 · H · act_bytes / pcie`` (weights streamed once at
the host rate, which is a one-token call's and so already holds the first token's arithmetic; the token
block sent to the host and back). The runtime copies an expert when more tokens than ``fetch_threshold``
(the largest n for which the CPU is not slower) route to it, all bandwidths scaled by ``efficiency``.
Defaults (:class:`TransferModel`): the planner's PCIe 25 GB/s, host 50 GB/s, 10 µs hops, efficiency
0.7, and ``DEFAULT_CPU_GFLOPS`` = 500 GFLOP/s of bf16 GEMM on the host. At the Ming-flash shape
(H 4096, I 1024) that gives 10 tokens for bf16 experts and 5 for fp8/int8: decode steps compute cold
experts on the CPU, prefill chunks pull the busy ones to the GPU. Pass ``RuntimeOptions(fetch_threshold=N)``
to override (``None``: derived). With a derived threshold the link and the CPU also share a layer's
CPU-bound experts (:meth:`TransferModel.fetch_to_balance`: some are copied while the CPU computes the
rest), and on CUDA the host rate follows what the layers' one-token CPU jobs reach
(:meth:`MoERuntime.observe_cpu`). A quantised expert computed on a GPU for a few tokens runs the fused
Triton kernel (no dequantised copy of its matrices).

``RuntimeOptions(calibrate=True)`` replaces the defaults by rates measured at start-up
(:meth:`TransferModel.calibrate`: pinned host→GPU copy, a one-row round trip, the CPU computing one
of the model's host-resident experts at T=1 and T=16).

Not done here: non-expert modules stay where load_model put them (one device); the runtime places only
routed experts. No expert-weight prefetch ahead of the router (the next layer's experts are known
only once its router ran).

Host-resident quantised experts (``cpu_kernels``, default on) run CPU kernels: int8 reads the stored
bytes in place (torch's kernel, or the native one for one token); int4 too where the native kernels are
built and take its groups (else torch's int4 kernel, with a second copy in its layout; the packed bytes stay
for fetches); fp8 has no CPU kernel, so host-resident fp8 experts are re-quantised to int8 per channel at
load (a fetch then copies int8 and the GPU kernel computes int8). Dequantising on every call instead
(``cpu_kernels=False``, the reference semantics) is two orders of magnitude slower on a CPU. For one
token (decode at batch 1), where the native CPU kernels are built (engine.kernels.native) and a layer's
host experts are int8, int4 or plain in the activations' dtype, all of that token's host experts run in **one
native call** on a CPU worker (their weighted sum comes back as one partial, like a fused GPU slot's),
reading the experts' own storage through a table of pointers (no copy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from engine.kernels import native
from engine.kernels.dispatch import use_triton
from engine.kernels.moe import QuantizedCpuExperts, check_routing, group_by_expert
from engine.loader import TensorReader
from engine.placement.planner import CPU, DEFAULT_EFFICIENCY, DEFAULT_HOP_LATENCY_US, DEFAULT_HOST_GBS, DEFAULT_PCIE_GBS
from engine.placement.quant import (ExpertWeights, bank_dims, bank_expert, check_expert_dtype, read_checkpoint_experts,
                                    set_meta_storage)

DEFAULT_CPU_GFLOPS = 500.0   # host bf16 GEMM throughput (a 16-32 core AVX-512/AMX server; 2 cores: ~100)
DEFAULT_CACHE_DECAY = 0.9    # per-step decay of the routing-count scores (~10-step memory)
DEFAULT_CACHE_HYSTERESIS = 0.25  # a candidate must beat the LFU resident's score by 25% to replace it
FUSED_MODES = ("auto", "off", "triton")
DEFAULT_CPU_WORKERS = 1      # threads computing host-resident experts (each uses torch's intra-op threads)
DEFAULT_FETCH_WINDOW = 2     # experts streamed to a GPU ahead of their compute (double buffering)
CALIBRATION_BYTES = 1 << 27  # 128 MiB per bandwidth measurement at start-up
CALIBRATION_REPEATS = 3
CALIBRATION_TOKENS = 16      # tokens of the CPU GEMM-rate measurement
HOST_RATE_SMOOTHING = 0.2  # weight of each new observation in the running mean of the CPU's rate
QUANTIZED_KERNEL_MAX_TOKENS = 16  # a quantised expert on a GPU: the fused kernel up to this many tokens
FETCH_STACK_EXPERTS = 8  # experts a call of a few tokens fetches into the shared stack (FetchStack): a token's top-8
MAX_FETCH_THRESHOLD = 1 << 16  # (a CPU faster than the link for any block: its experts are never fetched)


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

    def cpu_seconds(self, tokens: int, expert_bytes: int, hidden: int, inter: int, act_bytes: int) -> float:
        """The CPU computing `tokens` rows of one host-resident expert: its weights read once at the host
        rate (which is the rate of a one-token call, so it includes the first token's arithmetic), the
        further tokens' arithmetic, and their rows sent to the host and back (the hops not included)."""
        pcie, host = self.pcie_gbs * 1e9 * self.efficiency, self.host_gbs * 1e9 * self.efficiency
        cpu = self.cpu_gflops * 1e9 * self.efficiency
        return (expert_bytes / host + max(0, tokens - 1) * 6 * hidden * inter / cpu
                + tokens * 2 * hidden * act_bytes / pcie)

    def fetch_seconds(self, expert_bytes: int) -> float:
        """Copying one expert to the GPU (its compute there is small beside it; the hop not included)."""
        return expert_bytes / (self.pcie_gbs * 1e9 * self.efficiency)

    def fetch_threshold(self, expert_bytes: int, hidden: int, inter: int, act_bytes: int) -> int:
        """Copy a CPU-resident expert to the GPU when more tokens than this are routed to it: the largest
        n for which the CPU (one hop more than a fetch) is not slower than the copy."""
        one = self.cpu_seconds(1, expert_bytes, hidden, inter, act_bytes)
        more = self.cpu_seconds(2, expert_bytes, hidden, inter, act_bytes) - one  # each further token
        room = self.fetch_seconds(expert_bytes) - self.hop_latency_us * 1e-6 - one  # cpu(n) + hop <= fetch
        return 0 if room < 0 else min(MAX_FETCH_THRESHOLD, 1 + math.floor(room / more))

    def fetch_to_balance(self, sizes: list[int], fetched: int, expert_bytes: int, hidden: int, inter: int,
                         act_bytes: int) -> set[int]:
        """Of the experts bound for the CPU (their token counts `sizes`), which to fetch instead, so that
        the link (already carrying `fetched` experts) and the CPU, which work at the same time, finish
        about together: the largest first, each moved while that shortens the longer of the two (a
        decode step's eight one-token experts go half to each where the two rates are alike)."""
        hop = self.hop_latency_us * 1e-6
        each = [self.cpu_seconds(n, expert_bytes, hidden, inter, act_bytes) for n in sizes]
        link, cpu = fetched * self.fetch_seconds(expert_bytes), hop + sum(each)
        moved: set[int] = set()
        for j in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
            left = cpu - each[j] if len(moved) + 1 < len(sizes) else 0.0
            if max(link + self.fetch_seconds(expert_bytes), left) < max(link, cpu):
                link, cpu = link + self.fetch_seconds(expert_bytes), left
                moved.add(j)
        return moved

    @classmethod
    def calibrate(cls, device_map: "DeviceMap", expert: ExpertWeights, act_dtype: torch.dtype,
                  compute=None) -> "TransferModel":
        """Measured on this machine (best of a few runs, efficiency 1): the link (pinned host -> first
        GPU slot, or a host copy on a simulated map), the hop (a one-row copy round trip), and the CPU
        computing `expert` (a host-resident expert of the model) with `compute` (x -> y; default
        ExpertWeights.forward; the runtime passes the CPU kernel it computes that expert with): its T=1
        weight-read rate as the host bandwidth, its T=16 rate as the GEMM rate."""
        compute = compute or expert.forward
        target = device_map.gpus[0] if device_map.gpus else device_map.host
        cuda = target.type == "cuda"
        n = CALIBRATION_BYTES // 2
        src = torch.empty(n, dtype=torch.bfloat16).fill_(1.0)
        if cuda:
            src = src.pin_memory()
        dst = torch.empty(n, dtype=torch.bfloat16, device=target)

        def best(fn) -> float:
            fn()
            times = []
            for _ in range(CALIBRATION_REPEATS):
                if cuda:
                    torch.cuda.synchronize(target)
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize(target)
                times.append(time.perf_counter() - t0)
            return min(times)

        link = CALIBRATION_BYTES / best(lambda: dst.copy_(src, non_blocking=cuda))
        row = torch.zeros(1, expert.down.shape[0], dtype=act_dtype)
        hop = best(lambda: row.to(target, copy=True).to(device_map.host, copy=True)) / 2
        x1 = torch.zeros(1, row.shape[1], dtype=act_dtype)
        x16 = torch.zeros(CALIBRATION_TOKENS, row.shape[1], dtype=act_dtype)
        host = expert.nbytes / best(lambda: compute(x1))
        inter = expert.gate.shape[0]
        flops = 6 * CALIBRATION_TOKENS * row.shape[1] * inter / best(lambda: compute(x16))
        return cls(pcie_gbs=link / 1e9, host_gbs=host / 1e9, cpu_gflops=flops / 1e9, hop_latency_us=hop * 1e6,
                   efficiency=1.0)


@dataclass
class RuntimeOptions:
    """device_map: None = real CUDA devices for the plan's GPUs. cache_capacity: experts (all layers
    together) held in the GPU-side hot cache; 0 turns the cache off. fetch_threshold: tokens (None =
    derived from `transfer`, see the module doc); a negative value never fetches. fused_gpu_experts:
    "auto" runs each GPU's resident (unquantised) experts of a layer as one fused Triton call when that
    GPU can run Triton; "off" computes them one expert at a time; "triton" always fuses (tests run it
    under the Triton interpreter on simulated devices). cpu_workers: threads that compute the
    host-resident experts while the calling thread drives the GPUs (0: on the calling thread).
    fetch_window: experts copied to a GPU ahead of their compute (2 = double buffering; bounds the
    transient GPU memory of a prefill that streams a layer's experts). calibrate: measure the link,
    host and CPU rates at start-up (`TransferModel.calibrate`) and derive the fetch threshold from them.
    cpu_kernels: host-resident quantised experts run torch's int8 / int4 CPU kernels (see the module
    doc; fp8 ones are then held as int8) instead of being dequantised on every call.
    pin_host_experts: host-resident experts in pinned memory when the map has CUDA (fast, asynchronous
    fetches); False keeps them pageable (fetches are then plain copies). Added as an A/B switch when the
    calibration computed a pinned expert at 3.7 GB/s on an H200 host where bench/offload_gpu.py computed
    pageable ones at 61 GB/s. The likely cause was the calibration's, not the pinning's: that model had no
    embedding to take the activations' dtype from, so it timed fp32 activations, each call converting the
    bf16 expert to fp32 first (fixed, see MoERuntime.calibrate; not re-measured on a GPU)."""

    device_map: DeviceMap | None = None
    cache_capacity: int = 0
    cache_decay: float = DEFAULT_CACHE_DECAY
    cache_hysteresis: float = DEFAULT_CACHE_HYSTERESIS
    fetch_threshold: int | None = None
    transfer: TransferModel = field(default_factory=TransferModel)
    fused_gpu_experts: str = "auto"
    cpu_workers: int = DEFAULT_CPU_WORKERS
    fetch_window: int = DEFAULT_FETCH_WINDOW
    calibrate: bool = False
    cpu_kernels: bool = True
    pin_host_experts: bool = True

    def __post_init__(self):
        if self.fused_gpu_experts not in FUSED_MODES:
            raise ValueError(f"fused_gpu_experts must be one of {FUSED_MODES}, got {self.fused_gpu_experts!r}")
        if self.cpu_workers < 0 or self.fetch_window < 1:
            raise ValueError("cpu_workers must be >= 0 and fetch_window >= 1")


@dataclass
class RuntimeStats:
    """Counters since the last reset: token-expert assignments and compute calls per site ('gpu0', 'gpu1',
    'cpu'; an expert's block, or one fused call over a slot's experts; cache hits and fetched experts count
    on their GPU), copies and cache events."""

    tokens: dict[str, int] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    fetches: int = 0
    fetched_bytes: int = 0
    transient_fetches: int = 0
    cache_inserts: int = 0
    evictions: int = 0
    host_transfers: int = 0  # activation copies to/from the host for CPU-computed experts (2 per layer call)

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
        # per layer: its forwards so far, and {expert: (score, the forward it was last updated at)}; a score
        # decays lazily (decay ** forwards since), so a forward touches only the experts it routed to
        self.forwards: dict[int, int] = {}
        self.scores: dict[int, dict[int, tuple[float, int]]] = {}
        self.resident: dict[tuple[int, int], ExpertWeights] = {}  # insertion order = age

    def observe(self, layer: int, counts: dict[int, float]) -> None:
        """One forward of `layer` routed counts[e] tokens to expert e (experts not named: none). Plain
        Python on host numbers: the cache's bookkeeping reads nothing from a device."""
        now = self.forwards[layer] = self.forwards.get(layer, 0) + 1
        scores = self.scores.setdefault(layer, {})
        for e, n in counts.items():
            if n:
                scores[e] = (self._decayed(scores.get(e), now - 1) * self.decay + n, now)

    def _decayed(self, entry: tuple[float, int] | None, now: int) -> float:
        return 0.0 if entry is None else entry[0] * self.decay ** (now - entry[1])

    def score(self, key: tuple[int, int]) -> float:
        return self._decayed(self.scores.get(key[0], {}).get(key[1]), self.forwards.get(key[0], 0))

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


def host_kernel_format(w: ExpertWeights) -> ExpertWeights:
    """A host-resident expert in a format a CPU kernel reads: fp8 values (no CPU kernel) re-quantised to
    int8 per output channel from their fp32 values (the error adds at most amax/254 per row); other
    formats unchanged."""
    if w.kind not in ("fp8", "fp8-block"):
        return w
    deq = w.materialize(torch.float32)
    return ExpertWeights.from_float(*deq, "int8", torch.float32).map(
        lambda t: t.pin_memory() if w.gate.is_pinned() else t)


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


def moe_experts_triton_call(x, gate, up, down, local_ids, weights, scales):
    """The fused Triton kernel over stacked experts, ids local to the stack (-1: not here): fp32 [T, H]."""
    from engine.kernels.triton_impl.moe import moe_experts_triton

    return moe_experts_triton(x, gate, up, down, local_ids, weights, skip_negative_ids=True, out_dtype=torch.float32,
                              scales=scales)


class FetchStack:
    """A GPU buffer of FETCH_STACK_EXPERTS experts of one storage and shape, shared by the layers: a
    decode step's fetched experts are copied into its first rows (on CUDA on the side stream, after
    the previous layer's kernel has read them) and computed in one fused call."""

    def __init__(self, device: torch.device, sample: ExpertWeights, side_stream):
        self.device, self.side_stream = device, side_stream
        self.tensors = [torch.empty((FETCH_STACK_EXPERTS, *t.shape), dtype=t.dtype, device=device)
                        for t in sample.tensors()]
        self.gate, self.up, self.down = self.tensors[:3]
        self.scales = tuple(self.tensors[3:]) if sample.quantized else None
        self._read = None  # event: the last call that read the stack (CUDA)

    def fill(self, experts: list[ExpertWeights]) -> None:
        if self.device.type != "cuda":
            for j, w in enumerate(experts):
                for dst, src in zip(self.tensors, w.tensors()):
                    dst[j].copy_(src)
            return
        with torch.cuda.stream(self.side_stream):
            if self._read is not None:
                self.side_stream.wait_event(self._read)  # the previous layer's call has read its rows
            for j, w in enumerate(experts):
                for dst, src in zip(self.tensors, w.tensors()):
                    dst[j].copy_(src, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.side_stream)
        torch.cuda.current_stream(self.device).wait_event(copied)

    def used(self) -> None:
        """The fused call that reads the stack has been queued (the next fill waits for it on CUDA)."""
        if self.device.type == "cuda":
            self._read = torch.cuda.Event()
            self._read.record(torch.cuda.current_stream(self.device))


class LayerRuntime:
    """Routed experts of one MoE layer spread over slots; the ExpertBank.runtime hook (see module doc)."""

    def __init__(self, owner: "MoERuntime", layer: int, experts: list[ExpertWeights], slots: tuple[int, ...],
                 cache_slot: int | None, hidden: int, inter: int):
        self.owner, self.layer, self.experts, self.slots = owner, layer, experts, slots
        self.cache_slot, self.hidden, self.inter = cache_slot, hidden, inter
        self._fused_fetches: bool | None = None  # fetches of a few tokens go through the fetch stack (_stackable)
        self.fused: dict[int, FusedSlot] = {}
        self.whole_slot: int | None = None  # the fused GPU slot holding every expert of the layer, if one does
        self.staging = HostStaging(hidden, owner._pin)
        self._cpu_kernels: dict[torch.dtype, tuple[dict[int, int], object]] = {}
        self._host_tables: dict[torch.dtype, tuple[dict[int, int], native.ExpertTable] | None] = {}
        self._route_w: torch.Tensor | None = None  # reused (pinned on CUDA) routing weights of the host experts

    def cpu_expert(self, e: int, dtype: torch.dtype):
        """A callable computing host-resident expert e on activations of `dtype`: the int8 / int4 CPU
        kernels for quantised experts (built once per dtype, see QuantizedCpuExperts; int8 reads the stored
        bytes in place, int4 too with the native kernels, else a copy in torch's layout), else
        ExpertWeights.forward."""
        w = self.experts[e]
        if not (self.owner.options.cpu_kernels and w.quantized and w.kind in ("int8", "int4")):
            return w.forward
        if dtype not in self._cpu_kernels:
            host = [i for i, s in enumerate(self.slots) if s == CPU]
            packed = QuantizedCpuExperts(self.hidden, self.inter, dtype, w.kind, fuse_gate_up=False)
            for i in host:
                packed.append(self.experts[i].gate, self.experts[i].up, self.experts[i].down, self.experts[i].scales())
            self._cpu_kernels[dtype] = ({i: j for j, i in enumerate(host)}, packed)
        index, packed = self._cpu_kernels[dtype]
        return lambda x: packed.forward_expert(x, index[e])

    def host_table(self, dtype: torch.dtype) -> tuple[dict[int, int], native.ExpertTable] | None:
        """({expert: row of the table}, native.ExpertTable) over this layer's host-resident experts, for
        activations of `dtype`: when the native kernels are built, ``cpu_kernels`` is on and every host
        expert is int8 with per-row scales, int4 with group scales the kernels take, or plain in `dtype`
        (contiguous). Built once per dtype; None otherwise (the per-expert path runs)."""
        if dtype not in self._host_tables:
            self._host_tables[dtype] = self._build_host_table(dtype)
        return self._host_tables[dtype]

    def _build_host_table(self, dtype: torch.dtype):
        host = [e for e, s in enumerate(self.slots) if s == CPU]
        if not host or not self.owner.options.cpu_kernels or dtype not in (torch.float32, torch.bfloat16) \
                or not native.available():
            return None
        ws = [self.experts[e] for e in host]
        if all(w.kind == "int8" and w.gate_scale.dim() == 1 for w in ws) or all(w.kind == "int4" for w in ws):
            scales = tuple([getattr(w, f"{m}_scale") for w in ws] for m in ("gate", "up", "down"))
        elif all(not w.quantized and w.gate.dtype == dtype for w in ws):
            scales = None
        else:
            return None
        try:
            table = native.ExpertTable([w.gate for w in ws], [w.up for w in ws], [w.down for w in ws], scales)
        except ValueError:  # not contiguous CPU storage, or int4 groups the kernels do not take: the per-expert path
            return None
        return {e: j for j, e in enumerate(host)}, table

    def build_fused(self, mode: str) -> None:
        """Stack each GPU slot's resident experts (mode "auto": where Triton runs; "triton": always).
        The experts become views into the stacks, so the weights are not held twice; while one slot of
        one layer is being stacked, its weights briefly exist twice."""
        if mode == "off":
            return

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
        if len(by_slot) == 1 and CPU not in self.slots and set(by_slot) <= set(self.fused):
            self.whole_slot = next(iter(by_slot))

    @property
    def sync_free(self) -> bool:
        """Whether a call never waits for the device (ExpertBank.sync_free; a decode step of such layers can
        be a CUDA graph): every expert of the layer in one fused slot, on the only GPU (the home device)."""
        return self.whole_slot is not None and self.owner.device_map.n_gpus == 1

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
        if self.whole_slot is not None:  # one fused call over the whole layer: nothing to read or decide here
            stats.record(dm.name(self.whole_slot), ids.numel())
            part = self._run_fused(self.whole_slot, x, ids, weights)
            return part.to(home, non_blocking=part.is_cuda and home.type == "cuda").to(x.dtype)
        routed = ids.reshape(-1).tolist()  # the layer's one read of the device: which experts, how many tokens
        groups = group_by_expert(ids, weights, self.num_experts, host_ids=routed)
        sizes = [groups.offsets[i + 1] - groups.offsets[i] for i in range(len(groups.experts))]
        rt.cache.observe(self.layer, dict(zip(groups.experts, sizes)))
        threshold = rt.threshold(self, x.element_size())
        protect = {(self.layer, e) for e in groups.experts}

        # Decide a site per active expert.
        gpu_jobs, cpu_jobs, fetch_jobs = [], [], []
        fused_active: set[int] = set()
        fused_tokens: dict[int, int] = {}
        for i, e in enumerate(groups.experts):
            slot = self.slots[e]
            if slot in self.fused:  # computed below, with the slot's other experts, in one fused call
                fused_active.add(slot)
                fused_tokens[slot] = fused_tokens.get(slot, 0) + sizes[i]
                continue
            if slot != CPU:
                gpu_jobs.append((i, slot, self.experts[e]))
                continue
            key = (self.layer, e)
            cached = rt.cache.lookup(key) if self.cache_slot is not None else None
            if cached is not None:
                stats.cache_hits += 1
                gpu_jobs.append((i, self.cache_slot, cached))
                continue
            admit, victim = (rt.cache.admission(key, protect) if self.cache_slot is not None else (False, None))
            if self.cache_slot is not None and (admit or (threshold >= 0 and sizes[i] > threshold)):
                if admit:  # the cache entry is claimed now; its copy starts with the fetch window below
                    if victim is not None:
                        stats.evictions += 1
                    stats.cache_inserts += 1
                    rt.cache.insert(key, None, victim)
                else:
                    stats.transient_fetches += 1
                fetch_jobs.append((i, e, key if admit else None))
            else:
                cpu_jobs.append((i, e))
        if cpu_jobs and self.cache_slot is not None and rt.options.fetch_threshold is None:
            # the link and the CPU work at once: copy some of the CPU's experts where that finishes sooner
            moved = rt.transfer.fetch_to_balance([sizes[i] for i, _ in cpu_jobs], len(fetch_jobs),
                                                 self.experts[0].nbytes, self.hidden, self.inter, x.element_size())
            for j in sorted(moved):
                stats.transient_fetches += 1
                fetch_jobs.append((*cpu_jobs[j], None))
            cpu_jobs = [job for j, job in enumerate(cpu_jobs) if j not in moved]

        # 1. Host-resident experts go to the CPU workers first (one gather, one copy of their rows); one
        #    token's in one native call where the layer has a host table.
        host = self.host_table(x.dtype) if cpu_jobs and x.shape[0] == 1 and len(cpu_jobs) <= native.MAX_TOP_K else None
        if host is not None:
            cpu_finish = self._submit_cpu_native(x, weights, routed, cpu_jobs, host)  # (one token: its row)
        else:
            cpu_finish = self._submit_cpu(x, groups, cpu_jobs) if cpu_jobs else None
        # 2. Fused GPU calls, then per-expert GPU blocks (asynchronous on CUDA).
        partials = [self._run_fused(slot, x, ids, weights) for slot in sorted(fused_active)]
        for slot, n in fused_tokens.items():
            stats.record(dm.name(slot), n)  # (one call each)
        results: dict[int, torch.Tensor] = {}
        for i, slot, w in gpu_jobs:
            results[i] = self._run_block(x, groups, i, slot, w)
        # 3. Experts streamed to the cache GPU: a few tokens' transient copies into the runtime's fetch stack
        #    and one fused call over them; else `fetch_window` copies ahead of each one's compute.
        if fetch_jobs and self._stackable(fetch_jobs, x):
            partials.append(self._run_fetch_stack(x, ids, weights, routed, fetch_jobs, groups, sizes))
            fetch_jobs = []
        if fetch_jobs:
            pending = []
            for n in range(len(fetch_jobs) + rt.options.fetch_window):
                if n < len(fetch_jobs):
                    i, e, key = fetch_jobs[n]
                    copy, event = rt.copy_to(self.experts[e], self.cache_slot)
                    stats.fetches += 1
                    stats.fetched_bytes += copy.nbytes
                    if key is not None:
                        rt.cache.resident[key] = copy
                    pending.append((i, copy, event))
                if len(pending) > rt.options.fetch_window or (n >= len(fetch_jobs) and pending):
                    i, copy, event = pending.pop(0)
                    if event is not None:
                        rt.wait_for_copy(event, copy, dm.device(self.cache_slot))
                    results[i] = self._run_block(x, groups, i, self.cache_slot, copy)
        # 4. The CPU's results (copied back in one transfer).
        if cpu_finish is not None:
            done = cpu_finish()
            if isinstance(done, torch.Tensor):  # the native call's weighted sum
                partials.append(done)
            else:
                results.update(done)

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

    def _stackable(self, fetch_jobs: list, x: torch.Tensor) -> bool:
        """Whether this call's fetches go through the fetch stack: a few tokens (decode), transient copies
        only (no cache entry claimed), no more than the stack holds, on a GPU that runs the fused kernel."""
        if x.shape[0] > QUANTIZED_KERNEL_MAX_TOKENS or len(fetch_jobs) > FETCH_STACK_EXPERTS \
                or any(key is not None for _i, _e, key in fetch_jobs):
            return False
        if self._fused_fetches is None:  # (decided once: the mode and the cache GPU do not change)
            mode = self.owner.options.fused_gpu_experts
            dev = self.owner.device_map.device(self.cache_slot)
            self._fused_fetches = mode == "triton" or (
                mode == "auto" and dev.type == "cuda" and use_triton("auto", torch.empty(0, device=dev)))
        return self._fused_fetches

    def _run_fetch_stack(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, routed: list[int],
                         fetch_jobs: list, groups, sizes: list[int]) -> torch.Tensor:
        """Copy the fetched experts into rows 0..n-1 of the runtime's fetch stack on the cache GPU and compute
        them in one fused call (ids mapped to those rows, -1 for the layer's other experts): fp32 [T, H]
        weighted sum on that GPU. Replaces a gather, a copy, a kernel call and an index_add per expert."""
        rt, dm, stats = self.owner, self.owner.device_map, self.owner.stats
        dev = dm.device(self.cache_slot)
        sample = self.experts[fetch_jobs[0][1]]
        stack = rt.fetch_stack(dev, sample)
        row = {}
        for j, (i, e, _key) in enumerate(fetch_jobs):
            row[e] = j
            stats.fetches += 1
            stats.fetched_bytes += self.experts[e].nbytes
            stats.record(dm.name(self.cache_slot), sizes[i])
        stack.fill([self.experts[e] for _i, e, _key in fetch_jobs])
        # (the rows as a tensor made from host numbers: on CUDA one asynchronous copy of T*k ints, not a wait;
        # the sync counter counts it, so a layer that fetches this way shows two there)
        local = torch.tensor([row.get(e, -1) for e in routed], dtype=torch.long).view(ids.shape)
        n = len(fetch_jobs)
        out = moe_experts_triton_call(x.to(dev), stack.gate[:n], stack.up[:n], stack.down[:n],
                                      local.to(dev, non_blocking=dev.type == "cuda"), weights.to(dev),
                                      None if stack.scales is None else tuple(s[:n] for s in stack.scales))
        stack.used()
        return out

    def _run_block(self, x: torch.Tensor, groups, i: int, slot: int, w: ExpertWeights) -> torch.Tensor:
        """Expert block i of `groups` computed on `slot` from weights `w` (result stays on that device)."""
        start, end = groups.offsets[i], groups.offsets[i + 1]
        dev = self.owner.device_map.device(slot)
        block = x.index_select(0, groups.token_index[start:end])
        block = block.to(dev, non_blocking=block.is_cuda and dev.type == "cuda")
        self.owner.stats.record(self.owner.device_map.name(slot), end - start)
        mode = self.owner.options.fused_gpu_experts
        if w.quantized and (mode == "triton" or (mode == "auto" and end - start <= QUANTIZED_KERNEL_MAX_TOKENS
                                                 and dev.type != "cpu" and use_triton("auto", w.gate))):
            return self._quantized_on_gpu(block, w)
        return w.forward(block)

    @staticmethod
    def _quantized_on_gpu(block: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        """A few tokens of a quantised expert (fetched, cached or resident alone) on a GPU: the fused Triton
        kernel over this one expert, dequantising in registers, instead of dequantised copies of its three
        matrices (on the H200 those elementwise kernels cost a decode step's fetched fp8 experts 0.67 ms per
        layer). Larger blocks keep dequantise + GEMM: there the kernel's per-call sorting of one expert's
        rows made a 2 048-token prefill's host layer 129 ms against 43. The same values as forward()."""
        from engine.kernels.triton_impl.moe import moe_experts_triton

        n = block.shape[0]
        ids = torch.zeros((n, 1), dtype=torch.long, device=block.device)
        ones = torch.ones((n, 1), dtype=torch.float32, device=block.device)
        return moe_experts_triton(block, w.gate[None], w.up[None], w.down[None], ids, ones,
                                  scales=tuple(t[None] for t in w.scales()), out_dtype=block.dtype)

    def _submit_cpu(self, x: torch.Tensor, groups, jobs: list[tuple[int, int]]):
        """Stage the rows of the host-resident experts' tokens in this layer's reused host buffer (pinned
        on CUDA) with one copy, and start computing the experts on the CPU workers (spread over them by
        rows; here when there are none). Returns `finish()`: waits for them and gives {i: result on
        the home device}, copied back in one transfer. No synchronisation per expert."""
        rt = self.owner
        spans, rows, n = [], [], 0
        for i, e in jobs:
            start, end = groups.offsets[i], groups.offsets[i + 1]
            spans.append((i, e, n, n + end - start))
            rows.append(groups.token_index[start:end])
            n += end - start
            rt.stats.record("cpu", end - start)
        staged = self.staging.buffer("inputs", n, x.dtype)
        staged.copy_(x.index_select(0, torch.cat(rows)), non_blocking=x.is_cuda)
        ready = self.staging.mark(x.device) if x.is_cuda else None
        out = self.staging.buffer("outputs", n, x.dtype)
        rt.stats.host_transfers += 2

        threads = torch.get_num_threads()

        def work(chunk) -> float:
            if ready is not None:
                ready.synchronize()
            if torch.get_num_threads() != threads:
                # OpenMP thread counts are per thread: the caller's count, so that GEMMs block (and sum)
                # exactly as they would on the calling thread
                torch.set_num_threads(threads)
            t0 = time.perf_counter()
            with torch.inference_mode():  # thread-local: entered on the worker itself
                for _i, e, a, b in chunk:
                    out[a:b] = self.cpu_expert(e, staged.dtype)(staged[a:b])
            return time.perf_counter() - t0

        futures = [rt.run_on_cpu(work, chunk) for chunk in _balanced(spans, rt.options.cpu_workers)]

        def finish() -> dict[int, torch.Tensor]:
            seconds = max(f.result() for f in futures)
            if n == len(spans):  # one token each: the weights' read rate, as the transfer model's host rate
                rt.observe_cpu(len(spans) * self.experts[spans[0][1]].nbytes, seconds)
            back = out.to(x.device, non_blocking=x.is_cuda)
            if x.is_cuda:
                self.staging.released("outputs", x.device)
            return {i: back[a:b] for i, _e, a, b in spans}

        return finish

    def _submit_cpu_native(self, x: torch.Tensor, weights: torch.Tensor, routed: list[int], jobs: list[tuple[int, int]],
                           host):
        """One token's host-resident experts in one native call on a CPU worker: the token's row and its
        routing weights ([1, k], `routed` its expert ids as read on the host) staged in reused host buffers
        (pinned on CUDA; one copy each, no read of the device here), the call reads the experts in place.
        Returns `finish()`: the fp32 [1, H] weighted sum on the home device (the experts' outputs summed in
        ascending id order, as moe_experts_reference sums them)."""
        rt = self.owner
        index, table = host
        for _i, _e in jobs:
            rt.stats.record("cpu", 1)
        staged = self.staging.buffer("inputs", 1, x.dtype)
        staged.copy_(x, non_blocking=x.is_cuda)
        if self._route_w is None or self._route_w.shape[1] < weights.shape[1]:
            self._route_w = torch.empty(1, max(native.MAX_TOP_K, weights.shape[1]), dtype=torch.float32,
                                        pin_memory=rt._pin)
        route_all = self._route_w[:, :weights.shape[1]]
        route_all.copy_(weights, non_blocking=x.is_cuda)  # the whole row; the worker picks the host experts'
        slot_of = {e: j for j, e in enumerate(routed)}  # (a token's top-k experts are distinct)
        picks = [slot_of[e] for _i, e in jobs]  # ascending expert id, as `jobs`
        rows = [[index[e] for _i, e in jobs]]
        ready = self.staging.mark(x.device) if x.is_cuda else None
        rt.stats.host_transfers += 2
        threads = torch.get_num_threads()

        def work() -> tuple[torch.Tensor, float]:
            if ready is not None:
                ready.synchronize()
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)  # per-thread OpenMP count: the caller's
            t0 = time.perf_counter()
            route_w = route_all[:, picks]  # (host tensors, on the worker: after the copy has landed)
            out = native.moe_decode(staged, table, torch.tensor(rows, dtype=torch.int64), route_w)
            return out, time.perf_counter() - t0

        future = rt.run_on_cpu(work)

        def finish() -> torch.Tensor:
            out, seconds = future.result()
            rt.observe_cpu(len(jobs) * self.experts[jobs[0][1]].nbytes, seconds)
            return out.to(x.device, non_blocking=x.is_cuda)

        return finish


def _balanced(spans: list[tuple[int, int, int, int]], workers: int) -> list[list[tuple[int, int, int, int]]]:
    """Spans (i, expert, row start, row end) dealt to at most `workers` lists with similar row counts
    (largest first to the least loaded), each list in ascending row order."""
    n = max(1, min(workers, len(spans)))
    chunks: list[list] = [[] for _ in range(n)]
    load = [0] * n
    for span in sorted(spans, key=lambda s: s[2] - s[3]):
        j = load.index(min(load))
        chunks[j].append(span)
        load[j] += span[3] - span[2]
    return [sorted(c, key=lambda s: s[2]) for c in chunks if c]


class HostStaging:
    """Reused host buffers of one layer for the activations of CPU-computed experts (pinned when the
    runtime uses CUDA). A buffer whose contents a GPU copy still reads is not rewritten before that
    copy is done (an event per buffer)."""

    def __init__(self, hidden: int, pin: bool):
        self.hidden, self.pin = hidden, pin
        self._buffers: dict[str, torch.Tensor] = {}
        self._in_use: dict[str, object] = {}

    def buffer(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        pending = self._in_use.pop(name, None)
        if pending is not None:
            pending.synchronize()
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.shape[0] < rows:
            buf = torch.empty((max(rows, 1), self.hidden), dtype=dtype, pin_memory=self.pin)
            self._buffers[name] = buf
        return buf[:rows]

    @staticmethod
    def mark(device: torch.device):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    def released(self, name: str, device: torch.device) -> None:
        """The current stream of `device` reads buffer `name` (an asynchronous copy): mark when it is done."""
        self._in_use[name] = self.mark(device)


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
        self._host_rate: float | None = None  # GB/s of the layers' own one-token CPU jobs (observe_cpu)
        self._fetch_stacks: dict[tuple, FetchStack] = {}
        self._pin = self.device_map.uses_cuda and torch.cuda.is_available()
        self._executor: ThreadPoolExecutor | None = None
        self.transfer = self.options.transfer  # replaced by measured rates when options.calibrate

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
        if slot == CPU and self._pin and self.options.pin_host_experts:
            w = w.map(lambda t: t.pin_memory())
        return w

    def _install(self, llm: nn.Module, layer: int, bank: nn.Module, experts: list[ExpertWeights],
                 slots: tuple[int, ...]) -> None:
        e_n, inter, hidden = bank_dims(bank)
        if self.options.cpu_kernels:
            experts = [host_kernel_format(w) if slot == CPU else w for w, slot in zip(experts, slots)]
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
        if rt.options.calibrate and rt.layers:
            rt.calibrate(cls._activation_dtype(llm, rt))
        return rt

    @staticmethod
    def _activation_dtype(llm: nn.Module, rt: "MoERuntime") -> torch.dtype:
        """The dtype the experts will see: the word embeddings', else the model's other weights' (the experts'
        own are meta in the model once placed), else the experts' where they are plain, else torch's default."""
        embeddings = getattr(getattr(llm, "model", None), "word_embeddings", None)
        for t in ([embeddings.weight] if embeddings is not None else []) + list(llm.parameters()):
            if t.is_floating_point() and not t.is_meta:
                return t.dtype
        expert = next(iter(rt.layers.values())).experts[0]
        return torch.get_default_dtype() if expert.quantized else expert.gate.dtype

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
        if rt.options.calibrate and rt.layers:
            rt.calibrate(dtype)
        return rt, consumed

    # -- execution helpers ----------------------------------------------------------------------
    def run_on_cpu(self, fn, *args) -> Future:
        """Run fn(*args) on a CPU worker thread (on the calling thread when options.cpu_workers is 0)."""
        if self.options.cpu_workers == 0:
            done: Future = Future()
            done.set_result(fn(*args))
            return done
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.options.cpu_workers, thread_name_prefix="ming-cpu-experts")
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        """Stop the CPU worker threads (they are also stopped at interpreter exit)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def calibrate(self, dtype: torch.dtype) -> TransferModel:
        """Measure the transfer model on this machine with one of the model's host-resident experts
        (any expert when none is), use it for the fetch thresholds and return it."""
        layers = list(self.layers.values())
        host = [(lr, e) for lr in layers for e, s in enumerate(lr.slots) if s == CPU]
        if host:  # timed as the runtime computes it (the int8 / int4 CPU kernels; not a dequantising forward)
            lr, e = host[0]
            sample, compute = lr.experts[e], lr.cpu_expert(e, dtype)
        else:
            sample = layers[0].experts[0].to(self.device_map.host)
            compute = None
        with torch.inference_mode():
            self.transfer = TransferModel.calibrate(self.device_map, sample, dtype, compute)
        self._thresholds.clear()
        return self.transfer

    def fetch_stack(self, device: torch.device, sample: ExpertWeights) -> FetchStack:
        """The fetch stack of `device` for experts like `sample` (made on first use; one per storage)."""
        key = (str(device), tuple((t.dtype, tuple(t.shape)) for t in sample.tensors()))
        if key not in self._fetch_stacks:
            side = self._side_stream(device) if device.type == "cuda" else None
            self._fetch_stacks[key] = FetchStack(device, sample, side)
        return self._fetch_stacks[key]

    def observe_cpu(self, nbytes: int, seconds: float) -> None:
        """A CPU job's one-token experts read `nbytes` of weights in `seconds` (timed on the worker). On
        CUDA, with a derived threshold, the transfer model's host rate follows what the layers reach
        (a running mean, the thresholds redone when it moves by a sixth): the one-expert calibration at
        load ran 3x faster than the CPU's share of an H200 decode step, where the worker shares the
        machine with the thread driving the GPU."""
        if seconds <= 0 or not self._pin or self.options.fetch_threshold is not None:
            return
        rate = nbytes / seconds / 1e9 / self.transfer.efficiency
        self._host_rate = rate if self._host_rate is None else \
            (1 - HOST_RATE_SMOOTHING) * self._host_rate + HOST_RATE_SMOOTHING * rate
        if abs(self._host_rate - self.transfer.host_gbs) > self.transfer.host_gbs / 6:
            self.transfer = replace(self.transfer, host_gbs=self._host_rate)
            self._thresholds.clear()

    def threshold(self, layer: LayerRuntime, act_bytes: int) -> int:
        if self.options.fetch_threshold is not None:
            return int(self.options.fetch_threshold)
        key = (layer.layer, act_bytes)
        if key not in self._thresholds:
            self._thresholds[key] = self.transfer.fetch_threshold(
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
