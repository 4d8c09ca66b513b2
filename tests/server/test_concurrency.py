"""32 realtime sessions at once: every one completes, each gets exactly the reply the in-process
engine gives its own prompt (no cross-talk), queue positions are reported while they wait, and
every session's resources are released at the end."""

import asyncio
import json

from websockets.asyncio.client import connect

from tests.server import SYSTEM, reference_chat, running_server, wait_for

N_SESSIONS = 32
TOKENS = 3
WORDS = ["river", "lantern", "porcelain", "silk", "garden", "bridge", "mountain", "tea"]


def prompt(i: int) -> str:
    return f"Session {i}: say something about the {WORDS[i % len(WORDS)]} number {i * 7}."


async def one_session(url: str, i: int) -> dict:
    async with connect(url, compression=None) as ws:
        created = json.loads(await ws.recv())
        assert created["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update",
                                  "session": {"instructions": SYSTEM, "max_output_tokens": TOKENS}}))
        await ws.send(json.dumps({"type": "conversation.item.create",
                                  "item": {"type": "message", "role": "user", "content": prompt(i)}}))
        await ws.send(json.dumps({"type": "response.create"}))
        deltas, positions, done = [], [], None
        while done is None:
            ev = json.loads(await asyncio.wait_for(ws.recv(), 60))
            assert ev["type"] != "error", ev
            if ev["type"] == "response.output_text.delta":
                deltas.append(ev["delta"])
            elif ev["type"] == "response.queue_position":
                positions.append(ev["position"])
            elif ev["type"] == "response.done":
                done = ev["response"]
        return {"session": created["session"]["id"], "text": "".join(deltas), "positions": positions, "done": done}


async def all_sessions(url: str) -> list[dict]:
    return await asyncio.gather(*(one_session(url, i) for i in range(N_SESSIONS)))


def test_32_concurrent_sessions_complete_without_cross_talk(tiny_engine):
    expected = [reference_chat(tiny_engine, [{"role": "user", "content": prompt(i)}], TOKENS, system_prompt=SYSTEM)
                for i in range(N_SESSIONS)]
    assert len({e.text for e in expected}) > N_SESSIONS // 4  # the prompts give distinguishable replies
    with running_server(tiny_engine, max_sessions=N_SESSIONS) as srv:
        results = asyncio.run(all_sessions(srv.ws_url))
        assert len({r["session"] for r in results}) == N_SESSIONS
        for i, (r, e) in enumerate(zip(results, expected)):
            assert r["text"] == e.text, f"session {i} got another session's reply"
            assert r["done"]["output"][0]["content"][0]["text"] == e.text
            assert r["done"]["usage"]["input_tokens"] == e.stats.prompt_tokens
            assert r["done"]["status"] in ("completed", "incomplete")
            assert r["positions"] and r["positions"][-1] == 0
            assert r["positions"] == sorted(r["positions"], reverse=True)  # positions only move forward
        assert max(max(r["positions"]) for r in results) >= N_SESSIONS // 2  # they really queued
        waits = [r["done"]["metrics"]["queue_wait_ms"] for r in results]
        assert max(waits) > 0
        wait_for(lambda: len(srv.ctx.sessions) == 0)
        s = srv.ctx.scheduler
        assert s.running == 0 and s.waiting == 0 and s.counts["completed"] >= N_SESSIONS
