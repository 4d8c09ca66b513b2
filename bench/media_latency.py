"""Time to first audio and first image preview through client -> server -> engine vs in-process, on the
tiny model (or --model).

    python bench/media_latency.py [--model DIR] [--runs 5] [--json]

Measured by the caller, medians of runs interleaved across paths:
1. speech        "Hello world ..." (seeded): time to the first AudioChunk and the real-time factor
                 (synthesis time / audio seconds), engine.speak in-process vs EngineClient.speak
                 (POST /v1/audio/speech, SSE).
2. spoken chat   speak while thinking: from the end of the user's message (the request leaving the
                 caller) to the first TextDelta and the first AudioChunk, engine.chat(modalities=
                 ("text", "audio")) in-process vs EngineClient.chat over the realtime session and over
                 /v1/chat/completions. The tiny model's random text has no punctuation, so its first
                 segment closes only when the text ends: its first audio follows the last token. The
                 "scripted" row feeds a thinker that writes sentences (one word per 20 ms, like a fast
                 LLM) through the same talker, in-process, to show the overlap itself; its "seg->audio"
                 is the time from the word that closes the first segment (an English one closes at
                 . ! ? once it holds 12 words and marks) to the first audio chunk.
3. image         a 256x256 picture, 8 steps, a preview every step: time to the first ImagePreview and
                 seconds per step, engine.imagine in-process vs EngineClient.imagine
                 (POST /v1/images/generations, SSE).

The server runs in its own process (python -m engine.server) so client and server do not share an
interpreter lock; the in-process engine is loaded in this one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.cli import run  # noqa: E402
from bench.server_latency import free_port, start_server  # noqa: E402
from engine.client import EngineClient  # noqa: E402
from engine.events import AudioChunk, Done, Error, ImagePreview, TextDelta  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from engine.sampling import GenerationParams  # noqa: E402

SPEECH = "Hello world, this is Ming speaking to you from the studio today."
CHAT = [{"role": "user", "content": "Tell me about the Ming dynasty in a few sentences."}]
SCRIPT = ("The Ming dynasty was one of the great ages of China, and it ruled for almost three hundred years. "
          "Its porcelain is famous all over the world.").split(" ")  # the first segment closes at "years."
CLOSING_WORD = next(i for i, w in enumerate(SCRIPT) if w.endswith("."))
closed_at: list[float] = []  # when the scripted thinker wrote the word that closes its first segment


def firsts(events) -> dict:
    """Seconds from now to the first text / audio / preview of `events`, and the final figures."""
    closed_at.clear()
    t0 = time.perf_counter()
    out = {"text": None, "audio": None, "preview": None}
    final = None
    for ev in events:
        now = time.perf_counter() - t0
        if isinstance(ev, TextDelta) and out["text"] is None:
            out["text"] = now
        elif isinstance(ev, AudioChunk) and out["audio"] is None:
            out["audio"] = now
        elif isinstance(ev, ImagePreview) and out["preview"] is None:
            out["preview"] = now
        elif isinstance(ev, Error):
            raise RuntimeError(f"{ev.code}: {ev.message}")
        elif isinstance(ev, Done):
            final = ev
    out["total"] = time.perf_counter() - t0
    out["seg_audio"] = out["audio"] - (closed_at[0] - t0) if closed_at and out["audio"] is not None else None
    s = final.stats
    out["rtf"] = out["total"] / s.audio_seconds if s.audio_seconds else None
    out["step_s"] = s.image_step_s or None
    return out


def scripted_thinker():
    for i, word in enumerate(SCRIPT):
        time.sleep(0.02)
        if i == CLOSING_WORD:
            closed_at.append(time.perf_counter())
        yield TextDelta(word + " ")
    yield Done(" ".join(SCRIPT), "stop")


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--chat-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model)
    port = free_port()
    server = start_server(args.model, port, args.threads)
    paths: dict[str, list[dict]] = {}
    try:
        with EngineClient(f"http://127.0.0.1:{port}") as client:
            runs = {
                "speech in-process": lambda i: engine.speak(SPEECH, seed=i),
                "speech /v1/audio/speech": lambda i: client.speak(SPEECH, seed=i),
                "spoken chat in-process": lambda i: engine.chat(CHAT, GenerationParams(max_new_tokens=args.chat_tokens),
                                                                modalities=("text", "audio")),
                "spoken chat realtime": lambda i: client.chat(CHAT, max_tokens=args.chat_tokens,
                                                              modalities=("text", "audio")),
                "spoken chat /v1/chat/completions": lambda i: client.chat(CHAT, max_tokens=args.chat_tokens,
                                                                          modalities=("text", "audio"),
                                                                          transport="http"),
                "spoken chat scripted thinker": lambda i: engine.speak_while_thinking(scripted_thinker(), seed=i),
                "image in-process": lambda i: engine.imagine("a red teapot", size="256x256", steps=8,
                                                             preview_every=1, seed=i),
                "image /v1/images/generations": lambda i: client.imagine("a red teapot", size="256x256", steps=8,
                                                                         preview_every=1, seed=i),
            }
            for name, run in runs.items():  # warm-up
                firsts(run(0))
            for i in range(1, args.runs + 1):
                for name, run in runs.items():
                    paths.setdefault(name, []).append(firsts(run(i)))
    finally:
        server.terminate()
        server.wait(10)
    keys = ("text", "audio", "seg_audio", "preview", "total", "rtf", "step_s")
    table = {name: {k: median(rows, k) for k in keys}
             for name, rows in paths.items()}
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    ms = lambda v: "—" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
    num = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"{'path':34s} {'1st text':>9s} {'1st audio':>10s} {'seg->audio':>10s} {'1st preview':>12s} {'total':>9s} "
          f"{'RTF':>6s} {'s/step':>7s}   (medians of {args.runs}, {engine.info().name}, "
          f"{torch.get_num_threads()} thread)")
    for name, row in table.items():
        print(f"{name:34s} {ms(row['text']):>9s} {ms(row['audio']):>10s} {ms(row['seg_audio']):>10s} "
              f"{ms(row['preview']):>12s} {ms(row['total']):>9s} {num(row['rtf']):>6s} {num(row['step_s']):>7s}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
