"""What int8 activations cost the int4 and int8 CPU experts in accuracy, and what they gain in time, at the real MoE
shape.

    python bench/int8_activations.py [--weights int4,int8] [--hidden 4096] [--inter 1024] [--experts 16]
                                     [--top-k 8] [--tokens 3] [--outliers 4] [--prefill-rows 64] [--repeats 5]
                                     [--threads 2] [--json]

On CPUs with AVX2 the native kernels compute int4 and int8 weights against activations quantised to int8 per 32
columns (engine.kernels.native.quantized_activations;
`MING_CPU_ACTIVATIONS=float` keeps fp32 ones; `MING_NATIVE_ISA=avx2` runs the AVX2 build on a newer CPU). For
each weight format, random experts (normal weights, std 0.02) are quantised (int4: groups of 128; int8: per row)
and run on random tokens (normal activations with `--outliers` channels 20 times larger, as LLM hidden states
have), one token at a time through the native MoE call:

* error: |output - the unquantised experts' output (fp64)| / |that output| (L2 norms), for the format itself
  (the dequantised weights in fp64), the kernel with fp32 activations and with int8 ones; and the two kernels'
  outputs against each other;
* time: the same experts' decode call (one token) and a linear of `--prefill-rows` fp32 rows ([inter, hidden]
  weights: one expert's gate matrix in a prefill block), the two settings alternated, medians of `--repeats`. The
  experts are called over and over and may sit in a large last-level cache (16 int4 experts: ~100 MB): this times
  the kernels' arithmetic; `python bench/moe_layer_cpu.py --path int4,int4-float,int8,int8-float` times the
  layer from memory.
A format the kernels cannot meet with int8 activations here is left out and named (JSON: "not_taken"). Exit status
2 where there is nothing to compare (no native kernels, no AVX2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kernels import native  # noqa: E402
from engine.kernels.dequant import dequantize, quantize_int8_rows  # noqa: E402
from engine.kernels.moe import moe_experts_reference  # noqa: E402
from engine.placement.quant import quantize  # noqa: E402

OUTLIER_SCALE = 20.0
WEIGHT_STD = 0.02


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(fmt: str, args) -> dict:
    """Errors and times of `fmt` experts with fp32 and int8 activations (see the module's docstring)."""
    gen = torch.Generator().manual_seed(args.seed)
    e, h, i = args.experts, args.hidden, args.inter
    mats = [torch.randn(e, *shape, generator=gen) * WEIGHT_STD for shape in ((i, h), (i, h), (h, i))]
    if fmt == "int4":
        quantized = [[quantize(m[x], "int4") for x in range(e)] for m in mats]
        dequantized = [torch.stack([dequantize(q, s, torch.float64) for q, s in qs]) for qs in quantized]
    else:
        quantized = [[quantize_int8_rows(m[x]) for x in range(e)] for m in mats]
        dequantized = [torch.stack([q.double() * s.double()[:, None] for q, s in qs]) for qs in quantized]
    table = native.ExpertTable(*([q for q, _ in qs] for qs in quantized), tuple([s for _, s in qs] for qs in quantized))

    def run(mode: str, *call_args) -> torch.Tensor:
        native.set_quantized_activations(mode)
        return native.moe_decode(*call_args)

    rows = []
    for _ in range(args.tokens):
        x = torch.randn(1, h, generator=gen)
        x[0, torch.randperm(h, generator=gen)[:args.outliers]] *= OUTLIER_SCALE
        ids = torch.randperm(e, generator=gen)[:args.top_k].view(1, -1)
        weights = torch.softmax(torch.randn(1, args.top_k, generator=gen), -1)
        exact = moe_experts_reference(x.double(), *(m.double() for m in mats), ids, weights)
        fmt_out = moe_experts_reference(x.double(), *dequantized, ids, weights)
        got = {mode: run(mode, x, table, ids, weights) for mode in native.ACTIVATION_KINDS}
        rows.append({"format": rel(fmt_out, exact), "float": rel(got["float"], exact), "int8": rel(got["int8"], exact),
                     "int8_vs_float": rel(got["int8"], got["float"]), "auto": rel(got["auto"], exact),
                     "auto_vs_float": rel(got["auto"], got["float"])})
    x = torch.randn(1, h, generator=gen)
    ids, weights = torch.randperm(e, generator=gen)[:args.top_k].view(1, -1), torch.full((1, args.top_k), 1 / args.top_k)
    q, s = quantized[0][0]
    linear = native.bind_linear(q, min_bytes=0, scale=s, blocks=True)
    block = torch.randn(args.prefill_rows, h, generator=gen)
    times = {mode: {"decode": [], "prefill": []} for mode in native.ACTIVATION_KINDS}
    for _ in range(args.repeats):
        for mode in native.ACTIVATION_KINDS:
            native.set_quantized_activations(mode)
            times[mode]["decode"].append(timed(lambda: native.moe_decode(x, table, ids, weights), 3))
            times[mode]["prefill"].append(timed(lambda: linear(block), 3))
    ms = {mode: {k: 1e3 * statistics.median(v) for k, v in t.items()} for mode, t in times.items()}
    native.set_quantized_activations("auto")
    auto = native.activations_for(fmt)  # what the default gives this format: int8 (int4), int8x2 (int8)
    flops = 2 * args.prefill_rows * i * h
    return {"tokens": rows, "mean": {k: statistics.mean(r[k] for r in rows) for k in rows[0]}, "ms": ms,
            "prefill_gflops": {mode: flops / (v["prefill"] * 1e-3) / 1e9 for mode, v in ms.items()},
            "speedup": {k: ms["float"][k] / ms["int8"][k] for k in ("decode", "prefill")}, "auto": auto,
            "speedup_auto": {k: ms["float"][k] / ms["auto"][k] for k in ("decode", "prefill")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="int4,int8", help="comma-separated weight formats: int4, int8")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=3, help="tokens whose errors are measured")
    ap.add_argument("--outliers", type=int, default=4, help="channels of each token 20x larger")
    ap.add_argument("--prefill-rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.available():
        print(f"the native kernels are not available here: {native.status()}", file=sys.stderr)
        return 2
    before = native._activations_setting
    if native.set_quantized_activations("int8") != "int8":
        native.set_quantized_activations(before)
        print("the native kernels here have no int8 activations (they need AVX2): int4 and int8 weights meet fp32 "
              "activations only, nothing to compare", file=sys.stderr)
        return 2
    requested = [f for f in args.weights.split(",") if f]
    if not requested or any(f not in ("int4", "int8") for f in requested):
        ap.error(f"--weights takes int4 and / or int8; got {args.weights!r}")
    kinds = native.int8_kernel_kinds()
    formats = [f for f in requested if f in kinds]
    not_taken = {f: "the native kernels' int8 activations need AVX2 (or the kernels are not built)"
                 for f in requested if f not in kinds}
    for fmt, why in not_taken.items():
        print(f"{fmt}: left out, {why}", file=sys.stderr)
    if not formats:
        native.set_quantized_activations(before)
        return 2
    try:
        results = {fmt: measure(fmt, args) for fmt in formats}
    finally:
        native.set_quantized_activations(before)
    if args.json:
        print(json.dumps({"hidden": args.hidden, "inter": args.inter, "experts": args.experts, "top_k": args.top_k,
                          "outliers": args.outliers, "threads": torch.get_num_threads(), "formats": results,
                          "not_taken": not_taken, "kernels": native.status()}))
        return 0
    for fmt, out in results.items():
        ms = out["ms"]
        print(f"{fmt} experts (H={args.hidden}, I={args.inter}, top-{args.top_k} of {args.experts}"
              f"{', groups of 128' if fmt == 'int4' else ', row scales'}), {args.outliers} outlier channels "
              f"x{OUTLIER_SCALE:g}, {torch.get_num_threads()} threads")
        auto = f"auto ({out['auto']})"
        print(f"  error vs the unquantised experts (relative L2): token  {fmt} format  kernel fp32 act  kernel int8 act"
              f"  int8 vs fp32 act  {auto:>14}  auto vs fp32 act")
        for n, r in [*enumerate(out["tokens"]), ("mean", out["mean"])]:
            print(f"    {n:>5}  {r['format']:11.4f}  {r['float']:15.4f}  {r['int8']:15.4f}  "
                  f"{r['int8_vs_float']:16.4f}  {r['auto']:14.6f}  {r['auto_vs_float']:16.6f}")
        print(f"  time, fp32 act -> int8 act: decode (one token, {args.top_k} experts) {ms['float']['decode']:.3f} -> "
              f"{ms['int8']['decode']:.3f} ms ({out['speedup']['decode']:.2f}x); {args.prefill_rows}-row linear "
              f"[{args.inter}, {args.hidden}] {ms['float']['prefill']:.2f} -> {ms['int8']['prefill']:.2f} ms "
              f"({out['speedup']['prefill']:.2f}x, {out['prefill_gflops']['float']:.0f} -> "
              f"{out['prefill_gflops']['int8']:.0f} GFLOP/s)")
        if out["auto"] not in ("int8", "float"):
            up = out["speedup_auto"]
            print(f"  time, fp32 act -> {out['auto']} act (the default): decode {ms['float']['decode']:.3f} -> "
                  f"{ms['auto']['decode']:.3f} ms ({up['decode']:.2f}x); {args.prefill_rows}-row linear "
                  f"{ms['float']['prefill']:.2f} -> {ms['auto']['prefill']:.2f} ms ({up['prefill']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
