"""The load's weight quantisation on this CPU: the torch definitions against the native quantisers.

    python bench/quantize_cpu.py [--threads 2] [--rows 16384] [--cols 4096] [--repeats 3] [--json]

Why: a load without a GPU quantises the real model's routed experts to int4 (about 100 G weights) and its
other linears to int8 (2.35 G) as it reads them, so the quantisers' rate is a large part of its time.

For int8 (one scale per row) and int4 (one scale per 128 columns), from fp32 and from bf16 weights (a
[--rows, --cols] matrix of seeded random values, 256 MB in fp32 at the defaults: out of the caches, as a load
sees them): the best of --repeats timed calls (after one warm-up) of the torch definition
(`quantize_int8_rows(w, reference=True)`, `quantize_int4_rows(w, reference=True)`) and of the native
quantiser (`engine.kernels.native.quantize_rows`, what the load calls where the kernels are built), in M
weights/s, their ratio, and how far apart their results are: the largest difference of a quantised value (in
steps), the share of values that differ and the largest relative difference of a scale (all 0 where both
divide as the definition does, which the native loops do).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.kernels import native  # noqa: E402
from engine.kernels.dequant import quantize_int8_rows, unpack_int4  # noqa: E402
from engine.placement.quant import int4_group_size, quantize_int4_rows  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _best_seconds(fn, repeats: int) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def _difference(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], int4: bool) -> dict:
    values, values_ref = (unpack_int4(got[0]), unpack_int4(want[0])) if int4 else (got[0], want[0])
    steps = (values.int() - values_ref.int()).abs()
    scale_rel = ((got[1] - want[1]).abs() / want[1].abs()).max()
    return {"max_step_diff": int(steps.max()), "values_differing": float((steps > 0).float().mean()),
            "scale_max_rel_diff": float(scale_rel)}


def run(rows: int, cols: int, repeats: int) -> dict:
    if not native.available():
        raise SystemExit(f"the native quantisers are not built here: {native.status()}")
    group = int4_group_size(cols)
    out = {"rows": rows, "cols": cols, "int4_group": group, "threads": torch.get_num_threads(), "results": []}
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=gen) * 0.02
    for dtype_name, dtype in DTYPES.items():
        w = base.to(dtype)
        for fmt, reference, fast in (("int8", lambda: quantize_int8_rows(w, reference=True), lambda: native.quantize_rows(w)),
                                     ("int4", lambda: quantize_int4_rows(w, reference=True),
                                      lambda: native.quantize_rows(w, group))):
            t_ref, want = _best_seconds(reference, repeats)
            t_native, got = _best_seconds(fast, repeats)
            out["results"].append({
                "format": fmt, "weights": dtype_name,
                "torch_m_per_s": w.numel() / t_ref / 1e6, "native_m_per_s": w.numel() / t_native / 1e6,
                "speedup": t_ref / t_native, **_difference(got, want, int4=fmt == "int4")})
        del w
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run(args.rows, args.cols, args.repeats)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"quantising a [{out['rows']}, {out['cols']}] weight, {out['threads']} threads, int4 groups of "
          f"{out['int4_group']} ({native.status()})")
    print(f"{'format':7s} {'from':5s} {'torch M/s':>10s} {'native M/s':>11s} {'native/torch':>13s}  "
          f"max value diff (steps)  values differing  max scale rel diff")
    for r in out["results"]:
        print(f"{r['format']:7s} {r['weights']:5s} {r['torch_m_per_s']:10.0f} {r['native_m_per_s']:11.0f} "
              f"{r['speedup']:13.2f}  {r['max_step_diff']:22d}  {r['values_differing']:16.2e}  "
              f"{r['scale_max_rel_diff']:18.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
