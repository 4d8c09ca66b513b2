"""One Ming-flash MoE layer with part of its experts in host memory: the expert runtime on a real GPU.

    python bench/offload_gpu.py [--gpu-fraction 0.5] [--tokens 1,16,128] [--json]

Needs a CUDA GPU (prints why and exits 2 without one). Shape: 256 experts, hidden 4096, expert
intermediate 1024, top-8, bf16 (6.4 GB of expert weights).

Measured, all in one run:

* Link and host: pinned host→GPU copy rate (1 GiB, best of 5), pageable host→GPU, and the CPU's
  rate on one cold expert (``swiglu`` of T=1 and T=16 tokens on torch's threads) — the inputs of
  ``engine.placement.expert_runtime.TransferModel``. The fetch threshold derived from the measured rates is printed
  next to the one derived from the defaults.
* Layer time per call (host clock, CUDA synchronised, median over calls that each draw a new random
  routing), for: ``all-gpu`` (stacked weights on the GPU, the Triton kernel: the ceiling),
  ``runtime all-gpu`` (every expert on the GPU through :class:`MoERuntime`, one fused Triton call per
  GPU: the runtime's own cost), ``runtime all-gpu, per-expert`` (the same, one expert at a time),
  and ``offload`` (a random ``--gpu-fraction`` of the experts on the GPU, the rest in pinned host
  memory; cold ones computed by the CPU or fetched per the threshold; hot-expert cache of
  ``--cache`` experts).
* ``vs all-gpu`` = all-gpu time / configuration time (1.0 = no cost for offloading).
* Quantised experts all on the GPU (``--quant fp8,int4``): the stacked bank quantised
  (engine.placement.quant) and run by the fused Triton kernel, which dequantises the tiles in registers.
* ``cpu_expert_pinned_bytes_per_s``: the CPU's T=1 rate on the same experts in pinned memory (the runtime pins
  its host-resident experts on CUDA machines; ``RuntimeOptions(pin_host_experts=False)`` is the other side, timed
  as its own configuration).
* ``offload …, calibrated``: the runtime with ``RuntimeOptions(calibrate=True)`` (link, hop and CPU
  rates measured at start-up) and its CPU worker thread; ``predicted ms`` is the roofline of that
  layer from the calibrated rates (cold experts per token x expert bytes / measured CPU expert rate, or
  the copy of the experts the threshold fetches, plus the GPU's share at the all-gpu time and two
  hops), ``measured / predicted`` the check of the transfer model (goal: within 20 %).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kernels.moe import swiglu  # noqa: E402
from engine.models.thinker.layers import ExpertBank  # noqa: E402
from engine.placement.expert_runtime import CPU, DeviceMap, ExpertPlacement, MoERuntime, RuntimeOptions, TransferModel  # noqa: E402
from engine.placement.quant import quantize_bank_, set_bank_storage  # noqa: E402

GIB = 1024**3


class _Cfg:
    def __init__(self, experts: int, hidden: int, inter: int):
        self.num_experts, self.hidden_size, self.moe_intermediate_size = experts, hidden, inter


class _OneLayer(nn.Module):
    """The attributes MoERuntime reads: model.layers[i].is_moe and .mlp.experts."""

    def __init__(self, bank: ExpertBank):
        super().__init__()
        layer = nn.Module()
        layer.is_moe = True
        layer.mlp = nn.Module()
        layer.mlp.experts = bank
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])


def bank_of(cfg: _Cfg, weights) -> ExpertBank:
    """A bf16 ExpertBank holding `weights` (gate, up, down) as its storage, with no fp32 staging (the module's own
    init would allocate 12.8 GB of fp32 on the CPU first)."""
    with torch.device("meta"):
        bank = ExpertBank(cfg)
    set_bank_storage(bank, *weights, None)
    return bank


def copy_rates() -> dict:
    n = GIB // 2
    dst = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    out = {}
    for name, src in (("pinned", torch.empty(n, dtype=torch.bfloat16).pin_memory()),
                      ("pageable", torch.empty(n, dtype=torch.bfloat16))):
        src.fill_(1.0)
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[f"h2d_{name}_bytes_per_s"] = GIB / best
    return out


def cpu_expert_rates(hidden: int, inter: int) -> dict:
    g = torch.Generator().manual_seed(1)
    experts = [tuple(torch.randn(s, generator=g).to(torch.bfloat16) * 0.02
                     for s in ((inter, hidden), (inter, hidden), (hidden, inter))) for _ in range(16)]
    nbytes = 3 * hidden * inter * 2
    out = {}

    def median_time(x, weights) -> float:
        swiglu(x, *weights[0])
        times = []
        for w in weights:  # a different expert each call: weights come from memory, not cache
            t0 = time.perf_counter()
            swiglu(x, *w)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    for T in (1, 16):
        x = torch.randn(T, hidden).to(torch.bfloat16)
        t = median_time(x, experts)
        out[f"cpu_expert_T{T}_ms"] = t * 1e3
        if T == 1:
            out["cpu_expert_bytes_per_s"] = nbytes / t
        else:
            out["cpu_expert_flops"] = 6 * T * hidden * inter / t
    # the same experts in pinned memory, as the expert runtime holds its host-resident ones on CUDA machines
    pinned = [tuple(t.pin_memory() for t in w) for w in experts]
    out["cpu_expert_pinned_bytes_per_s"] = nbytes / median_time(torch.randn(1, hidden).to(torch.bfloat16), pinned)
    return out


def time_layer(fn, hidden: int, experts: int, top_k: int, tokens: int, calls: int, device) -> float:
    g = torch.Generator().manual_seed(tokens)
    times = []
    for i in range(calls + 2):
        ids = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :top_k].contiguous().to(device)
        w = torch.rand(tokens, top_k, generator=g).float().to(device)
        x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x, ids, w)
        torch.cuda.synchronize()
        if i >= 2:  # two warm-up calls
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def predicted_ms(t: TransferModel, all_gpu_ms: float, tokens: int, k: int, experts: int, on_gpu: int,
                 expert_bytes: int, threshold: int, hidden: int, inter: int) -> float:
    """Layer time from the calibrated transfer model: the GPU's share of the all-gpu time, then the
    cold experts (uniform routing: each gets tokens*k/experts tokens) computed on the CPU (weights read
    once, 6*H*I flops per token), or copied when the threshold says so, plus the two activation hops."""
    cold = experts - on_gpu
    per_expert_tokens = tokens * k / experts
    active_cold = cold * (1 - (1 - 1 / experts) ** (tokens * k))  # expected cold experts hit
    if per_expert_tokens > threshold >= 0:
        cold_s = active_cold * expert_bytes / (t.pcie_gbs * 1e9)
    else:
        cold_s = active_cold * (expert_bytes / (t.host_gbs * 1e9)
                                + 6 * hidden * inter * per_expert_tokens / (t.cpu_gflops * 1e9))
    hops = 2 * t.hop_latency_us * 1e-6
    return all_gpu_ms * on_gpu / experts + (cold_s + hops) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", default="1,16,128")
    ap.add_argument("--gpu-fraction", type=float, default=0.5, help="share of experts resident on the GPU")
    ap.add_argument("--cache", type=int, default=16, help="hot-expert cache capacity (experts)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--quant", default="fp8,int4", help="quantised formats to time all on the GPU ('' for none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("offload_gpu: no CUDA GPU here", file=sys.stderr)
        return 2
    E, H, I, k = args.experts, args.hidden, args.inter, args.top_k
    result: dict = {"device": torch.cuda.get_device_name(), "cpu_threads": torch.get_num_threads(),
                    **copy_rates(), **cpu_expert_rates(H, I)}
    # Measured rates are achieved rates already: efficiency 1.
    measured = TransferModel(pcie_gbs=result["h2d_pinned_bytes_per_s"] / 1e9,
                             host_gbs=result["cpu_expert_bytes_per_s"] / 1e9,
                             cpu_gflops=result["cpu_expert_flops"] / 1e9, efficiency=1.0)
    expert_bytes = 3 * H * I * 2
    result["fetch_threshold_default"] = TransferModel().fetch_threshold(expert_bytes, H, I, 2)
    result["fetch_threshold_measured"] = measured.fetch_threshold(expert_bytes, H, I, 2)
    print(json.dumps(result), file=sys.stderr, flush=True)

    torch.manual_seed(0)
    cfg = _Cfg(E, H, I)
    # The weights are drawn and quantised on the GPU, then copied to the host for the runtimes: 6.4 GB drawn
    # and quantised by the CPU took longer than the rest of the benchmark on a 16-core host.
    plain = [torch.empty(shape, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
             for shape in ((E, I, H), (E, I, H), (E, H, I))]
    gpu_bank = bank_of(cfg, plain)
    host = [w.cpu() for w in plain]  # what the runtimes load (a copy each: attaching takes the bank's tensors)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    with torch.inference_mode():
        base = {T: time_layer(gpu_bank, H, E, k, T, args.calls, "cuda") for T in tokens}
    for T in tokens:
        rows.append({"config": "all-gpu (Triton)", "tokens": T, "ms": base[T], "vs_all_gpu": 1.0})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for kind in [q for q in args.quant.split(",") if q]:
        qbank = bank_of(cfg, plain)  # (quantising installs new tensors: `plain` stays as it is)
        quantize_bank_(qbank, kind)
        with torch.inference_mode():
            for T in tokens:
                ms = time_layer(qbank, H, E, k, T, args.calls, "cuda")
                rows.append({"config": f"all-gpu {kind} (Triton, dequant in kernel)", "tokens": T, "ms": ms,
                             "vs_all_gpu": base[T] / ms})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del qbank
        torch.cuda.empty_cache()
    del gpu_bank, plain
    torch.cuda.empty_cache()

    g = torch.Generator().manual_seed(7)
    on_gpu = set(torch.randperm(E, generator=g)[: round(args.gpu_fraction * E)].tolist())
    configs = [("runtime all-gpu", ExpertPlacement({0: (0,) * E}, {0: 0}), RuntimeOptions(device_map=DeviceMap.cuda(1))),
               ("runtime all-gpu, per-expert", ExpertPlacement({0: (0,) * E}, {0: 0}),
                RuntimeOptions(device_map=DeviceMap.cuda(1), fused_gpu_experts="off")),
               (f"offload {args.gpu_fraction:.0%} gpu, cache {args.cache}",
                ExpertPlacement({0: tuple(0 if e in on_gpu else CPU for e in range(E))}, {0: 0}),
                RuntimeOptions(device_map=DeviceMap.cuda(1), cache_capacity=args.cache)),
               (f"offload {args.gpu_fraction:.0%} gpu, calibrated, no cache",
                ExpertPlacement({0: tuple(0 if e in on_gpu else CPU for e in range(E))}, {0: 0}),
                RuntimeOptions(device_map=DeviceMap.cuda(1), calibrate=True)),
               (f"offload {args.gpu_fraction:.0%} gpu, calibrated, no cache, host experts pageable",
                ExpertPlacement({0: tuple(0 if e in on_gpu else CPU for e in range(E))}, {0: 0}),
                RuntimeOptions(device_map=DeviceMap.cuda(1), calibrate=True, pin_host_experts=False)),
               (f"offload {args.gpu_fraction:.0%} gpu, calibrated, no cache, CPU on the calling thread",
                ExpertPlacement({0: tuple(0 if e in on_gpu else CPU for e in range(E))}, {0: 0}),
                RuntimeOptions(device_map=DeviceMap.cuda(1), calibrate=True, cpu_workers=0))]
    for name, placement, options in configs:
        llm = _OneLayer(bank_of(cfg, [w.clone() for w in host]))
        rt = MoERuntime.attach(llm, placement, options)
        layer = llm.model.layers[0].mlp.experts
        with torch.inference_mode():
            for T in tokens:
                rt.reset_stats()
                ms = time_layer(layer, H, E, k, T, args.calls, "cuda")
                st = rt.stats
                rows.append({"config": name, "tokens": T, "ms": ms, "vs_all_gpu": base[T] / ms,
                             "sites": dict(st.tokens), "cache_hits": st.cache_hits, "fetches": st.fetches})
                if options.calibrate:
                    rows[-1]["transfer"] = vars(rt.transfer)
                    rows[-1]["predicted_ms"] = predicted_ms(rt.transfer, base[T], T, k, E, len(on_gpu),
                                                            expert_bytes, rt.threshold(rt.layers[0], 2), H, I)
                    rows[-1]["measured_vs_predicted"] = ms / rows[-1]["predicted_ms"]
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del llm, rt, layer
        torch.cuda.empty_cache()
    result["rows"] = rows
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['device']}, {result['cpu_threads']} CPU threads")
    print(f"host->GPU pinned {result['h2d_pinned_bytes_per_s'] / 1e9:.1f} GB/s, pageable "
          f"{result['h2d_pageable_bytes_per_s'] / 1e9:.1f} GB/s; CPU expert T=1 {result['cpu_expert_T1_ms']:.2f} ms "
          f"({result['cpu_expert_bytes_per_s'] / 1e9:.1f} GB/s), T=16 {result['cpu_expert_T16_ms']:.2f} ms "
          f"({result['cpu_expert_flops'] / 1e9:.0f} GFLOP/s); T=1 from pinned memory "
          f"{result['cpu_expert_pinned_bytes_per_s'] / 1e9:.1f} GB/s")
    print(f"fetch threshold (tokens): defaults {result['fetch_threshold_default']}, "
          f"measured rates {result['fetch_threshold_measured']}")
    print(f"{'configuration':34s} {'T':>5} {'ms/layer':>9} {'vs all-gpu':>10}  sites")
    for r in rows:
        pred = f"  predicted {r['predicted_ms']:.3f} ms, measured/predicted {r['measured_vs_predicted']:.2f}" \
            if "predicted_ms" in r else ""
        print(f"{r['config']:34s} {r['tokens']:>5} {r['ms']:>9.3f} {r['vs_all_gpu']:>10.2f}  {r.get('sites', '')}{pred}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
