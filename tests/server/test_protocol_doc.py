"""The "A whole session" transcript of docs/protocol.md, re-run against the real server (the tiny
engine): its client events are read from the page and sent as written (media placeholders filled
with real media), and the server must answer with the documented event types, in the documented
order. The endpoint table of the page, its `--openai-only` extension routes and the README's list of
endpoints are the server's routes. The page cannot drift from what the server does."""

from __future__ import annotations

import inspect
import json
import re
from types import SimpleNamespace

import httpx
import pytest
from websockets.sync.client import connect

from engine.client import AsyncEngineClient, EngineClient
from engine.server.app import create_app, served_routes
from engine.server.http_api import capabilities
from engine.server.limits import MiB, Limits
from engine.server.protocol import METRICS
from engine.server.speech_api import speech_options
from tests.paths import REPO
from tests.server import FakeEngine, b64, fake_server, image_array, png_bytes, recv_json, running_server, tone_pcm16

REPEATS = 2  # how many times a client event marked (repeat) is sent
DOC = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
README = (REPO / "README.md").read_text(encoding="utf-8")
ROUTE = re.compile(r"`(GET|POST|DELETE) (/[^`]*)`")


def transcript() -> list[tuple[str, str, bool]]:
    """[(direction "→"/"←", text, repeated)] of the page's whole-session transcript."""
    block = DOC.split("### A whole session")[1].split("```text\n")[1].split("```")[0]
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


def route_key(method: str, path: str) -> str:
    """'GET /v1/models/{}': a route with its path parameters' names left out (the page writes {id})."""
    return f"{method} {re.sub(r'{[^}]*}', '{}', path)}"


def server_routes(openai_only: bool = False) -> set[str]:
    """The /v1 routes a server serves, a websocket's as 'WS /v1/realtime'."""
    routes = served_routes(create_app(FakeEngine(), openai_only=openai_only))
    return {route_key(*route.split(" ", 1)) for route in routes}


def test_the_endpoint_table_lists_the_servers_routes():
    table = DOC.split("| endpoint | what |")[1].split("\n\n")[0]
    documented = {route_key(method, path.removesuffix(" (websocket)").strip()) for method, path in ROUTE.findall(table)}
    websocket = "`GET /v1/realtime` (websocket)" in table
    documented = {"WS /v1/realtime" if websocket and r == "GET /v1/realtime" else r for r in documented}
    assert documented - {"GET /health"} == server_routes()


def test_the_openai_only_section_names_the_routes_it_leaves_out():
    section = DOC.split("### `--openai-only`")[1].split("###")[0]
    left_out = {path for path in re.findall(r"`(/v1/[^`]*)`", section)}
    gone = {route.split(" ", 1)[1] for route in server_routes() - server_routes(openai_only=True)}
    assert left_out <= gone
    assert {g for g in gone if not any(g == p or g.startswith(p + "/") for p in left_out)} == set(), \
        "left out with --openai-only but not named (a route under a named one counts as named)"


def test_the_readmes_endpoints_are_served_and_those_it_calls_openai_compatible_by_an_openai_only_server():
    row = next(line for line in README.splitlines() if line.startswith("| `python -m engine.server"))
    openai_part, ours = row.split("OpenAI-compatible HTTP (")[1].split(")")[0], row.split(") and the realtime")[1]
    served = {route.split(" ", 1)[1] for route in server_routes()}
    openai_served = {route.split(" ", 1)[1] for route in server_routes(openai_only=True)}
    openai_named = set(re.findall(r"`(/v1/[^`]*)`", openai_part.split("our ")[0]))
    assert openai_named - openai_served == set(), "called OpenAI-compatible but not served with --openai-only"
    assert set(re.findall(r"`(/v1/[^`]*)`", openai_part + ours)) - served == set()


def test_the_figures_the_page_lists_are_those_a_response_reports():
    paragraph = DOC.split("Every response reports figures")[1].split("\n\n")[0]
    documented = set(re.findall(r"`([a-z_]+)`", paragraph)) - {"metrics"}
    reported = {name for name, _, _ in METRICS} | {"time_to_first_token_ms"}  # the server's own, from its clock
    assert documented == reported


def documented_signatures() -> list[tuple[str, list[str]]]:
    """[(method, its parameter names)] of each `name(…)` signature the prose of the page's "Python client" section
    writes (a bare `name()` names a method without its parameters)."""
    section = re.sub(r"```.*?```", "", DOC.split("## Python client")[1], flags=re.S)
    signatures = []
    for span in re.findall(r"`([a-z_]+\([^`]*\))`", section):
        name, inside = span.split("(", 1)
        params, depth, word = [], 0, ""
        for ch in inside[:-1] + ",":
            depth += ch in "([{"
            depth -= ch in ")]}"
            if ch == "," and depth == 0:
                params.append(word.split("=")[0].strip())
                word = ""
            else:
                word += ch
        signatures.append((name, [p for p in params if p not in ("", "*")]))
    return signatures


@pytest.mark.parametrize("client_class", [EngineClient, AsyncEngineClient], ids=lambda c: c.__name__)
def test_the_client_signatures_the_page_writes_are_the_clients(client_class):
    signatures = documented_signatures()
    assert {"chat", "speak", "imagine", "save_voice", "delete_voice", "voices"} <= {name for name, _ in signatures}
    for name, params in signatures:
        method = getattr(client_class, name, None)
        if method is None:  # a RealtimeClient method (respond)
            continue
        takes = list(inspect.signature(method).parameters)[1:]
        assert params in (takes, []), f"{client_class.__name__}.{name}: the page writes {params}"


def test_the_speech_options_the_page_lists_are_those_the_server_answers():
    section = DOC.split("### `GET /v1/audio/speech/options`")[1].split("###")[0]
    documented = set(re.findall(r"`([a-z_]+)`", section))
    answer = speech_options(SimpleNamespace(talker=SimpleNamespace(sample_rate=44100)))
    assert f"`{answer.pop('object')}` object" in section
    assert documented == set(answer)


def test_the_model_card_the_page_shows_has_the_servers_fields_and_capabilities():
    section = DOC.split("### `GET /v1/models`, `GET /health`")[1].split("\n## ")[0]
    example = json.loads(section.split("```json\n")[1].split("```")[0])["data"][0]
    with fake_server() as srv:
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]
    assert set(example) == set(card)
    assert set(example["limits"]) == set(card["limits"]) | {"context_tokens"}  # the fake engine has no tokenizer
    prose = section.split("`capabilities` (")[1].split("), `default_instructions`")[0]
    everything = SimpleNamespace(info=lambda: SimpleNamespace(components=["llm", "vision", "audio"]),
                                 has_talker=True, has_image_generator=True)
    assert set(re.findall(r"`([a-z_]+)`", prose)) == capabilities(everything) | {"realtime"}
    assert set(example["capabilities"]) <= set(card["capabilities"]) | capabilities(everything)
    assert "realtime" in card["capabilities"] and "realtime" in example["capabilities"]


def test_the_health_answer_the_page_shows_has_the_servers_fields():
    section = DOC.split("### `GET /v1/models`, `GET /health`")[1].split("\n## ")[0]
    example = json.loads(section.split("```json\n")[2].split("```")[0])
    with fake_server() as srv:
        health = httpx.get(srv.url + "/health").json()
    assert set(example) == set(health)
    assert set(example["queue"]) == set(health["queue"])
    assert set(example["client_aborts"]) == set(health["client_aborts"])


# the Limits table's rows (by how the row starts) and the Limits fields their default column states, in order
LIMIT_ROWS = {
    "one realtime event": ["max_message_bytes"], "one HTTP JSON body": ["max_request_bytes"],
    "one upload": ["max_upload_bytes"], "values in one JSON body": ["max_json_values"],
    "one audio clip": ["max_audio_seconds"], "one recording to transcribe": ["max_transcription_seconds"], "pixels of one image": ["max_image_pixels"],
    "decoded media of one HTTP request": ["max_session_media_bytes"], "webcam frames buffered": ["max_video_frames"],
    "open realtime sessions": ["max_sessions"], "open HTTP and websocket connections": ["max_connections"], "one realtime session's life": ["max_session_s"], "a realtime session's idle time": ["realtime_idle_s"],
    "requests waiting": ["max_queue"], "what a client still sends after an answer": ["refusal_linger_s"],
    "a kept-alive connection idle": ["keep_alive_s"],
    "a request body's average rate": ["body_rate_grace_s", "min_body_bytes_per_s"],
    "a chunked request body's chunks": ["min_chunk_bytes"], "a request body's reads": ["min_read_bytes"],
    "`max_tokens` a request": ["max_new_tokens", "default_max_tokens"],
    "items per session": ["max_conversation_items", "max_session_media_bytes"],
    "decoded media of all realtime sessions": ["max_total_media_bytes"],
}
DEFAULT_VALUE = re.compile(r"(\d+(?: \d{3})*(?:\.\d+)?)(?: (MiB|s)\b)?")  # 4 MiB, 300 s, 16 000 000


def test_the_limits_table_states_the_servers_defaults():
    table = DOC.split("## Limits")[1].split("\n\n")[1]
    rows = {cells[1].strip(): cells[2] for cells in (line.split("|") for line in table.splitlines()[2:])}
    defaults = Limits()
    for start, names in LIMIT_ROWS.items():
        cell = next(default for row, default in rows.items() if row.startswith(start))
        stated = [float(number.replace(" ", "")) * (MiB if unit == "MiB" else 1)
                  for number, unit in DEFAULT_VALUE.findall(cell)][:len(names)]
        assert stated == [getattr(defaults, name) for name in names], f"the row '{start}…' says {cell.strip()}"
