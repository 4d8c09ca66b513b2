"""One large valid prompt must not block other clients (issue 9 §2): text that cannot fit the model's
context is refused before anything tokenises it (a characters bound derived from the context and the
tokenizer's longest token), /health keeps answering while another client sends the largest body the
server takes, and a realtime session's text is bounded like its media."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from tokenizers import Tokenizer
from websockets.sync.client import connect

from tests.server import recv_item, recv_json, recv_until, running_server
from tests.test_generate import short_context_engine


def expected_bound(server, engine) -> int:
    """The server's characters bound, checked against the checkpoint's tokenizer: more characters than
    the bound never make fewer tokens than the context (here with the text that packs the most
    characters into each token, the longest vocabulary entries, and with plain words)."""
    bound = server.ctx.prompt_bound
    context = engine.model.config.llm.max_position_embeddings
    assert bound is not None and bound.context_tokens == context
    tok = Tokenizer.from_file(str(engine.model.path / "tokenizer.json"))
    tok.encode_special_tokens = True
    longest = max(tok.get_vocab(with_added_tokens=False), key=len)
    for unit in (tok.decode([tok.token_to_id(longest)]) or "x", "the quick brown fox ", "声音"):
        text = (unit * (bound.max_chars // len(unit) + 1))[:bound.max_chars + 1]
        assert len(tok.encode(text, add_special_tokens=False).ids) > context, unit
    return bound.max_chars


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(tiny_engine, max_request_bytes=16 * 1024 * 1024) as srv:
        yield srv


def test_text_that_cannot_fit_is_refused_before_the_engine_sees_it(server, tiny_engine):
    bound = expected_bound(server, tiny_engine)
    submitted = server.ctx.scheduler.counts["submitted"]
    parts = [{"type": "text", "text": "ab" * (bound // 4)}, {"type": "text", "text": "c" * (bound // 2 + 10)}]
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": parts}], "max_tokens": 2})
    took = time.perf_counter() - t0
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and f"{bound:,}" in err["message"], err
    assert server.ctx.scheduler.counts["submitted"] == submitted  # never queued, never tokenised
    assert took < 2.0
    # text within the bound still reaches the engine
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_text_under_the_bound_whose_tokens_cannot_fit_is_refused_before_it_is_queued(server, tiny_engine):
    context = tiny_engine.model.config.llm.max_position_embeddings
    text = ("words of an ordinary prompt, " * context)[:expected_bound(server, tiny_engine) - 100]
    submitted = server.ctx.scheduler.counts["submitted"]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": text}], "max_tokens": 200})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
    assert f"{context:,} tokens" in err["message"] and "200 more" in err["message"], err
    assert server.ctx.scheduler.counts["submitted"] == submitted  # counted by the server, never queued
    with connect(server.ws_url, max_size=None) as ws:
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps({"type": "conversation.item.create",
                            "item": {"type": "message", "role": "user", "content": text}}))
        recv_item(ws)
        ws.send(json.dumps({"type": "response.create", "event_id": "r1", "response": {"max_output_tokens": 200}}))
        ev = recv_json(ws)
        assert ev["type"] == "error" and ev["error"]["code"] == "context_length_exceeded", ev
        assert ev["error"]["event_id"] == "r1"
    assert server.ctx.scheduler.counts["submitted"] == submitted


def health_waits(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            assert c.get(url + "/health").status_code == 200
            out.append(time.perf_counter() - t0)
            time.sleep(0.02)


def test_health_answers_while_another_client_sends_a_huge_prompt(server):
    body = json.dumps({"messages": [{"role": "user", "content": "word " * (6 * 1024 * 1024 // 5)}],
                       "max_tokens": 2}).encode()
    waits: list[float] = []
    stop = threading.Event()
    poller = threading.Thread(target=health_waits, args=(server.url, stop, waits))
    poller.start()
    try:
        time.sleep(0.1)
        r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=120,
                       headers={"content-type": "application/json"})
        time.sleep(0.1)
    finally:
        stop.set()
        poller.join()
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    print(f"\n[/health while a {len(body) / 2 ** 20:.1f} MiB prompt is refused] worst wait {1000 * max(waits):.0f} ms "
          f"over {len(waits)} polls")
    assert max(waits) < 1.0


def test_a_realtime_session_has_a_text_budget(server, tiny_engine):
    bound = expected_bound(server, tiny_engine)
    big = "xy" * (bound // 3)  # two of these do not fit; one does
    with connect(server.ws_url, max_size=None) as ws:
        assert recv_json(ws)["type"] == "session.created"

        def create(text: str) -> dict:
            ws.send(json.dumps({"type": "conversation.item.create",
                                "item": {"type": "message", "role": "user", "content": text}}))
            return recv_json(ws)

        first = create(big)
        assert first["type"] == "conversation.item.added"
        recv_json(ws)  # .done
        refused = create(big)
        assert refused["type"] == "error" and refused["error"]["code"] == "session_text_limit", refused
        assert f"{bound:,}" in refused["error"]["message"]
        assert refused["error"]["param"] == "item.content"  # each refusal names the field that brought the text
        ws.send(json.dumps({"type": "session.update", "session": {"instructions": big}}))
        ev = recv_json(ws)
        assert ev["type"] == "error" and ev["error"]["code"] == "session_text_limit", ev
        assert ev["error"]["param"] == "session.instructions"
        ws.send(json.dumps({"type": "response.create", "response": {"instructions": big}}))
        ev = recv_json(ws)
        assert ev["type"] == "error" and ev["error"]["code"] == "session_text_limit", ev
        assert ev["error"]["param"] == "response.instructions"
        # room is made by deleting items, as with media
        ws.send(json.dumps({"type": "conversation.item.delete", "item_id": first["item"]["id"]}))
        assert recv_json(ws)["type"] == "conversation.item.deleted"
        ws.send(json.dumps({"type": "conversation.item.create",
                            "item": {"type": "message", "role": "user", "content": big}}))
        assert recv_item(ws)["item"]["role"] == "user"


def test_the_bound_follows_the_tokenizer_file(tmp_path):
    """Longest merge, added tokens user text can hold, and normalizers: composing ones widen the bound,
    ones that may drop text leave no characters bound (the token count still applies)."""
    from engine.server.text import chars_per_token

    def bound_of(**spec) -> int | None:
        path = tmp_path / f"tok{len(list(tmp_path.iterdir()))}.json"
        model = {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "abab": 3, "<|very_long_special|>": 4},
                 "merges": ["a b", "ab ab"]}
        path.write_text(json.dumps({"model": model, "added_tokens": [], "normalizer": None, **spec}))
        return chars_per_token(str(path))

    assert bound_of() == 4  # "ab" + "ab": the special entry is never a merge result
    assert bound_of(added_tokens=[{"content": "<think-about-it>", "special": False}]) == 16
    assert bound_of(added_tokens=[{"content": "<think-about-it>", "special": True}]) == 4
    assert bound_of(normalizer={"type": "NFC"}) == 16
    assert bound_of(normalizer={"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}) == 16
    assert bound_of(normalizer={"type": "Strip", "strip_left": True, "strip_right": True}) is None


def test_one_realtime_item_that_cannot_fit_alone_is_context_length_exceeded(server, tiny_engine):
    bound = expected_bound(server, tiny_engine)
    with connect(server.ws_url, max_size=None) as ws:
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps({"type": "conversation.item.create",
                            "item": {"type": "message", "role": "user", "content": "x" * (bound + 1)}}))
        ev = recv_json(ws)
        assert ev["type"] == "error" and ev["error"]["code"] == "context_length_exceeded", ev
        assert ev["error"]["param"] == "item.content", ev
        for event, param in (({"type": "session.update", "session": {"instructions": "x" * (bound + 1)}},
                              "session.instructions"),
                             ({"type": "response.create", "response": {"instructions": "x" * (bound + 1)}},
                              "response.instructions")):
            ws.send(json.dumps(event))
            ev = recv_json(ws)
            assert ev["type"] == "error" and ev["error"]["code"] == "context_length_exceeded", ev
            assert ev["error"]["param"] == param, ev


def test_a_transcription_prompt_that_cannot_fit_is_refused_naming_it_before_it_queues(server, tiny_engine):
    """A transcription's `prompt` (context for the recogniser) of 90,000 characters used to be queued,
    tokenised by the engine and refused with context_length_exceeded, param null."""
    from tests.server import tone_pcm16, wav_bytes

    bound = expected_bound(server, tiny_engine)
    prompt = ("the quick brown fox " * (bound // 20 + 10))[:bound + 100]
    submitted = server.ctx.scheduler.counts["submitted"]
    r = httpx.post(server.url + "/v1/audio/transcriptions", timeout=60,
                   files={"file": ("a.wav", wav_bytes(tone_pcm16(0.5)))}, data={"prompt": prompt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt", err
    assert server.ctx.scheduler.counts["submitted"] == submitted  # never queued
    r = httpx.post(server.url + "/v1/audio/transcriptions", timeout=60,  # a prompt that fits is taken
                   files={"file": ("a.wav", wav_bytes(tone_pcm16(0.5)))}, data={"prompt": "a short context",
                                                                                  "max_tokens": "2"})
    assert r.status_code == 200, r.text


def test_a_media_prompt_that_cannot_fit_is_refused_before_its_media_is_encoded(server, tiny_engine, monkeypatch):
    """Ten 1800x1800 pictures make more prompt tokens than the context holds: the engine used to encode
    every one (88 s of ViT work on a CPU, holding the engine from every other client) before refusing
    the request with context_length_exceeded, which the token count alone had decided."""
    import base64
    import io

    from PIL import Image

    from engine.media.errors import MediaError

    encoded = []

    def spy(prompt, cancel=None):
        encoded.append(prompt)
        raise MediaError("encode_media ran")  # (stands in for minutes of encoding)

    monkeypatch.setattr(tiny_engine, "encode_media", spy)
    buf = io.BytesIO()
    Image.new("RGB", (1800, 1800), (90, 120, 200)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}] * 10 + [{"type": "text", "text": "hi"}]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                   json={"messages": [{"role": "user", "content": content}], "max_tokens": 4096})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert encoded == []
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120,  # one that fits still reaches the encoder
                   json={"messages": [{"role": "user", "content": content[:1] + content[-1:]}], "max_tokens": 2})
    assert r.status_code == 400 and "encode_media ran" in r.json()["error"]["message"], r.text
    assert len(encoded) == 1


def test_a_request_naming_no_token_limit_runs_to_the_end_of_the_context(tiny_engine):
    """A prompt leaving 5 tokens of the context: a chat naming no max_tokens (the server's default of 256 is
    no request) and a realtime response under the session's default or "inf" end there, finish_reason
    "length" / status incomplete (they were refused with context_length_exceeded); a limit the request
    names that cannot fit is still refused."""
    msg = [{"role": "user", "content": "Hello"}]
    short = short_context_engine(tiny_engine, len(tiny_engine.processor.build(msg).ids) + 5)
    with running_server(short) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={"messages": msg})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5, body
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={"messages": msg, "max_tokens": 50})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        with connect(srv.ws_url, max_size=None) as ws:
            assert recv_json(ws)["type"] == "session.created"
            ws.send(json.dumps({"type": "conversation.item.create",
                                "item": {"type": "message", "role": "user", "content": "Hello"}}))
            recv_item(ws)
            for response in ({}, {"max_output_tokens": "inf"}):
                ws.send(json.dumps({"type": "response.create", "response": response}))
                done = recv_until(ws, "response.done")[-1]["response"]
                assert done["status"] == "incomplete" and done["usage"]["output_tokens"] == 5, done
                ws.send(json.dumps({"type": "conversation.item.delete", "item_id": done["output"][0]["id"]}))
                assert recv_json(ws)["type"] == "conversation.item.deleted"
            ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 50}}))
            events = recv_until(ws, "response.done")
            errors = [ev["response"]["status_details"]["error"] if ev["type"] == "response.done" else ev.get("error")
                      for ev in events if ev["type"] in ("error", "response.done")]
            assert any(e and e["code"] == "context_length_exceeded" for e in errors), events
