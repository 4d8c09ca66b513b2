"""Time to first audio and real-time factor of the tiny demo talker on this machine.

    python bench/tts_tiny.py [--model DIR] [--runs 3] [--json]

Tasks: TTS (one sentence), cloning (a 2 s reference clip with its transcript; the clip's CAM++ vector
and latents are computed inside the timed call), music (Genre/Mood/Instrument/Theme, 10 s asked),
sound, and speak-while-thinking twice: with the tiny thinker's own (random) reply, and with a scripted
thinker that streams a fixed English reply at 30 words/s (its first segment closes after 11 words,
~0.37 s: spec §7.9 closes English text at . ! ? only), timed from the call (the end of the user's
message) to the first audio chunk. One warm-up per task, then medians over the runs.
RTF = synthesis time / audio duration; the ratio column is TTFA relative to TTS's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cli import run  # noqa: E402
from engine.events import Done, TextDelta  # noqa: E402
from engine.runtime import Engine  # noqa: E402

SCRIPTED_REPLY = ("Sure, here is a short answer about the Ming dynasty. It ruled China from 1368 to 1644. "
                  "It is remembered for its navy, its porcelain and the Forbidden City in Beijing.")
SCRIPTED_TOKENS_PER_S = 30.0


def scripted_thinker():
    for word in SCRIPTED_REPLY.split(" "):
        time.sleep(1 / SCRIPTED_TOKENS_PER_S)
        yield TextDelta(word + " ")
    yield Done(text=SCRIPTED_REPLY, finish_reason="stop")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the tiny random demo model)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    engine = Engine.load(args.model)
    rate = 22050
    t = np.arange(2 * rate) / rate
    clip = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    tasks = {
        "tts": lambda s: engine.speak("Hello world, this is Ming speaking to you today.", seed=s),
        "clone": lambda s: engine.speak("我们一起去公园散步吧。", ref_audio=clip, ref_text="感谢你的认可。",
                                        sample_rate=rate, seed=s),
        "music": lambda s: engine.speak(task="music", music=dict(genre="jazz", mood="calm", instrument="piano",
                                                                 theme="night", duration=10), seed=s),
        "sound": lambda s: engine.speak("Thunder and a gentle rain", task="sound", seed=s),
        "speak_while_thinking_tiny_chat": lambda s: engine.speak_while_thinking(
            engine.chat([{"role": "user", "content": "Tell me about the Ming dynasty."}]), seed=s),
        "speak_while_thinking_scripted_30tps": lambda s: engine.speak_while_thinking(scripted_thinker(), seed=s),
    }
    rows = {}
    for name, call in tasks.items():
        list(call(0))  # warm-up
        ttfa, rtf, audio = [], [], []
        for run in range(args.runs):
            done = list(call(run + 1))[-1]
            assert isinstance(done, Done), done
            ttfa.append(done.stats.time_to_first_audio_s)
            rtf.append(done.stats.audio_real_time_factor)
            audio.append(done.stats.audio_seconds)
        rows[name] = {"ttfa_ms": 1000 * statistics.median(ttfa), "rtf": statistics.median(rtf),
                      "audio_s": statistics.median(audio)}
    base = rows["tts"]["ttfa_ms"]
    for r in rows.values():
        r["ttfa_vs_tts"] = r["ttfa_ms"] / base
    info = engine.info()
    out = {"model": info.name, "device": info.device, "dtype": info.dtype, "runs": args.runs,
           "sample_rate": engine.talker.sample_rate, "tasks": rows}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"model {out['model']} on {out['device']} ({out['dtype']}), {out['sample_rate']} Hz, median of {args.runs}")
    print(f"{'task':38s} {'TTFA ms':>9s} {'RTF':>7s} {'audio s':>8s} {'TTFA/tts':>9s}")
    for name, r in rows.items():
        print(f"{name:38s} {r['ttfa_ms']:9.1f} {r['rtf']:7.3f} {r['audio_s']:8.2f} {r['ttfa_vs_tts']:9.2f}")
    print("(speak_while_thinking RTF counts the thinker's time too)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
