"""The ViT's CPU attention over one big picture, in query blocks of several score caps: the time of the whole
attention and the longest stretch between two cancel checks (a check runs before each block).

    python bench/vit_attention_cpu.py [--patches 15625] [--caps-mib 256,64,16,4] [--threads 2] [--repeats 2] [--json]

Shapes: Ming-flash-omni 2.0's ViT (16 heads of 72, bf16) over `--patches` tokens of one picture (15,625 is a
2000x2000 picture: 125x125 patches of 16), and the tiny demo ViT (2 heads of 16, fp32). The cap is
`engine.models.thinker.vision.MAX_SCORE_BYTES`: the most bytes of [heads, queries, keys] scores one call holds.
Printed per cap: the median time of `--repeats` runs, its ratio to the first cap's, the number of calls and the
longest gap between checks (the most a cancel waits inside the attention). `--json` prints the same as one JSON
object.
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

from engine.models.thinker import vision  # noqa: E402

SHAPES = {"2.0 ViT (16x72, bf16)": (16, 72, torch.bfloat16), "tiny ViT (2x16, fp32)": (2, 16, torch.float32)}


def run_once(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[float, int, float]:
    """(seconds, calls, longest gap between checks) of one chunked attention over the whole picture."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    vision.chunked_attention(q, k, v, [0, q.shape[0]], lambda: stamps.append(time.perf_counter()))
    t1 = time.perf_counter()
    edges = [t0] + stamps + [t1]
    return t1 - t0, len(stamps), max(b - a for a, b in zip(edges, edges[1:]))


def measure(args: argparse.Namespace) -> dict:
    """{"bench", "patches", "threads", "shapes": [{"shape", "caps": [{"cap_mib", "seconds", "ratio", "calls",
    "longest_gap_s"}]}]}: each shape's attention timed at each score cap, the ratio to the first cap's time."""
    caps = [int(c) for c in args.caps_mib.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes, engine_cap = [], vision.MAX_SCORE_BYTES
    try:
        for name, (heads, head_dim, dtype) in SHAPES.items():
            q, k, v = (torch.randn(args.patches, heads, head_dim).to(dtype) for _ in range(3))
            rows, base = [], None
            for cap in caps:
                vision.MAX_SCORE_BYTES = cap * 1024 * 1024
                runs = [run_once(q, k, v) for _ in range(args.repeats)]
                secs = statistics.median(r[0] for r in runs)
                base = base or secs
                rows.append({"cap_mib": cap, "seconds": secs, "ratio": secs / base, "calls": runs[0][1],
                             "longest_gap_s": max(r[2] for r in runs)})
            shapes.append({"shape": name, "caps": rows})
    finally:
        vision.MAX_SCORE_BYTES = engine_cap
    return {"bench": "vit_attention_cpu", "patches": args.patches, "threads": args.threads, "shapes": shapes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=15625)
    ap.add_argument("--caps-mib", default="256,64,16,4", help="score caps to compare, MiB, the first is the base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    out = measure(args)
    if args.json:
        print(json.dumps(out))
        return 0
    for shape in out["shapes"]:
        print(f"{shape['shape']}, {out['patches']} patches, {out['threads']} threads")
        first = shape["caps"][0]["cap_mib"]
        for row in shape["caps"]:
            print(f"  cap {row['cap_mib']:4d} MiB: {row['seconds']:6.2f} s (x{row['ratio']:.2f} of {first} MiB), "
                  f"{row['calls']:4d} calls, longest gap between checks {row['longest_gap_s']:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
