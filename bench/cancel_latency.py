"""Engine-side cancel latency for a long prompt: how long the engine stays busy after a cancel.

    python bench/cancel_latency.py [--model DIR] [--prompt-tokens 16000] [--cancel-after 0.2] [--runs 3] [--json]

A prompt of ``--prompt-tokens`` ordinary text tokens (random ids, fixed seed) is sent through
``Engine.generate_ids``; another thread sets the cancel event ``--cancel-after`` seconds after the
request starts (the prompt is still being prefilled then). Reported: the time from the cancel to the
end of the event stream (``cancel_latency_s``, median over the runs) and, for scale, the time the
same prompt takes to its first token without a cancel (``prefill_s``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cli import run  # noqa: E402
from engine.events import Done, Error  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from engine.sampling import GenerationParams  # noqa: E402


def prompt_ids(engine: Engine, n: int) -> list[int]:
    """n ids drawn from the vocabulary below the first special token (plain text tokens)."""
    cfg = engine.model.config.llm
    special = min([*cfg.eos_token_ids, cfg.image_patch_token, cfg.image_start_token])
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, special, (n,), generator=gen).tolist()


def cancelled_run(engine: Engine, ids: list[int], after_s: float) -> dict:
    cancel = threading.Event()
    set_at: list[float] = []

    def fire():
        set_at.append(time.perf_counter())
        cancel.set()

    timer = threading.Timer(after_s, fire)
    t0 = time.perf_counter()
    timer.start()
    events = list(engine.generate_ids(ids, GenerationParams(max_new_tokens=16), cancel))
    t_end = time.perf_counter()
    timer.cancel()
    last = events[-1]
    if not set_at:
        raise RuntimeError(f"the request ended after {t_end - t0:.3f} s, before the cancel at {after_s} s")
    finish = last.finish_reason if isinstance(last, Done) else f"error: {last.message}"
    return {"cancel_latency_s": t_end - set_at[0], "total_s": t_end - t0, "finish_reason": finish,
            "new_tokens": last.stats.new_tokens if isinstance(last, Done) else 0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the tiny random demo model)")
    ap.add_argument("--prompt-tokens", type=int, default=16000)
    ap.add_argument("--cancel-after", type=float, default=0.2, help="seconds after the request starts")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    engine = Engine.load(args.model)
    ids = prompt_ids(engine, args.prompt_tokens)
    list(engine.generate_ids(ids[:256], GenerationParams(max_new_tokens=2)))  # warm-up
    t0 = time.perf_counter()
    done = list(engine.generate_ids(ids, GenerationParams(max_new_tokens=1)))[-1]
    if isinstance(done, Error):
        print(f"error: {done.message}", file=sys.stderr)
        return 1
    prefill_s = time.perf_counter() - t0
    runs = [cancelled_run(engine, ids, args.cancel_after) for _ in range(args.runs)]
    out = {"model": engine.info().name, "device": engine.info().device, "prompt_tokens": len(ids),
           "prefill_s": prefill_s, "cancel_after_s": args.cancel_after,
           "cancel_latency_s_median": statistics.median(r["cancel_latency_s"] for r in runs),
           "cancel_latency_s_max": max(r["cancel_latency_s"] for r in runs),
           "finish_reasons": sorted({r["finish_reason"] for r in runs}), "runs": runs}
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            if k != "runs":
                print(f"{k:26s} {v:.3f}" if isinstance(v, float) else f"{k:26s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
