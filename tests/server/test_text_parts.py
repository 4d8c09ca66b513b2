"""A message's text given as several parts (OpenAI's content arrays): the parts are separate pieces of text, so the
model reads them joined by a newline, as it reads several system messages, over HTTP and realtime alike; text next
to a picture stays where the reference template places it."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.sync.client import connect

from tests.server import FakeEngine, b64, fake_server, image_array, png_bytes, recv_item, recv_json, recv_until


def parts(*texts: str, kind: str = "text") -> list[dict]:
    return [{"type": kind, "text": t} for t in texts]


@pytest.fixture(scope="module")
def engine_and_server():
    engine = FakeEngine()
    with fake_server(engine) as srv:
        yield engine, srv


def test_a_system_and_a_user_message_in_text_parts_are_read_as_separate_sentences(engine_and_server):
    """["Be brief.", "Answer in French."] reached the model as "Be brief.Answer in French."."""
    engine, srv = engine_and_server
    messages = [{"role": "developer", "content": parts("Be brief.", "Answer in French.")},
                {"role": "user", "content": parts("Hello.", "Who are you?")}]
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    call = engine.calls[-1]
    assert call["system_prompt"] == "Be brief.\nAnswer in French."
    assert call["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hello.\nWho are you?"}]}]


def test_text_around_a_picture_is_placed_as_the_reference_template_places_it(engine_and_server):
    engine, srv = engine_and_server
    content = [*parts("Look:"), {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                          + b64(png_bytes(image_array(24, 32)))}},
               *parts("What is it?", "One word.")]
    r = httpx.post(f"{srv.url}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": content}], "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    got = engine.calls[-1]["messages"][0]["content"]
    assert [p["type"] for p in got] == ["text", "image", "text"]
    assert (got[0]["text"], got[2]["text"]) == ("Look:", "What is it?\nOne word.")


def test_realtime_items_in_text_parts_are_read_as_separate_sentences(engine_and_server):
    engine, srv = engine_and_server
    with connect(srv.ws_url) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for role in ("system", "user"):
            ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": role, "content": parts(f"{role} one.", f"{role} two.", kind="input_text")}}))
            item = recv_item(ws)["item"]
            assert [p["text"] for p in item["content"]] == [f"{role} one.", f"{role} two."]  # echoed as given
        ws.send(json.dumps({"type": "response.create"}))
        recv_until(ws, "response.done")
    texts = [(m["role"], m["content"][0]["text"] if isinstance(m["content"], list) else m["content"])
             for m in engine.calls[-1]["messages"]]
    assert texts[-1] == ("user", "user one.\nuser two.")
    system = engine.calls[-1]["system_prompt"] or dict(texts).get("system")
    assert "system one.\nsystem two." in system


def test_a_replayed_answer_of_as_many_parts_as_allowed_keeps_its_refusal_and_more_are_counted_as_sent():
    """An assistant answer replayed with 64 content parts (the most a message holds) and its `refusal` was refused as
    "65 parts": the refusal, read after the parts, was counted as one. It is taken, its refusal after its parts; 65
    parts are refused counting the content's parts alone and naming the limit."""
    from engine.server.codec import MAX_CONTENT_PARTS
    from engine.server.http_api import convert_messages
    from engine.server.limits import Limits
    from engine.server.protocol import ApiError

    said, user = parts(*(f"part {i}." for i in range(MAX_CONTENT_PARTS))), {"role": "user", "content": "Again?"}
    messages, _ = convert_messages([user, {"role": "assistant", "content": said, "refusal": "I can't."}, user], Limits())
    assert messages[1]["content"] == [{"type": "text", "text": "\n".join([p["text"] for p in said] + ["I can't."])}]
    with pytest.raises(ApiError) as refused:
        convert_messages([user, {"role": "assistant", "content": said + said[:1], "refusal": "No."}, user], Limits())
    assert (refused.value.code, refused.value.message) == (
        "too_many_parts", f"'messages[1].content' has 65 content parts; a message holds at most {MAX_CONTENT_PARTS}")
