"""GPU benchmark of the fused-MoE Triton kernel at the real Ming-flash shape, against HBM bandwidth.

    python bench/moe_layer_gpu.py [--tokens 1,8,64,512,4096] [--quant bf16,fp8,int4] [--tune] [--json]

Needs a CUDA GPU (prints why and exits 2 without one). Shape defaults: 256 experts, hidden 4096,
expert intermediate 1024, top-8, bf16 weights (one MoE layer = 6.4 GB).

Method
------
* Ceilings, measured in the same run: HBM bandwidth = a 4 GiB device-to-device copy (bytes read plus
  bytes written, best of 10 after warm-up); bf16 matrix rate = an 8192^3 ``torch.matmul``.
* For each token count T, eight routings are drawn (each token picks top_k distinct experts uniformly
  at random) and the timed call cycles through them, so consecutive calls read different experts and
  the 50 MB L2 cannot hold the weights between calls. Times are ``triton.testing.do_bench`` medians
  (which also flushes L2 before each call). ``triton_ms`` replays one CUDA graph per routing (the
  kernels' own time, what a graph-captured decode step pays); ``triton_eager_ms`` is the plain Python
  call, launch and routing-alignment overhead included.
* Bytes per call = weight bytes of the experts that received at least one token (each once) plus
  activations in and out; ``roofline_fraction`` = (bytes / time) / measured HBM bandwidth. FLOPs per
  call = 6·T·k·H·I; ``mma_fraction`` = achieved FLOP/s / measured matmul rate (what matters when T is
  large enough for the layer to be compute-bound).
* ``vs_torch`` = eager time of the torch reference path on the same GPU (one GEMM block per active
  expert, the engine's CPU algorithm) / eager Triton time.
* ``--quant``: the same layer with its experts quantised (engine.placement.quant: fp8 per channel, int8,
  int4 with group scales), dequantised inside the kernel; its bytes are the quantised weights and their
  scales, so ``roofline_fraction`` says how close each storage comes to its own (smaller) floor.
* ``--tune`` sweeps tile sizes / warps / stages for every T (and storage) and prints the best
  configuration next to the default one (timed as graph replays).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROUTINGS = 8


def _copy_rate() -> float:
    import triton.testing as tt

    src = torch.empty(4 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = tt.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="min")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _matmul_rate() -> float:
    import triton.testing as tt

    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = tt.do_bench(lambda: m @ m, warmup=50, rep=300, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


def measure_ceilings() -> dict:
    out = {"hbm_bytes_per_s": _copy_rate(), "bf16_matmul_flops": _matmul_rate()}
    torch.cuda.empty_cache()
    return out


def quantised(weights: tuple[torch.Tensor, ...], kind: str) -> tuple[tuple[torch.Tensor, ...], tuple | None]:
    """The stacked bf16 (gate, up, down) weights in storage `kind` (bf16: as they are) -> (weights, scales)."""
    if kind == "bf16":
        return weights, None
    from types import SimpleNamespace

    from engine.models.thinker.layers import ExpertBank
    from engine.placement import quant

    E, I, H = weights[0].shape
    with torch.device("meta"):
        bank = ExpertBank(SimpleNamespace(num_experts=E, hidden_size=H, moe_intermediate_size=I))
    quant.set_bank_storage(bank, *weights, None)  # the plain tensors themselves: quantising replaces, not mutates
    quant.quantize_bank_(bank, kind)  # on the GPU, expert by expert
    return (bank.gate_proj, bank.up_proj, bank.down_proj), quant.bank_scales(bank)


def routings(tokens: int, experts: int, top_k: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(ROUTINGS):
        ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k].contiguous()
        w = torch.rand(tokens, top_k, generator=gen)
        out.append((ids.cuda(), (w / w.sum(1, keepdim=True)).float().cuda()))
    return out


def cycling(fn, x, weights, routes):
    state = {"i": 0}

    def call():
        ids, w = routes[state["i"] % len(routes)]
        state["i"] += 1
        return fn(x, *weights, ids, w)

    return call


def tuning_grid(assignments: int):
    """(block_m, block_n, block_k, num_warps, num_stages) candidates for a number of (token, slot) pairs."""
    if assignments < 64:  # decode: one row per expert; parallelism has to come from the N tiles
        return itertools.product((16,), (16, 32, 64), (64, 128, 256), (2, 4), (3, 4, 5))
    if assignments < 8192:
        return itertools.product((16, 32, 64), (64, 128), (64, 128), (4, 8), (3, 4))
    return itertools.product((64, 128), (64, 128, 256), (32, 64), (4, 8), (3, 4))


def graph_replays(fn, x, weights, routes):
    """One CUDA graph per routing (captured after a warm-up call); the returned call replays them in
    turn. Replays have no Python or launch overhead: what is left is the kernels' own time."""
    graphs = []
    for ids, w in routes:
        fn(x, *weights, ids, w)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(x, *weights, ids, w)
        graphs.append(g)
    state = {"i": 0}

    def call():
        graphs[state["i"] % len(graphs)].replay()
        state["i"] += 1

    return call


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", default="1,8,64,512,4096")
    ap.add_argument("--quant", default="bf16", help="expert storages to time: bf16, fp8, int8, int4 (comma-separated)")
    ap.add_argument("--tune", action="store_true", help="sweep launch configurations")
    ap.add_argument("--tune-tokens", default="1,64,512,4096", help="token counts the sweep runs at")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch reference timings")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_layer_gpu: no CUDA GPU here (this benchmark times the Triton kernel on a GPU)", file=sys.stderr)
        return 2
    import triton.testing as tt

    from engine.kernels.moe import moe_experts_reference
    from engine.kernels.triton_impl.moe import moe_experts_triton

    tune_tokens = {int(t) for t in args.tune_tokens.split(",")}
    E, H, I, k = args.experts, args.hidden, args.inter, args.top_k
    ceil = measure_ceilings()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    plain = tuple(torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.02
                  for shape in ((E, I, H), (E, I, H), (E, H, I)))
    rows = []
    for kind in args.quant.split(","):
        weights, scales = quantised(plain, kind)
        # bytes of one expert: its weights in their storage and their scales
        expert_bytes = sum(w[0].numel() * w.element_size() for w in weights)
        expert_bytes += sum(s[0].numel() * s.element_size() for s in scales) if scales else 0
        kernel = functools.partial(moe_experts_triton, scales=scales)
        for T in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(T, H, dtype=torch.bfloat16, device="cuda")
            routes = routings(T, E, k, gen)
            active = sum(len(torch.unique(ids)) for ids, _ in routes) / len(routes)
            nbytes = active * expert_bytes + 2 * T * H * 2
            flops = 6 * T * k * H * I
            eager_ms = tt.do_bench(cycling(kernel, x, weights, routes), warmup=25, rep=200,
                                   return_mode="median")
            ms = tt.do_bench(graph_replays(kernel, x, weights, routes), warmup=25, rep=200,
                             return_mode="median")
            row = {"storage": kind, "tokens": T, "active_experts": active, "triton_ms": ms, "triton_eager_ms": eager_ms,
                   "bytes_per_s": nbytes / (ms * 1e-3), "flops_per_s": flops / (ms * 1e-3)}
            row["roofline_fraction"] = row["bytes_per_s"] / ceil["hbm_bytes_per_s"]
            row["mma_fraction"] = row["flops_per_s"] / ceil["bf16_matmul_flops"]
            if not args.no_torch and kind == "bf16":
                ms_ref = tt.do_bench(cycling(moe_experts_reference, x, weights, routes), warmup=25, rep=200,
                                     return_mode="median")
                row["torch_ms"], row["vs_torch"] = ms_ref, ms_ref / eager_ms
            if args.tune and T in tune_tokens:
                best = None
                for bm, bn, bk, warps, stages in tuning_grid(T * k):
                    fn = lambda x_, g, u, d, i_, w_, c=(bm, bn, bk, warps, stages): moe_experts_triton(  # noqa: E731
                        x_, g, u, d, i_, w_, block_m=c[0], block_n=c[1], block_k=c[2], num_warps=c[3], num_stages=c[4],
                        scales=scales)
                    try:
                        t = tt.do_bench(graph_replays(fn, x, weights, routes), warmup=10, rep=60, return_mode="median")
                    except Exception as e:  # out of shared memory etc.
                        torch.cuda.synchronize()
                        print(f"  skip {bm, bn, bk, warps, stages}: {type(e).__name__}", file=sys.stderr)
                        continue
                    if best is None or t < best[0]:
                        best = (t, {"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": warps, "num_stages": stages})
                if best is not None:
                    row["tuned_ms"], row["tuned_config"] = best
                    row["tuned_roofline_fraction"] = nbytes / (best[0] * 1e-3) / ceil["hbm_bytes_per_s"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"device": torch.cuda.get_device_name(), "shape": {"experts": E, "hidden": H, "inter": I, "top_k": k},
              **ceil, "rows": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['device']}: HBM {ceil['hbm_bytes_per_s'] / 1e12:.2f} TB/s (copy), "
          f"bf16 matmul {ceil['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    head = f"{'store':>5} {'T':>6} {'experts':>7} {'eager ms':>8} {'triton ms':>9} {'TB/s':>6} {'roofline':>8} {'TFLOP/s':>8} {'mma':>5} {'vs torch':>8}"
    print(head + ("  tuned ms  tuned roofline  config" if args.tune else ""))
    for r in rows:
        line = (f"{r['storage']:>5} {r['tokens']:>6} {r['active_experts']:>7.1f} {r['triton_eager_ms']:>8.3f} {r['triton_ms']:>9.3f} {r['bytes_per_s'] / 1e12:>6.2f} "
                f"{r['roofline_fraction']:>8.2f} {r['flops_per_s'] / 1e12:>8.1f} {r['mma_fraction']:>5.2f} "
                f"{r.get('vs_torch', float('nan')):>8.2f}")
        if "tuned_ms" in r:
            line += f"  {r['tuned_ms']:>8.3f}  {r['tuned_roofline_fraction']:>14.2f}  {r['tuned_config']}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
