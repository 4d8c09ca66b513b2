"""Helpers shared by the server tests: real servers on loopback (ephemeral ports) around the tiny
engine, and small media made on the fly."""

from __future__ import annotations

import base64
import io
import json
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


def reference_chat(engine, messages, max_new_tokens: int, system_prompt=None, thinking=False) -> Done:
    """The in-process result a server response must equal (greedy decoding is deterministic)."""
    with torch_threads(1):
        events = list(engine.chat(messages, GenerationParams(max_new_tokens=max_new_tokens),
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
    """Events up to and including the first of type `kind`."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        ev = recv_json(ws, max(0.1, deadline - time.monotonic()))
        out.append(ev)
        if ev["type"] == kind:
            return out
        assert time.monotonic() < deadline, f"no {kind} in time"
