"""A stand-in for the engine's `/v1/realtime` in studio tests: a real websocket server on a free
loopback port (websockets' threaded server) that records what it receives and answers with canned
OpenAI Realtime GA events. It checks the token like the engine does (401 without it).

Hands-free (turn_detection set): once it has heard `turn_after_s` seconds of audio and seen a
frame, it plays a whole turn: speech_started, speech_stopped, committed, the user item, then a
response with text deltas (and, with `speak=True`, audio deltas). Push-to-talk: commit and
response.create are answered as the engine would.
"""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from websockets.sync.server import serve

REPLY = "I see a red cup on a wooden table."


@dataclass
class Received:
    events: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    audio_seconds: float = 0.0
    audio_rates: set = field(default_factory=set)
    frames: list[bytes] = field(default_factory=list)
    closed: int = 0  # connections that ended

    def types(self) -> list[str]:
        return [e.get("type") for e in self.events]


class FakeEngine:
    def __init__(self, token: str | None = "engine-secret", turn_after_s: float = 1.0, speak: bool = False):
        self.token = token
        self.turn_after_s = turn_after_s
        self.speak = speak
        self.barge_in_after: int | None = None  # words into a reply: the user "speaks" (speech_started)
        self.session_refusal: dict | None = None  # an OpenAI error object: session.update is refused with it
        self.hung = False  # session.update is never answered (an engine whose loop is stuck)
        self.idle_close = False  # after session.updated, the session is ended as the engine ends an idle one
        self.got = Received()
        self.lock = threading.Lock()
        self.server = serve(self._handle, "127.0.0.1", 0, process_request=self._check_token, max_size=2 ** 24)
        self.port = self.server.socket.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)

    def __enter__(self) -> "FakeEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_closed(self, n: int = 1, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.got.closed >= n:
                return True
            time.sleep(0.02)
        return False

    # ------------------------------------------------------------------ server side
    def _check_token(self, connection, request):
        with self.lock:
            self.got.headers.append(dict(request.headers.raw_items()))
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return connection.respond(401, "missing or wrong token\n")
        return None

    def _handle(self, ws) -> None:
        state = {"vad": False, "heard": 0.0, "turns": 0, "n": 0}
        send = lambda ev: ws.send(json.dumps(ev))  # noqa: E731
        try:
            send({"type": "session.created", "session": {"id": "sess_fake", "output_modalities": ["text"]}})
            for text in ws:
                ev = json.loads(text)
                with self.lock:
                    self.got.events.append(ev)
                kind = ev.get("type")
                if kind == "session.update" and self.hung:
                    continue
                if kind == "session.update" and self.session_refusal is not None:
                    send({"type": "error", "error": {**self.session_refusal, "event_id": ev.get("event_id")}})
                elif kind == "session.update":
                    td = ev.get("session", {}).get("audio", {}).get("input", {}).get("turn_detection")
                    state["vad"] = td is not None
                    send({"type": "session.updated", "session": {"id": "sess_fake", "turn_detection": td}})
                    if self.idle_close:  # (engine.server.realtime: the error, then a normal close)
                        send({"type": "error", "error": {"type": "invalid_request_error", "code": "session_idle_timeout",
                                                         "message": "Your session was closed after 600 seconds ..."}})
                        ws.close(code=1000)
                        return
                elif kind == "input_audio_buffer.append":
                    rate = ev.get("sample_rate", 24000)  # as the engine: OpenAI's default, PCM16 at 24 kHz
                    n = len(base64.b64decode(ev["audio"])) // 2
                    with self.lock:
                        self.got.audio_seconds += n / rate
                        self.got.audio_rates.add(rate)
                    state["heard"] += n / rate
                    if state["vad"] and state["heard"] >= self.turn_after_s and self.got.frames and not state["turns"]:
                        state["turns"] += 1
                        self._turn(send, state)
                elif kind == "input_video_buffer.append":
                    with self.lock:
                        self.got.frames.append(base64.b64decode(ev["image"]))
                elif kind == "input_audio_buffer.commit":
                    send({"type": "input_audio_buffer.committed", "item_id": "item_user1"})
                    send(self._user_item("item_user1"))
                elif kind == "conversation.item.create":  # a typed turn
                    state["typed"] = state.get("typed", 0) + 1
                    item = {**ev["item"], "id": f"item_typed{state['typed']}"}
                    send({"type": "conversation.item.added", "item": item})
                elif kind == "response.create":
                    self._respond(send, state)
                elif kind == "response.cancel":  # the canned reply has been sent whole already
                    send({"type": "error", "error": {"type": "invalid_request_error",
                          "code": "response_cancel_not_active", "message": "no active response"}})
                elif kind == "close_me":
                    ws.close(code=1011, reason="engine stopping")
                    return
        except Exception:  # the peer went away
            pass
        finally:
            with self.lock:
                self.got.closed += 1

    @staticmethod
    def _user_item(item_id: str) -> dict:
        return {"type": "conversation.item.added", "item": {"id": item_id, "type": "message", "role": "user",
                "content": [{"type": "input_video", "frames": 2, "seconds": 1.0},
                            {"type": "input_audio", "seconds": 1.6, "transcript": None}]}}

    def _turn(self, send, state) -> None:
        ms = int(1000 * state["heard"])
        send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "item_user1"})
        send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ms, "item_id": "item_user1"})
        send({"type": "input_audio_buffer.committed", "item_id": "item_user1"})
        send(self._user_item("item_user1"))
        self._respond(send, state)

    def _respond(self, send, state) -> None:
        state["n"] += 1
        rid, iid = f"resp_{state['n']}", f"item_reply{state['n']}"
        ids = {"response_id": rid, "item_id": iid, "output_index": 0}
        send({"type": "response.created", "response": {"id": rid, "status": "in_progress"}})
        send({"type": "response.output_item.added", "response_id": rid, "output_index": 0,
              "item": {"id": iid, "type": "message", "role": "assistant", "content": []}})
        send({"type": "conversation.item.added", "item": {"id": iid, "role": "assistant", "content": []}})
        kind = "audio" if self.speak else "text"
        send({"type": "response.content_part.added", **ids, "content_index": 0, "part": {"type": kind}})
        for i, word in enumerate(REPLY.split(" ")):  # 8 words, 0.12 s of sound each
            if i == self.barge_in_after:  # the server heard the user: the reply is cancelled, yet a few
                send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "item_user2"})
                time.sleep(0.3)  # stale pieces still come (the page must not play them)
            delta = word if i == 0 else " " + word
            if self.speak:
                send({"type": "response.output_audio_transcript.delta", **ids, "content_index": 0, "delta": delta})
                send({"type": "response.output_audio.delta", **ids, "content_index": 0, "sample_rate": 24000,
                      "delta": tone_base64(0.12, 24000, 220 + 40 * i)})
            else:
                send({"type": "response.output_text.delta", **ids, "content_index": 0, "delta": delta})
            time.sleep(0.03)
        if self.speak:
            send({"type": "response.output_audio.done", **ids, "content_index": 0})
            send({"type": "response.output_audio_transcript.done", **ids, "content_index": 0, "transcript": REPLY})
        else:
            send({"type": "response.output_text.done", **ids, "content_index": 0, "text": REPLY})
        status = "cancelled" if self.barge_in_after is not None else "completed"
        send({"type": "response.done", "response": {"id": rid, "status": status,
              "usage": {"input_tokens": 812, "output_tokens": 9},
              "metrics": {"time_to_first_token_ms": 120.0, "tokens_per_s": 20.0}}})


def tone_base64(seconds: float, rate: int, freq: float) -> str:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.2 * 32767 * np.sin(2 * math.pi * freq * t)).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode("ascii")
