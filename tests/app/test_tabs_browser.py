"""Every tab's main path in a real browser (Debian's chromium, fake camera and microphone) against the
studio serving the tiny engine: Speech transcribes an example clip, Voice speaks a sentence and
offers the WAV, Image generates a picture and segments one, all at a phone-sized and a desktop
width. Screenshots are kept in $STUDIO_ARTIFACTS (default: test-artifacts/ in the repo, git-ignored)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from app.ui.image import REQUEST_KEY, STORED_RESULTS
from tests.app.browser import keep_screenshot, set_number, set_slider
from tests.app.media_files import video_file
from tests.app.test_browser import sync_api
from tests.paths import REPO

ASSETS = REPO / "app" / "assets"
MEDIA_ARGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
              f"--use-file-for-fake-audio-capture={ASSETS / 'fake_capture' / 'mic.wav'}"]
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 1000}


def assert_download_names_whole(page, *elem_ids: str) -> None:
    """Each download of the File outputs `elem_ids` shows its whole name (Gradio kept the size column at 8 rem and cut
    the name: the Speech tab's .txt and .srt read ".t" and ".s" on a phone)."""
    for elem_id in elem_ids:
        name = page.locator(f"#{elem_id} td.filename").first
        shown = name.evaluate("e => Array.from(e.querySelectorAll('span')).every(s => s.scrollWidth <= s.clientWidth + 1)"
                              " && e.scrollWidth <= e.clientWidth + 1")
        assert shown, (elem_id, name.get_attribute("aria-label"), name.bounding_box())


def assert_downloads_png(page, elem_id: str, stem: str) -> None:
    """The download button of the picture `#elem_id` gives a lossless PNG named `stem`<date-time>.png."""
    with page.expect_download() as download:
        page.locator(f"#{elem_id} a[download]").first.click()
    name = download.value.suggested_filename
    assert name.startswith(stem) and name.endswith(".png"), name
    assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.fixture(scope="module")
def browser(chromium):
    return chromium(*MEDIA_ARGS)


def open_tab(browser, studio, name: str, viewport: dict):
    context = browser.new_context(viewport=viewport, permissions=["camera", "microphone"])
    page = context.new_page()
    page.goto(studio, wait_until="load", timeout=60_000)
    sync_api.expect(page.locator("#model-banner")).to_contain_text("RANDOM DEMO WEIGHTS", timeout=30_000)
    page.get_by_role("tab", name=name).click()
    return page


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_speech_tab_transcribes_an_uploaded_clip(browser, studio, viewport):
    page = open_tab(browser, studio, "Speech", viewport)
    page.locator("#speech-clip input[type=file]").set_input_files(str(ASSETS / "speech" / "what_do_you_see_en.wav"))
    page.locator("#speech-go").click()
    sync_api.expect(page.locator("#speech-figures")).to_contain_text("finish reason", timeout=60_000)
    assert page.locator("#speech-transcript textarea").input_value().strip()
    assert_download_names_whole(page, "speech-txt", "speech-srt")
    print(f"\n[Speech tab, {viewport['width']} px] {page.locator('#speech-figures').inner_text()}")
    assert keep_screenshot(page, f"speech-{'phone' if viewport is PHONE else 'desktop'}").stat().st_size > 10_000
    page.context.close()


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_voice_tab_speaks_and_offers_the_wav(browser, studio, viewport):
    page = open_tab(browser, studio, "Voice", viewport)
    page.locator("#voice-text textarea").fill("Hello from the voice tab.")
    page.locator("#voice-go").click()
    sync_api.expect(page.locator("#voice-figures")).to_contain_text("real-time factor", timeout=60_000)
    sync_api.expect(page.locator("#voice-wav")).to_contain_text(".wav", timeout=30_000)
    assert_download_names_whole(page, "voice-wav")
    # the take is kept in the list of every take (Make it again replaced the only download: the earlier take was gone)
    sync_api.expect(page.locator("#voice-takes")).to_contain_text(".wav", timeout=15_000)
    # one download, named for what was made: the player's own gave the stream as 'audio-stream.mp3'
    assert page.locator("#voice-player a[download], #voice-player button[aria-label='Download']").count() == 0
    print(f"\n[Voice tab, {viewport['width']} px] {page.locator('#voice-figures').inner_text()}")
    keep_screenshot(page, f"voice-{'phone' if viewport is PHONE else 'desktop'}")
    page.context.close()


def test_image_tab_generates_then_segments(browser, studio):
    page = open_tab(browser, studio, "Image", DESKTOP)
    page.locator("#image-prompt textarea").fill('A red cup on a table, a sign saying "OPEN"')
    # the seed box starts at -1 = random (a Number box drew "empty" as 0, which then went out as seed 0)
    assert page.locator("#image-seed input").input_value() == "-1"
    set_slider(page, "image-steps", 8)  # a preview at step 5 (the default: every 5 steps)
    set_number(page, "#image-seed input", 7)
    page.locator("#image-go").click()
    sync_api.expect(page.locator("#image-figures")).to_contain_text("seed 7", timeout=60_000)
    sync_api.expect(page.locator("#image-figures")).to_contain_text("time to first preview")
    print(f"\n[Image tab, generate] {page.locator('#image-figures').inner_text()}")
    sync_api.expect(page.locator("#image-gallery img").first).to_be_visible(timeout=30_000)
    keep_screenshot(page, "image-generate-desktop")
    # the Result's own download is the PNG made, named for the task and seed (it gave 'image.webp', a lossy WebP)
    assert_downloads_png(page, "image-result", "generate-seed7-")

    page.get_by_role("radio", name="Segment").check()
    page.locator("#image-refs input[type=file]").set_input_files(str(ASSETS / "images" / "cup.png"))
    page.locator("#image-target textarea").fill("the cup")
    page.locator("#image-go").click()
    sync_api.expect(page.locator("#image-figures")).to_contain_text("finish reason", timeout=60_000)
    sync_api.expect(page.locator("#image-mask img")).to_be_visible(timeout=30_000)
    sync_api.expect(page.locator("#image-files")).to_contain_text("overlay", timeout=30_000)
    print(f"\n[Image tab, segment] {page.locator('#image-figures').inner_text()}")
    assert_downloads_png(page, "image-mask", "segment-seed7-mask-")  # a lossy WebP gave the mask grey edges
    assert_downloads_png(page, "image-overlay", "segment-seed7-overlay-")
    # each picture shown is named for screen readers (Gradio's button around it, with no alt text, said only "button")
    assert not page.evaluate(UNNAMED_CONTROLS), page.evaluate(UNNAMED_CONTROLS)
    keep_screenshot(page, "image-segment-desktop")

    # a page reload emptied the gallery: both results come back, and still give their settings back
    page.wait_for_function(f"() => JSON.parse({STORED_RESULTS}).length === 2")  # (kept once each image is made)
    page.reload(wait_until="load")
    page.get_by_role("tab", name="Image").click()
    thumbnails = page.locator("#image-gallery .thumbnail-item img, #image-gallery .grid-wrap img")
    sync_api.expect(thumbnails).to_have_count(2, timeout=30_000)
    # the Segment reopened brings back its target and the picture it was made from (the reload emptied the box)
    thumbnails.nth(1).click()
    sync_api.expect(page.locator("#image-target textarea")).to_have_value("the cup")
    sync_api.expect(page.locator("#image-refs")).to_contain_text(re.compile(r"cup\s*\.png"), timeout=10_000)
    thumbnails.first.click()
    sync_api.expect(page.locator("#image-prompt textarea")).to_have_value('A red cup on a table, a sign saying "OPEN"')
    page.context.close()


def test_deleting_a_saved_voice_asks_first_in_the_browser(browser, studio, engine_server):
    """The walk lost a saved voice at one press of Delete: the tab asks, and only "Yes, delete it" deletes."""
    from engine.client import EngineClient
    from tests.server import tone_pcm16, wav_bytes

    with EngineClient(engine_server.url, token="test-token") as client:
        client.save_voice("walk voice", wav_bytes(tone_pcm16(1.5, 22050, 220.0), 22050), "hello there", replace=True)
    page = open_tab(browser, studio, "Voice", DESKTOP)
    page.get_by_role("button", name="Clone from a clip / save a voice").click()
    saved = page.locator("#voice-saved input")
    saved.click()
    page.get_by_role("option", name="walk voice", exact=True).click()
    status, confirm = page.locator("#voice-figures"), page.locator("#voice-confirm-delete")
    for answer, after in (("#voice-delete-no", "Kept the voice 'walk voice'."),
                          ("#voice-delete-yes", "Deleted the voice 'walk voice'.")):
        page.locator("#voice-delete").click()
        sync_api.expect(status).to_contain_text("Delete the saved voice 'walk voice'?", timeout=15_000)
        sync_api.expect(confirm).to_be_visible()
        page.locator(answer).click()
        sync_api.expect(status).to_contain_text(after, timeout=15_000)
        sync_api.expect(confirm).to_be_hidden()
    with EngineClient(engine_server.url, token="test-token") as client:
        assert "walk voice" not in [v["name"] for v in client.voices()]
    page.context.close()


def test_chat_tab_on_a_phone(browser, studio):
    """Enter in the empty box says so and asks nothing of the engine (it queued a reply with nothing to answer, and
    the page logged an aborted queue/data request); a message then gets its reply, and one sent while it streams cuts it
    and gets its own."""
    page = open_tab(browser, studio, "Chat", PHONE)
    box = page.locator("#chat-input textarea")
    queued = []
    page.on("request", lambda r: queued.append(r.url) if "/queue/join" in r.url else None)
    box.press("Enter")
    sync_api.expect(page.locator("#chat-figures")).to_contain_text("Type a message or attach a file first")
    page.wait_for_timeout(300)
    assert not queued, queued
    box.fill("Hi from a phone")
    box.press("Enter")
    history = page.locator("#chat-history")
    page.wait_for_function("() => document.querySelector('#chat-history').innerText.length > 200", timeout=30_000)
    box.fill("And a second one")  # sent while the first reply streams: it cuts that reply and gets its own
    box.press("Enter")
    sync_api.expect(page.locator("#chat-figures")).to_contain_text("finish reason", timeout=60_000)
    sync_api.expect(history).to_contain_text("And a second one")
    sync_api.expect(history).to_contain_text("stopped: the reply was cut here")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, f"the page scrolls sideways on a phone ({width} px wide)"
    print(f"\n[Chat tab, phone] {page.locator('#chat-figures').inner_text()}")
    keep_screenshot(page, "chat-phone")
    page.context.close()


def test_stop_with_nothing_running_says_so_in_every_tab(browser, studio):
    """Stop pressed while nothing is being made shows "Nothing is being …" (an unqueued event dropped that
    gr.Info: the press showed nothing at all)."""
    page = open_tab(browser, studio, "Chat", DESKTOP)
    for tab, stop in (("Chat", "#chat-stop"), ("Speech", "#speech-stop"), ("Voice", "#voice-stop"),
                      ("Image", "#image-stop")):
        page.get_by_role("tab", name=tab).click()
        page.locator(stop).click()
        toast = page.locator(".toast-body").last
        sync_api.expect(toast).to_contain_text("Nothing is being", timeout=15_000)
        page.locator(".toast-close").last.click()  # the next tab's toast is then the only one
        sync_api.expect(page.locator(".toast-body")).to_have_count(0, timeout=10_000)
    page.context.close()


def test_image_previews_are_not_hidden_by_the_progress_bar(browser, studio):
    """The progress bar lay over the result image (Gradio puts it on every output), so the previews the result
    is labelled with were never seen; it is shown on the status line."""
    page = open_tab(browser, studio, "Image", DESKTOP)
    page.locator("#image-prompt textarea").fill("a red cup")
    page.get_by_label("or exact size (WxH)").fill("1024x1024")  # slow enough to look at it while it is made
    set_slider(page, "image-steps", 50)
    page.locator("#image-go").click()
    status, bars_on_result = page.locator("#image-figures"), []
    while "finish reason" not in (text := status.inner_text()) and len(bars_on_result) < 400:
        if "Generating" in text and page.locator("#image-result img").count():  # a preview is in the result:
            bars_on_result.append(page.locator("#image-result .progress-text").count())  # with no bar over it
        page.wait_for_timeout(20)
    sync_api.expect(status).to_contain_text("finish reason", timeout=60_000)
    assert bars_on_result, "no preview was seen while the image was made"
    assert not any(bars_on_result), bars_on_result
    page.context.close()


# Each form control's accessible name, as a screen reader finds it: aria-label, aria-labelledby, a <label> (around
# it or for it), a button's text; a placeholder is not a name (it goes once something is typed).
UNNAMED_CONTROLS = r"""() => Array.from(document.querySelectorAll(
    'input:not([type=hidden]):not([type=file]), textarea, select, button, [role=slider], [role=combobox]'))
  .filter(el => el.getClientRects().length && getComputedStyle(el).visibility !== 'hidden')
  .filter(el => {
    const by = (el.getAttribute('aria-labelledby') || '').split(' ').filter(Boolean)
      .map(id => (document.getElementById(id) || {}).textContent || '').join('');
    const name = (el.getAttribute('aria-label') || '') + by + Array.from(el.labels || []).map(l => l.textContent).join('')
      + (el.tagName === 'BUTTON' ? el.textContent + (el.title || '') : '');
    return !name.trim();
  })
  .map(el => `${el.tagName.toLowerCase()} in #${(el.closest('[id]') || {}).id} (placeholder ${JSON.stringify(el.placeholder || '')})`)"""


def test_every_control_of_every_tab_has_a_name(browser, studio):
    """The Chat message box was named only by its placeholder (no label), and the spoken example's button by
    nothing (an example of a recording and no text): a screen reader announced "edit text" and "button"."""
    page = open_tab(browser, studio, "Chat", DESKTOP)
    sync_api.expect(page.get_by_role("textbox", name="Message", exact=True)).to_be_visible(timeout=15_000)
    unnamed = {}
    for tab in ("Chat", "Live", "Speech", "Voice", "Image"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(500)
        for closed in page.locator(".label-wrap:not(.open)").all():  # the accordions' options too
            if closed.is_visible():
                closed.click()
        page.wait_for_timeout(300)
        if found := page.evaluate(UNNAMED_CONTROLS):
            unnamed[tab] = found
    assert not unnamed, unnamed
    page.context.close()


def test_a_player_with_nothing_to_play_stays_empty(browser, studio):
    """A text-only chat reply and Voice's "Type the text to speak first" left their streaming players showing a
    pause button at 0:00 / 0:00 with a download of nothing, and the browser logged "HLS error ... No Segments
    found in Playlist" (a None sent to a streaming gr.Audio opens an empty stream)."""
    page = open_tab(browser, studio, "Chat", DESKTOP)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.locator("#chat-input textarea").fill("Text only, please")
    page.locator("#chat-input textarea").press("Enter")
    sync_api.expect(page.locator("#chat-figures")).to_contain_text("finish reason", timeout=60_000)
    page.get_by_role("tab", name="Voice").click()
    page.locator("#voice-go").click()  # no text typed
    sync_api.expect(page.locator("#voice-figures")).to_contain_text("Type the text to speak", timeout=15_000)
    page.wait_for_timeout(2_000)  # the player would load its (empty) playlist by now
    for player in ("#chat-speech", "#voice-player"):
        assert "0:00" not in page.locator(player).inner_text(), f"{player} shows a player with nothing in it"
        assert page.locator(f"{player} audio").count() == 0, f"{player} holds an audio element with nothing"
    assert not [e for e in errors if "HLS" in e or "Playlist" in e], errors
    page.context.close()


def test_no_share_button_that_only_fails_off_spaces(browser, studio):
    """Every image, audio player, the gallery and the conversation offered Gradio's Share, which works only on a
    Hugging Face Space: here a press said "Must be on Spaces to share." and the browser logged a ShareError."""
    page = open_tab(browser, studio, "Image", DESKTOP)
    page.locator("#image-prompt textarea").fill("a red cup")
    page.get_by_label("or exact size (WxH)").fill("64x64")
    page.locator("#image-go").click()
    sync_api.expect(page.locator("#image-figures")).to_contain_text("finish reason", timeout=60_000)
    sync_api.expect(page.locator("#image-result button[aria-label='Download']")).to_be_visible()
    shares = {}
    for tab in ("Image", "Chat", "Speech", "Voice"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(300)
        shares[tab] = page.locator("button[aria-label='Share']:visible, button[title='Share']:visible").count()
    assert not any(shares.values()), shares
    page.context.close()


def test_a_reload_mid_run_gives_back_what_was_asked_and_says_it_was_interrupted(browser, studio):
    """A reload while Voice, Image or Speech was making something lost the text typed and the run without a word: what
    was asked comes back (Speech: its context and hotwords; the clip is to be given again), and the status line says
    the run was interrupted; a finished run's text comes back alone."""
    page = open_tab(browser, studio, "Voice", DESKTOP)
    page.locator("#voice-text textarea").fill("A long sentence to speak, interrupted by a reload. " * 6)
    page.locator("#voice-go").click()
    sync_api.expect(page.locator("#voice-figures")).to_contain_text("Generating", timeout=30_000)
    page.reload(wait_until="load")
    page.get_by_role("tab", name="Voice").click()
    sync_api.expect(page.locator("#voice-text textarea")).to_have_value(
        "A long sentence to speak, interrupted by a reload. " * 6, timeout=30_000)
    sync_api.expect(page.locator("#voice-figures")).to_contain_text("interrupted")
    page.get_by_role("tab", name="Image").click()
    page.locator("#image-prompt textarea").fill("a cup, interrupted")
    page.get_by_label("or exact size (WxH)").fill("1024x1024")
    set_slider(page, "image-steps", 50)
    page.locator("#image-go").click()
    sync_api.expect(page.locator("#image-figures")).to_contain_text("step", timeout=30_000)
    page.reload(wait_until="load")
    page.get_by_role("tab", name="Image").click()
    sync_api.expect(page.locator("#image-prompt textarea")).to_have_value("a cup, interrupted", timeout=30_000)
    sync_api.expect(page.locator("#image-figures")).to_contain_text("interrupted")
    page.locator("#image-prompt textarea").fill("a cup, finished")
    page.get_by_label("or exact size (WxH)").fill("32x32")
    page.locator("#image-go").click()
    sync_api.expect(page.locator("#image-figures")).to_contain_text("finish reason", timeout=60_000)
    page.wait_for_function(f"() => JSON.parse(localStorage.getItem({REQUEST_KEY!r})).done")  # (marked once it ends)
    page.reload(wait_until="load")
    page.get_by_role("tab", name="Image").click()
    sync_api.expect(page.locator("#image-prompt textarea")).to_have_value("a cup, finished", timeout=30_000)
    assert "interrupted" not in page.locator("#image-figures").inner_text()
    # Speech: the context and hotwords typed come back, and the status says to give the clip again
    page.get_by_role("tab", name="Speech").click()
    page.locator("#speech-clip input[type=file]").set_input_files(str(ASSETS / "speech" / "what_do_you_see_en.wav"))
    page.get_by_label("Context (what the audio is about; optional)").fill("a talk about cups")
    page.get_by_label("Hotwords (comma-separated; optional)").fill("Gansu, Uyghur")
    page.locator("#speech-go").click()
    sync_api.expect(page.locator("#speech-figures")).to_contain_text("Transcribing", timeout=30_000)
    page.reload(wait_until="load")
    page.get_by_role("tab", name="Speech").click()
    sync_api.expect(page.get_by_label("Context (what the audio is about; optional)")).to_have_value(
        "a talk about cups", timeout=30_000)
    sync_api.expect(page.get_by_label("Hotwords (comma-separated; optional)")).to_have_value("Gansu, Uyghur")
    sync_api.expect(page.locator("#speech-figures")).to_contain_text("give the clip again")
    page.context.close()


def test_speech_tab_transcribes_the_sound_of_a_video_and_names_a_silent_one(browser, studio, tmp_path):
    """The Speech tab took audio only: a video dropped on it got Gradio's own file-type message. A video's sound is
    transcribed (its first words are the condition; the test waited for the demo weights' whole 512-token transcript,
    which a loaded machine did not finish within the 60 s: Stop ends it once words come); a video with no sound track
    is named as such when it is given."""
    talk = video_file(tmp_path / "talk.mp4", "mp4", "mpeg4", "aac")
    page = open_tab(browser, studio, "Speech", DESKTOP)
    page.locator("#speech-video input[type=file]").set_input_files(str(ASSETS / "video" / "cup_on_table.mp4"))
    sync_api.expect(page.locator("#speech-figures")).to_contain_text("'cup_on_table.mp4' is a video with no sound track",
                                                                     timeout=15_000)
    page.locator("#speech-video button[aria-label='Clear']").click()  # the box holds one file at a time
    page.locator("#speech-video input[type=file]").set_input_files(str(talk))
    # (the uploaded file's row: its text reads "talk .mp4", stem and extension apart; the test matched the name only
    # in the transient "Uploading 1 file... talk.mp4", which a quick upload had already replaced, as in a CI run)
    sync_api.expect(page.locator("#speech-video").get_by_role("cell", name="talk.mp4")).to_be_visible(timeout=15_000)
    page.locator("#speech-go").click()
    sync_api.expect(page.locator("#speech-transcript textarea")).to_have_value(re.compile(r"\S"), timeout=60_000)
    page.locator("#speech-stop").click()  # (what is left of the transcript would only hold the engine for later tests)
    sync_api.expect(page.locator("#speech-figures")).to_contain_text("finish reason", timeout=30_000)
    page.context.close()


def test_a_file_that_is_not_what_it_says_is_named_as_soon_as_it_is_given(browser, studio, tmp_path):
    """A text file renamed .wav (or a PDF renamed .png) was taken without a word: only the button pressed later
    said, in the engine's wire terms, that it was not audio. The status line names the file as it is given."""
    notes, report = tmp_path / "notes.wav", tmp_path / "report.png"
    notes.write_text("hello, this is text\n")
    report.write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    page = open_tab(browser, studio, "Speech", DESKTOP)
    page.locator("#speech-clip input[type=file]").set_input_files(str(notes))
    sync_api.expect(page.locator("#speech-figures")).to_contain_text("'notes.wav' is not an audio clip", timeout=15_000)
    # and in a toast, seen where the file was given (the status line is a column away, a screen away on a phone)
    sync_api.expect(page.locator(".toast-body").last).to_contain_text("'notes.wav'", timeout=15_000)
    page.get_by_role("tab", name="Image").click()
    page.locator("#image-refs input[type=file]").set_input_files(str(report))
    sync_api.expect(page.locator("#image-figures")).to_contain_text("'report.png' is not a picture", timeout=15_000)
    page.context.close()


def test_the_banner_keeps_a_flag_on_one_line_on_a_phone(browser, studio):
    """On a phone the demo banner broke "--model" at its hyphens: "(or give -" on one line, "-model a local
    checkpoint directory)" on the next, a flag nobody could type as shown."""
    page = open_tab(browser, studio, "Chat", PHONE)
    lines = page.evaluate("""() => {
        const banner = document.getElementById('model-banner');
        const walker = document.createTreeWalker(banner, NodeFilter.SHOW_TEXT);
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            const at = node.textContent.indexOf('--model');
            if (at < 0 || node.parentElement.closest('code') && node.textContent.startsWith('python')) continue;
            const range = document.createRange();
            range.setStart(node, at);
            range.setEnd(node, at + '--model'.length);
            return new Set(Array.from(range.getClientRects()).map(r => Math.round(r.top))).size;
        }
        return -1;
    }""")
    assert lines == 1, f"'--model' in the banner's text spans {lines} lines on a phone"
    page.context.close()


@pytest.mark.parametrize("locale, share", [("en-US", "Share"), ("de-DE", "Teilen")])
def test_no_share_button_on_the_media_of_the_conversation(browser, studio, locale, share):
    """Gradio's Chatbot gives each picture, clip or recording in a message a Share button whatever its own buttons
    (it is hard-coded there): off a Space a press said "Must be on Spaces to share." and the browser logged a
    ShareError. None is shown, in any language the page speaks (its label is translated: 'Teilen' in German)."""
    context = browser.new_context(viewport=DESKTOP, locale=locale)
    page = context.new_page()
    page.goto(studio, wait_until="load", timeout=60_000)
    sync_api.expect(page.locator("#model-banner")).to_contain_text("RANDOM DEMO WEIGHTS", timeout=30_000)
    page.get_by_role("button", name="What is on the table? (+ cup.png)").click()
    box = page.locator("#chat-input textarea")
    sync_api.expect(box).to_have_value("What is on the table?", timeout=15_000)  # the example is in the box
    sync_api.expect(page.locator("#chat-input img").first).to_be_visible(timeout=15_000)  # with its picture
    box.press("Enter")
    picture = page.locator("#chat-history img[src*='cup']").first
    sync_api.expect(picture).to_be_visible(timeout=30_000)
    sync_api.expect(page.locator("#chat-history button[aria-label='Download']:visible, "
                                 "#chat-history button[aria-label='Herunterladen']:visible").first).to_be_visible()
    shares = page.locator(f"#chat-history button[aria-label='{share}']:visible")
    assert shares.count() == 0, f"{shares.count()} Share button(s) in the conversation"
    page.locator("#chat-stop").click()
    context.close()


@pytest.mark.parametrize("width", [320, 390])
def test_every_tab_is_in_sight_on_a_phone(browser, studio, width):
    """On a phone only Chat and Live (320 px) or Chat, Live and Speech (390 px) were tabs: Voice and Image hid
    behind a '⋯' button (Gradio's 'More tabs'), where a first-time visitor never finds them. The five tabs fit."""
    page = open_tab(browser, studio, "Chat", {"width": width, "height": 800})
    tabs = page.get_by_role("tab")
    sync_api.expect(tabs).to_have_count(5)
    assert [t.inner_text() for t in tabs.all() if t.is_visible()] == ["Chat", "Live", "Speech", "Voice", "Image"]
    assert page.evaluate("document.documentElement.scrollWidth") <= width + 1
    page.context.close()


@pytest.mark.parametrize("width", [320, 390])
def test_the_banner_command_breaks_only_between_its_words_on_a_phone(browser, studio, width):
    """The demo banner's command broke at its hyphens on a phone: 'python launch.py --' / 'model' at 320 px,
    'inclusionAI/Ming-flash-omni-' / '2.0' at 390 px, a command nobody could type as shown. Each word of it stays
    on one line (the line may break between words) and the page does not scroll sideways."""
    page = open_tab(browser, studio, "Chat", {"width": width, "height": 800})
    split = page.evaluate("""() => {
        const code = Array.from(document.querySelectorAll('#model-banner code'))
            .find(c => c.textContent.startsWith('python'));
        const text = code.textContent, split = [];
        const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            for (const m of node.textContent.matchAll(/\\S+/g)) {
                const range = document.createRange();
                range.setStart(node, m.index);
                range.setEnd(node, m.index + m[0].length);
                if (new Set(Array.from(range.getClientRects()).map(r => Math.round(r.top))).size > 1) split.push(m[0]);
            }
        }
        return [text, split];
    }""")
    assert split[0] == "python launch.py --model inclusionAI/Ming-flash-omni-2.0", split[0]
    assert not split[1], f"broken across lines at {width} px: {split[1]}"
    assert page.evaluate("document.documentElement.scrollWidth") <= width + 1
    page.context.close()


def test_no_button_label_overflows_its_button(browser, studio):
    """The Voice tab's 'Refresh' spilled out of its 60 px button (65 px of bold text on a box that ends before
    it). Every button of every tab, its accordions open, holds its label."""
    page = open_tab(browser, studio, "Chat", PHONE)
    spilled = {}
    for tab in ("Chat", "Live", "Speech", "Voice", "Image"):
        page.get_by_role("tab", name=tab).click()
        for accordion in page.locator(".label-wrap:visible").all():
            accordion.click()
        for _ in range(10):  # an accordion's arrow turns for a while after the click: a spill must outlast it
            page.wait_for_timeout(300)
            spilled[tab] = page.evaluate("""() => Array.from(document.querySelectorAll('button'))
                .filter(b => b.offsetParent && b.textContent.trim() && b.scrollWidth > b.clientWidth + 1)
                .map(b => `${b.textContent.trim()} (${b.scrollWidth} px in ${b.clientWidth})`)""")
            if not spilled[tab]:
                break
    assert not any(spilled.values()), spilled
    page.context.close()


def test_a_result_in_the_gallery_shows_with_its_caption(browser, studio):
    """Gradio gives a gallery of fewer pictures than its columns that many columns: one result filled the 220 px
    Results box as a 700 px square, cut, and its caption (mode, prompt, seed: what a click reuses) lay out of sight
    below. Each result shows whole, with its caption in the box, on a desktop and on a phone; the caption is read
    whole (one line cut it to "Generate: a red cu…", the seed out of sight), in the grid and in the preview."""
    page = open_tab(browser, studio, "Image", DESKTOP)
    page.locator("#image-prompt textarea").fill("a red cup on a wooden table by a window, morning light, film grain")
    page.get_by_label("or exact size (WxH)").fill("64x64")
    set_slider(page, "image-steps", 2)
    page.locator("#image-go").click()
    caption = page.locator("#image-gallery .caption-label").first
    sync_api.expect(caption).to_contain_text("a red cup on a wooden table", timeout=60_000)
    seed = page.locator("#image-figures").inner_text().split("seed ")[1].split(" ")[0]
    assert f"seed {seed} · 2 steps" in caption.inner_text()
    assert caption.inner_text().endswith("…")  # a prompt cut short is marked so
    cut = "e => e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1"
    for viewport in (DESKTOP, PHONE):
        page.set_viewport_size(viewport)
        page.wait_for_timeout(300)
        box = page.locator("#image-gallery").bounding_box()
        thumb = page.locator("#image-gallery .thumbnail-item").first.bounding_box()
        cap = caption.bounding_box()
        assert thumb["y"] + thumb["height"] <= box["y"] + box["height"] + 1, (viewport, box, thumb)
        assert box["y"] <= cap["y"] and cap["y"] + cap["height"] <= box["y"] + box["height"] + 1, (viewport, box, cap)
        assert not caption.evaluate(cut), (viewport, caption.inner_text())
        assert thumb["x"] <= cap["x"] and cap["x"] + cap["width"] <= thumb["x"] + thumb["width"] + 1, (viewport, cap)
    page.locator("#image-gallery .thumbnail-item").first.click()  # the preview (and the settings back)
    preview = page.locator("#image-gallery .caption").first
    sync_api.expect(preview).to_contain_text(f"seed {seed}")
    assert not preview.evaluate(cut), preview.inner_text()
    # on a phone the caption takes two lines: none of it lies under the strip of thumbnails
    strip = page.locator("#image-gallery .preview .thumbnails").bounding_box()
    cap = preview.bounding_box()
    assert cap["y"] + cap["height"] <= strip["y"] + 1, (cap, strip)
    # Escape closes the preview and gives the focus back to the thumbnail that opened it (it went to the page's top)
    # (and so does its Close button, to the preview opened by the keyboard)
    thumb = page.locator("#image-gallery button.thumbnail-lg").first
    page.keyboard.press("Escape")
    sync_api.expect(thumb).to_be_focused(timeout=5_000)
    page.keyboard.press("Enter")
    close = page.locator("#image-gallery .preview button[aria-label=Close]")
    close.press("Enter")
    sync_api.expect(thumb).to_be_focused(timeout=5_000)
    page.context.close()


def test_ctrl_enter_in_a_tabs_text_box_runs_the_tab(browser, studio):
    """Chat sends on Enter, but a keyboard-only user had no key to run Image, Voice or Speech. Ctrl+Enter in the
    tab's text boxes presses its button (the main box says so), and the button names the key to screen readers."""
    page = open_tab(browser, studio, "Image", PHONE)
    sync_api.expect(page.locator("#image-prompt")).to_contain_text("Ctrl+Enter: Make it")
    sync_api.expect(page.locator("#image-go")).to_have_attribute("aria-keyshortcuts", "Control+Enter Meta+Enter")
    page.locator("#image-prompt textarea").fill("a red cup")
    set_slider(page, "image-steps", 2)
    page.get_by_label("or exact size (WxH)").fill("64x64")
    page.locator("#image-prompt textarea").press("Control+Enter")
    sync_api.expect(page.locator("#image-figures")).to_contain_text("64x64", timeout=60_000)

    page.get_by_role("tab", name="Voice").click()
    sync_api.expect(page.locator("#voice-text")).to_contain_text("Ctrl+Enter: Make it")
    page.locator("#voice-text textarea").fill("Hello.")
    page.locator("#voice-text textarea").press("Control+Enter")
    sync_api.expect(page.locator("#voice-figures")).to_contain_text("finish reason", timeout=60_000)
    assert page.locator("#voice-text textarea").input_value() == "Hello."  # no line break typed into the text

    page.get_by_role("tab", name="Speech").click()
    hotwords = page.get_by_label("Hotwords (comma-separated; optional)")
    hotwords.fill("Gansu")
    hotwords.press("Control+Enter")  # pressed Transcribe: with no clip given it says what is missing
    sync_api.expect(page.locator("#speech-figures")).to_contain_text("upload a clip", timeout=30_000)
    page.context.close()


def test_choosing_a_saved_voice_or_giving_a_clip_makes_it_the_voice(browser, studio, engine_server):
    """A saved voice chosen in its list, or a clip uploaded to clone, was not used while Voice stayed at "Default
    voice": Make it spoke in the default voice without a word. Choosing one makes it the Voice."""
    from engine.client import EngineClient
    from tests.server import tone_pcm16, wav_bytes

    with EngineClient(engine_server.url, token="test-token") as client:
        client.save_voice("chosen voice", wav_bytes(tone_pcm16(1.5, 22050, 220.0), 22050), "hello there", replace=True)
    try:
        page = open_tab(browser, studio, "Voice", PHONE)
        page.locator("#voice-saved input").click()
        page.get_by_role("option", name="chosen voice", exact=True).click()
        sync_api.expect(page.get_by_role("radio", name="Saved voice")).to_be_checked(timeout=15_000)
        page.get_by_role("button", name="Clone from a clip / save a voice").click()
        page.locator("#voice-clip input[type=file]").set_input_files(str(ASSETS / "speech" / "what_do_you_see_en.wav"))
        sync_api.expect(page.get_by_role("radio", name="Clone from a clip")).to_be_checked(timeout=15_000)
        page.context.close()
    finally:
        with EngineClient(engine_server.url, token="test-token") as client:
            client.delete_voice("chosen voice")


def test_no_choice_of_a_list_is_cut_on_a_phone(browser, studio):
    """Image's Edit preset, chosen "Replace the background", showed "Replace the backgrou" on a phone. Every list of
    every tab, its accordions open, shows its longest choice whole at 390 px."""
    page = open_tab(browser, studio, "Chat", PHONE)
    cut = []
    for tab in ("Chat", "Speech", "Voice", "Image"):
        page.get_by_role("tab", name=tab).click()
        for accordion in page.locator(".label-wrap:visible").all():
            accordion.click()
        for box in page.locator("input[role=combobox]:visible").all():
            box.click()
            choices = page.locator("ul[role=listbox] li:visible")
            try:
                choices.first.wait_for(timeout=3_000)
            except sync_api.Error:  # a list with nothing to choose (no saved voice yet)
                box.press("Escape")
                continue
            page.wait_for_timeout(300)  # the list settles (a click on it opening was lost, "not stable")
            longest = max(choices.all_inner_texts(), key=len)
            choices.filter(has_text=longest).first.click()
            page.wait_for_timeout(200)
            if box.evaluate("e => e.scrollWidth > e.clientWidth + 1"):
                cut.append(f"{tab}: {box.input_value()!r} ({box.evaluate('e => e.scrollWidth')} px in "
                           f"{box.evaluate('e => e.clientWidth')})")
    assert not cut, cut
    page.context.close()


DROP_FILE = """([box, name, type]) => {
  const files = new DataTransfer();
  files.items.add(new File(["not audio"], name, { type }));
  const area = document.querySelector(`#${box} input[type=file]`).parentElement;
  area.dispatchEvent(new DragEvent("drop", { bubbles: true, cancelable: true, dataTransfer: files }));
}"""


def drop_file(page, box: str, name: str, mime: str) -> None:
    """A file of `name` and `mime` dropped on upload box `#box`, once the box is on the page (a box in an accordion
    just clicked open is rendered a moment later)."""
    page.locator(f"#{box} input[type=file]").wait_for(state="attached", timeout=15_000)
    page.evaluate(DROP_FILE, [box, name, mime])


def test_a_file_of_the_wrong_kind_given_to_an_upload_box_is_said_in_the_tabs_words(browser, studio, tmp_path):
    """A video dropped (or chosen) on the Speech tab's clip box or the Voice tab's reference clip got Gradio's own
    "Invalid file type: talk.mp4. Only audio/* allowed.", a MIME-type list, and the Speech tab's video box went
    unmentioned (a PDF among the Image tab's references, a clip on the video box: the same). The tab's status line
    (and a toast) names the file and says where it goes; the files a box takes are still taken as before, the
    pictures given with a PDF too."""
    talk = video_file(tmp_path / "talk.mp4", "mp4", "mpeg4", "aac")
    page = open_tab(browser, studio, "Speech", DESKTOP)
    page.locator("#speech-clip input[type=file]").set_input_files(str(talk))
    said = "'talk.mp4' is a video: give it in the box below"
    sync_api.expect(page.locator("#speech-figures")).to_contain_text(said, timeout=15_000)
    sync_api.expect(page.locator(".toast-body").last).to_contain_text(said, timeout=15_000)
    drop_file(page, "speech-clip", "report.pdf", "application/pdf")
    sync_api.expect(page.locator("#speech-figures")).to_contain_text("'report.pdf' is not an audio clip",
                                                                     timeout=15_000)
    page.get_by_role("tab", name="Voice").click()
    page.get_by_role("button", name="Clone from a clip / save a voice").click()
    drop_file(page, "voice-clip", "interview.mov", "video/quicktime")
    sync_api.expect(page.locator("#voice-figures")).to_contain_text(
        "'interview.mov' is a video: a reference clip is sound alone", timeout=15_000)
    page.locator("#voice-clip input[type=file]").set_input_files(str(ASSETS / "speech" / "what_do_you_see_en.wav"))
    sync_api.expect(page.get_by_role("radio", name="Clone from a clip")).to_be_checked(timeout=15_000)
    page.get_by_role("tab", name="Speech").click()
    page.locator("#speech-video input[type=file]").set_input_files(str(ASSETS / "speech" / "what_do_you_see_en.wav"))
    sync_api.expect(page.locator("#speech-figures")).to_contain_text(
        "'what_do_you_see_en.wav' is not a video", timeout=15_000)
    page.get_by_role("tab", name="Image").click()
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4\n%%EOF\n")
    page.locator("#image-refs input[type=file]").set_input_files([str(ASSETS / "images" / "cup.png"), str(report)])
    sync_api.expect(page.locator("#image-figures")).to_contain_text("'report.pdf' is not a picture", timeout=15_000)
    sync_api.expect(page.locator("#image-refs").get_by_role("cell", name="cup.png")).to_be_visible(timeout=15_000)
    assert "Invalid file type" not in page.locator("body").inner_text()
    page.context.close()


def test_a_long_seed_typed_runs_as_typed_or_is_refused_never_changed(browser, studio):
    """The seed boxes stopped at 2147483647 while the engine takes seeds up to 2**63 - 1. They take every seed the
    page's number box holds exactly (up to 9007199254740991); a longer one, which the browser rounds before the studio
    sees it, is refused in the tab's words, not run as another seed."""
    from app.ui.common import SEED_RANGE

    largest = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER
    page = open_tab(browser, studio, "Image", DESKTOP)
    page.locator("#image-prompt textarea").fill("a red cup")
    set_slider(page, "image-steps", 2)
    set_number(page, "#image-seed input", largest)
    page.locator("#image-go").click()
    sync_api.expect(page.locator("#image-figures")).to_contain_text(f"seed {largest} ", timeout=60_000)
    page.locator("#image-seed input").fill(str(largest + 2))  # 9007199254740993: the browser holds ...992
    page.locator("#image-seed input").press("Tab")
    page.locator("#image-go").click()
    sync_api.expect(page.locator("#image-figures")).to_have_text(SEED_RANGE, timeout=30_000)
    page.context.close()


def test_a_document_attached_to_a_chat_message_is_said_in_the_tabs_words(browser, studio, tmp_path):
    """A PDF attached to a chat message got Gradio's own "Invalid file type: report.pdf. Only image, video, audio
    allowed." in an Error toast. The status line names the file and what the model reads; the text typed stays."""
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4\n%%EOF\n")
    page = open_tab(browser, studio, "Chat", DESKTOP)
    page.locator("#chat-input textarea").fill("What does this say?")
    page.locator("#chat-input input[type=file]").set_input_files(str(report))
    sync_api.expect(page.locator("#chat-figures")).to_contain_text("'report.pdf' cannot be attached: the model reads "
                                                                   "pictures", timeout=15_000)
    assert page.locator("#chat-input textarea").input_value() == "What does this say?"
    assert "Invalid file type" not in page.locator("body").inner_text()
    page.context.close()


def test_takes_made_in_two_tabs_of_one_browser_are_all_kept(browser, studio):
    """Each tab of a browser kept its own copy of the Voice takes and wrote it whole: a take made in one tab was gone
    from the list (and after a reload) once another tab, opened before it, made one. Every take is kept."""
    context = browser.new_context(viewport=DESKTOP)
    pages = [context.new_page(), context.new_page()]
    for page in pages:  # both open before either makes a take
        page.goto(studio, wait_until="load", timeout=60_000)
        sync_api.expect(page.locator("#model-banner")).to_contain_text("RANDOM DEMO WEIGHTS", timeout=30_000)
        page.get_by_role("tab", name="Voice").click()
    for made, page in enumerate(pages, start=1):
        page.locator("#voice-text textarea").fill(f"Take number {made}.")
        page.locator("#voice-go").click()
        sync_api.expect(page.locator("#voice-takes td.filename")).to_have_count(made, timeout=60_000)
    pages[0].reload(wait_until="load")
    pages[0].get_by_role("tab", name="Voice").click()
    sync_api.expect(pages[0].locator("#voice-takes td.filename")).to_have_count(2, timeout=30_000)
    context.close()


# The contrast of each element's own text in `selector` against the first background behind it that is not
# transparent (WCAG's relative luminance): [contrast, text] of those under `least`.
LOW_CONTRAST_TEXT = r"""([selector, least]) => {
  const rgba = (colour) => { const c = colour.match(/[\d.]+/g).map(Number); return c.length < 4 ? [...c, 1] : c; };
  const luminance = ([r, g, b]) => {
    const linear = [r, g, b].map((c) => {
      c /= 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2];
  };
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = rgba(getComputedStyle(el).backgroundColor);
      if (c[3] > 0.5) return c;
    }
    return document.body.classList.contains("dark") ? [11, 15, 25, 1] : [255, 255, 255, 1];
  };
  // the boxes that show text (a range, radio or checkbox shows none: its look is not text's to measure)
  const TEXT_INPUTS = "select, textarea, input:not([type]), input[type=text], input[type=number], input[type=search]";
  // a text colour with transparency is read as it shows: blended over its background
  const shown = (fg, bg) => fg.slice(0, 3).map((c, i) => c * fg[3] + bg[i] * (1 - fg[3]));
  return Array.from(document.querySelectorAll(selector)).filter((el) => el.getClientRects().length)
    .filter((el) => getComputedStyle(el).visibility !== "hidden")
    .flatMap((el) => {
      const texts = [];  // [its colour, what it is]: the element's text, and an empty box's placeholder
      if (el.matches(TEXT_INPUTS) || Array.from(el.childNodes).some((n) => n.nodeType === 3 && n.textContent.trim())) {
        texts.push([getComputedStyle(el).color, el.textContent.trim().slice(0, 40) || el.outerHTML.slice(0, 60)]);
      }
      if (el.matches(TEXT_INPUTS) && el.placeholder && !el.value) {
        texts.push([getComputedStyle(el, "::placeholder").color, `placeholder "${el.placeholder.slice(0, 30)}"`]);
      }
      const bg = background(el);
      return texts.map(([colour, what]) => {
        const [a, b] = [luminance(shown(rgba(colour), bg)), luminance(bg)];
        return [(Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05), `${what} (${colour} on rgba(${bg.join(", ")}))`];
      });
    })
    .filter(([contrast]) => contrast < least);
}"""


@pytest.fixture(scope="module")
def dark_page(browser, studio):
    """The studio in a desktop page of a browser whose system asks for dark mode (Gradio follows it), shared by the
    tests of the page's looks (each leaves it on any tab)."""
    context = browser.new_context(viewport=DESKTOP, color_scheme="dark")
    page = context.new_page()
    page.goto(studio, wait_until="load", timeout=60_000)
    sync_api.expect(page.locator("#model-banner")).to_contain_text("RANDOM DEMO WEIGHTS", timeout=30_000)
    yield page
    context.close()


def low_contrast_in_every_tab(page) -> dict:
    """The texts of each tab (with its accordions open) that read under 4.5:1 on their background (WCAG AA)."""
    low = {}
    for tab in ("Chat", "Live", "Speech", "Voice", "Image"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(300)  # (a tab is drawn when first opened)
        page.evaluate("() => { for (const closed of document.querySelectorAll('.label-wrap:not(.open), "
                      ".live-settings:not([open]) summary')) if (closed.offsetParent) closed.click(); }")
        page.wait_for_timeout(150)
        if found := page.evaluate(LOW_CONTRAST_TEXT, ["body *", 4.5]):
            low[tab] = found
    return low


def test_every_text_of_every_tab_reads_at_4_5_to_1_in_light_and_dark_mode(browser, studio, dark_page):
    """Gradio's light-mode info text under a control's label (its "subdued" grey, rgb(187, 187, 194) on white) read at
    1.9:1, the open tab's name and the white on its orange and red buttons under 4:1. In dark mode the banner's "RANDOM
    DEMO WEIGHTS" and its command took Gradio's light text colour on the banner's light yellow box (1.0:1), and the
    Live tab's message box and settings choices light text on a white box. Every visible text of every tab (the
    banner's too) reads at 4.5:1 at least (WCAG AA), in light mode and in dark mode."""
    assert dark_page.evaluate("document.body.classList.contains('dark')")  # (Gradio follows the system's preference)
    light = open_tab(browser, studio, "Chat", DESKTOP)
    assert not light.evaluate("document.body.classList.contains('dark')")
    low = {"light": low_contrast_in_every_tab(light), "dark": low_contrast_in_every_tab(dark_page)}
    light.context.close()
    assert low == {"light": {}, "dark": {}}, low


# What shows focus on an element and around it (its outline, shadow and border, and its frame's up to 8 levels out).
FOCUS_LOOK = """(e) => { const look = []; for (let x = e, i = 0; x && i < 8; x = x.parentElement, i++) {
  const s = getComputedStyle(x); look.push([s.outlineStyle, s.outlineWidth, s.boxShadow, s.borderColor].join(' ')); }
  return look.join(' / '); }"""


def test_keyboard_focus_is_in_sight_on_the_message_box_radios_and_sliders(dark_page):
    """Tab reached the Chat message box, the Image tab's mode radios and its sliders with nothing in sight to say so
    (Gradio took their outline off; the message box's frame stayed as it was): a keyboard user lost the focus there.
    Each, reached with Tab, looks different from when it is left."""
    page, unseen = dark_page, []
    for tab, selector in (("Chat", "#chat-input textarea"), ("Image", "#image-mode input[type=radio]"),
                          ("Image", "#image-steps input[type=range]")):
        page.get_by_role("tab", name=tab).click()
        target = page.locator(selector).first
        target.wait_for()
        page.keyboard.press("Tab")  # the keyboard moves the focus: the browser shows its focus ring from then on
        target.focus()
        assert target.evaluate("e => e.matches(':focus-visible')")
        focused = target.evaluate(FOCUS_LOOK)
        target.evaluate("e => e.blur()")
        if target.evaluate(FOCUS_LOOK) == focused:
            unseen.append(selector)
    assert not unseen, unseen


def test_a_reload_after_a_masked_edit_gives_back_its_pictures_and_mask(browser, studio, tmp_path):
    """The kept request held the prompt only: after a reload mid masked edit the Mask box was empty and nothing said
    so. The reference picture and the mask come back with it, in the Mask box shown."""
    from app.ui.image import REQUEST_KEY
    mask = tmp_path / "where-to-edit.png"
    Image.new("RGBA", Image.open(ASSETS / "images" / "cup.png").size, (0, 0, 0, 0)).save(mask)
    page = open_tab(browser, studio, "Image", DESKTOP)
    page.get_by_role("radio", name="Edit").check()
    page.locator("#image-refs input[type=file]").set_input_files(str(ASSETS / "images" / "cup.png"))
    page.locator("#image-mask-file input[type=file]").set_input_files(str(mask))
    page.locator("#image-prompt textarea").fill("make the cup blue")
    set_slider(page, "image-steps", 2)
    page.locator("#image-go").click()
    page.wait_for_function(f"(localStorage.getItem({REQUEST_KEY!r}) || '').includes('where-to-edit')", timeout=30_000)
    page.reload(wait_until="load")  # mid-run, once the press kept the request
    page.get_by_role("tab", name="Image").click()
    sync_api.expect(page.locator("#image-prompt textarea")).to_have_value("make the cup blue", timeout=30_000)
    sync_api.expect(page.locator("#image-refs")).to_contain_text(re.compile(r"cup\s*\.png"), timeout=10_000)
    sync_api.expect(page.locator("#image-mask-file")).to_contain_text(re.compile(r"where-to-edit\s*\.png"))
    sync_api.expect(page.locator("#image-mask-file")).to_be_visible()  # (the box is shown in Edit mode only)
    page.context.close()


def gradio_encrypted(page, value, secret: str) -> str:
    """`value` as a gr.BrowserState with `secret` keeps it in localStorage (Gradio's page: CryptoJS AES-256-CBC with the
    passphrase sha256(secret) in hex, OpenSSL's salted format: key and IV by EVP_BytesToKey with MD5), encrypted with
    the page's WebCrypto."""
    passphrase, salt, derived = hashlib.sha256(secret.encode()).hexdigest().encode(), os.urandom(8), b""
    while len(derived) < 48:
        derived += hashlib.md5(derived[-16:] + passphrase + salt).digest()
    key, iv = derived[:32], derived[32:48]
    sealed = page.evaluate("""async ([key, iv, text]) => {
        const k = await crypto.subtle.importKey("raw", new Uint8Array(key), "AES-CBC", false, ["encrypt"]);
        const sealed = await crypto.subtle.encrypt({name: "AES-CBC", iv: new Uint8Array(iv)}, k,
                                                   new TextEncoder().encode(text));
        return Array.from(new Uint8Array(sealed)); }""", [list(key), list(iv), json.dumps(value)])
    return f"{base64.b64encode(iv).decode()}:{base64.b64encode(b'Salted__' + salt + bytes(sealed)).decode()}"


def test_what_an_earlier_studio_kept_is_carried_over_once_or_said_unreadable(browser, studio):
    """The gallery and the request the studio kept before (gr.BrowserState under older keys) were left behind without a
    word: a readable request comes back and moves to the new key; an unreadable gallery is removed and said, once."""
    from app.ui.common import browser_secret
    from app.ui.image import KEPT_GALLERY_KEY, REQUEST_BEFORE_KEY, REQUEST_KEY, RESULTS_BEFORE_KEY
    page = open_tab(browser, studio, "Image", DESKTOP)
    request = {"mode": "Generate", "prompt": "a cup kept by the studio before", "target": "", "done": False}
    page.evaluate("([keys, values]) => { localStorage.clear(); keys.forEach((k, i) => localStorage.setItem(k, values[i])); }",
                  [[REQUEST_BEFORE_KEY, RESULTS_BEFORE_KEY],
                   [gradio_encrypted(page, request, browser_secret()), gradio_encrypted(page, [], "a lost key")]])
    page.reload(wait_until="load")
    page.get_by_role("tab", name="Image").click()
    sync_api.expect(page.locator("#image-prompt textarea")).to_have_value(request["prompt"], timeout=30_000)
    figures = page.locator("#image-figures")
    sync_api.expect(figures).to_contain_text("interrupted")
    sync_api.expect(figures).to_contain_text("results gallery kept in this browser by an earlier version")
    page.wait_for_function("(keys) => keys.every((k) => localStorage.getItem(k) === null)",
                           arg=[REQUEST_BEFORE_KEY, RESULTS_BEFORE_KEY], timeout=10_000)
    assert json.loads(page.evaluate(f"localStorage.getItem({REQUEST_KEY!r})"))["prompt"] == request["prompt"]
    assert page.evaluate(f"localStorage.getItem({KEPT_GALLERY_KEY!r})") is None  # (said once: the old keys are gone)
    page.context.close()
