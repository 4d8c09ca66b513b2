"""A long prompt dropped at once stops the engine within one prefill chunk, through the server
(issue 9 §3): an HTTP stream whose client hangs up, a realtime socket that closes, a response.cancel.
The engine side (prefill in chunks, a cancel check between them) is engine.generate's; these tests run
where the engine has it and are skipped on an engine that prefills a prompt in one go."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

import engine.generate
from tests.server import b64, png_bytes, recv_item, recv_json, recv_until, running_server, wait_for

pytestmark = pytest.mark.skipif(not hasattr(engine.generate, "prefill"),
                                reason="this engine prefills a prompt in one piece (no chunked prefill to cancel "
                                       "between): see bench/server_cancel.py for the figures")

PROMPT_TOKENS = 6000  # ~12 prefill chunks of the CPU default (512): several seconds when not cancelled
CHUNK_BUDGET_S = 2.0  # one chunk of the tiny model on a busy 2-core machine, with room to spare


def long_text(engine, tokens: int) -> str:
    """Plain text of about `tokens` prompt tokens for this engine's tokenizer."""
    unit = "the quick brown fox jumps over the lazy dog. "
    per_unit = len(engine.tokenizer.encode_plain(unit))
    return unit * (tokens // per_unit)


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(tiny_engine) as srv:
        yield srv


def record_of(server, before: int, label_start: str):
    return wait_for(lambda: next((r for r in list(server.ctx.scheduler.history)[before:]
                                  if r.label.startswith(label_start)), None), 60)


def dropped_http_stream(server, content, pause: float, started: threading.Event | None = None):
    """The record of a streamed chat request whose client hangs up `pause` s after it is queued (after `started`
    is set, when given)."""
    before = len(server.ctx.scheduler.history)
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith(": queue_position"):
                wait_started(started)
                time.sleep(pause)  # the engine is at work on the prompt now
                break
    return record_of(server, before, "chat.completions")


def wait_started(started: threading.Event | None) -> None:
    if started is not None:
        assert started.wait(60), "the engine never reached the stage to cancel"


@pytest.fixture
def vision_started(tiny_engine):
    """Set when the ViT starts on a picture (reading a 2000x2000 PNG takes a second or more before that: a fixed
    pause after the queue position may still fall in it on a slower machine)."""
    started = threading.Event()
    hook = tiny_engine.model.encoders.vision.register_forward_pre_hook(lambda *_: started.set())
    yield started
    hook.remove()


def cancelled_realtime_response(server, content, how: str, pause: float, started: threading.Event | None = None):
    """The record of a realtime response to `content` that is cancelled (`how`: "close" the socket or
    "response.cancel") `pause` s after it is queued (after `started` is set, when given)."""
    before = len(server.ctx.scheduler.history)
    with connect(server.ws_url, max_size=None) as ws:
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": content}}))
        recv_item(ws)
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 4}}))
        recv_until(ws, "response.queue_position")
        wait_started(started)
        time.sleep(pause)
        if how == "response.cancel":
            ws.send(json.dumps({"type": "response.cancel"}))
            done = recv_until(ws, "response.done")[-1]
            assert done["response"]["status"] == "cancelled"
    return record_of(server, before, "realtime")


def test_an_http_stream_dropped_during_prefill_stops_within_a_chunk(server, tiny_engine):
    rec = dropped_http_stream(server, long_text(tiny_engine, PROMPT_TOKENS), 0.3)
    print(f"\n[HTTP drop during a {PROMPT_TOKENS}-token prefill] engine busy {rec.cancel_latency_s:.3f} s after the "
          f"drop (run {rec.run_s:.2f} s)")
    assert rec.finish_reason == "cancelled" and rec.new_tokens == 0
    assert rec.cancel_latency_s < CHUNK_BUDGET_S


@pytest.mark.parametrize("how", ["close", "response.cancel"])
def test_a_realtime_response_cancelled_during_prefill_stops_within_a_chunk(server, tiny_engine, how):
    rec = cancelled_realtime_response(server, long_text(tiny_engine, PROMPT_TOKENS), how, 0.3)
    print(f"\n[realtime {how} during a {PROMPT_TOKENS}-token prefill] engine busy {rec.cancel_latency_s:.3f} s")
    assert rec.finish_reason == "cancelled" and rec.cancel_latency_s < CHUNK_BUDGET_S


BIG_PICTURE = np.zeros((2000, 2000, 3), np.uint8)  # 15,625 patches: seconds through the tiny ViT's 2 blocks here
ENCODE_BUDGET_S = 2.0  # a fraction of one ViT block: the check also runs between its attention query blocks


def test_an_http_stream_dropped_during_vision_encoding_stops_within_a_block(server, vision_started):
    """A huge picture kept the engine busy until the ViT was through (60-120 s on the real model); the
    cancel is now checked between the encoder's blocks (and attention query blocks)."""
    url = "data:image/png;base64," + b64(png_bytes(BIG_PICTURE))
    rec = dropped_http_stream(server, [{"type": "image_url", "image_url": {"url": url}},
                                       {"type": "text", "text": "what is this?"}], 0.3, vision_started)
    print(f"\n[HTTP drop during vision encoding] engine busy {rec.cancel_latency_s:.3f} s after the drop "
          f"(run {rec.run_s:.2f} s)")
    assert rec.finish_reason == "cancelled" and rec.new_tokens == 0
    assert rec.cancel_latency_s < ENCODE_BUDGET_S


def test_a_realtime_response_cancel_during_vision_encoding_stops_within_a_block(server, vision_started):
    rec = cancelled_realtime_response(server, [{"type": "input_image", "image": b64(png_bytes(BIG_PICTURE))},
                                               {"type": "input_text", "text": "what is this?"}], "response.cancel", 0.3,
                                      vision_started)
    print(f"\n[realtime response.cancel during vision encoding] engine busy {rec.cancel_latency_s:.3f} s")
    assert rec.finish_reason == "cancelled" and rec.cancel_latency_s < ENCODE_BUDGET_S
