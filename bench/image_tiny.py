"""Seconds per denoising step and per image of the embedded tiny model's image generator, at 256² and
512² (text-to-image, CFG on, 30 steps), plus time to first preview and cancel latency.

    python bench/image_tiny.py [--model DIR] [--steps 30] [--runs 3] [--json]

The demo checkpoint diffuses at its own 256-base bucket table; the bench adds the 512 table so an
explicit 512x512 request diffuses at 512² (the same code path a real checkpoint takes). One warm-up
image per size; medians over the runs. Ratios printed: 512² vs 256² seconds per step (4x the image
tokens), and the whole image vs its steps (what the prompt pass, condition and VAE cost on top).
Cancel latency: another thread sets the cancel event mid-step; time from then to the final Done event.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cli import run  # noqa: E402
from engine.events import Done, Progress  # noqa: E402
from engine.runtime import Engine  # noqa: E402

PROMPT = 'A lighthouse on a cliff at dusk, a sign saying "OPEN"'


def run_once(engine: Engine, size: str, steps: int, seed: int) -> Done:
    done = list(engine.imagine(PROMPT, size=size, steps=steps, seed=seed, preview_every=5))[-1]
    assert isinstance(done, Done), done
    return done


def cancel_latency(engine: Engine, size: str, steps: int, delay_s: float) -> float:
    """Another thread sets the cancel event `delay_s` after denoising starts (mid-step, as a UI's Stop
    button would); returns the time from then to the final Done event."""
    cancel = threading.Event()
    t_set: list[float] = []

    def press() -> None:
        t_set.append(time.perf_counter())
        cancel.set()

    timer = None
    for ev in engine.imagine(PROMPT, size=size, steps=steps, seed=1, cancel=cancel):
        if isinstance(ev, Progress) and ev.stage == "denoising" and ev.done == 0:
            timer = threading.Timer(delay_s, press)
            timer.start()
        if isinstance(ev, Done):
            timer.join()
            assert ev.finish_reason == "cancelled", ev
            return time.perf_counter() - t_set[0]
    raise RuntimeError("the request did not end with Done")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the tiny random demo model)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    engine = Engine.load(args.model)
    gen = engine.image_generator
    if gen is None:
        print("this checkpoint has no image generator", file=sys.stderr)
        return 1
    gen.bucket_bases = tuple(sorted(set(gen.bucket_bases) | {256, 512}))
    out: dict = {"model": engine.info().name, "device": str(gen.compute), "dtype": str(gen.dtype).replace("torch.", ""),
                 "threads": __import__("torch").get_num_threads(), "steps": args.steps}
    for side in (256, 512):
        size = f"{side}x{side}"
        run_once(engine, size, args.steps, 0)  # warm-up (and the preview map fit)
        runs = [run_once(engine, size, args.steps, seed) for seed in range(1, args.runs + 1)]
        assert runs[0].result["diffusion_width"] == side, runs[0].result
        out[f"s_per_step_{side}"] = statistics.median(r.stats.image_step_s for r in runs)
        out[f"s_per_image_{side}"] = statistics.median(r.stats.total_s for r in runs)
        out[f"first_preview_s_{side}"] = statistics.median(r.stats.time_to_first_preview_s for r in runs)
    out["step_ratio_512_vs_256"] = out["s_per_step_512"] / out["s_per_step_256"]
    out["image_vs_steps_ratio_256"] = out["s_per_image_256"] / (args.steps * out["s_per_step_256"])
    # pressed 5.5 steps into denoising: the request ends at the next step boundary (< one step)
    out["cancel_latency_ms_512"] = 1000 * cancel_latency(engine, "512x512", args.steps, 5.5 * out["s_per_step_512"])
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
