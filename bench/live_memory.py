"""Memory of a long live session: a simulated 10-minute hands-free session, faster than real time,
through the real realtime server around the tiny engine, and through the turn detector and rolling
video context alone.

    python bench/live_memory.py [--minutes 10] [--fps 30] [--keep-turns N] [--components] [--json]

Scenario "server" (the default): a client streams the microphone (48 kHz, 20 ms pieces: our
espeak-ng question every 8 s with silence between) and a camera flood (640x480 JPEGs at --fps,
capture_time on the audio clock) into `/v1/realtime` of a real server (engine.server, in this
process, around the tiny engine) with server_vad and an 8 s, 1 fps video window. Every turn the
server detects is committed (video + audio) and answered (8 tokens); 1.9 s after each question
the client waits for that turn's answer before it streams on (the simulated clock stands still
meanwhile, so answers are never cut by the next question). Printed per simulated
minute: turns, conversation items, what the session holds (conversation media, the rolling video
context, the turn detector) and the process RSS. --keep-turns overrides how many turns keep their
video (the server's default: VideoContextConfig.keep_turns); a large value shows the growth the
dropping prevents. --keep-items N makes the client delete all but its newest N items after each
answer (conversation.item.delete), which keeps the prompt (and the engine's working memory) short.

With --components, the detector and the context alone (no server, no engine):
scenario "talk": a browser's microphone (48 kHz, 20 ms pieces) saying our espeak-ng question every
~8 s with silence between, and a camera flooding 640x480 frames at --fps (thinned to 1 fps by the
context); every turn that ends takes the video window as the model would (preprocessing included).
Scenario "never stops": continuous speech for the whole time (the turn limit, 300 s, ends turns).
Printed per minute: turns, what the detector and the context hold, and the process RSS. Flat
figures are the point; the VAD cost per second of audio is printed too.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import resource
import sys
import threading
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
QUESTION_AT_S = 3  # the question starts this far into each period of the microphone's signal


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
        lead, tail = np.zeros(16000 * QUESTION_AT_S, np.float32), np.zeros(int(16000 * 3.4), np.float32)
        period = np.concatenate([lead, q, tail])
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


# --------------------------------------------------------------------------- the real server


def camera_jpeg() -> bytes:
    """A 640x480 webcam frame: our cup picture, as a browser's canvas.toBlob would send it."""
    from PIL import Image

    img = Image.open(ROOT / "app/assets/images/cup.png").convert("RGB").resize((640, 480))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70)
    return buf.getvalue()


class Listener(threading.Thread):
    """Reads the session's events; counts what the scenario waits for."""

    def __init__(self, ws):
        super().__init__(daemon=True)
        self.ws = ws
        self.counts: dict[str, int] = {}
        self.errors: list[dict] = []
        self.items: list[str] = []  # conversation item ids, oldest first
        self.prompt_tokens = 0  # of the latest answer
        self.cond = threading.Condition()

    def run(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for text in self.ws:
                ev = json.loads(text)
                with self.cond:
                    self.counts[ev["type"]] = self.counts.get(ev["type"], 0) + 1
                    if ev["type"] == "error":
                        self.errors.append(ev["error"])
                    elif ev["type"] == "conversation.item.added" and ev["item"]["id"] not in self.items:
                        self.items.append(ev["item"]["id"])
                    elif ev["type"] == "response.done":
                        self.prompt_tokens = (ev["response"].get("usage") or {}).get("input_tokens", 0)
                    self.cond.notify_all()
        except ConnectionClosed:
            pass

    def wait(self, kind: str, n: int, timeout: float = 120.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.counts.get(kind, 0) >= n, timeout):
                raise RuntimeError(f"no {kind} #{n} in {timeout} s; errors: {self.errors[-3:]}")


def run_server(minutes: float, fps: float, keep_turns: int | None, keep_items: int | None) -> dict:
    from websockets.sync.client import connect

    from engine.runtime import Engine
    from engine.server import Limits, ServerHandle, create_app
    from engine.server.sessions import Session

    if keep_turns is not None:  # a bench-only override of the server's setting
        drop = Session.drop_old_turn_video
        Session.drop_old_turn_video = lambda self, keep: drop(self, keep_turns)
    engine = Engine.load(None, dtype="fp32", device="cpu")
    rss_loaded = rss_mb()
    period = mic_audio(False, minutes)
    pause_at = int((QUESTION_AT_S + 3.5) * MIC_RATE)  # in each period: the turn has ended by then
    frame = base64.b64encode(camera_jpeg()).decode()
    total_pieces = int(minutes * 60 * MIC_RATE / PIECE)
    per_minute = int(60 * MIC_RATE / PIECE)
    rows, next_frame, turns, deleted, t_start = [], 0.0, 0, 0, time.perf_counter()
    with ServerHandle(create_app(engine, Limits())) as srv, connect(srv.ws_url, max_size=None) as ws:
        listener = Listener(ws)
        listener.start()
        ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "max_output_tokens": 8,
            "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}},
            "video": {"window_seconds": 8, "fps": 1}}}))
        listener.wait("session.updated", 1)
        session = next(iter(srv.ctx.sessions.open.values()))
        for i in range(total_pieces):
            t = i * PIECE / MIC_RATE
            start = (i * PIECE) % len(period)
            piece = period[start:start + PIECE]
            if len(piece) < PIECE:
                piece = np.concatenate([piece, period[: PIECE - len(piece)]])
            ws.send(json.dumps({"type": "input_audio_buffer.append", "sample_rate": MIC_RATE,
                                "audio": base64.b64encode(piece.tobytes()).decode()}))
            while next_frame <= t:  # the camera's flood
                ws.send(json.dumps({"type": "input_video_buffer.append", "image": frame,
                                    "capture_time": round(next_frame, 4)}))
                next_frame += 1.0 / fps
            if start <= pause_at < start + PIECE:  # the user waits for the answer (the clock stands still)
                turns += 1
                listener.wait("input_audio_buffer.speech_stopped", turns)
                listener.wait("response.done", turns)
                old = listener.items[:-keep_items] if keep_items else []
                for item_id in old:  # a client that keeps its conversation short
                    ws.send(json.dumps({"type": "conversation.item.delete", "item_id": item_id}))
                    listener.items.remove(item_id)
                deleted += len(old)
                listener.wait("conversation.item.deleted", deleted)
            if (i + 1) % per_minute == 0:
                video = session.video
                rows.append({"minute": round((i + 1) / per_minute), "turns": turns, "items": len(session.items),
                             "prompt_tokens": listener.prompt_tokens,
                             "conversation_mb": round(sum(it.nbytes for it in session.items) / 2 ** 20, 2),
                             "turns_with_video": sum(it.turn_video for it in session.items),
                             "video_context_mb": round(video.nbytes / 2 ** 20, 2), "video_frames": len(video),
                             "detector_kb": round(session.detector.held_bytes / 1024, 1),
                             "session_mb": round(session.held_bytes / 2 ** 20, 2), "rss_mb": round(rss_mb(), 1),
                             "wall_s": round(time.perf_counter() - t_start, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        done = {k: listener.counts.get(k, 0) for k in ("response.done", "error")}
        received, thinned = session.video.clip.received, session.video.clip.thinned
    return {"scenario": "server", "minutes": minutes, "camera_fps": fps, "keep_turns": keep_turns,
            "keep_items": keep_items, "turns": turns,
            "responses": done["response.done"], "errors": done["error"], "error_samples": listener.errors[:3],
            "frames_decoded": received - thinned, "rss_after_load_mb": round(rss_loaded, 1), "rows": rows,
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def print_server(r: dict) -> None:
    print(f"\n## real server + tiny engine: {r['minutes']:g} min, camera {r['camera_fps']:g} fps of 640x480 JPEGs, "
          f"{r['turns']} turns, {r['responses']} answers, {r['errors']} errors, {r['frames_decoded']} frames decoded; "
          f"keep_turns {r['keep_turns'] or 'default'}, keep_items {r['keep_items'] or 'all'}; RSS after loading "
          f"{r['rss_after_load_mb']} MB, peak {r['max_rss_mb']} MB")
    print("| minute | turns | items | prompt tokens | turns with video | conversation (MB) | video context (MB) | "
          "detector (KB) | session (MB) | RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in r["rows"]:
        print(f"| {row['minute']} | {row['turns']} | {row['items']} | {row['prompt_tokens']} | "
              f"{row['turns_with_video']} | "
              f"{row['conversation_mb']} | {row['video_context_mb']} | {row['detector_kb']} | {row['session_mb']} | "
              f"{row['rss_mb']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=30.0, help="camera frames offered per second")
    ap.add_argument("--keep-turns", type=int, default=None, help="turns that keep their video (server scenario)")
    ap.add_argument("--keep-items", type=int, default=None,
                    help="the client deletes all but its newest N conversation items after each answer")
    ap.add_argument("--components", action="store_true", help="the detector and video context alone")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.components:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        result = run_server(args.minutes, args.fps, args.keep_turns, args.keep_items)
        print(json.dumps(result, indent=1) if args.json else "", end="")
        if not args.json:
            print_server(result)
        return
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
