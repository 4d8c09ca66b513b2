"""Helpers shared by the server tests: real servers on loopback (ephemeral ports) around the tiny
engine, and small media made on the fly."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import threading
import time
import wave
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from engine.events import Done, TextDelta
from engine.sampling import GenerationParams


@contextmanager
def torch_threads(n: int = 1):
    """Torch's intra-op threads for a while. On a 2-core machine the server's event loop and the
    test's clients share the cores with torch; with two OpenMP threads that spin at barriers, the
    tiny model's steps then take 10-50x longer. One thread keeps the tests fast and steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def running_server(engine, token: str | None = None, **limits):
    from engine.server import Limits, ServerHandle, create_app

    app = create_app(engine, Limits(**limits), token=token)
    with torch_threads(1), ServerHandle(app) as srv:
        yield srv


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def image_array(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tone_pcm16(seconds: float = 0.5, rate: int = 16000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)


def wav_bytes(pcm: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def opus_bytes(seconds: float, rate: int = 48000, bitrate: int = 8000) -> bytes:
    """A mono Ogg Opus file of a tone, `seconds` long (stated in its container), small: 8 kbit/s."""
    import av  # noqa: PLC0415

    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=rate, layout="mono")
        stream.bit_rate = bitrate
        second = tone_pcm16(1.0, rate)[None]
        for _ in range(int(seconds)):
            frame = av.AudioFrame.from_ndarray(second, format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def reference_chat(engine, messages, max_new_tokens: int, system_prompt=None, thinking=False, **sampling) -> Done:
    """The in-process result a server response must equal (greedy decoding is deterministic, and so is a
    seeded draw: `sampling` holds GenerationParams' temperature, top_p, seed ...)."""
    with torch_threads(1):
        events = list(engine.chat(messages, GenerationParams(max_new_tokens=max_new_tokens, **sampling),
                                  system_prompt=system_prompt, thinking=thinking))
    assert isinstance(events[-1], Done), events[-1]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == events[-1].text
    return events[-1]


_LONG: dict[int, tuple[str, str]] = {}
SYSTEM = "Be brief."


def long_prompt(engine, tokens: int = 48) -> str:
    """A user prompt whose greedy reply runs `tokens` tokens without stopping (the tiny model's
    weights are random, so some prompts end early): what cancellation tests need."""
    if id(engine) not in _LONG:
        for i in range(20):
            prompt = f"Count slowly from one to a thousand, attempt {i}."
            done = reference_chat(engine, [{"role": "user", "content": prompt}], tokens, system_prompt=SYSTEM)
            if done.finish_reason == "length":
                _LONG[id(engine)] = (prompt, done.text)
                break
        else:
            raise AssertionError("no prompt runs long on this model")
    return _LONG[id(engine)][0]


def recv_json(ws, timeout: float = 30.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def recv_item(ws, timeout: float = 30.0) -> dict:
    """A conversation item joining: conversation.item.added then .done (returned)."""
    added, done = recv_json(ws, timeout), recv_json(ws, timeout)
    assert (added["type"], done["type"]) == ("conversation.item.added", "conversation.item.done"), (added, done)
    assert added["item"] == done["item"] and added["previous_item_id"] == done["previous_item_id"]
    return done


def recv_until(ws, kind: str, timeout: float = 60.0) -> list[dict]:
    """Events up to and including the first of type `kind`; after response.done, the rate_limits.updated that
    follows it is read too (and checked), not returned."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        ev = recv_json(ws, max(0.1, deadline - time.monotonic()))
        out.append(ev)
        if ev["type"] == kind:
            if kind == "response.done":
                follows_response_done(recv_json(ws, max(0.1, deadline - time.monotonic())))
            return out
        assert time.monotonic() < deadline, f"no {kind} in time"


def follows_response_done(event: dict) -> None:
    """The event a realtime server sends right after each response.done: rate_limits.updated, OpenAI's shape."""
    assert event["type"] == "rate_limits.updated", event
    assert event["rate_limits"] and all(r["name"] in ("requests", "tokens") and 0 <= r["remaining"] <= r["limit"]
                                        for r in event["rate_limits"]), event


# --------------------------------------------------------------------------- an engine that yields every kind


def every_kind_script() -> list:
    """One response with every kind of engine event (what the talker and the image generator will
    yield), ending with Done. Nothing in the engine yields audio or images yet: the server's mapping
    is tested with this script."""
    from engine.events import AudioChunk, GenerationStats, ImageDone, ImagePreview, Progress

    tone = np.sin(np.linspace(0, 40, 480)) * 0.4
    preview, final = png_bytes(image_array(8, 8, seed=5)), png_bytes(image_array(16, 16, seed=6))
    return [Progress("prefill", 1, 1, "reading the prompt"),
            TextDelta("Hello "),
            AudioChunk.from_samples(tone, 24000, text="Hello", start_s=0.0),
            TextDelta("world"),
            AudioChunk.from_samples(tone[::-1], 24000, text="", start_s=0.02),
            ImagePreview(preview, step=2, total_steps=4, width=8, height=8),
            ImageDone(final, 16, 16, seed=3, mask=preview, overlay=None, note="the mask is a test"),
            Done("Hello world", "stop", GenerationStats(
                prompt_tokens=7, new_tokens=2, time_to_first_token_s=0.0123, decode_tokens_per_s=80.5, total_s=0.25,
                media_encode_s=0.001, time_to_first_audio_s=0.0456, audio_seconds=0.04, audio_real_time_factor=0.5,
                time_to_first_preview_s=0.0789, image_steps=4, image_step_s=0.05, images=1))]


class FakeVoices:
    """The saved voices of a FakeEngine's talker: `check_saved` as VoiceLibrary's (engine.models.talker.voices)
    refuses a name not among them, which the server asks where a voice is set (params.voice_name)."""

    def __init__(self, names=()):
        self.saved = list(names)

    def check_saved(self, name: str) -> None:
        from engine.models.talker.voices import VoiceNotFound

        if name not in self.saved:
            raise VoiceNotFound(f"unknown voice {name!r}; saved voices: {', '.join(self.saved) or 'none saved yet'}")


class FakeEngine:
    """An `Engine`-like object (what create_app takes) whose chat() yields a script of events; it
    records each call's arguments. `step_s`: a pause before each event (cancel is checked there).
    `voices`: the names its talker has saved (with `has_talker`)."""

    is_demo = True

    def __init__(self, script=None, has_talker: bool = False, step_s: float = 0.0, voices=()):
        self.script = script if script is not None else every_kind_script()
        self.has_talker = has_talker
        self.voices = FakeVoices(voices)
        self.step_s = step_s
        self.calls: list[dict] = []

    def info(self):
        from engine.runtime import EngineInfo

        return EngineInfo(name="fake-omni", path="/nowhere/fake-omni", is_demo=True, release="2.0", parameters=0,
                          dtype="float32", device="cpu", load_seconds=0.0, components=["llm"], placement="nowhere")

    def chat(self, messages, params=None, cancel=None, system_prompt=None, thinking=False, **output):
        self.calls.append({"messages": messages, "params": params, "system_prompt": system_prompt,
                           "thinking": thinking, **output})
        for ev in self.script:
            if self.step_s:
                time.sleep(self.step_s)
            if cancel is not None and cancel.is_set():
                yield Done("", "cancelled")
                return
            yield ev

    def transcribe(self, audio, context=None, hotwords=None, dialect=None, params=None, cancel=None,
                   sample_rate=None, task="transcribe"):
        yield TextDelta("fake transcript")
        yield Done("fake transcript", "stop", result={"language": dialect, "text": "fake transcript"})


@contextmanager
def fake_server(engine=None, **limits):
    from engine.server import Limits, ServerHandle, create_app

    app = create_app(engine if engine is not None else FakeEngine(), Limits(**limits))
    with ServerHandle(app) as srv:
        yield srv


def sse_events(resp) -> list:
    """An SSE answer's events: `data:` objects decoded, comment lines (": ...") as they are, [DONE] left out."""
    return [json.loads(line[6:]) if line.startswith("data: {") else line for line in resp.iter_lines()
            if line and line != "data: [DONE]"]


def leave_stream_at(server, http, path: str, body: dict, marker: str, label: str):
    """POST a streaming request, drop the connection at the first line holding `marker`, and return the
    scheduler's record of the job (`label`) once it has ended."""
    before = len(server.ctx.scheduler.history)
    with http.stream("POST", path, json=body) as r:
        for line in r.iter_lines():
            if marker in line:
                break
    return wait_for(lambda: next((h for h in list(server.ctx.scheduler.history)[before:] if h.label == label), None),
                    30)


# --------------------------------------------------------------------------- clients that misbehave on the wire


def raw_socket(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed client or a dropped network does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def truncated_upload(port: int, path: str, ctype: bytes, head: bytes) -> None:
    """A request that declares 100 000 bytes of body, sends `head` and hangs up."""
    s = raw_socket(port)
    s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype
              + b"\r\nContent-Length: 100000\r\n\r\n" + head)
    time.sleep(0.2)
    s.close()


def invalid_utf8_frame(port: int, payload: bytes = b'{"type": "\xff\xfe"}', path: str = "/v1/realtime") -> bytes:
    """Open a websocket by hand and send one text frame whose payload is not UTF-8; what the server sent back (its
    close frame: 0x88 ...)."""
    return raw_frame(port, payload, path)


def raw_frame(port: int, payload: bytes, path: str = "/v1/realtime", opcode: int = 0x1) -> bytes:
    """Open a websocket by hand and send one final frame of `opcode` (0x1 text, 0x8 close ...) holding `payload`;
    what the server sent back (its close frame: 0x88 ...)."""
    s = raw_socket(port)
    key = base64.b64encode(os.urandom(16))
    s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 101")
    s.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)  # final, mask of zeros
    got = b""
    deadline = time.monotonic() + 10
    while b"\x88" not in got and time.monotonic() < deadline:  # the close frame
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    s.close()
    return got


def reset_mid_stream(port: int) -> None:
    """A streamed chat whose connection is reset once the first chunk has come."""
    s = raw_socket(port)
    body = json.dumps({"messages": [{"role": "user", "content": "Count slowly to one hundred."}],
                       "max_tokens": 200, "stream": True}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"data: {" not in got:
        got += s.recv(4096)
    reset(s)


def handshake_answer(port: int, path: str, extra_header: str = "") -> bytes:
    """The first bytes the server answers a websocket opening handshake with (b"" if it answers nothing in 10 s)."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra_header}Upgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        try:
            return sock.recv(200)
        except TimeoutError:
            return b""


def draw_until_cancelled(monkeypatch, scheduler, token: int, started: threading.Event, wait_s: float = 10.0) -> None:
    """The engine's sampler made to wait at every draw until a job running in `scheduler` is cancelled (at most
    `wait_s`), then to draw `token`; `started` is set at the first draw: a generation only cancelling ends early."""
    from engine.sampling import Sampler

    class UntilCancelled(Sampler):
        def choose(self, logits):
            started.set()
            deadline = time.monotonic() + wait_s
            while not any(job.cancel.is_set() for job in list(scheduler._running)) and time.monotonic() < deadline:
                time.sleep(0.01)
            return torch.tensor([token], device=logits.device)

    monkeypatch.setattr("engine.generate.Sampler", UntilCancelled)
