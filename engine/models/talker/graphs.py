"""CUDA graphs for the talker's per-patch work on CUDA (the reference captures the same two): the
talker LLM's 1-token decode step on the static 2048-position cache, and the patch step (the CFM loop of
`steps` doubled-batch DiT evaluations + the aggregator + the stop probability). Both are captured once
per pipeline at batch 1 and replayed with inputs copied into static buffers; cfg and the SDE noise
scale are tensors, so a request's sampling settings need no re-capture. The prefill and the VAE stream
run eagerly. On CPU none of this is used (generate.py runs the same modules eagerly).
"""

from __future__ import annotations

import threading

import torch

from engine.models.talker.backbone import StaticKVCache
from engine.models.talker.cfm import SamplingParams, runs_unconditional_branch, sde_scalars, time_grid
from engine.models.talker.config import MAX_CACHE_LEN
from engine.models.talker.generate import PatchStep
from engine.models.talker.model import BailingTalker2

WARMUP_RUNS = 2


class GraphRunner:
    def __init__(self, talker: BailingTalker2):
        if talker.device.type != "cuda":
            raise ValueError("CUDA graphs need the talker on a CUDA device")
        cfg = talker.config
        dev, dtype = talker.device, talker.dtype
        self.talker = talker
        self.cache = StaticKVCache(cfg.llm, MAX_CACHE_LEN, 1, dtype, dev)
        hidden = cfg.llm.hidden_size
        self.embed_in = torch.zeros(1, 1, hidden, dtype=dtype, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.h_in = torch.zeros(1, 1, hidden, dtype=dtype, device=dev)
        self.his = torch.zeros(1, cfg.history_patch_size, cfg.latent_dim, dtype=dtype, device=dev)
        self.y0 = torch.zeros(1, cfg.patch_size, cfg.latent_dim, dtype=dtype, device=dev)
        self.sde = torch.zeros(cfg.steps, 1, cfg.patch_size, cfg.latent_dim, dtype=dtype, device=dev)
        self.cfg_t = torch.zeros((), dtype=dtype, device=dev)
        self.noise_scale_t = torch.zeros((), dtype=dtype, device=dev)
        self.times = time_grid(cfg.steps, dtype, dev)
        self.unguided_step = PatchStep(talker)  # eager: a Preview cfg below PREVIEW_UNGUIDED_BELOW
        self.llm_graph: torch.cuda.CUDAGraph | None = None
        self.patch_graph: torch.cuda.CUDAGraph | None = None
        self._lock = threading.Lock()

    def _llm_body(self) -> torch.Tensor:
        return self.talker.model(self.embed_in, self.cache, positions=self.pos)[:, -1:]

    def _patch_body(self):
        t = self.talker
        gen = t.cfm.sample(self.h_in, self.his, self.y0, self.sde, self.cfg_t, self.noise_scale_t, self.times)
        return gen, t.aggregator(gen), t.stop_probability(self.h_in)

    def capture(self) -> None:
        with self._lock, torch.inference_mode():
            if self.llm_graph is not None:
                return
            self.cache.full_view = True
            stream = torch.cuda.Stream(device=self.talker.device)
            stream.wait_stream(torch.cuda.current_stream(self.talker.device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_RUNS):
                    self._llm_body()
                    self._patch_body()
            torch.cuda.current_stream(self.talker.device).wait_stream(stream)
            llm, patch = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(llm):
                self.h_out = self._llm_body()
            with torch.cuda.graph(patch, pool=llm.pool()):
                self.gen_out, self.next_out, self.p_out = self._patch_body()
            torch.cuda.synchronize(self.talker.device)
            self.llm_graph, self.patch_graph = llm, patch
            self.cache.reset()

    def prepare(self):
        """(cache, llm_step, patch_step) for one segment; the eager prefill fills the same cache."""
        self.capture()
        self.cache.reset()
        self.cache.full_view = False
        return self.cache, self.llm_step, self.patch_step

    def llm_step(self, embed: torch.Tensor) -> torch.Tensor:
        self.embed_in.copy_(embed)
        self.pos.fill_(self.cache.length)
        self.llm_graph.replay()
        self.cache.length += 1
        return self.h_out.clone()

    def patch_step(self, h, his, y0, sde, params: SamplingParams, trace: dict | None = None):
        if trace is not None:
            raise ValueError("tracing needs the eager path (no CUDA graphs)")
        if not runs_unconditional_branch(params.cfg, self.talker.config.preview):
            return self.unguided_step(h, his, y0, sde, params)  # the captured graph runs both branches
        self.h_in.copy_(h)
        self.his.copy_(his)
        self.y0.copy_(y0)
        self.sde.copy_(sde)
        cfg, noise_scale = sde_scalars(params, self.cfg_t.dtype, self.cfg_t.device)
        self.cfg_t.copy_(cfg)
        self.noise_scale_t.copy_(noise_scale)
        self.patch_graph.replay()
        return self.gen_out.clone(), self.next_out.clone(), self.p_out.clone()
