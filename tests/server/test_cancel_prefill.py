"""A long prompt dropped at once stops the engine within one prefill chunk, through the server
(issue 9 §3): an HTTP stream whose client hangs up, a realtime socket that closes, a response.cancel.
The engine side (prefill in chunks, a cancel check between them) is engine.generate's; these tests run
where the engine has it and are skipped on an engine that prefills a prompt in one go."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from websockets.sync.client import connect

import engine.generate
from tests.server import recv_item, recv_json, recv_until, running_server, wait_for

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


def test_an_http_stream_dropped_during_prefill_stops_within_a_chunk(server, tiny_engine):
    before = len(server.ctx.scheduler.history)
    body = {"messages": [{"role": "user", "content": long_text(tiny_engine, PROMPT_TOKENS)}], "max_tokens": 4,
            "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith(": queue_position"):
                time.sleep(0.3)  # the engine is inside the prefill now
                break
    rec = record_of(server, before, "chat.completions")
    print(f"\n[HTTP drop during a {PROMPT_TOKENS}-token prefill] engine busy {rec.cancel_latency_s:.3f} s after the "
          f"drop (run {rec.run_s:.2f} s)")
    assert rec.finish_reason == "cancelled" and rec.new_tokens == 0
    assert rec.cancel_latency_s < CHUNK_BUDGET_S


@pytest.mark.parametrize("how", ["close", "response.cancel"])
def test_a_realtime_response_cancelled_during_prefill_stops_within_a_chunk(server, tiny_engine, how):
    before = len(server.ctx.scheduler.history)
    with connect(server.ws_url, max_size=None) as ws:
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": long_text(tiny_engine, PROMPT_TOKENS)}}))
        recv_item(ws)
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 4}}))
        recv_until(ws, "response.queue_position")
        time.sleep(0.3)
        if how == "response.cancel":
            ws.send(json.dumps({"type": "response.cancel"}))
            done = recv_until(ws, "response.done")[-1]
            assert done["response"]["status"] == "cancelled"
    rec = record_of(server, before, "realtime")
    print(f"\n[realtime {how} during a {PROMPT_TOKENS}-token prefill] engine busy {rec.cancel_latency_s:.3f} s")
    assert rec.finish_reason == "cancelled" and rec.cancel_latency_s < CHUNK_BUDGET_S
