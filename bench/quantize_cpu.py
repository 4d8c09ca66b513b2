"""The load's weight quantisation on this CPU: the torch definitions against the native quantisers.

    python bench/quantize_cpu.py [--threads 2] [--rows 16384] [--cols 4096] [--repeats 3] [--json]

Why: a load without a GPU quantises the real model's routed experts to int4 (about 100 G weights) and its
other linears to int8 (2.35 G) as it reads them, so the quantisers' rate is a large part of its time.

For int8 (one scale per row) and int4 (one scale per 128 columns), from fp32 and from bf16 weights (a
[--rows, --cols] matrix of seeded random values, 256 MB in fp32 at the defaults: out of the caches, as a load
sees them): the best of --repeats timed calls (after one warm-up) of the torch definition
(`quantize_int8_rows(w, reference=True)`, `quantize_int4_rows(w, reference=True)`) and of the native
quantiser (`engine.kernels.native.quantize_rows`, what the load calls where the kernels are built), in M
weights/s, their ratio, and whether the two gave the same values (they should: both divide as the definition
does).
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
from engine.kernels.dequant import quantize_int8_rows  # noqa: E402
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
                "speedup": t_ref / t_native,
                "same_values": bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))})
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
    print(f"{'format':7s} {'from':5s} {'torch M/s':>10s} {'native M/s':>11s} {'native/torch':>13s}  same values")
    for r in out["results"]:
        print(f"{r['format']:7s} {r['weights']:5s} {r['torch_m_per_s']:10.0f} {r['native_m_per_s']:11.0f} "
              f"{r['speedup']:13.2f}  {'yes' if r['same_values'] else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
