"""CUDA graphs of the decode step: captured once per (batch, attention window), replayed per token.

A decode step (engine.models.thinker.llm `forward_step`) reads nothing back to the host, so its
kernels can be recorded once and replayed: the host then issues one graph launch per step instead
of a few hundred kernel launches. What a graph bakes in must not change between replays, hence:

* one **static KV cache** per batch size (engine.models.thinker.kv_cache, ``static=True``) of
  ``max_tokens`` slots, allocated on first use and reused by every request (its buffers, padding
  mask, rope deltas and slot counters keep their addresses; a request resets them in place);
* the token ids go in through a static [B, 1] buffer on the embedding's device, the logits come out
  in a static [B, V] buffer (sampling runs after the replay, eagerly: see engine.sampling);
* the attention window is a host value, so there is one graph per window bucket (powers of two from
  ``MIN_WINDOW`` up to ``max_tokens``); a step uses the smallest bucket that holds its slots.

Models placed over several GPUs (layers split by a placement plan) get one graph per run of layers on
one device ("segment"), replayed in order; activations cross between segments through static buffers
(eager device-to-device copies, ordered by the streams). A step can be captured only when every
layer, the embedding and the head live on CUDA devices, the embedding sits with the first layers and
the head with the last, and every MoE layer's experts run without host syncs (ExpertBank.sync_free:
the Triton path, on plain or quantised weights); `graph_blockers` says what prevents it otherwise, and the decode
loop then runs the same step eagerly.

Captures run once per key: a warm-up call of the step first (Triton compiles, allocator settles; its
effects on the cache are undone: it writes the slot the real step writes again and its slot advance
is reset), then the capture (which executes nothing) into one memory pool shared by all graphs of the
model. Set ``MING_CUDA_GRAPHS=0`` to run every step eagerly. A capture the driver refuses does not end the
request: the model's steps then run eagerly (the same step, its cause in ``failure``, said once as a warning).
"""

from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass

import torch

from engine.models.thinker.kv_cache import KVCache
from engine.models.thinker.layers import Numerics

GRAPHS_ENV = "MING_CUDA_GRAPHS"
MIN_WINDOW = 128


def graphs_enabled() -> bool:
    return os.environ.get(GRAPHS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def window_bucket(needed: int, capacity: int) -> int:
    """The attention window of a graph step that must see `needed` slots: the next power of two (at
    least MIN_WINDOW), never beyond the cache's capacity."""
    return min(capacity, max(MIN_WINDOW, 1 << max(0, needed - 1).bit_length()))


def graph_blockers(llm) -> list[str]:
    """Why the decode step of this model cannot be captured in CUDA graphs (empty: it can)."""
    model = llm.model
    if not torch.cuda.is_available():
        return ["no CUDA"]
    reasons = []
    segments = model.segments()
    if any(dev.type != "cuda" for dev, _ in segments):
        reasons.append("layers live on the CPU")
    embed_dev, head_dev = model.word_embeddings.weight.device, model.norm.weight.device
    if embed_dev != segments[0][0]:
        reasons.append(f"the embedding ({embed_dev}) is not on the first layers' device ({segments[0][0]})")
    if head_dev != segments[-1][0]:
        reasons.append(f"the head ({head_dev}) is not on the last layers' device ({segments[-1][0]})")
    for i, layer in enumerate(model.layers):
        if layer.is_moe and not layer.mlp.experts.sync_free:
            reasons.append(f"layer {i}: the routed experts' path reads results back to the host "
                           "(CPU-resident or torch-reference experts)")
            break
    return reasons


@dataclass
class _Segment:
    device: torch.device
    layers: list
    x_in: torch.Tensor | None = None  # static inputs of a segment after the first
    residual_in: torch.Tensor | None = None
    x_out: torch.Tensor | None = None  # static outputs of a segment before the last
    residual_out: torch.Tensor | None = None


class _Captured:
    """The graphs of one (batch, window): one per segment."""

    def __init__(self, graphs: list):
        self.graphs = graphs


class DecodeGraphs:
    """The decode-step graphs of one model (see module doc). Not thread-safe: one request at a time
    uses a batch size's cache (the engine runs one request at a time)."""

    def __init__(self, llm, numerics: Numerics, max_tokens: int | None = None):
        blockers = graph_blockers(llm)
        if blockers:
            raise ValueError("the decode step cannot be captured: " + "; ".join(blockers))
        self.llm, self.numerics = llm, numerics
        self.max_tokens = int(max_tokens or llm.config.max_position_embeddings)
        self.pools: dict[torch.device, object] = {}  # one memory pool per device, shared by its graphs
        self._caches: dict[int, KVCache] = {}
        self._tokens: dict[int, torch.Tensor] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._segments: dict[int, list[_Segment]] = {}
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self.captures = 0
        self.replay = True  # False: run the very same step eagerly (what the graphs are checked against)
        self.failure: str | None = None  # why a capture failed (the steps then run eagerly), None while none has

    # ------------------------------------------------------------------ per batch size
    def acquire(self, batch: int) -> KVCache:
        """The static cache of this batch size, emptied for a new sequence (allocated on first use)."""
        if batch not in self._caches:
            llm = self.llm
            model = llm.model
            self._caches[batch] = llm.new_cache(batch, self.numerics, capacity=self.max_tokens, static=True)
            self._tokens[batch] = torch.zeros(batch, 1, dtype=torch.long, device=model.word_embeddings.weight.device)
            self._logits[batch] = torch.empty(batch, llm.config.vocab_size, dtype=torch.float32,
                                              device=model.norm.weight.device)
            segments = [_Segment(dev, layers) for dev, layers in model.segments()]
            hidden = llm.config.hidden_size
            for i, seg in enumerate(segments):
                make = (lambda d: torch.zeros(batch, 1, hidden, dtype=self.numerics.dtype, device=d))  # noqa: E731
                if i:
                    seg.x_in, seg.residual_in = make(seg.device), make(seg.device)
                if i < len(segments) - 1:
                    seg.x_out, seg.residual_out = make(seg.device), make(seg.device)
            self._segments[batch] = segments
        cache = self._caches[batch]
        cache.reset()
        return cache

    def tokens(self, batch: int) -> torch.Tensor:
        """The static [B, 1] input ids of the next step."""
        return self._tokens[batch]

    def window(self, cache: KVCache) -> int:
        return window_bucket(cache.length + 1, cache.capacity)

    # ------------------------------------------------------------------ the step
    def _run_segment(self, batch: int, i: int, window: int) -> None:
        """Segment i of the step on static buffers (eager, or recorded while capturing)."""
        llm, model, cache = self.llm, self.llm.model, self._caches[batch]
        seg = self._segments[batch][i]
        if i == 0:
            x, residual = model.embed(self._tokens[batch]), None
        else:
            x, residual = seg.x_in, seg.residual_in
        x, residual = model.step_segment(seg.device, seg.layers, x, residual, cache, self.numerics, window)
        if seg.x_out is not None:
            seg.x_out.copy_(x)
            seg.residual_out.copy_(residual)
        else:
            self._logits[batch].copy_(llm.logits(model.final_norm(x, residual)[:, -1]))

    def _hand_over(self, batch: int, i: int) -> None:
        """Segment i's outputs into segment i+1's inputs (device to device, ordered by the streams)."""
        segs = self._segments[batch]
        segs[i + 1].x_in.copy_(segs[i].x_out)
        segs[i + 1].residual_in.copy_(segs[i].residual_out)

    def _capture(self, batch: int, window: int) -> _Captured:
        cache = self._caches[batch]
        segments = self._segments[batch]
        # warm-up on a side stream (compiles Triton kernels, settles cuBLAS/allocator state)
        side = torch.cuda.Stream(device=segments[0].device)
        side.wait_stream(torch.cuda.current_stream(segments[0].device))
        with torch.cuda.stream(side):
            for i in range(len(segments)):
                with torch.cuda.device(segments[i].device):
                    self._run_segment(batch, i, window)
                if i + 1 < len(segments):
                    self._hand_over(batch, i)
        torch.cuda.current_stream(segments[0].device).wait_stream(side)
        for seg in segments:
            torch.cuda.synchronize(seg.device)
        cache.start_device_steps()  # undo the warm-up's slot advance (its KV write is rewritten by the step)
        graphs = []
        for i, seg in enumerate(segments):
            with torch.cuda.device(seg.device):
                g = torch.cuda.CUDAGraph()
                if seg.device not in self.pools:
                    self.pools[seg.device] = torch.cuda.graph_pool_handle()
                with torch.cuda.graph(g, pool=self.pools[seg.device], capture_error_mode="thread_local"):
                    self._run_segment(batch, i, window)
            graphs.append(g)
        self.captures += 1
        return _Captured(graphs)

    def _give_up(self, error: BaseException) -> None:
        """After a failed capture: the same steps launched eagerly (replay off), said once, the cause kept in
        `failure`. The capture executed nothing and the warm-up's slot advance was undone before it, so the
        cache is as the step expects; the failed capture's graph is dropped."""
        self.failure = f"{type(error).__name__}: {error}"
        self.replay = False
        warnings.warn(f"CUDA graph capture of the decode step failed ({self.failure.splitlines()[0][:300]}); "
                      "its steps run eagerly (set MING_CUDA_GRAPHS=0 to skip the attempt)", RuntimeWarning, stacklevel=3)

    def run(self, cache: KVCache, window: int) -> torch.Tensor:
        """Replay the step for `window` (capturing it first if new) -> the static logits [B, V] fp32.
        The caller has put the input ids in `tokens(batch)` and advances `cache.length` afterwards."""
        batch = cache.batch
        if self._caches.get(batch) is not cache:
            raise ValueError("run() needs the cache from acquire() of this batch size")
        segments = self._segments[batch]
        if not self.replay:
            for i in range(len(segments)):
                with torch.cuda.device(segments[i].device):
                    self._run_segment(batch, i, window)
                if i + 1 < len(segments):
                    self._hand_over(batch, i)
            return self._logits[batch]
        key = (batch, window)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(batch, window)
            except RuntimeError as e:  # a capture the driver refused: this model's steps run eagerly from now on
                self._give_up(e)
                return self.run(cache, window)
        for i, g in enumerate(self._graphs[key].graphs):
            with torch.cuda.device(segments[i].device):
                g.replay()
            if i + 1 < len(segments):
                self._hand_over(batch, i)
        return self._logits[batch]


_BY_MODEL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def decode_graphs_for(llm, numerics: Numerics) -> DecodeGraphs | None:
    """The model's DecodeGraphs (made on first use), or None when graphs are off or impossible."""
    if not graphs_enabled():
        return None
    entry = _BY_MODEL.get(llm)
    if entry is None:
        entry = DecodeGraphs(llm, numerics) if not graph_blockers(llm) else False
        _BY_MODEL[llm] = entry
    return entry or None
