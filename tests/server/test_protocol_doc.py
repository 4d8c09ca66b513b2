"""The "A whole session" transcript of docs/protocol.md, re-run against the real server (the tiny
engine): its client events are read from the page and sent as written (media placeholders filled
with real media), and the server must answer with the documented event types, in the documented
order. The page cannot drift from what the server does."""

from __future__ import annotations

import json
import re

import pytest
from websockets.sync.client import connect

from tests.paths import REPO
from tests.server import b64, image_array, png_bytes, recv_json, running_server, tone_pcm16

REPEATS = 2  # how many times a client event marked (repeat) is sent


def transcript() -> list[tuple[str, str, bool]]:
    """[(direction "→"/"←", text, repeated)] of the page's whole-session transcript."""
    doc = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    block = doc.split("### A whole session")[1].split("```text\n")[1].split("```")[0]
    entries: list[list[str]] = []
    for line in block.splitlines():
        if line.startswith(("→", "←")):
            entries.append([line[0], line[1:].strip()])
        elif line.strip():
            entries[-1][1] += " " + line.strip()
    out = []
    for direction, text in entries:
        repeated = text.endswith("(repeat)")
        out.append((direction, text.removesuffix("(repeat)").strip(), repeated))
    return out


def client_event(text: str, i: int) -> dict:
    """A documented client event with its placeholders filled; repeated frames get later capture times."""
    text = text.replace("<PNG>", b64(png_bytes(image_array(40, 56, seed=i))))
    text = text.replace("<PCM16>", b64(tone_pcm16(0.3, rate=24000).tobytes()))
    event = json.loads(text)
    if "capture_time" in event:
        event["capture_time"] += 0.5 * i
    return event


def server_type(text: str) -> str:
    return re.search(r'"type": "([a-z_.]+)"', text).group(1)


def test_the_documented_session_runs_against_the_server(tiny_engine):
    steps = transcript()
    assert steps[0] == ("→", "(connect) ws://127.0.0.1:8000/v1/realtime            (or ...?token=T)", False)
    sent = received = 0
    with running_server(tiny_engine) as srv, connect(srv.ws_url, max_size=None) as ws:
        pending = None  # a server event read ahead while matching a (repeat)
        for direction, text, repeated in steps[1:]:
            if direction == "→":
                for i in range(REPEATS if repeated else 1):
                    ws.send(json.dumps(client_event(text, i)))
                    sent += 1
                continue
            want = server_type(text)
            ev = pending or recv_json(ws, 60)
            pending = None
            assert ev["type"] == want, f"documented {want}, the server sent {ev['type']}: {str(ev)[:300]}"
            received += 1
            while repeated:
                ev = recv_json(ws, 60)
                if ev["type"] != want:
                    pending = ev
                    break
                received += 1
        assert pending is None
    print(f"\n[docs/protocol.md transcript] {sent} client events sent, {received} server events in the documented "
          "order")
    assert sent >= 9 and received >= 25


@pytest.mark.parametrize("step", [s for s in transcript()[1:] if s[0] == "→"], ids=lambda s: server_type(s[1]))
def test_every_documented_client_event_is_valid_json(step):
    assert client_event(step[1], 0)["type"]
