"""Memory of a long live session: the server-side turn detector and rolling video context fed a
simulated 10-minute hands-free session, faster than real time.

    python bench/live_memory.py [--minutes 10] [--fps 30] [--json]

Scenario "talk": a browser's microphone (48 kHz, 20 ms pieces) saying our espeak-ng question every
~8 s with silence between, and a camera flooding 640x480 frames at --fps (thinned to 1 fps by the
context); every turn that ends takes the video window as the model would (preprocessing included).
Scenario "never stops": continuous speech for the whole time (the turn limit, 300 s, ends turns).
Printed per minute: turns, what the detector and the context hold, and the process RSS. Flat
figures are the point; the VAD cost per second of audio is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.media.audio import load_audio, resample  # noqa: E402
from engine.server.turns import ServerVad, SpeechStopped, TurnDetector  # noqa: E402
from engine.server.video_context import VideoContext, VideoContextConfig  # noqa: E402

MIC_RATE, PIECE = 48000, 960  # 20 ms


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def mic_audio(continuous: bool, seconds: float) -> np.ndarray:
    """One period of the microphone signal at 48 kHz (int16), repeated by the caller."""
    q = load_audio(ROOT / "app/assets/speech/what_do_you_see_en.wav").numpy()
    if continuous:
        zh = load_audio(ROOT / "app/assets/speech/what_is_this_zh.wav").numpy()
        period = np.concatenate([q, zh])
    else:
        period = np.concatenate([np.zeros(16000 * 3, np.float32), q, np.zeros(int(16000 * 3.4), np.float32)])
    x = resample(torch.from_numpy(period), 16000, MIC_RATE).numpy()
    rng = np.random.default_rng(0)
    x = x + 0.002 * rng.standard_normal(len(x)).astype(np.float32)  # a room's hiss
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def run(scenario: str, minutes: float, fps: float) -> dict:
    period = mic_audio(scenario == "never stops", minutes)
    detector = TurnDetector(ServerVad(silence_duration_ms=500))
    clock = [0.0]
    context = VideoContext(VideoContextConfig(window_seconds=8.0, fps=1.0), clock=lambda: clock[0])
    frame = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    total_pieces = int(minutes * 60 * MIC_RATE / PIECE)
    next_frame, turns, turn_seconds, vad_s, video_s, rows = 0.0, 0, 0.0, 0.0, 0.0, []
    peak = {"detector_kb": 0.0, "video_frames": 0, "video_mb": 0.0}
    offered = 0
    for i in range(total_pieces):
        t = i * PIECE / MIC_RATE
        clock[0] = t
        start = (i * PIECE) % len(period)
        piece = period[start:start + PIECE]
        if len(piece) < PIECE:
            piece = np.concatenate([piece, period[: PIECE - len(piece)]])
        t0 = time.perf_counter()
        events = detector.feed(piece, MIC_RATE)
        vad_s += time.perf_counter() - t0
        while next_frame <= t:  # the camera's flood
            offered += 1
            if context.wants(next_frame):
                context.add(frame, next_frame)
            next_frame += 1.0 / fps
        for ev in events:
            if isinstance(ev, SpeechStopped):
                turns += 1
                turn_seconds += ev.seconds
                t0 = time.perf_counter()
                context.take_turn_video()
                video_s += time.perf_counter() - t0
        peak["detector_kb"] = max(peak["detector_kb"], detector.held_bytes / 1024)
        peak["video_frames"] = max(peak["video_frames"], len(context))
        peak["video_mb"] = max(peak["video_mb"], context.nbytes / 2 ** 20)
        if (i + 1) % int(60 * MIC_RATE / PIECE) == 0:
            rows.append({"minute": round((i + 1) * PIECE / MIC_RATE / 60), "turns": turns,
                         "detector_kb": round(detector.held_bytes / 1024, 1), "video_frames": len(context),
                         "video_mb": round(context.nbytes / 2 ** 20, 2), "rss_mb": round(rss_mb(), 1)})
    audio_s = total_pieces * PIECE / MIC_RATE
    return {"scenario": scenario, "minutes": minutes, "camera_fps": fps, "frames_offered": offered,
            "frames_kept": context.clip.received - context.clip.thinned, "turns": turns,
            "mean_turn_s": round(turn_seconds / max(turns, 1), 2), "peak": {k: round(v, 2) for k, v in peak.items()},
            "vad_ms_per_audio_s": round(1000 * vad_s / audio_s, 2), "video_ms_per_turn": round(
                1000 * video_s / max(turns, 1), 1), "rows": rows,
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=30.0, help="camera frames offered per second")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = [run("talk", args.minutes, args.fps), run("never stops", args.minutes, args.fps)]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for r in results:
        print(f"\n## {r['scenario']}: {r['minutes']:g} min, camera {r['camera_fps']:g} fps offered "
              f"({r['frames_offered']} frames, {r['frames_kept']} kept), {r['turns']} turns of {r['mean_turn_s']} s")
        print(f"VAD {r['vad_ms_per_audio_s']} ms per second of audio; video window taken in "
              f"{r['video_ms_per_turn']} ms per turn; peaks: {r['peak']}")
        print("| minute | turns | detector holds (KB) | video frames | video (MB) | RSS (MB) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in r["rows"]:
            print(f"| {row['minute']} | {row['turns']} | {row['detector_kb']} | {row['video_frames']} | "
                  f"{row['video_mb']} | {row['rss_mb']} |")


if __name__ == "__main__":
    main()
