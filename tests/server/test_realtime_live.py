"""Hands-free live sessions on the realtime server (server_vad turn detection, rolling webcam video,
barge-in, conversation.item.truncate), end to end over a websocket: our spoken questions
(app/assets/speech, espeak-ng) streamed as a browser sends them (48 kHz, 40 ms pieces) with webcam
frames, into a real server around the tiny engine (or a scripted engine where a test needs audio
output the tiny engine cannot give yet)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from websockets.sync.client import connect

from engine.events import AudioChunk, Done, GenerationStats, TextDelta
from engine.media.audio import resampled_length
from tests.server import FakeEngine, fake_server, follows_response_done, running_server, wait_for
from tests.server.live import MIC_RATE, LiveClient, last_loud_s, silence, speaks, speech

pytest.importorskip("silero_vad")

VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
OUTPUT_DELTAS = ("response.output_text.delta", "response.output_audio_transcript.delta", "response.output_audio.delta")


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(tiny_engine, max_sessions=8) as srv:
        yield srv


def hands_free(client: LiveClient, **session) -> dict:
    client.drain(10)
    client.send(type="session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": VAD}},
                                                "video": {"window_seconds": 8, "fps": 1}, **session})
    client.wait(lambda t: "session.updated" in t or "error" in t)
    ev = client.events[-1][1]
    assert ev["type"] == "session.updated", ev
    return ev["session"]


class Playback:
    """A client playing a reply's audio as it arrives, in real time (what it reports as heard)."""

    def __init__(self):
        self.started: float | None = None
        self.received_ms = 0.0

    def feed(self, events: list[tuple[float, dict]]) -> None:
        for t, e in events:
            if e["type"] == "response.output_audio.delta":
                self.started = self.started or t
                self.received_ms += 1000 * len(e["delta"]) * 3 / 4 / 2 / e["sample_rate"]

    def heard_ms(self, now: float) -> int:
        return 0 if self.started is None else int(min(self.received_ms, 1000 * (now - self.started)))


def start_spoken_reply(ws) -> None:
    """A new session answering in audio: one user item, then response.create."""
    recv_until(ws, "session.created")
    ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["audio"]}}))
    recv_until(ws, "session.updated")
    ws.send(json.dumps({"type": "conversation.item.create",
                        "item": {"type": "message", "role": "user", "content": "Say something."}}))
    recv_until(ws, "conversation.item.done")
    ws.send(json.dumps({"type": "response.create"}))


def test_a_hands_free_turn_with_barge_in_end_to_end(server, tiny_engine):
    """Turn 1: the question, then silence: the server stops the turn, commits video + audio and
    answers. Turn 2 starts while the answer streams: the answer is cancelled at once (reason
    turn_detected), nothing of it arrives after speech_started, the conversation keeps only what was
    sent (cut to what was heard when it spoke), and turn 2 gets its own answer."""
    audio_out = speaks(tiny_engine)
    q1, q2 = speech("what_do_you_see_en.wav"), speech("describe_picture_en.wav")
    with connect(server.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        session = hands_free(c, instructions="Be brief.", max_output_tokens=300,
                             output_modalities=["audio"] if audio_out else ["text"])
        sid = session["id"]
        assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        assert session["video"] == {"window_seconds": 8.0, "fps": 1.0}
        c.stream(silence(0.2), pace=4)
        c.stream(q1, pace=4)
        speech_end_s = 0.2 + last_loud_s(q1)
        first_output = "response.output_audio.delta" if audio_out else "response.output_text.delta"
        c.stream(silence(4.0), pace=1, until=lambda t: t.count(first_output) >= 6)  # real time: the VAD's wait
        playback = Playback()
        playback.feed(c.events)
        barge_at = len(c.events)
        c.stream(q2, pace=4, until=lambda t: "input_audio_buffer.speech_started" in t[barge_at:])
        i_barge, t_barge, _ = c.first("input_audio_buffer.speech_started", barge_at)
        playback.feed(c.events[barge_at:i_barge])
        heard_ms = playback.heard_ms(t_barge)
        reply_id = c.first("response.output_item.added")[2]["item"]["id"]
        if audio_out:  # the page stops the sound and says how much was heard
            c.send(type="conversation.item.truncate", item_id=reply_id, content_index=0, audio_end_ms=heard_ms)
        c.send(type="session.update", session={"max_output_tokens": 4})  # keep turn 2's answer short
        c.stream(q2[int(0.6 * MIC_RATE):], pace=4)
        c.stream(silence(1.5), pace=2, until=lambda t: t.count("response.created") >= 2)
        c.wait(lambda t: t.count("response.done") >= 2)
        session = server.ctx.sessions.open[sid]
        wait_for(lambda: len(session.items) == 4)
        conversation = [(it.role, it.parts[-1].get("text")) for it in session.items]

    kinds = c.types()
    # turn 1, in order
    i_start = c.first("input_audio_buffer.speech_started")[0]
    i_stop, t_stop, stop = c.first("input_audio_buffer.speech_stopped")
    i_commit, _, commit = c.first("input_audio_buffer.committed")
    i_user, _, user = c.first("conversation.item.added")
    i_created, t_created, created = c.first("response.created")
    i_delta, t_delta, _ = c.first(first_output)
    assert i_start < i_stop < i_commit < i_user < i_created < i_delta < i_barge
    assert kinds[i_user + 1] == "conversation.item.done"
    assert stop["item_id"] == commit["item_id"] == user["item"]["id"]
    video, audio = user["item"]["content"]
    assert video["type"] == "input_video" and video["frames"] >= 2 and audio["type"] == "input_audio"
    assert abs(audio["seconds"] - (stop["audio_end_ms"] - c.first("input_audio_buffer.speech_started")[2][
        "audio_start_ms"]) / 1000) < 0.05
    assert 0.5 <= stop["audio_end_ms"] / 1000 - speech_end_s <= 1.0  # the silence it waited for, and no more
    # barge-in: the answer ends at once, cancelled by the turn, and nothing of it follows speech_started
    resp1 = created["response"]["id"]
    i_done1, t_done1, done1 = c.first("response.done")
    assert done1["response"]["id"] == resp1 and done1["response"]["status"] == "cancelled"
    assert done1["response"]["status_details"]["reason"] == "turn_detected"
    assert not [k for k, (_, e) in enumerate(c.events[i_barge:], i_barge)
                if e["type"] in OUTPUT_DELTAS and e.get("response_id") == resp1], "stale output after the barge-in"
    sent = [e for _, e in c.events[:i_barge] if e["type"] in OUTPUT_DELTAS[:2] and e.get("response_id") == resp1]
    said = "".join(e["delta"] for e in sent)
    item1 = done1["response"]["output"][0]
    kept = item1["content"][0].get("text", item1["content"][0].get("transcript"))
    assert item1["status"] == "incomplete" and kept and said.startswith(kept)
    assert conversation[1] == ("assistant", kept)  # what the model gets next: the cut reply between the turns
    if not audio_out:
        assert kept == said  # what the page shows is what the conversation keeps
    else:
        assert c.first("conversation.item.truncated")[2]["audio_end_ms"] == heard_ms
    # turn 2 is answered after the cancelled answer ended
    i_stop2 = c.first("input_audio_buffer.speech_stopped", i_barge)[0]
    i_created2, _, created2 = c.first("response.created", i_created + 1)
    assert i_done1 < i_created2 and i_stop2 < i_created2
    done2 = c.first("response.done", i_done1 + 1)[2]["response"]
    assert done2["id"] == created2["response"]["id"] and done2["status"] in ("completed", "incomplete")
    assert [role for role, _ in conversation] == ["user", "assistant", "user", "assistant"]
    rec = next(r for r in server.ctx.scheduler.history if r.label.endswith(sid) and r.finish_reason == "cancelled")
    assert rec.steps_after_cancel is not None and rec.steps_after_cancel <= 1
    wait_for(lambda: sid not in server.ctx.sessions.open)
    assert server.ctx.scheduler.running == 0 and server.ctx.scheduler.waiting == 0

    def ms(a, b):
        return round(1000 * (b - a))
    t_speech_end = c.wall_time_of(speech_end_s)
    print(f"\n[hands-free turn, {'audio' if audio_out else 'text'} replies] speech end -> speech_stopped "
          f"{ms(t_speech_end, t_stop)} ms (silence_duration_ms {VAD['silence_duration_ms']}), -> response.created "
          f"{ms(t_speech_end, t_created)} ms, -> first {first_output.split('.')[1]} delta {ms(t_speech_end, t_delta)}"
          f" ms; barge-in: speech_started -> response.done (cancelled) {ms(t_barge, t_done1)} ms, decode steps "
          f"after the cancel {rec.steps_after_cancel}; heard {heard_ms} ms of {playback.received_ms:.0f} ms received; "
          f"reply kept: {kept!r}")
    print("events:", " ".join(k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]))


# --------------------------------------------------------------------------- spoken replies: truncate


def spoken_reply_script(words: int = 12, chunk_s: float = 0.2, rate: int = 24000) -> list:
    """A reply spoken chunk by chunk, each chunk starting one word (what the talker yields)."""
    import numpy as np
    import torch

    tone = (0.2 * np.sin(np.linspace(0, 300, int(chunk_s * rate)))).astype(np.float32)
    chunks = [AudioChunk.from_samples(tone, rate, text=f"w{i} ", start_s=round(i * chunk_s, 3)) for i in range(words)]
    return chunks + [Done("", "stop", GenerationStats(new_tokens=words))]


def recv_until(ws, kind: str, timeout: float = 20.0) -> list[dict]:
    """Events up to and including the first of type `kind` (after response.done, the rate_limits.updated
    that follows it is read and checked, not returned)."""
    out, deadline = [], time.monotonic() + timeout
    while not out or out[-1]["type"] != kind:
        out.append(json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
    if kind == "response.done":
        follows_response_done(json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
    return out


def test_truncate_keeps_only_what_was_heard_of_a_spoken_reply():
    """Push-to-talk: the page heard 500 ms of the reply (the third chunk had started), truncates and
    cancels: the item keeps the words whose audio had started; a finished reply is cut the same way."""
    engine = FakeEngine(script=spoken_reply_script(), has_talker=True, step_s=0.03)
    with fake_server(engine) as srv, connect(srv.ws_url) as ws:
        start_spoken_reply(ws)
        got = recv_until(ws, "response.output_audio.delta")
        got += recv_until(ws, "response.output_audio.delta") + recv_until(ws, "response.output_audio.delta")
        item_id = next(e for e in got if e["type"] == "response.output_item.added")["item"]["id"]
        ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                            "audio_end_ms": 500}))
        ws.send(json.dumps({"type": "response.cancel"}))
        rest = recv_until(ws, "response.done")
        truncated = next(e for e in rest if e["type"] == "conversation.item.truncated")
        assert (truncated["item_id"], truncated["content_index"], truncated["audio_end_ms"]) == (item_id, 0, 500)
        done = rest[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["output"][0]["content"][0]["transcript"] == "w0 w1 w2 "  # 0.4 s < 500 ms: w2 had started
        assert done["output"][0]["status"] == "incomplete"
        session = next(iter(srv.ctx.sessions.open.values()))
        wait_for(lambda: len(session.items) == 2)
        assert session.items[-1].parts == [{"type": "text", "text": "w0 w1 w2 "}]  # what the model sees next
        # a finished reply, truncated afterwards; and what truncate refuses
        engine.step_s = 0.0
        ws.send(json.dumps({"type": "conversation.item.create",
                            "item": {"type": "message", "role": "user", "content": "Again."}}))
        recv_until(ws, "conversation.item.done")
        ws.send(json.dumps({"type": "response.create"}))
        done = recv_until(ws, "response.done")[-1]["response"]
        item2 = done["output"][0]["id"]
        assert done["output"][0]["content"][0]["transcript"] == "".join(f"w{i} " for i in range(12))
        wait_for(lambda: len(session.items) == 4)
        for event, code, param in [({"item_id": item2, "audio_end_ms": 2500}, "invalid_value", "audio_end_ms"),
                                   ({"item_id": item2, "audio_end_ms": 10, "content_index": 3}, "invalid_value",
                                    "content_index"),
                                   ({"item_id": "item_nope", "audio_end_ms": 10}, "item_not_found", "item_id"),
                                   ({"item_id": session.items[0].id, "audio_end_ms": 10}, "invalid_value", "item_id"),
                                   ({"item_id": item2, "audio_end_ms": -1}, "invalid_value", "audio_end_ms")]:
            ws.send(json.dumps({"type": "conversation.item.truncate", "event_id": "t", **event}))
            err = recv_until(ws, "error")[-1]["error"]
            assert (err["code"], err["param"], err["event_id"]) == (code, param, "t"), err
        ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": item2, "content_index": 0,
                            "audio_end_ms": 0}))
        assert recv_until(ws, "conversation.item.truncated")[-1]["audio_end_ms"] == 0
        assert session.items[-1].parts == [{"type": "text", "text": ""}] and session.items[-1].status == "incomplete"
        assert session.items[-1].public[0]["transcript"] == ""
        # conversation.item.retrieve shows the server's view: the reply as truncated, the user's turn as sent
        ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": item2}))
        got = recv_until(ws, "conversation.item.retrieved")[-1]["item"]
        assert (got["id"], got["role"], got["status"]) == (item2, "assistant", "incomplete")
        assert got["content"][0]["transcript"] == ""
        ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": session.items[0].id}))
        got = recv_until(ws, "conversation.item.retrieved")[-1]["item"]
        assert (got["role"], got["content"]) == ("user", session.items[0].public)
        ws.send(json.dumps({"type": "conversation.item.retrieve", "event_id": "r", "item_id": "item_nope"}))
        err = recv_until(ws, "error")[-1]["error"]
        assert (err["code"], err["param"], err["event_id"]) == ("item_not_found", "item_id", "r")


def test_barge_in_on_a_spoken_reply_sends_no_stale_audio():
    """A spoken reply streaming faster than real time (so audio waits in the server's queue): the
    turn that starts over it cancels it, and no audio delta follows speech_started."""
    engine = FakeEngine(script=spoken_reply_script(words=40, chunk_s=0.2), has_talker=True, step_s=0.01)
    with fake_server(engine) as srv, connect(srv.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        hands_free(c, output_modalities=["audio"])
        c.stream(speech(), pace=8)
        c.stream(silence(2.0), pace=8, until=lambda t: t.count("response.output_audio.delta") >= 3)
        at = len(c.events)
        c.stream(speech("describe_picture_en.wav"), pace=8, until=lambda t: "input_audio_buffer.speech_started"
                 in t[at:])
        i_barge = c.first("input_audio_buffer.speech_started", at)[0]
        c.wait(lambda t: "response.done" in t)
        done = c.first("response.done")[2]["response"]
        assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
        assert "response.output_audio.delta" not in c.types()[i_barge:]
        sent = [e for _, e in c.events[:i_barge] if e["type"] == "response.output_audio_transcript.delta"]
        assert done["output"][0]["content"][0]["transcript"] == "".join(e["delta"] for e in sent)
        assert len(sent) < 40  # the reply was cut, not played out
        session = next(iter(srv.ctx.sessions.open.values()))
        wait_for(lambda: len(session.items) == 2)
        assert [s.text for s in session.items[1].audio] == [e["delta"] for e in sent]


# --------------------------------------------------------------------------- push-to-talk and memory


def push_to_talk_with_video(client: LiveClient) -> str:
    """The session's id, once it takes turns the client commits, each with the last 4 s of frames at 2 fps."""
    client.drain(10)
    client.send(type="session.update", session={"audio": {"input": {"turn_detection": None}},
                                                "video": {"window_seconds": 4, "fps": 2}})
    client.wait(lambda t: "session.updated" in t)
    return client.events[-1][1]["session"]["id"]


def test_push_to_talk_turns_carry_the_rolling_video_and_old_turns_lose_theirs(server):
    """With video settings and no turn detection, each committed turn gets the last seconds of
    frames (compact uint8); after `keep_turns` newer turns an old turn's video leaves the
    conversation, so memory stays bounded however long the session runs."""
    from engine.media.video import WebcamClip
    from engine.server.video_context import VideoContextConfig

    keep = VideoContextConfig().keep_turns
    q = speech()
    with connect(server.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        sid = push_to_talk_with_video(c)
        for turn in range(keep + 2):
            c.send(type="input_audio_buffer.clear")
            c.stream(q, pace=50)
            c.send(type="input_audio_buffer.commit")
            c.wait(lambda t, n=turn + 1: t.count("conversation.item.done") == n)
        session = server.ctx.sessions.open[sid]
        items = [c.first("conversation.item.added", i)[2]["item"] for i, k in enumerate(c.types())
                 if k == "conversation.item.added"]
        for item in items:
            video, audio = item["content"]
            assert video["type"] == "input_video" and video["frames"] >= 3 and 1.0 <= video["seconds"] <= 4.0
            assert audio["type"] == "input_audio" and audio["sample_rate"] == MIC_RATE
        videos = [p.get("video") for it in session.items for p in it.parts if p["type"] == "video"]
        kept = [isinstance(v, WebcamClip) for v in videos]
        assert kept == [True] * keep
        assert [bool(it.public[0].get("dropped")) for it in session.items] == [True, True] + [False] * keep
        assert all(it.nbytes == 2 * len(q) for it in session.items[:2])  # audio only
        frame_bytes = 192 * 256 * 3
        assert all(it.nbytes <= 9 * frame_bytes + 2 * len(q) for it in session.items[2:])  # uint8 frames


def test_a_message_typed_during_a_video_call_sees_the_camera(server):
    """A Live call without a microphone types its turns (conversation.item.create): such a message got none of
    the rolling webcam video a spoken turn gets, so "what am I holding?" was answered blind. An appended user
    message now takes the frames as a committed turn does; a message inserted earlier and a system one do not."""
    with connect(server.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        sid = push_to_talk_with_video(c)
        c.stream(silence(1.5), pace=50)  # the camera's frames arrive with the (silent) audio clock
        typed = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "what is this?"}]}
        c.send(type="conversation.item.create", item=typed)
        c.wait(lambda t: t.count("conversation.item.done") == 1)
        c.send(type="conversation.item.create", previous_item_id="root", item=typed)
        c.send(type="conversation.item.create", item={**typed, "role": "system", "content": [
            {"type": "input_text", "text": "be brief"}]})
        c.wait(lambda t: t.count("conversation.item.done") == 3)
        added = [e["item"] for _, e in c.events if e["type"] == "conversation.item.added"]
        video, text = added[0]["content"]
        assert video["type"] == "input_video" and video["frames"] >= 2 and text["text"] == "what is this?"
        assert [p["type"] for p in added[1]["content"]] == ["input_text"]  # inserted first: not the latest turn
        assert [p["type"] for p in added[2]["content"]] == ["input_text"]
        items = server.ctx.sessions.open[sid].items
        assert [p["type"] for it in items for p in it.parts].count("video") == 1


# --------------------------------------------------------------------------- nothing left running


def test_a_client_that_never_speaks_and_one_that_leaves_mid_reply_leave_nothing_running(server):
    q = speech()
    # frames only, for a while: nothing is committed, memory stays at the window
    with connect(server.ws_url, max_size=None) as ws:
        c = LiveClient(ws, frame_every_s=0.05)  # a 20 fps camera
        sid = hands_free(c)["id"]
        c.stream(silence(6.0), pace=30)
        session = server.ctx.sessions.open[sid]
        assert session.items == [] and len(session.video) <= session.settings.video_context.max_frames
        assert "error" not in c.types() and "input_audio_buffer.speech_started" not in c.types()
    wait_for(lambda: sid not in server.ctx.sessions.open)
    # the tab closes while the answer streams
    with connect(server.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        sid = hands_free(c, max_output_tokens=300)["id"]
        c.stream(q, pace=4)
        c.stream(silence(3.0), pace=2, until=lambda t: "response.output_text.delta" in t)
    rec = wait_for(lambda: next((r for r in server.ctx.scheduler.history if r.label.endswith(sid)), None))
    assert rec.finish_reason == "cancelled" and rec.new_tokens < 300
    wait_for(lambda: sid not in server.ctx.sessions.open)
    assert server.ctx.scheduler.running == 0 and server.ctx.scheduler.waiting == 0


def test_turn_detection_and_video_settings_are_checked_and_reported(server):
    with connect(server.ws_url) as ws:
        c = LiveClient(ws)
        session = hands_free(c, video={"window_seconds": 12, "fps": 0.5})
        assert session["audio"]["input"]["turn_detection"] == {**VAD, "create_response": True,
                                                               "interrupt_response": True, "idle_timeout_ms": None}
        assert session["video"] == {"window_seconds": 12.0, "fps": 0.5}
        for spec, code, param in [
                ({"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}, "unsupported_parameter",
                 "session.audio.input.turn_detection.type"),
                ({"turn_detection": {"threshold": 1.5}}, "invalid_value", "session.turn_detection.threshold"),
                ({"video": {"fps": 10}}, "invalid_value", "session.video.fps"),
                ({"video": {"window_seconds": 5}, "turn_detection": {"silence_duration_ms": "x"}}, "invalid_type",
                 "session.turn_detection.silence_duration_ms")]:
            n = len(c.events)
            c.send(type="session.update", event_id="bad", session=spec)
            c.wait(lambda t: len(t) > n)
            err = c.events[-1][1]["error"]
            assert (err["code"], err["param"], err["event_id"]) == (code, param, "bad"), err
        n = len(c.events)
        c.send(type="session.update", session={})  # the refused updates changed nothing
        c.wait(lambda t: len(t) > n)
        assert c.events[-1][1]["session"]["video"] == {"window_seconds": 12.0, "fps": 0.5}
        n = len(c.events)
        c.send(type="session.update", session={"audio": {"input": {"turn_detection": None}}, "video": None})
        c.wait(lambda t: len(t) > n)
        s = c.events[-1][1]["session"]
        assert s["audio"]["input"]["turn_detection"] is None and s["video"] is None


def test_a_full_hands_free_conversation_lets_its_oldest_turns_go():
    """Hands-free, the server commits turns itself: when the conversation is full (items or media),
    the oldest turns leave it (conversation.item.deleted) instead of the next turn being refused,
    and the conversation still opens with a user turn."""
    engine = FakeEngine(script=[TextDelta("ok"), Done("ok", "stop", GenerationStats(new_tokens=1))])
    with fake_server(engine, max_conversation_items=5) as srv, connect(srv.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        hands_free(c)
        q = speech()
        for turn in range(4):
            c.stream(q, pace=10)
            c.stream(silence(1.0), pace=10, until=lambda t, n=turn + 1: t.count("response.done") == n)
            c.wait(lambda t, n=turn + 1: t.count("response.done") == n)
        session = next(iter(srv.ctx.sessions.open.values()))
        wait_for(lambda: len(session.items) == 4)
        deleted = [e["item_id"] for _, e in c.events if e["type"] == "conversation.item.deleted"]
        users = [e["item_id"] for _, e in c.events if e["type"] == "input_audio_buffer.committed"]
        assert "error" not in c.types() and len(users) == 4
        assert deleted[:2] == [users[0], c.first("response.done")[2]["response"]["output"][0]["id"]]
        assert [it.role for it in session.items] == ["user", "assistant"] * 2 and session.items[0].id == users[2]


class HeldReplies(FakeEngine):
    """Each reply sends one delta, then waits until the test releases it (`release()`): a turn can be spoken while a
    given reply is still running, whatever the machine's speed."""

    def __init__(self):
        super().__init__(script=[])
        self.released = threading.Semaphore(0)

    def release(self) -> None:
        self.released.release()

    def chat(self, messages, params=None, cancel=None, system_prompt=None, thinking=False, **output):
        self.calls.append({"messages": messages})
        yield TextDelta("ok")
        while not self.released.acquire(timeout=0.05):
            if cancel is not None and cancel.is_set():
                break
        yield Done("ok", "stop", GenerationStats(new_tokens=1))


def test_a_full_hands_free_conversation_keeps_the_item_a_running_reply_answers_and_room_for_both_replies():
    """interrupt_response off, each turn spoken while the previous reply runs, in a conversation of 5 items: the
    third turn left room for one reply only, so once the running reply joined, the third turn's own response was
    refused (conversation_too_long). Room is now made for both replies, the oldest turns leave
    (conversation.item.deleted), never the item the running reply answers."""
    engine = HeldReplies()
    with fake_server(engine, max_conversation_items=5) as srv, connect(srv.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        hands_free(c, audio={"input": {"turn_detection": {**VAD, "interrupt_response": False}}})
        for turn in range(1, 4):  # each turn spoken while the previous reply runs
            c.stream(speech(), pace=10)
            c.stream(silence(1.0), pace=10, until=lambda t, n=turn: t.count("input_audio_buffer.committed") == n)
            c.wait(lambda t, n=turn: t.count("input_audio_buffer.committed") == n)
            if turn > 1:
                engine.release()  # the previous reply ends; this turn's starts
            c.wait(lambda t, n=turn: t.count("response.output_text.delta") == n)
        engine.release()
        c.wait(lambda t: t.count("response.done") == 3)
        users = [e["item_id"] for _, e in c.events if e["type"] == "input_audio_buffer.committed"]
        replies = [e["response"]["output"][0]["id"] for _, e in c.events if e["type"] == "response.done"]
        deleted = [e["item_id"] for _, e in c.events if e["type"] == "conversation.item.deleted"]
        assert "error" not in c.types(), [e for _, e in c.events if e["type"] == "error"]
        assert deleted == [users[0], replies[0]]  # at the third turn; the second (being answered) stays
        session = next(iter(srv.ctx.sessions.open.values()))
        wait_for(lambda: len(session.items) == 4)
        assert [it.id for it in session.items] == [users[1], replies[1], users[2], replies[2]]


def test_a_g711_caller_takes_turns_hands_free():
    """A telephony bridge streaming G.711 mu-law (8 kHz, OpenAI's g711_ulaw) with server_vad: the
    question is one turn, committed as 8 kHz audio, its times on the session's audio clock."""
    import base64

    import numpy as np
    import torch

    from engine.media.audio import resample
    from tests.server.test_realtime import mulaw_encode

    x = speech()
    question = resample(torch.from_numpy(x), MIC_RATE, 8000).numpy()
    pcm = np.clip(np.round(np.concatenate([question, np.zeros(12000, np.float32)]) * 32767), -32768, 32767)
    law = mulaw_encode(pcm.astype(np.int16))
    with fake_server(FakeEngine()) as srv, connect(srv.ws_url) as ws:
        c = LiveClient(ws)
        c.drain(10)
        c.send(type="session.update", session={"input_audio_format": "g711_ulaw", "turn_detection": {
            **VAD, "create_response": False}})
        c.wait(lambda t: "session.updated" in t or "error" in t)
        assert c.events[-1][1]["type"] == "session.updated", c.events[-1][1]
        for i in range(0, len(law), 321):  # 40 ms pieces of an odd byte count
            c.send(type="input_audio_buffer.append", audio=base64.b64encode(law[i:i + 321]).decode())
        c.wait(lambda t: "conversation.item.done" in t)
        started = c.first("input_audio_buffer.speech_started")[2]
        stopped = c.first("input_audio_buffer.speech_stopped")[2]
        item = c.first("conversation.item.done")[2]["item"]
        assert abs(stopped["audio_end_ms"] - 1000 * last_loud_s(x) - 500) < 200, (stopped, last_loud_s(x))
        assert started["audio_start_ms"] < 400
        audio = next(p for p in item["content"] if p["type"] == "input_audio")
        assert audio["sample_rate"] == 16000  # (a hands-free turn is kept at the detector's rate)
        assert abs(audio["seconds"] - (stopped["audio_end_ms"] - started["audio_start_ms"]) / 1000) < 0.05
        assert srv.ctx.sessions.open


def test_a_truncate_that_arrives_while_the_reply_is_finishing_is_kept(monkeypatch):
    """The reply has been generated and its closing events are on their way (a slow socket: they
    wait for room) when the page's truncate arrives: it was answered conversation.item.truncated
    but lost, since the reply had been cut (or not) before those sends, and the whole reply joined
    the conversation (the model then 'remembers' words the user never heard). It is cut as it joins."""
    import asyncio

    from engine.server.realtime import RealtimeConnection

    original = RealtimeConnection.send

    async def slow_send(self, event):  # the closing events wait until the truncate has been handled
        if event.get("type") == "response.output_audio.done":
            for _ in range(500):
                active = self.session.active
                if active is None or active.truncate_ms is not None:
                    break
                await asyncio.sleep(0.01)
        await original(self, event)

    monkeypatch.setattr(RealtimeConnection, "send", slow_send)
    engine = FakeEngine(script=spoken_reply_script(words=5), has_talker=True)
    with fake_server(engine) as srv, connect(srv.ws_url) as ws:
        start_spoken_reply(ws)
        got = []
        while sum(e["type"] == "response.output_audio.delta" for e in got) < 5:
            got += recv_until(ws, "response.output_audio.delta")
        item_id = next(e for e in got if e["type"] == "response.output_item.added")["item"]["id"]
        ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                            "audio_end_ms": 300}))
        rest = recv_until(ws, "response.done")
        assert any(e["type"] == "conversation.item.truncated" for e in rest)
        session = next(iter(srv.ctx.sessions.open.values()))
        wait_for(lambda: len(session.items) == 2)
        assert session.items[-1].parts == [{"type": "text", "text": "w0 w1 "}]  # 0.2 s < 300 ms: w1 had started
        assert session.items[-1].status == "incomplete"
        ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": item_id}))
        assert recv_until(ws, "conversation.item.retrieved")[-1]["item"]["content"][0]["transcript"] == "w0 w1 "


def test_the_audio_clock_runs_across_turn_detection_switches():
    """audio_start_ms / audio_end_ms count the audio written during the session (OpenAI's clock; the
    page maps them to its own clock). Turning server_vad off (push-to-talk turns) and on again
    restarted them at 0, so the next turn seemed to start before the first one had."""
    with fake_server(FakeEngine()) as srv, connect(srv.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        vad = {"audio": {"input": {"turn_detection": {**VAD, "create_response": False}}}}
        c.drain(10)
        c.send(type="session.update", session=vad)
        c.stream(speech(), pace=20)
        c.stream(silence(1.0), pace=20)
        c.wait(lambda t: "input_audio_buffer.committed" in t)
        first = c.first("input_audio_buffer.speech_stopped")[2]["audio_end_ms"]
        sent_vad = c.audio_s
        c.send(type="session.update", session={"audio": {"input": {"turn_detection": None}}})
        c.stream(speech(), pace=20)  # a push-to-talk turn: its audio counts too
        c.send(type="input_audio_buffer.commit")
        c.wait(lambda t: t.count("input_audio_buffer.committed") == 2)
        at = len(c.events)
        c.send(type="session.update", session=vad)
        c.stream(speech(), pace=20)
        c.stream(silence(1.0), pace=20)
        c.wait(lambda t: "input_audio_buffer.speech_stopped" in t[at:])
        started = c.first("input_audio_buffer.speech_started", at)[2]["audio_start_ms"]
        stopped = c.first("input_audio_buffer.speech_stopped", at)[2]["audio_end_ms"]
        assert first < 1000 * sent_vad <= started, (first, sent_vad, started)
        ptt_s = c.audio_s - sent_vad - len(speech()) / MIC_RATE - 1.0
        assert abs(started - 1000 * (sent_vad + ptt_s)) < 600, (started, sent_vad, ptt_s)
        assert stopped > started
        assert srv.ctx.sessions.open


def test_turning_server_vad_off_mid_turn_keeps_what_was_said():
    """speech_started had announced the turn's item_id when the client switched to push-to-talk
    (turn_detection null): the turn was dropped without a word (no speech_stopped, no commit, the
    page 'hearing you' for ever, the speech lost). It is ended and committed there, as a commit
    would (no response is started), before the new settings apply."""
    with fake_server(FakeEngine()) as srv, connect(srv.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        c.drain(10)
        c.send(type="session.update", session={"audio": {"input": {"turn_detection": VAD}}})
        c.stream(speech(), pace=20, until=lambda t: "input_audio_buffer.speech_started" in t)
        c.stream(speech()[:MIC_RATE // 2], pace=20)
        started = c.first("input_audio_buffer.speech_started")[2]
        at = len(c.events)
        c.send(type="session.update", session={"audio": {"input": {"turn_detection": None}}})
        c.wait(lambda t: "session.updated" in t[at:])
        c.drain(0.3)
        types = c.types()[at:]
        assert types[:4] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                             "conversation.item.added", "conversation.item.done"], types
        assert c.first("input_audio_buffer.speech_stopped", at)[2]["item_id"] == started["item_id"]
        assert c.first("input_audio_buffer.committed", at)[2]["item_id"] == started["item_id"]
        assert "response.created" not in types
        session = next(iter(srv.ctx.sessions.open.values()))
        assert [i.id for i in session.items] == [started["item_id"]] and session.detector is None


@pytest.mark.parametrize("session", [
    {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}}}},
    {"audio": {"output": {"format": {"type": "audio/pcm"}}}},
    {"audio": {"output": {"format": "pcm16"}}},
    {"output_audio_format": "pcm16"}])
def test_the_declared_output_audio_rate_is_the_rate_sent(session):
    """An OpenAI client declares audio.output.format {"type": "audio/pcm", "rate": 24000} (or the
    beta "pcm16": 24 kHz) and plays every delta at that rate: the declaration was accepted (or
    "pcm16" refused) and the talker's 44.1 kHz sent as it was, so the reply played 1.8x slow and
    low. The reply is resampled to the declared rate as it streams (each delta names it)."""
    import base64

    engine = FakeEngine(script=spoken_reply_script(words=6, chunk_s=0.2, rate=44100), has_talker=True)
    with fake_server(engine) as srv, connect(srv.ws_url, max_size=None) as ws:
        recv_until(ws, "session.created")
        ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["audio"], **session}}))
        upd = recv_until(ws, "session.updated")[-1]
        assert upd["type"] == "session.updated", upd
        assert upd["session"]["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
        for expected in (24000, 44100):
            ws.send(json.dumps({"type": "conversation.item.create",
                                "item": {"type": "message", "role": "user", "content": "Say something."}}))
            recv_until(ws, "conversation.item.done")
            ws.send(json.dumps({"type": "response.create", "response": {} if expected == 24000 else
                                {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 44100}}}}}))
            events = recv_until(ws, "response.done")
            deltas = [e for e in events if e["type"] == "response.output_audio.delta"]
            assert {d["sample_rate"] for d in deltas} == {expected}
            samples = sum(len(base64.b64decode(d["delta"])) // 2 for d in deltas)
            assert samples == resampled_length(6 * 8820, 44100, expected), samples  # to the last sample
            assert [d["start_s"] for d in deltas[:6]] == [round(0.2 * i, 3) for i in range(6)]
            if expected != 44100:  # the resampling filter's tail ends the audio, where the talker's did
                assert len(deltas) == 7 and deltas[-1]["start_s"] == pytest.approx(1.2, abs=0.01)
        session_obj = next(iter(srv.ctx.sessions.open.values()))
        wait_for(lambda: len(session_obj.items) == 4)
        assert abs(sum(s.seconds for s in session_obj.items[1].audio) - 1.2) < 0.01


def test_a_turn_that_joins_while_a_reply_is_written_follows_the_reply():
    """The reply being written was announced (conversation.item.added, after the user's item) and
    joins the conversation there; a user turn committed meanwhile (interrupt_response off, or push
    to talk) was announced with previous_item_id = the user's first item, the same as the reply's,
    so a client rebuilding the conversation from previous_item_id could not tell the order the
    server keeps (first turn, reply, second turn), and an item.create naming the reply as its
    previous_item_id was refused. Items joining while the reply is written follow it."""
    engine = FakeEngine(script=spoken_reply_script(words=10), has_talker=True, step_s=0.05)
    with fake_server(engine) as srv, connect(srv.ws_url) as ws:
        recv_until(ws, "session.created")
        ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["audio"]}}))
        recv_until(ws, "session.updated")
        ws.send(json.dumps({"type": "conversation.item.create",
                            "item": {"type": "message", "role": "user", "content": "Say something."}}))
        first = recv_until(ws, "conversation.item.done")[-1]["item"]["id"]
        ws.send(json.dumps({"type": "response.create"}))
        reply = recv_until(ws, "response.output_item.added")[-1]["item"]["id"]
        ws.send(json.dumps({"type": "conversation.item.create",
                            "item": {"type": "message", "role": "user", "content": "And then?"}}))
        events = recv_until(ws, "conversation.item.done")
        added = [e for e in events if e["type"] == "conversation.item.added" and e["item"]["role"] == "user"][-1]
        second = added["item"]["id"]
        assert added["previous_item_id"] == reply
        ws.send(json.dumps({"type": "conversation.item.create", "previous_item_id": second,
                            "item": {"type": "message", "role": "user", "content": "Third."}}))
        third = recv_until(ws, "conversation.item.done")[-1]
        assert third["type"] == "conversation.item.done" and third["previous_item_id"] == second
        done = recv_until(ws, "response.done")[-1]["response"]
        assert done["status"] == "completed"
        session = next(iter(srv.ctx.sessions.open.values()))
        wait_for(lambda: len(session.items) == 4)
        assert [i.id for i in session.items] == [first, reply, second, third["item"]["id"]]


def test_a_reply_that_fails_midway_keeps_what_was_sent():
    """The talker failed after three chunks: the reply had been announced (conversation.item.added,
    then .done 'incomplete') and partly played, but it never joined the conversation, so the
    page's truncate (the user speaking over it) and a retrieve were answered item_not_found and the
    next reply's context lacked what the user heard. What was sent is kept, incomplete."""
    from engine.events import Error

    script = spoken_reply_script(words=3) + [Error("the talker failed", "engine_error")]
    engine = FakeEngine(script=[e for e in script if type(e).__name__ != "Done"], has_talker=True)
    with fake_server(engine) as srv, connect(srv.ws_url) as ws:
        start_spoken_reply(ws)
        done = recv_until(ws, "response.done")[-1]["response"]
        assert done["status"] == "failed"
        item_id = done["output"][0]["id"]
        ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": item_id}))
        got = json.loads(ws.recv(timeout=10))
        assert got["type"] == "conversation.item.retrieved", got
        assert (got["item"]["status"], got["item"]["content"][0]["transcript"]) == ("incomplete", "w0 w1 w2 ")
        ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                            "audio_end_ms": 300}))
        assert recv_until(ws, "conversation.item.truncated")[-1]["audio_end_ms"] == 300
        session = next(iter(srv.ctx.sessions.open.values()))
        assert session.items[-1].parts == [{"type": "text", "text": "w0 w1 "}]


def test_speech_interrupts_a_reply_to_the_conversation_but_not_an_out_of_band_one():
    """OpenAI's interrupt_response cancels 'any ongoing response with output to the default conversation'; an
    out-of-band response (conversation 'none': a summary, a classification) was cancelled by the user speaking
    too. It runs to its end; the turn's own reply starts after it."""
    engine = FakeEngine(script=[TextDelta(f"w{i} ") for i in range(60)] + [Done("", "stop", GenerationStats())],
                        step_s=0.03)
    with fake_server(engine) as srv, connect(srv.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        hands_free(c)
        c.send(type="conversation.item.create", item={"type": "message", "role": "user", "content": "Summarise."})
        c.send(type="response.create", response={"conversation": "none", "metadata": {"job": "summary"}})
        c.wait(lambda t: "response.output_text.delta" in t)
        c.stream(speech(), pace=4, until=lambda t: "input_audio_buffer.speech_started" in t)
        c.stream(silence(1.0), pace=4)
        c.wait(lambda t: t.count("response.done") >= 2)
        done = [e["response"] for _, e in c.events if e["type"] == "response.done"]
        assert done[0]["metadata"] == {"job": "summary"} and done[0]["status"] == "completed", done[0]
        assert done[1]["conversation_id"] is not None and done[1]["status"] == "completed"
        assert c.first("input_audio_buffer.speech_started")[0] < c.first("response.done")[0]  # spoken over it


def test_idle_timeout_makes_a_response_when_the_user_stays_silent_after_a_reply():
    """server_vad's idle_timeout_ms was refused ('not supported'). As OpenAI documents it: no speech for that long
    after the last reply's audio has played (response.done plus the audio's length) sends
    input_audio_buffer.timeout_triggered over the silent span, commits the latest audio as the user's item and
    makes a response; speech before the timeout, or no reply yet, triggers nothing."""
    engine = FakeEngine(script=spoken_reply_script(words=5, chunk_s=0.2), has_talker=True)  # 1 s of reply audio
    with fake_server(engine) as srv, connect(srv.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        session = hands_free(c, output_modalities=["audio"],
                             audio={"input": {"turn_detection": {**VAD, "idle_timeout_ms": 5000}}})
        assert session["audio"]["input"]["turn_detection"]["idle_timeout_ms"] == 5000
        c.stream(silence(6.0), pace=20)  # no reply yet: nothing to time out from
        c.stream(speech(), pace=8)
        c.stream(silence(1.0), pace=8, until=lambda t: "response.done" in t)
        c.wait(lambda t: "response.done" in t)
        replied_at_ms = 1000 * c.audio_s
        c.stream(silence(4.5), pace=20)  # the reply's 1 s of audio plus 3.5 s: not idle long enough
        assert "input_audio_buffer.timeout_triggered" not in c.types()
        at = len(c.events)
        c.stream(silence(3.0), pace=20, until=lambda t: "input_audio_buffer.timeout_triggered" in t[at:])
        c.wait(lambda t: t.count("response.done") == 2)
        _, _, fired = c.first("input_audio_buffer.timeout_triggered", at)
        turn_end_ms = c.first("input_audio_buffer.speech_stopped")[2]["audio_end_ms"]  # the reply came after it
        assert turn_end_ms + 1000 <= fired["audio_start_ms"] <= replied_at_ms + 1000, (fired, replied_at_ms)
        assert abs(fired["audio_end_ms"] - fired["audio_start_ms"] - 5000) <= 100
        _, _, committed = c.first("input_audio_buffer.committed", at)
        assert committed["item_id"] == fired["item_id"]
        assert c.first("response.created", at)[0] > c.first("input_audio_buffer.committed", at)[0]
        user = srv.ctx.sessions.open[next(iter(srv.ctx.sessions.open))].find_item(fired["item_id"])
        assert user.role == "user" and 0 < user.public[-1]["seconds"] <= 0.3 + 0.032  # the latest audio, silent
        assert len(engine.calls) == 2  # the idle turn was answered


def test_a_second_barge_in_cuts_the_reply_to_the_first_and_the_third_turn_is_answered():
    """The user speaks over a reply, then over the reply to that turn too: each reply is cancelled (turn_detected)
    with no output of it after its speech_started, each is kept cut to what was heard (200 ms), and the engine ran
    the three responses and nothing more (the scheduler's history: two cancelled, the last complete)."""
    engine = FakeEngine(script=spoken_reply_script(words=40, chunk_s=0.2), has_talker=True, step_s=0.02)
    with fake_server(engine) as srv, connect(srv.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        sid = hands_free(c, output_modalities=["audio"])["id"]
        c.stream(speech(), pace=8)
        for n in (1, 2):
            c.stream(silence(2.0), pace=8, until=lambda t, n=n: t.count("response.created") == n
                     and t.count("response.output_audio.delta") >= 3 * n)
            at = len(c.events)
            c.stream(speech("describe_picture_en.wav"), pace=8,
                     until=lambda t, a=at: "input_audio_buffer.speech_started" in t[a:])
            reply_id = [e for _, e in c.events if e["type"] == "response.output_item.added"][-1]["item"]["id"]
            c.send(type="conversation.item.truncate", item_id=reply_id, content_index=0, audio_end_ms=200)
            c.stream(silence(1.0), pace=8)
        c.wait(lambda t: t.count("response.done") >= 3)
        done = [(i, e["response"]) for i, (_, e) in enumerate(c.events) if e["type"] == "response.done"]
        assert [(r["status"], (r.get("status_details") or {}).get("reason")) for _, r in done] == [
            ("cancelled", "turn_detected"), ("cancelled", "turn_detected"), ("completed", None)]
        for _, r in done[:2]:
            created = c.first("response.created", 0)[0] if r is done[0][1] else \
                [i for i, (_, e) in enumerate(c.events) if e["type"] == "response.created"][1]
            i_barge = c.first("input_audio_buffer.speech_started", created)[0]
            assert not [e for _, e in c.events[i_barge:] if e.get("response_id") == r["id"]
                        and e["type"] in OUTPUT_DELTAS], "stale output after a barge-in"
        session = srv.ctx.sessions.open[sid]
        wait_for(lambda: len(session.items) == 6)
        replies = [it for it in session.items if it.role == "assistant"]
        assert [it.status for it in replies] == ["incomplete", "incomplete", "completed"]
        assert all(abs(sum(span.seconds for span in it.audio) - 0.2) < 1e-6 for it in replies[:2])  # what was heard
    wait_for(lambda: srv.ctx.scheduler.running == 0 and srv.ctx.scheduler.waiting == 0)
    runs = [r for r in srv.ctx.scheduler.history if r.label.endswith(sid)]
    assert [r.finish_reason for r in runs] == ["cancelled", "cancelled", "stop"]


def test_with_interrupt_response_off_speech_over_a_reply_lets_it_finish_then_answers_the_turn():
    """interrupt_response false (OpenAI's: the response 'will continue until complete'): speech over a reply is
    still reported (speech_started / speech_stopped, the turn committed), the reply is not cancelled, and the turn
    gets its own response once the reply has ended."""
    engine = FakeEngine(script=[TextDelta(f"w{i} ") for i in range(60)] + [Done("", "stop", GenerationStats())],
                        step_s=0.03)
    with fake_server(engine) as srv, connect(srv.ws_url, max_size=None) as ws:
        c = LiveClient(ws)
        hands_free(c, audio={"input": {"turn_detection": {**VAD, "interrupt_response": False}}})
        c.stream(speech(), pace=8)
        c.stream(silence(1.0), pace=8, until=lambda t: "response.output_text.delta" in t)
        at = len(c.events)
        c.stream(speech("describe_picture_en.wav"), pace=4)
        c.stream(silence(1.0), pace=4)
        c.wait(lambda t: t.count("response.done") >= 2)
        done = [(i, e["response"]) for i, (_, e) in enumerate(c.events) if e["type"] == "response.done"]
        assert [r["status"] for _, r in done] == ["completed", "completed"]
        assert c.first("input_audio_buffer.speech_started", at)[0] < done[0][0]  # spoken over the first reply
        assert c.first("input_audio_buffer.committed", at)[0] < done[0][0]
        assert len(done[0][1]["output"][0]["content"][0]["text"].split()) == 60  # the whole reply
        assert len(engine.calls) == 2 and len(engine.calls[1]["messages"]) == 3  # the turn, answered after it


class PieceTranscriber(FakeEngine):
    """A scripted engine that transcribes: each clip it is given is recorded (its length in samples) and written as
    'piece<n>'."""

    def __init__(self):
        super().__init__()
        self.clips: list[int] = []

    def info(self):
        from dataclasses import replace

        return replace(super().info(), components=["llm", "audio"])

    def transcribe(self, audio, context=None, hotwords=None, dialect=None, params=None, cancel=None,
                   sample_rate=None):
        self.clips.append(len(audio))
        text = f"piece{len(self.clips)}"
        yield TextDelta(text)
        yield Done(text, "stop", result={"language": None, "text": text})


def test_a_turn_is_transcribed_while_it_is_spoken_each_piece_once():
    """Input transcription deltas came only after the turn had ended (the whole turn transcribed then): a caller saw
    no words while speaking. A turn is now transcribed a piece (3 s or more) at a time while it is spoken, each sample
    once; deltas name the item speech_started announced, and .completed is their concatenation."""
    engine = PieceTranscriber()
    with fake_server(engine) as srv, connect(srv.ws_url, max_size=None) as ws:
        c = LiveClient(ws, _next_frame=float("inf"))  # (no webcam: the audio is the item's first part)
        c.drain(10)
        c.send(type="session.update", session={"audio": {"input": {
            "turn_detection": {**VAD, "create_response": False}, "transcription": {"model": "whisper-1"}}}})
        c.wait(lambda t: "session.updated" in t)
        said = [speech(), silence(0.2), speech(), silence(0.2), speech(), silence(0.2), speech()]  # one 7 s turn
        c.stream(np.concatenate(said), pace=20)
        c.stream(silence(1.0), pace=20)
        c.wait(lambda t: "conversation.item.input_audio_transcription.completed" in t)
        stopped = c.first("input_audio_buffer.speech_stopped")[0]
        item_id = c.first("input_audio_buffer.speech_started")[2]["item_id"]
        deltas = [(i, e) for i, (_, e) in enumerate(c.events)
                  if e["type"] == "conversation.item.input_audio_transcription.delta"]
        assert deltas and deltas[0][0] < stopped  # words while the user still spoke
        assert [(e["item_id"], e["content_index"]) for _, e in deltas] == [(item_id, 0)] * len(deltas)
        done = c.first("conversation.item.input_audio_transcription.completed")[2]
        pieces = [f"piece{n}" for n in range(1, len(engine.clips) + 1)]
        assert done["transcript"] == "".join(e["delta"] for _, e in deltas) == " ".join(pieces)
        seconds = c.first("conversation.item.added")[2]["item"]["content"][0]["seconds"]
        assert sum(engine.clips) / 16000 == pytest.approx(seconds, abs=1e-3)  # every sample once, none twice
        assert 2 <= len(engine.clips) <= seconds // 2 + 1, engine.clips  # pieces of 2-3 s and the rest
