"""The Live tab in a real browser (Debian's chromium with a fake camera and microphone playing
our own test media, app/assets/fake_capture) in a small page of its own, relayed by the studio's
proxy to a fake engine that answers with canned realtime events, and to a real engine server (the
tiny engine) that hears the spoken question itself. Skips when /usr/bin/chromium or playwright is
missing. Screenshots are kept in test-artifacts/ (tests/app/browser.py)."""

from __future__ import annotations

import re
from contextlib import contextmanager

import pytest

from tests.app.browser import keep_screenshot
from tests.app.fake_engine import REPLY, FakeEngine
from tests.app.test_remote_studio import free_port
from tests.app.test_browser import sync_api
from tests.paths import REPO

CAPTURE = REPO / "app/assets/fake_capture"
MEDIA_ARGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
              f"--use-file-for-fake-video-capture={CAPTURE / 'webcam.y4m'}",
              f"--use-file-for-fake-audio-capture={CAPTURE / 'mic.wav'}", "--autoplay-policy=no-user-gesture-required"]
PHONE = {"width": 390, "height": 844}


@contextmanager
def served_live_tab(engine_url, token: str | None, **tab):
    """The URL of a page with only the Live tab (build_live_tab(**tab)), served with the proxy to
    the engine at `engine_url` (or at the address a function of no argument gives at each call)."""
    gr = pytest.importorskip("gradio")
    from app.live_proxy import LiveProxy
    from app.studio import close_studio
    from app.ui.live import build_live_tab

    proxy = LiveProxy(lambda: (engine_url() if callable(engine_url) else engine_url, token))
    with gr.Blocks(title="Live test") as demo:
        with gr.Tab("Live"):
            build_live_tab(**tab)
        with gr.Tab("Other"):  # (a call goes on while another tab is open)
            gr.Markdown("Another tab")
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                app_kwargs=proxy.app_kwargs())
    try:
        yield demo.local_url
    finally:
        close_studio(demo)


@pytest.fixture(scope="module")
def live_page():
    """(url, engine): the Live tab (speech output on) relayed to the fake engine."""
    with FakeEngine(speak=True) as engine, served_live_tab(engine.url, engine.token, speech_output=True,
                                                            voices=["default"]) as url:
        yield url, engine


@pytest.fixture
def browser(new_context):
    """A phone-sized page of a fresh context of the shared Chromium with the fake camera and microphone."""
    return new_context(*MEDIA_ARGS, permissions=["camera", "microphone"], viewport=PHONE).new_page()


def test_hands_free_the_tab_hears_a_question_sends_frames_and_shows_the_spoken_reply(live_page, browser):
    url, engine = live_page
    page = browser
    page.goto(url, wait_until="networkidle", timeout=60_000)
    page.locator('#live [data-role="start"]').click()
    reply = page.locator("#live .live-assistant").first
    sync_api.expect(reply).to_have_text(REPLY, timeout=30_000)
    sync_api.expect(page.locator("#live .live-user").first).to_contain_text("s of speech")
    latency = page.locator('#live [data-role="latency"]')
    sync_api.expect(latency).to_contain_text("ms · → first audio")
    sync_api.expect(latency).not_to_contain_text("audio …")
    assert page.locator('#live [data-role="error"]').is_hidden()
    keep_screenshot(page, "live-hands-free-phone")

    update = next(e for e in engine.got.events if e["type"] == "session.update")["session"]
    turns = update["audio"]["input"]["turn_detection"]  # where the GA protocol puts it
    assert turns["type"] == "server_vad" and turns["silence_duration_ms"] > 0 and turns["interrupt_response"]
    assert update["video"] == {"window_seconds": 8, "fps": 1} and update["output_modalities"] == ["audio"]
    page_rate = page.evaluate("() => { const c = new AudioContext(); const r = c.sampleRate; c.close(); return r; }")
    # replies at the page's own audio rate (at most 48 kHz), not OpenAI's 24 kHz default: the talker's band kept
    assert update["audio"]["output"] == {"voice": "default",
                                         "format": {"type": "audio/pcm", "rate": min(round(page_rate), 48000)}}
    assert engine.got.audio_seconds >= 1.0 and all(r >= 8000 for r in engine.got.audio_rates)
    assert engine.got.frames and all(f[:3] == b"\xff\xd8\xff" for f in engine.got.frames)  # JPEGs
    page.locator('#live [data-role="stop"]').click()
    assert engine.wait_closed(1), "the engine session stayed open after Stop"


def test_a_call_left_running_in_another_tab_says_so_there_and_can_be_ended_there(live_page, browser):
    """A call went on, unseen, while another tab was open (the microphone hearing, replies playing): outside the Live
    tab a badge says the call is on, with a button that ends it; back on the Live tab the badge goes."""
    url, engine = live_page
    page = browser
    page.goto(url, wait_until="networkidle", timeout=60_000)
    closed = engine.got.closed
    page.locator('#live [data-role="start"]').click()
    page.wait_for_function("() => [...document.querySelectorAll('#live *')].find(e => e.liveState)?.liveState()?.ready",
                           timeout=30_000)
    badge = page.locator(".live-call-badge")
    assert badge.is_hidden()
    page.get_by_role("tab", name="Other").click()
    sync_api.expect(badge).to_be_visible(timeout=5_000)
    sync_api.expect(badge).to_contain_text("Live call on: the microphone is listening")
    page.get_by_role("tab", name="Live").click()
    sync_api.expect(badge).to_be_hidden(timeout=5_000)
    page.get_by_role("tab", name="Other").click()
    badge.get_by_role("button", name="End call").click()
    sync_api.expect(badge).to_be_hidden(timeout=5_000)
    assert engine.wait_closed(closed + 1), "the engine session stayed open after End call"
    page.get_by_role("tab", name="Live").click()
    sync_api.expect(page.locator('#live [data-role="status"]')).to_have_text("Stopped.")


def test_push_to_talk_and_barge_in_stops_the_speech_and_truncates_it(live_page, browser):
    url, engine = live_page
    before = len(engine.got.events)
    page = browser
    page.goto(url, wait_until="networkidle", timeout=60_000)
    page.locator('#live [data-role="mode"]').select_option("ptt")
    page.locator('#live [data-role="start"]').click()
    talk = page.locator('#live [data-role="talk"]')
    sync_api.expect(talk).to_be_enabled(timeout=20_000)
    page.wait_for_function("document.querySelector('#live video').videoWidth > 0")
    talk.hover()
    page.mouse.down()
    page.wait_for_timeout(1500)
    page.mouse.up()
    sync_api.expect(page.locator("#live .live-assistant").first).to_contain_text("I see", timeout=20_000)
    page.wait_for_timeout(300)  # part of the reply's sound has played
    page.mouse.down()  # talk over the reply
    page.wait_for_timeout(200)
    state = page.evaluate("[...document.querySelectorAll('#live *')].find(e => e.liveState).liveState()")
    assert state["playing"] == 0, "the reply's speech kept playing after the user spoke"
    page.mouse.up()
    page.locator('#live [data-role="stop"]').click()
    got = engine.got.events[before:]
    kinds = [e["type"] for e in got]
    assert kinds.count("input_audio_buffer.commit") >= 1 and "response.create" in kinds
    assert got[0]["session"]["audio"]["input"]["turn_detection"] is None  # push-to-talk: the page commits
    truncate = next(e for e in got if e["type"] == "conversation.item.truncate")
    assert truncate["item_id"].startswith("item_reply") and truncate["content_index"] == 0
    assert 0 < truncate["audio_end_ms"] <= 8 * 120 + 50  # what was heard of the 0.96 s reply
    # the fake engine had sent the whole reply (response.done) before the user spoke: nothing to cancel
    assert "response.cancel" not in kinds


def test_barge_in_from_the_server_stops_the_speech_at_once_and_ignores_stale_audio(live_page, browser):
    url, engine = live_page
    before = len(engine.got.events)
    engine.barge_in_after = 3  # speech_started arrives after three words of the spoken reply
    try:
        page = browser
        page.goto(url, wait_until="networkidle", timeout=60_000)
        page.locator('#live [data-role="start"]').click()
        reply = page.locator("#live .live-assistant").first
        sync_api.expect(reply).to_have_class("live-turn live-assistant live-interrupted", timeout=30_000)
        state = page.evaluate("[...document.querySelectorAll('#live *')].find(e => e.liveState).liveState()")
        assert state["playing"] == 0, "stale audio after the barge-in was played"
        assert reply.inner_text().startswith("I see a") and "table" not in reply.inner_text()
        keep_screenshot(page, "live-barge-in-phone")
        page.locator('#live [data-role="stop"]').click()
    finally:
        engine.barge_in_after = None
    got = engine.got.events[before:]
    truncate = next(e for e in got if e["type"] == "conversation.item.truncate")
    assert 0 < truncate["audio_end_ms"] <= 3 * 120 + 50  # only the three words were heard
    assert "response.cancel" not in [e["type"] for e in got]  # hands-free: the server cancels by itself


def test_a_call_by_keyboard_alone_and_a_reload_during_it(live_page, browser):
    """Start pressed with Enter disabled itself and dropped the keyboard focus to the page's top (Stop: the same once
    pressed); a reload during a call ended it without a word and forgot the settings chosen (push-to-talk back to
    hands-free). The focus goes on from Start to Stop and back; the space bar talks; the page that comes back from a
    reload says the call ended there and keeps the settings. A pasted text over the limit is refused, not cut."""
    url, engine = live_page
    page = browser
    page.goto(url, wait_until="networkidle", timeout=60_000)
    mode, start, stop = (page.locator(f'#live [data-role="{role}"]') for role in ("mode", "start", "stop"))
    status = page.locator('#live [data-role="status"]')
    mode.focus()
    page.keyboard.press("ArrowDown")  # push-to-talk
    assert mode.input_value() == "ptt"
    start.focus()
    page.keyboard.press("Enter")
    sync_api.expect(stop).to_be_focused(timeout=20_000)
    sync_api.expect(page.locator('#live [data-role="talk"]')).to_be_enabled(timeout=20_000)
    page.keyboard.down("Space")  # (on the focused Stop: it talks, it does not press Stop)
    page.wait_for_timeout(1200)
    page.keyboard.up("Space")
    sync_api.expect(page.locator("#live .live-assistant").last).to_have_text(REPLY, timeout=20_000)
    # a pasted text of 100 000 characters was cut to 4 000 by the box without a word: it is kept whole and refused
    text, typed = page.locator('#live [data-role="text"]'), engine.got.types().count("conversation.item.create")
    text.fill("x" * 100_000)
    text.press("Enter")
    sync_api.expect(status).to_contain_text("100,000 characters long: at most 4,000")
    assert len(text.input_value()) == 100_000 and engine.got.types().count("conversation.item.create") == typed
    stop.focus()
    page.keyboard.press("Enter")  # Stop
    sync_api.expect(status).to_have_text("Stopped.")
    sync_api.expect(start).to_be_focused()
    page.keyboard.press("Enter")
    sync_api.expect(page.locator('#live [data-role="talk"]')).to_be_enabled(timeout=20_000)
    closed = engine.got.closed
    page.reload(wait_until="networkidle", timeout=60_000)
    assert engine.wait_closed(closed + 1), "the engine session stayed open after the reload"
    sync_api.expect(status).to_contain_text("The call ended when the page was reloaded")
    assert mode.input_value() == "ptt"


def test_a_denied_microphone_makes_a_typed_call_and_a_blocked_camera_is_said_in_the_page(live_page, new_context):
    url, engine = live_page
    flags = [a for a in MEDIA_ARGS if a != "--use-fake-ui-for-media-stream"]  # real permission checks
    page = new_context(*flags, permissions=[], viewport=PHONE).new_page()  # the user said no to everything
    page.goto(url, wait_until="networkidle", timeout=60_000)
    page.locator('#live [data-role="start"]').click()
    # the call goes on typed (it used to end with "Permission denied": no call without a microphone)
    error = page.locator('#live [data-role="error"]')
    sync_api.expect(error).to_contain_text("microphone is blocked", timeout=20_000)
    sync_api.expect(error).to_contain_text("type your messages")
    sync_api.expect(page.locator('#live [data-role="status"]')).to_contain_text("Type a message")
    assert page.locator('#live [data-role="talk"]').is_disabled()
    page.locator('#live [data-role="text"]').fill("what do you see?")
    page.locator('#live [data-role="text"]').press("Enter")
    sync_api.expect(page.locator("#live .live-user").last).to_have_text("You: what do you see?")
    sync_api.expect(page.locator("#live .live-assistant").last).to_have_text(REPLY, timeout=20_000)
    assert page.locator('#live [data-role="text"]').input_value() == ""
    asked = sum(e["type"] == "response.create" for e in engine.got.events)
    for text in ("and now?", "and then?"):  # the second while the first is answered: asked after it
        page.locator('#live [data-role="text"]').fill(text)
        page.locator('#live [data-role="text"]').press("Enter")
    sync_api.expect(page.locator("#live .live-assistant")).to_have_count(3, timeout=20_000)
    sync_api.expect(page.locator("#live .live-assistant").last).to_have_text(REPLY, timeout=20_000)
    assert sum(e["type"] == "response.create" for e in engine.got.events) == asked + 2
    assert page.locator('#live [data-role="error"]').text_content().count("active response") == 0
    typed = [e["item"]["content"] for e in engine.got.events if e["type"] == "conversation.item.create"]
    assert typed[-3:] == [[{"type": "input_text", "text": t}] for t in ("what do you see?", "and now?",
                                                                          "and then?")]
    update = [e for e in engine.got.events if e["type"] == "session.update"][-1]["session"]
    assert update["audio"]["input"]["turn_detection"] is None  # no microphone: nothing to detect
    page.locator('#live [data-role="stop"]').click()
    sync_api.expect(page.locator('#live [data-role="text"]')).to_be_disabled()
    # stopped: why the microphone was not used still said, "You can still type" (no longer true) gone
    sync_api.expect(page.locator('#live [data-role="error"]')).not_to_contain_text("type your messages")
    sync_api.expect(page.locator('#live [data-role="error"]')).to_contain_text("microphone is blocked")
    frames = len(engine.got.frames)
    page = new_context(*flags, permissions=["microphone"], viewport=PHONE).new_page()  # the camera is blocked
    page.goto(url, wait_until="networkidle", timeout=60_000)
    page.locator('#live [data-role="start"]').click()
    sync_api.expect(page.locator('#live [data-role="status"]')).to_contain_text("Listening", timeout=20_000)
    sync_api.expect(page.locator('#live [data-role="error"]')).to_contain_text("camera is blocked")
    assert page.locator('#live [data-role="preview"]').is_hidden()  # no black box where the camera was
    page.wait_for_timeout(1200)
    assert len(engine.got.frames) == frames  # sound only
    page.locator('#live [data-role="stop"]').click()


def test_a_page_built_without_speech_asks_the_studio_and_offers_the_saved_voices(browser):
    """The tab was built once, when the studio started: an engine that was down then (or voices saved since)
    left Live text-only with only "default voice" for good. The page asks the studio at load, at Start and when the
    studio's banner sees the engine change (it asked at load and Start only: the note stayed until then). The voice
    chosen is kept across a reload (it went back to the default voice: the list arrives after the page loads)."""
    from app.ui.live import follow_engine_js

    now = {"speech_output": False, "voices": []}

    def live_settings(_data=None) -> dict:
        return dict(now)
    with FakeEngine(speak=True) as engine, served_live_tab(engine.url, engine.token, speech_output=False,
                                                            settings=live_settings) as url:
        page = browser
        page.goto(url, wait_until="networkidle", timeout=60_000)
        sync_api.expect(page.locator('#live [data-role="text-only"]')).to_be_visible()
        now.update(speech_output=True, voices=["anna"])  # the engine came back; a voice was saved
        page.evaluate(follow_engine_js())  # what the studio's page runs when its banner sees the engine change
        voice = page.locator('#live [data-role="voice"]')
        sync_api.expect(voice.locator("option")).to_have_text(["default voice", "anna"], timeout=10_000)
        assert page.locator('#live [data-role="text-only"]').is_hidden()
        now.update(voices=["anna", "ben"])  # a page load asks too
        page.reload(wait_until="networkidle", timeout=60_000)
        sync_api.expect(voice.locator("option")).to_have_text(["default voice", "anna", "ben"], timeout=10_000)
        page.locator("#live details.live-settings summary").click()
        voice.select_option("anna")
        page.locator('#live [data-role="start"]').click()
        sync_api.expect(page.locator('#live [data-role="status"]')).to_contain_text("Listening", timeout=20_000)
        update = next(e for e in engine.got.events if e["type"] == "session.update")["session"]
        assert update["output_modalities"] == ["audio"] and update["audio"]["output"]["voice"] == "anna"
        assert update["audio"]["output"]["format"]["type"] == "audio/pcm"  # at the page's own rate (see above)
        page.locator('#live [data-role="stop"]').click()
        page.reload(wait_until="networkidle", timeout=60_000)  # the voice chosen is kept, as the other settings
        sync_api.expect(voice).to_have_value("anna", timeout=10_000)


# --------------------------------------------------------------------------- against a real engine server


@pytest.fixture(scope="module")
def live_page_real_engine(tiny_engine):
    """(url, engine server, speech): the Live tab relayed to a real engine server around the tiny
    engine, with spoken replies when the engine speaks in chat (else text); short answers keep the
    test light."""
    pytest.importorskip("silero_vad")
    from tests.server import running_server
    from tests.server.live import speaks

    speech = speaks(tiny_engine)
    with running_server(tiny_engine, default_max_tokens=24) as srv, \
            served_live_tab(srv.url, None, speech_output=speech) as url:
        yield url, srv, speech


def test_hands_free_against_the_real_engine_hears_the_question_sees_frames_and_replies(live_page_real_engine,
                                                                                      browser):
    """The fake microphone plays our spoken question (1 s silence, the question, 3 s silence, looped):
    the engine's own turn detection hears it, commits it with the camera frames, and the page
    shows the user's turn and the model's reply as it streams."""
    from tests.server import wait_for

    url, srv, speech = live_page_real_engine
    page = browser
    page.goto(url, wait_until="networkidle", timeout=60_000)
    page.locator('#live [data-role="start"]').click()
    user = page.locator("#live .live-user").first
    sync_api.expect(user).to_contain_text("camera frame", timeout=30_000)  # the turn holds the video window
    sync_api.expect(user).to_contain_text("s of speech")
    reply = page.locator("#live .live-assistant").first
    sync_api.expect(reply).not_to_have_text("", timeout=30_000)
    latency = page.locator('#live [data-role="latency"]')
    sync_api.expect(latency).to_contain_text(re.compile(r"first text \d+ ms"))
    if speech:  # the reply is spoken too, in the engine's default voice
        sync_api.expect(latency).to_contain_text(re.compile(r"first audio \d+ ms"), timeout=30_000)
    assert page.locator('#live [data-role="error"]').is_hidden()
    sid = next(iter(srv.ctx.sessions.open))
    session = srv.ctx.sessions.open[sid]
    wait_for(lambda: len(session.items) >= 2, 30)
    user_item = session.items[0]
    assert [p["type"] for p in user_item.public] == ["input_video", "input_audio"]
    speech_s = user_item.public[1]["seconds"]
    assert 1.5 <= speech_s <= 3.5, speech_s  # the 1.6 s question with its padding, not the silence around it
    if speech:  # spoken replies come at the page's audio rate (Chromium's 44.1 or 48 kHz), not at 24 kHz
        assert session.settings.output_rate in (44100, 48000), session.settings.output_rate
    shot = keep_screenshot(page, "live-real-engine-phone")
    assert shot.stat().st_size > 10_000
    text = reply.inner_text()
    page.locator('#live [data-role="stop"]').click()
    wait_for(lambda: sid not in srv.ctx.sessions.open)
    wait_for(lambda: srv.ctx.scheduler.running == 0 and srv.ctx.scheduler.waiting == 0)
    print(f"\n[live tab, real engine] user turn: {user_item.public}; reply shown: {text!r}; "
          f"{latency.inner_text()}; screenshot: {shot}")


# a few quick tries to reconnect (the studio's: 5 over about 23 s)
QUICK_RECONNECT = dict(reconnect_tries=2, reconnect_first_wait_ms=300, reconnect_max_wait_ms=600)


def test_an_engine_that_goes_down_mid_call_is_said_with_what_to_do(browser):
    """The engine stopped mid-call (a restart: close code 1012): the tab said only "the engine closed the live session
    (code 1012)". Once its tries to reconnect fail, it says what to do: press Start again once the engine is back; a
    Start while it is still down says it cannot be reached (it said "The engine refused this call's settings: cannot
    reach the engine ...")."""
    from app.ui.live import LiveDefaults

    with FakeEngine(speak=True) as engine, served_live_tab(engine.url, engine.token, speech_output=True,
                                                            defaults=LiveDefaults(**QUICK_RECONNECT)) as url:
        page = browser
        page.goto(url, wait_until="networkidle", timeout=60_000)
        page.locator('#live [data-role="start"]').click()
        sync_api.expect(page.locator('#live [data-role="status"]')).to_contain_text("Listening", timeout=20_000)
        engine.server.shutdown(code=1012)  # as uvicorn closes sessions when the engine server restarts
        error = page.locator('#live [data-role="error"]')
        sync_api.expect(error).to_contain_text("Press Start to call again once", timeout=20_000)
        sync_api.expect(error).to_contain_text("2 tries to reconnect failed")
        sync_api.expect(page.locator('#live [data-role="start"]')).to_be_enabled()
        sync_api.expect(page.locator('#live [data-role="status"]')).to_have_text("Stopped.")
        page.locator('#live [data-role="start"]').click()  # still down: it said "The engine refused this call's
        sync_api.expect(error).to_contain_text("cannot reach the engine", timeout=20_000)  # settings: cannot reach"
        sync_api.expect(error).to_contain_text("Press Start to call again once")
        assert "refused this call's settings" not in error.inner_text()


def test_a_dropped_call_reconnects_by_itself_saying_so_and_stop_ends_the_tries(browser):
    """A call whose connection dropped (the engine restarted, a proxy closed an idle socket) ended for good, the user
    left to notice and press Start. The page reconnects by itself, saying which try it is at, with the same settings
    and the microphone still open; the text typed meanwhile is kept; Stop during the tries ends them."""
    from app.ui.live import LiveDefaults

    with FakeEngine(speak=True) as first, FakeEngine(speak=True) as second:
        engine = {"now": first}
        with served_live_tab(lambda: engine["now"].url, first.token, speech_output=True,
                             defaults=LiveDefaults(**QUICK_RECONNECT)) as url:
            page = browser
            page.goto(url, wait_until="networkidle", timeout=60_000)
            page.locator('#live [data-role="start"]').click()
            status = page.locator('#live [data-role="status"]')
            sync_api.expect(status).to_contain_text("Listening", timeout=20_000)
            page.locator('#live [data-role="text"]').fill("half a sentence")
            first.server.shutdown(code=1012)  # the engine restarts: the first try finds it down
            sync_api.expect(status).to_contain_text(re.compile(r"reconnecting… (1st|2nd) try"), timeout=10_000)
            engine["now"] = second  # back (at another address, as the proxy's function says)
            sync_api.expect(status).to_contain_text("Listening", timeout=10_000)
            sync_api.expect(page.locator("#live .live-note.live-turn")).to_contain_text("Reconnected")
            assert page.locator('#live [data-role="error"]').is_hidden()
            assert page.locator('#live [data-role="text"]').input_value() == "half a sentence"
            update = next(e for e in second.got.events if e["type"] == "session.update")["session"]
            assert update["audio"]["input"]["turn_detection"]["type"] == "server_vad"  # the call's own settings
            heard = second.got.audio_seconds
            page.wait_for_timeout(400)
            assert second.got.audio_seconds > heard  # the microphone streams to the new connection
            second.server.shutdown(code=1012)
            sync_api.expect(status).to_contain_text("reconnecting…", timeout=10_000)
            page.locator('#live [data-role="stop"]').click()  # the user's Stop ends the tries
            sync_api.expect(status).to_have_text("Stopped.")
            page.wait_for_timeout(2 * QUICK_RECONNECT["reconnect_max_wait_ms"])  # longer than any wait left
            sync_api.expect(status).to_have_text("Stopped.")
            assert page.locator('#live [data-role="error"]').is_hidden()


# a camera that opens but never delivers a frame (a canvas track nothing is drawn on), with the fake microphone
SILENT_CAMERA = """
const open = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = async (wanted) => {
  const stream = await open({ audio: wanted.audio });
  if (wanted.video) {
    const canvas = document.createElement("canvas");
    canvas.width = 640; canvas.height = 480;
    stream.addTrack(canvas.captureStream(0).getVideoTracks()[0]);
  }
  return stream;
};
"""


def test_a_camera_that_sends_no_picture_is_said_and_the_call_goes_on_with_sound(live_page, browser):
    """A camera that opened but delivered no frame left an empty preview and sent nothing, without a word. The page
    says so after a few seconds, hides the preview, and the call goes on with the microphone."""
    url, engine = live_page
    frames = len(engine.got.frames)
    page = browser
    page.add_init_script(SILENT_CAMERA)
    page.goto(url, wait_until="networkidle", timeout=60_000)
    page.locator('#live [data-role="start"]').click()
    error = page.locator('#live [data-role="error"]')
    sync_api.expect(error).to_contain_text("The camera sends no picture", timeout=15_000)
    sync_api.expect(error).to_contain_text("going on with sound only")
    assert page.locator('#live [data-role="preview"]').is_hidden()
    sync_api.expect(page.locator('#live [data-role="status"]')).to_contain_text("Listening")
    heard = engine.got.audio_seconds
    page.wait_for_timeout(1500)
    assert engine.got.audio_seconds >= heard + 1.0  # the microphone still streams to the engine
    assert len(engine.got.frames) == frames  # no frame was ever sent
    page.locator('#live [data-role="stop"]').click()


def test_settings_the_engine_refuses_end_the_start_with_its_message_not_a_spinner(live_page, browser):
    """The engine refused the page's session.update (an engine without silero-vad: turn_detection_unavailable): the
    page showed the message but stayed on "Connecting…" with Start and Stop both disabled, for good. It stops the
    call with the engine's message; Start works again and no engine session is left open."""
    url, engine = live_page
    closed = engine.got.closed
    engine.session_refusal = {"type": "server_error", "code": "turn_detection_unavailable", "param": None,
                              "message": "server-side turn detection needs the silero-vad package"}
    try:
        page = browser
        page.goto(url, wait_until="networkidle", timeout=60_000)
        page.locator('#live [data-role="start"]').click()
        error = page.locator('#live [data-role="error"]')
        sync_api.expect(error).to_contain_text("refused this call's settings: server-side turn detection needs the "
                                               "silero-vad package", timeout=20_000)
        sync_api.expect(page.locator('#live [data-role="status"]')).to_have_text("Stopped.")
        sync_api.expect(page.locator('#live [data-role="start"]')).to_be_enabled()
        assert engine.wait_closed(closed + 1), "the engine session stayed open"
    finally:
        engine.session_refusal = None


# the wait for the engine's answer to a call's settings (the studio's: 15 s)
QUICK_READY_WAIT_MS = 5000


def test_an_engine_that_never_answers_the_start_can_be_stopped_and_times_out(browser):
    """An engine that accepted the call but never answered its settings left the page on "Connecting…" with Start and
    Stop disabled, for good. Stop works at once, and the page gives up by itself after its wait, saying why."""
    from app.ui.live import LiveDefaults

    quick = LiveDefaults(ready_wait_ms=QUICK_READY_WAIT_MS)
    with FakeEngine(speak=True) as engine, served_live_tab(engine.url, engine.token, speech_output=True,
                                                            defaults=quick) as url:
        engine.hung = True
        page = browser
        page.goto(url, wait_until="networkidle", timeout=60_000)
        page.locator('#live [data-role="start"]').click()
        status = page.locator('#live [data-role="status"]')
        sync_api.expect(status).to_have_text("Connecting…", timeout=20_000)
        page.locator('#live [data-role="stop"]').click()  # given up by the user
        sync_api.expect(status).to_have_text("Stopped.")
        assert engine.wait_closed(1), "the engine session stayed open"
        page.locator('#live [data-role="start"]').click()  # and left to time out
        sync_api.expect(page.locator('#live [data-role="error"]')).to_contain_text(
            f"did not answer within {QUICK_READY_WAIT_MS // 1000} s", timeout=25_000)
        sync_api.expect(status).to_have_text("Stopped.")
        sync_api.expect(page.locator('#live [data-role="start"]')).to_be_enabled()
        assert engine.wait_closed(2), "the engine session stayed open"


def test_a_ready_wait_that_could_not_work_is_refused_when_the_tab_is_built():
    """No wait for the engine's answer would end every call at once: refused naming the setting."""
    from app.ui.live import LiveDefaults, build_live_tab

    with pytest.raises(ValueError, match="ready_wait_ms > 0, got 0"):
        build_live_tab(defaults=LiveDefaults(ready_wait_ms=0))


@pytest.mark.parametrize("bad", [dict(reconnect_tries=-1), dict(reconnect_first_wait_ms=0),
                                 dict(reconnect_first_wait_ms=9000, reconnect_max_wait_ms=8000)])
def test_reconnect_settings_that_could_not_work_are_refused_when_the_tab_is_built(bad):
    """A negative number of tries, no wait (a page hammering a down engine) or a first wait over the longest are
    refused naming the settings, not left to a page that would misbehave."""
    from app.ui.live import LiveDefaults, build_live_tab

    with pytest.raises(ValueError, match="reconnect_tries >= 0 and 0 < reconnect_first_wait_ms <= reconnect_max_wait"):
        build_live_tab(defaults=LiveDefaults(**bad))


def test_a_call_the_engine_ends_as_idle_ends_saying_why_and_does_not_reconnect(live_page, browser):
    """The engine ends a realtime session in which nothing was said, typed or shown for its idle limit
    (session_idle_timeout, then a normal close): the page reconnected, holding a new session for a call nobody was in
    (a tab left open), every idle limit for good. The call ends, saying why; Start calls again."""
    url, engine = live_page
    connections = len(engine.got.headers)
    engine.idle_close = True
    try:
        page = browser
        page.goto(url, wait_until="networkidle", timeout=60_000)
        page.locator('#live [data-role="start"]').click()
        error = page.locator('#live [data-role="error"]')
        sync_api.expect(error).to_contain_text("nothing was said, typed or shown", timeout=20_000)
        sync_api.expect(error).to_contain_text("Press Start to call again")
        sync_api.expect(page.locator('#live [data-role="status"]')).to_have_text("Stopped.")
        sync_api.expect(page.locator('#live [data-role="start"]')).to_be_enabled()
        page.wait_for_timeout(1500)  # longer than the first reconnect wait of a dropped call
        assert len(engine.got.headers) == connections + 1, "the page reconnected to the engine"
    finally:
        engine.idle_close = False
