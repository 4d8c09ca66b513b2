"""The ViT's CPU attention over one big picture, in query blocks of several score caps: the time of the whole
attention and the longest stretch between two cancel checks (a check runs before each block).

    python bench/vit_attention_cpu.py [--patches 15625] [--caps-mib 256,64,16,4] [--threads 2] [--repeats 2]

Shapes: Ming-flash-omni 2.0's ViT (16 heads of 72, bf16) over `--patches` tokens of one picture (15,625 is a
2000x2000 picture: 125x125 patches of 16), and the tiny demo ViT (2 heads of 16, fp32). The cap is
`engine.models.thinker.vision.MAX_SCORE_BYTES`: the most bytes of [heads, queries, keys] scores one call holds.
Printed per cap: the median time of `--repeats` runs, its ratio to the first cap's, the number of calls and the
longest gap between checks (the most a cancel waits inside the attention).
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=15625)
    ap.add_argument("--caps-mib", default="256,64,16,4", help="score caps to compare, MiB, the first is the base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    caps = [int(c) for c in args.caps_mib.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name, (heads, head_dim, dtype) in SHAPES.items():
        q, k, v = (torch.randn(args.patches, heads, head_dim).to(dtype) for _ in range(3))
        print(f"{name}, {args.patches} patches, {args.threads} threads")
        base = None
        for cap in caps:
            vision.MAX_SCORE_BYTES = cap * 1024 * 1024
            runs = [run_once(q, k, v) for _ in range(args.repeats)]
            secs = statistics.median(r[0] for r in runs)
            base = base or secs
            print(f"  cap {cap:4d} MiB: {secs:6.2f} s (x{secs / base:.2f} of {caps[0]} MiB), {runs[0][1]:4d} calls, "
                  f"longest gap between checks {max(r[2] for r in runs):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
