"""Time to first token with media on the embedded tiny model, side by side with text only:
one 640x480 image, a 10-frame webcam clip (640x480, 2 fps) and 10 s of audio.

    python bench/multimodal_ttft.py [--model DIR] [--runs 3] [--json]

Time to first token counts from the request (preprocessing, encoders, prefill). Medians after a
warm-up run of each input; `ratio_vs_text` = ttft / text-only ttft.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cli import run  # noqa: E402
from engine.events import Done  # noqa: E402
from engine.media.video import WebcamClip  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from engine.sampling import GenerationParams  # noqa: E402


def inputs() -> dict[str, list]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    clip = WebcamClip()
    for i in range(10):
        clip.add_frame(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8), capture_time=i * 0.5)
    t = np.arange(16000 * 10) / 16000
    audio = (0.3 * np.sin(2 * np.pi * (200 + 50 * t) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    q = {"type": "text", "text": "What is this?"}
    return {"text only": [q],
            "one image 640x480": [{"type": "image", "image": image}, q],
            "webcam clip 10 frames": [{"type": "video", "video": clip}, q],
            "audio 10 s": [{"type": "audio", "audio": audio, "sample_rate": 16000}, q]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    engine = Engine.load(args.model)
    params = GenerationParams(max_new_tokens=1)
    rows = {}
    for name, content in inputs().items():
        msgs = [{"role": "user", "content": content}]
        list(engine.chat(msgs, params))  # warm-up
        runs = []
        for _ in range(args.runs):
            done = list(engine.chat(msgs, params))[-1]
            assert isinstance(done, Done), done
            runs.append(done.stats)
        rows[name] = {"prompt_tokens": runs[0].prompt_tokens,
                      "ttft_ms": 1000 * statistics.median(s.time_to_first_token_s for s in runs),
                      "media_encode_ms": 1000 * statistics.median(s.media_encode_s for s in runs)}
    base = rows["text only"]["ttft_ms"]
    for r in rows.values():
        r["ratio_vs_text"] = r["ttft_ms"] / base
    if args.json:
        print(json.dumps({"model": engine.info().name, "device": engine.info().device, "rows": rows}))
    else:
        print(f"{'input':24s} {'prompt tokens':>14s} {'ttft ms':>9s} {'encode ms':>10s} {'ratio vs text':>14s}")
        for name, r in rows.items():
            print(f"{name:24s} {r['prompt_tokens']:14d} {r['ttft_ms']:9.1f} {r['media_encode_ms']:10.1f} "
                  f"{r['ratio_vs_text']:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
