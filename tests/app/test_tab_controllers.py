"""The Voice and Image tabs' controllers against the tiny engine behind its server: saving a voice under a
name already taken keeps the saved voice and says how to replace it, ticking Replace replaces it; a seed box
left at -1 (or emptied by an API caller) draws a new seed each time; a studio started before its engine claims
nothing about what the engine serves, and shows it once the engine is up."""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

from app.engine_link import IMAGE_OUT, SPEECH_OUT, EngineLink  # noqa: E402
from app.ui.chat import ASSUMED_TOKEN_CAP, ChatController, page_state, speech_controls, token_slider  # noqa: E402
from app.ui.common import (RANDOM_SEED, SEED_MAX, SEED_RANGE, chosen_seed, figures_line, note_text,  # noqa: E402
                           seed_box, seed_problem)
from app.ui.image import ASPECTS, AUTO_ASPECT, DEMO_PICTURE, EDIT_PROMPT_HINTS, REFS_NOT_USED, ImageController, _keep_copy, _save_png, kept_results  # noqa: E402
from app.ui.common import GENERATING  # noqa: E402
from app.ui.image import MAX_PICTURES, SIZE_FORM  # noqa: E402
from app.ui.live import engine_settings  # noqa: E402
from app.ui.speech import BOTH_GIVEN, CUT_AT_LIMIT, CUT_ON_DEMO, NOTHING_GIVEN, SpeechController  # noqa: E402
from app.ui import common, voice as voice_tab  # noqa: E402
from app.ui.voice import (CONFIRM_DELETE, MUSIC_TEXT_UNUSED, NAME_TOO_LONG, NO_CHOICE, PODCAST_NEEDS_A_VOICE,  # noqa: E402
                          REPLACE_LABEL, TASKS, TEXT_TOO_LONG, VOICE_NAME_CHARS, VOICE_UNUSED, VoiceController,
                          keep_take, restore_takes)
from engine.client import EngineClient  # noqa: E402
from engine.events import (AudioChunk, Done, Error, GenerationStats, ImageDone, ImagePreview, QueuePosition,  # noqa: E402
                           TextDelta)
from tests.paths import REPO  # noqa: E402
from tests.app.canned_http import serving  # noqa: E402
from tests.app.media_files import video_file  # noqa: E402
from tests.server import draw_until_cancelled, running_server, tone_pcm16, wav_bytes  # noqa: E402


def last(stream):
    """What a tab's streaming handler shows at the end."""
    *_, end = stream
    return end


def test_the_chat_and_live_voice_lists_offer_the_saved_voices(engine_server, tmp_path):
    """The Chat tab's voice box said "a preset or a saved voice" (the engine has no presets) and listed none;
    it lists the saved voices, asked again at each page load and when the list is opened. Live offered only
    the default voice: its page asks engine_settings at load and at Start."""
    link = EngineLink(EngineClient(engine_server.url, token="test-token"))
    voices = VoiceController(link)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.5, 22050, 220.0), 22050))
    voices.save("chat voice", str(clip), "hello there", True)
    try:
        assert "chat voice" in page_state(link)[2]["choices"]
        assert engine_settings(link)() == {"speech_output": True, "voices": voices.voice_names()}
        assert "chat voice" in voices.voice_names()
    finally:
        voices.delete("chat voice")
    assert "chat voice" not in page_state(link)[2]["choices"]


def test_the_token_slider_stops_at_the_cap_the_engine_reports(tiny_engine):
    """The Max new tokens slider stopped at the engine server's default cap (4096) whatever the engine was
    started with (--max-new-tokens): the model card now reports the cap and each page load reads it. A server
    whose card does not say (an OpenAI-compatible one) gets the default cap, and the label says so."""
    from engine.server import Limits, ServerHandle, create_app

    with running_server(tiny_engine, max_new_tokens=1000) as srv:
        link = EngineLink(EngineClient(srv.url))
        assert token_slider(link) == {"maximum": 1000, "value": 256,
                                      "label": "Max new tokens (up to 1,000, the engine's cap)"}
        assert page_state(link)[3]["maximum"] == 1000
    with running_server(tiny_engine, max_new_tokens=100) as srv:  # below the default 256: the value follows
        assert token_slider(EngineLink(EngineClient(srv.url)))["value"] == 100
    with ServerHandle(create_app(tiny_engine, Limits(), openai_only=True)) as srv:
        slider = token_slider(EngineLink(EngineClient("openai+" + srv.url)))
    assert slider["maximum"] == ASSUMED_TOKEN_CAP and "does not say" in slider["label"]


def test_no_saved_voice_is_selected_until_the_user_chooses_one(engine_server, tmp_path):
    """The Saved voice list selected the first voice by itself (Gradio's default), so "Delete the selected saved
    voice" pressed before choosing anything deleted it."""
    import gradio as gr

    from app.ui.voice import build_voice_tab

    link = EngineLink(EngineClient(engine_server.url, token="test-token"))
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.5, 22050, 220.0), 22050))
    VoiceController(link).save("first voice", str(clip), "hello there", True)
    try:
        with gr.Blocks() as demo:
            build_voice_tab(link)
        saved = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "voice-saved")
        assert "first voice" in saved.choices[0] and saved.value is None
    finally:
        VoiceController(link).delete("first voice")


def test_no_two_controls_of_a_tab_share_a_name():
    """The Voice tab's "Saved voice" named both a choice of its Voice radio and the list of saved voices: a screen reader
    announced two controls of one name, and finding the list by its name found the radio choice too. In every tab each
    label, radio choice and button text names one control."""
    from collections import defaultdict

    from app.studio import build_studio, close_studio

    demo = build_studio(EngineClient("http://127.0.0.1:9", timeout=1))  # (no engine: the tabs are built all the same)
    try:
        named = defaultdict(list)
        for block in demo.blocks.values():
            tab = block.parent
            while tab is not None and not isinstance(tab, gr.Tab):
                tab = tab.parent
            names = [block.value] if isinstance(block, gr.Button) else []
            if isinstance(block, gr.components.FormComponent) and getattr(block, "label", None):
                names.append(block.label)
            if isinstance(block, gr.Radio):
                names += [choice[0] if isinstance(choice, tuple) else choice for choice in block.choices]
            for name in names:
                named[(getattr(tab, "label", None), str(name))].append(type(block).__name__)
    finally:
        close_studio(demo)
    assert len(named) > 50, len(named)  # (the tabs' controls were found)
    shared = {where: kinds for where, kinds in named.items() if len(kinds) > 1}
    assert not shared, shared


def test_the_voice_tabs_downloads_offer_no_upload(engine_server):
    """The empty "WAV download" box said "Drop File Here - or - Click to Upload" (Gradio makes a box that an event
    reads an upload box unless it is marked not interactive), so a download looked like a place to give a file."""
    import gradio as gr

    from app.ui.voice import build_voice_tab

    with gr.Blocks() as demo:
        build_voice_tab(EngineLink(EngineClient(engine_server.url, token="test-token")))
    read = {i for dependency in demo.config["dependencies"] for i in dependency["inputs"]}
    uploads = [b.label for b in demo.blocks.values() if getattr(b, "elem_id", None) in ("voice-wav", "voice-takes")
               and b._id in read and b.interactive is not False]
    assert not uploads, uploads


def test_deleting_a_saved_voice_asks_first(engine_server, tmp_path):
    """"Delete the selected saved voice" deleted it at one press, with no way back: it now names the voice and
    asks; "No, keep it" keeps it, "Yes, delete it" deletes the voice it named. A voice deleted meanwhile in another tab
    is said so (it said the engine's "unknown voice ...; saved voices: ...") and the list is brought up to date."""
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.5, 22050, 220.0), 22050))
    voices.save("asked voice", str(clip), "hello there")
    try:
        row, asked, note = voices.ask_delete("asked voice")
        assert row == {"visible": True, "__type__": "update"} and asked == "asked voice"
        assert note.startswith("Delete the saved voice 'asked voice'?") and CONFIRM_DELETE in note
        assert "asked voice" in voices.voice_names()  # nothing deleted yet
        assert voices.keep_voice(asked)[1:] == (None, "Kept the voice 'asked voice'.")
        assert "asked voice" in voices.voice_names()
        assert voices.ask_delete(None)[1:] == (None, "Choose a saved voice to delete.")
        names, note, row, asked = voices.confirm_delete("asked voice")
        assert note == "Deleted the voice 'asked voice'." and row["visible"] is False and asked is None
        assert "asked voice" not in voices.voice_names() and "asked voice" not in names["choices"]
        # deleted again from a tab whose list still offers it (deleted in another): said so, the list brought up to date
        names, note, *_ = voices.confirm_delete("asked voice")
        assert note == voice_tab.ALREADY_DELETED.format(name="asked voice") and "asked voice" not in names["choices"]
        # Make it with the deleted voice still selected (a tab whose list still offers it): refused in the tab's words
        # (not the wire's), the last take left offered, the list brought up to date with nothing selected (it kept
        # offering the voice until Refresh)
        *_, made = voices.synthesize("Hi.", "Speech", "Saved voice", "asked voice", None, "", *[None] * 5, "", "", "",
                                     None, "", "", "", "", 10, 3)
        assert made[2] == voice_tab.VOICE_GONE.format(name="asked voice") and made[3] == gr.skip(), made
        assert "asked voice" not in made[4]["choices"] and made[4]["value"] is None, made
    finally:
        if "asked voice" in voices.voice_names():
            voices.delete("asked voice")


def test_a_voice_name_longer_than_the_engine_keeps_is_said_before_sending(engine_server, tmp_path):
    """A long name (a sentence pasted in Save as) came back as "Error (invalid_value): 'name' is too long (5000
    characters)": the engine's field, no limit. The tab says the limit, the engine's own, before sending."""
    from engine.server.params import MAX_VOICE_NAME_CHARS

    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.5, 22050, 220.0), 22050))
    assert VOICE_NAME_CHARS == MAX_VOICE_NAME_CHARS
    _, status = voices.save("x" * 5000, str(clip), "hello there", True)
    assert status == NAME_TOO_LONG.format(n=5000, most=MAX_VOICE_NAME_CHARS), status
    assert "x" * 5000 not in voices.voice_names()


def test_saving_under_a_taken_name_keeps_the_voice_unless_replace_is_ticked(engine_server, tmp_path):
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.5, 22050, 220.0), 22050))
    _, note = voices.save("studio voice", str(clip), "hello there")
    assert note.startswith("Saved the voice 'studio voice'") and "studio voice" in voices.voice_names()
    client = voices.link.client
    _, note = voices.save("studio voice", str(clip), "a second take")
    assert "already saved" in note and REPLACE_LABEL in note
    assert [v for v in client.voices() if v["name"] == "studio voice"][0]["reference_text"] == "hello there"
    _, note = voices.save("studio voice", str(clip), "a second take", True)
    assert note.startswith("Saved the voice 'studio voice'")
    assert [v for v in client.voices() if v["name"] == "studio voice"][0]["reference_text"] == "a second take"
    voices.delete("studio voice")
    _, note = voices.delete("studio voice")  # (gone already: said in the tab's words, see ALREADY_DELETED)
    assert note == voice_tab.ALREADY_DELETED.format(name="studio voice")


def test_a_clipped_clip_is_cloned_and_saved_with_a_warning(engine_server, tmp_path):
    """A clip recorded too loud was cloned and saved without a word: the status now says how much of it sits at full
    scale and what to do."""
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    loud = tmp_path / "loud.wav"
    t = np.arange(22050) / 22050
    loud.write_bytes(wav_bytes((np.clip(1.5 * np.sin(2 * np.pi * 220 * t), -1, 1) * 32767).astype(np.int16), 22050))
    *_, end = voices.synthesize("Hi.", "Speech", "Clone from a clip", None, str(loud), "hello", *[None] * 5, "", "",
                                "", None, "", "", "", "", 10, 3)
    assert "finish reason: stop" in end[2] and "⚠ Reference clip is clipped: 53." in end[2], end[2]
    assert "of its samples sit at full scale" in end[2] and "input level lower" in end[2]
    _, note = voices.save("loud voice", str(loud), "hello")
    voices.delete("loud voice")
    assert note.startswith("Saved the voice 'loud voice'") and "⚠ Reference clip is clipped: 53." in note, note


def test_stop_stops_saving_a_voice_while_its_clip_is_transcribed(engine_server, tiny_engine, tmp_path, monkeypatch):
    """Save a voice with no transcript ran our ASR inside the save, which Stop could not reach: the save went on to
    the end and kept the voice. Stop now stops the transcription, and nothing is saved."""
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    started, token = threading.Event(), tiny_engine.tokenizer.encode_plain("hi")[0]
    scheduler = engine_server.ctx.scheduler

    draw_until_cancelled(monkeypatch, scheduler, token, started)  # (until the transcription's job is cancelled, or 10 s)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.0, 22050, 220.0), 22050))
    said, visitor = [], SimpleNamespace(session_hash="a visitor")  # (Stop finds the save of the same visitor)
    saving = threading.Thread(target=lambda: said.append(voices.save("stopped voice", str(clip), "", request=visitor)))
    saving.start()
    assert started.wait(30)
    voices.stop(visitor)
    saving.join(30)
    assert said and said[0][1] == voice_tab.SAVE_STOPPED.format(name="stopped voice"), said
    assert "stopped voice" not in voices.voice_names()


def test_a_podcast_with_the_default_voice_says_which_voice_to_choose(engine_server, tmp_path):
    """Podcast with Voice "Default voice" came back as the engine's "podcast needs one reference clip (or saved
    voice) per speaker", though this tab takes one clip; it now says which Voice to choose, and a clip speaks."""
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    podcast = next(label for label, task in TASKS.items() if task == "podcast")
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.5, 22050, 220.0), 22050))

    def status_of(source, clip_path):
        *_, last = voices.synthesize("speaker_1: Hello.\nspeaker_2: Hi!", podcast, source, None, clip_path,
                                     "hello there", *[None] * 5, "", "", "", None, "", "", "", "", 10, 3)
        return last[2]
    assert status_of("Default voice", None) == PODCAST_NEEDS_A_VOICE
    assert "finish reason: stop" in status_of("Clone from a clip", str(clip))


def test_the_wav_download_is_named_for_what_was_made_and_earlier_takes_are_kept(engine_server):
    """Music and sound effects were offered as 'speech-<time>.wav'. Each Make it replaced the WAV download: the
    take before it was gone. Every take is offered, newest first (a refused run adds none), and comes back after a
    page reload; a path the browser gives back that this tab did not write, or that is gone, is not offered."""
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    kept, made = [], []
    for label, stem in (("Sound effect", "sound"), ("Speech", "speech")):
        *_, end = voices.synthesize("Rain on a roof", label, "Default voice", None, None, "", *[None] * 5, "", "",
                                    "", None, "", "", "", "", 10, 3)
        assert Path(end[3]).name.startswith(f"{stem}-") and end[3].endswith(".wav"), end
        made.append(end[3])
        kept, offered = keep_take(end[3], kept)
    assert offered == kept == [str(Path(p).resolve()) for p in reversed(made)]
    refused = last(voices.synthesize("", "Speech", "Default voice", None, None, "", *[None] * 5, "", "", "", None,
                                     "", "", "", "", 10, 3))
    assert keep_take(made[-1], kept)[0] == kept and refused[3] == gr.skip()  # (the download as it was: no new take)
    assert restore_takes(kept) == (kept, kept)
    Path(made[0]).unlink()  # (gone: the machine cleaned its temp folder)
    assert restore_takes([*kept, "/etc/passwd", "/speech-20260101-000000.wav", {"path": made[1]}]) == (kept[:1],) * 2


def test_a_stopped_take_says_so_in_its_name_and_is_kept(engine_server):
    """A long text stopped mid-way was offered as 'speech-<time>.wav', as if the take were whole: its name says it was
    stopped, and it is kept with the others."""
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    me = SimpleNamespace(session_hash="stops-a-take")
    stream = voices.synthesize("A long text to speak. " * 40, "Speech", "Default voice", None, None, "", *[None] * 5,
                               "", "", "", None, "", "", "", "", 10, 3, request=me)
    next(update for update in stream if "of audio so far" in str(update[2]))
    voices.stop(me)
    *_, end = stream
    assert "cancelled" in end[2] and re.fullmatch(r"speech-\d{8}-\d{6}-\d{3}-stopped\.wav", Path(end[3]).name), end
    assert keep_take(end[3], [])[0] == [str(Path(end[3]).resolve())]


def test_stop_while_the_reference_clip_is_transcribed_stops_at_once(engine_server, tmp_path):
    """Cloning from a clip without its transcript said "Generating…" through the transcription, and Stop was heard
    only once it had run to its end (8 s on the demo model). The status says it is transcribing; Stop ends it then."""
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(3.0, 22050, 220.0), 22050))
    me = SimpleNamespace(session_hash="stops-a-transcription")
    stream = voices.synthesize("A long text to speak. " * 40, "Speech", "Clone from a clip", None, str(clip), "",
                               *[None] * 5, "", "", "", None, "", "", "", "", 10, 3, request=me)
    next(update for update in stream if update[2] == voice_tab.TRANSCRIBING_CLIP)
    voices.stop(me)
    *_, end = stream
    assert "cancelled" in end[2] and end[3] == gr.skip(), end  # no sound made: no new take (the last stays offered)


def test_two_takes_made_in_one_second_are_offered_under_their_own_names():
    """A take's file was named to the second: two short sound effects made within one second were offered (and saved
    by the browser) under one name. Each take's name is its own, and each is still offered after a page reload."""
    made = [voice_tab.write_wav([np.zeros(441, "<i2")], 44100, "sound") for _ in range(3)]
    assert len({Path(p).name for p in made}) == 3, made
    assert restore_takes(made)[0] == [str(Path(p).resolve()) for p in made]


def test_a_stopped_stream_without_figures_shows_none():
    """An image stopped mid-way read "prompt tokens 0, new tokens 0, time to first token 0.0 ms, 0.0 tokens/s ·
    finish reason: cancelled (stopped)": the client ends a stream it closed with no figures."""
    assert figures_line(Done(text="", finish_reason="cancelled")) == "finish reason: cancelled (stopped)"
    measured = Done(text="", finish_reason="stop", stats=GenerationStats(images=1, image_steps=8, image_step_s=0.01))
    assert figures_line(measured) == "8 steps, 0.01 s/step · finish reason: stop (complete)"


def test_an_edit_without_a_prompt_says_what_the_prompt_is_for(engine_server):
    """An Edit with an empty prompt went to the engine and came back as "'prompt' is empty: give the prompt"; the
    tab says what the prompt is for with the preset chosen (the new background, the object to remove)."""
    image = ImageController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    cup = str(REPO / "app" / "assets" / "images" / "cup.png")
    for preset, hint in EDIT_PROMPT_HINTS.items():
        *_, last = image.make("Edit", " ", [cup], preset, "", "1:1", "32x32", 2, 2.0, 1, 0, [],
                              progress=lambda *a, **k: None)
        assert last[3] == hint
    *_, last = image.make("Edit", "cup", [cup], "Remove an object", "", "1:1", "32x32", 2, 2.0, 1, 0, [],
                          progress=lambda *a, **k: None)
    assert "finish reason: stop" in last[3], last[3]


def test_several_pictures_a_press_each_kept_as_it_is_made_and_stop_keeps_those_made(engine_server):
    """The Image tab made one picture a press. It makes up to MAX_PICTURES (seed, seed + 1, ...): the progress bar
    and the status say which picture is being made, each goes to the gallery (after the earlier results) and to the
    downloads, named by its seed, as soon as it is done; Stop after the first keeps the first."""
    image = ImageController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    visitor = SimpleNamespace(session_hash="pictures")
    earlier = [{"image": "earlier.png", "settings": {"mode": "Generate", "prompt": "before", "target": "", "seed": 1,
                                                      "steps": 1}}]
    said = []
    shown = []  # (status, gallery entries, downloads) as each update was sent
    for out in image.make("Generate", "a cup", None, None, "", "1:1", "32x32", 1, 2.0, 5, 0, earlier, count=2,
                          request=visitor, progress=lambda *a, desc="", **k: said.append(desc)):
        shown.append((str(out[3]), len(out[5]), list(out[6] or [])))
    picture, _, _, status, _, kept, files = out
    assert [k["settings"]["seed"] for k in kept] == [1, 5, 6] and "seeds 5, 6" in status
    assert [Path(f).name.split("-")[:2] for f in files] == [["generate", "seed5"], ["generate", "seed6"]]
    assert picture == files[-1] and (f"{GENERATING} picture 2 of 2", 2, files[:1]) in shown  # the first, kept at once
    assert any("picture 2 of 2" in d for d in said) and MAX_PICTURES >= 2, said

    def stop_at_the_second(*a, desc="", **k):
        if "picture 2 of" in desc:
            image.stop(visitor)
    *_, stopped = image.make("Generate", "a cup", None, None, "", "1:1", "32x32", 2, 2.0, 7, 0, [], count=3,
                             request=visitor, progress=stop_at_the_second)
    assert "cancelled" in stopped[3] and [k["settings"]["seed"] for k in stopped[5]] == [7], stopped[3]
    assert len(stopped[6]) == 1 and Path(stopped[6][0]).is_file()


def test_the_pictures_slider_goes_as_far_as_the_server_makes(engine_server):
    """The Pictures slider stopped at 4 (and a request for more was cut to 4) while the server makes up to OpenAI's 10
    a request: both stop at the server's most, and a press for 5 asks for 5 (stopped once the first is under way)."""
    from engine.server.images_api import MAX_N

    assert MAX_PICTURES == MAX_N
    image = ImageController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    visitor, said = SimpleNamespace(session_hash="five"), []

    def stop_once_told(*a, desc="", **k):
        said.append(desc)
        image.stop(visitor)
    *_, end = image.make("Generate", "a cup", None, None, "", "1:1", "16x16", 3, 2.0, 3, 0, [], count=5,
                         request=visitor, progress=stop_once_told)
    assert any("picture 1 of 5" in d for d in said) and "cancelled" in end[3], (said, end[3])


def test_the_kept_gallery_gives_back_only_this_studios_images_still_there(tmp_path):
    """A page reload emptied the Image gallery; the browser keeps its entries, and at load they come back. The
    browser holds what it gives back: only a PNG this studio saved comes back, while it is still there."""
    settings = {"mode": "Generate", "prompt": "a cup", "preset": "(none)", "target": "", "aspect": "1:1",
                "size": "", "steps": 8, "guidance": 2.0, "seed": 7}
    made, gone = _save_png(b"png", "image"), _save_png(b"png", "image")
    Path(gone).unlink()
    elsewhere = tmp_path / "image.png"
    elsewhere.write_bytes(b"png")
    saved = [{"image": made, "settings": {**settings, "extra": 1}}, {"image": gone, "settings": settings},
             {"image": str(elsewhere), "settings": settings}, {"image": made, "settings": {"mode": "Generate"}},
             {"image": made}, "junk"]
    assert kept_results(saved) == [{"image": str(Path(made).resolve()), "settings": settings}]
    entries, gallery = ImageController.restore_gallery(saved)
    assert entries == kept_results(saved) and gallery == [(entries[0]["image"], "Generate · seed 7 · 8 steps · a cup")]
    assert kept_results(None) == kept_results({"image": made}) == []


class StoppedTranscriber:
    """An engine client whose transcription is stopped after a word (as Stop ends it)."""
    endpoints = SimpleNamespace(http="http://stub")

    def info(self):
        raise ConnectionError("no engine here")

    def transcribe(self, audio, **kwargs):
        yield TextDelta("hello")
        yield Done(text="hello", finish_reason="cancelled")


class DeafSaver(StoppedTranscriber):
    """An engine client whose transcription hears nothing, and which counts its transcriptions and voice saves."""

    def __init__(self):
        self.calls = []

    def transcribe(self, audio, **kwargs):
        self.calls.append("transcribe")
        yield Done(text="", finish_reason="stop", result={"text": ""})

    def save_voice(self, name, reference_audio, reference_text=None, replace=False):
        self.calls.append(("save_voice", reference_text))
        return {"name": name}


def test_a_clip_in_which_the_tabs_transcription_hears_nothing_is_not_transcribed_again(tmp_path):
    """Save with no transcript: the tab's own (stoppable) transcription heard nothing, so it passed no transcript and
    the engine transcribed the clip again (the same nothing), where Stop could not stop it. The clip is transcribed
    once; the voice is not saved and the status says to type the words."""
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.0, 22050, 220.0), 22050))
    client = DeafSaver()
    _, status = VoiceController(EngineLink(client)).save("hum", str(clip), "")
    assert client.calls == ["transcribe"], client.calls
    assert status == voice_tab.NOTHING_HEARD.format(name="hum") and voice_tab.CLIP_TEXT in status, status


class Translator(StoppedTranscriber):
    """An engine client that translates (and says which call it got)."""

    def __init__(self):
        self.calls = []

    def translate(self, audio, **kwargs):
        self.calls.append(("translate", kwargs.get("context"), kwargs.get("hotwords")))
        yield Done(text="good morning", finish_reason="stop", result={"language": "English", "text": "good morning"},
                   stats=GenerationStats(prompt_tokens=90, new_tokens=3, total_s=0.5))

    def transcribe(self, audio, **kwargs):
        self.calls.append(("transcribe", kwargs.get("context")))
        yield from super().transcribe(audio, **kwargs)


def test_the_speech_tab_translates_into_english_when_asked(tmp_path):
    """The Speech tab could only transcribe; its language list now offers an English translation (the engine's
    /v1/audio/translations): the clip and context go to translate(), its text and files come back with the language
    said. Hotwords go with a translation as with a transcript (the tab refused them, the engine takes them)."""
    from app.ui.speech import TRANSLATE

    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.0, 16000, 220.0), 16000))
    client = Translator()
    speech = SpeechController(EngineLink(client))
    text, status, txt, srt = list(speech.transcribe_file(str(clip), "A greeting.", "", TRANSLATE))[-1]
    assert client.calls == [("translate", "A greeting.", None)] and text == "good morning"
    assert status.startswith("language: English · ")
    assert Path(txt).read_text(encoding="utf-8").strip() == "good morning"
    assert list(speech.transcribe_file(str(clip), "", "Ming, 景德镇", TRANSLATE))[-1][0] == "good morning"
    assert client.calls[-1] == ("translate", None, ["Ming", "景德镇"])


def test_a_stopped_transcription_offers_no_files_and_keeps_the_last_finished_ones(tmp_path):
    """Stop during Transcribe offered a 1-byte transcript .txt and an .srt of nothing; and starting a transcription
    emptied the boxes of the last finished one's files, so a stopped or failed run lost the earlier transcript."""
    import gradio as gr

    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.0, 16000, 220.0), 16000))
    speech = SpeechController(EngineLink(StoppedTranscriber()))
    shown = list(speech.transcribe_file(str(clip), "", "", None))
    assert shown[-1] == ("hello", "finish reason: cancelled (stopped)", gr.skip(), gr.skip())
    assert all(files == (gr.skip(), gr.skip()) for *_, files in ((s[:2], s[2:]) for s in shown)), shown
    assert speech.finish({"chunks": []}, "", "", None)[1:] == (gr.skip(), "Nothing was recorded.", gr.skip(), gr.skip())


class BusyTranscriber(StoppedTranscriber):
    """An engine client whose transcription waits in line, then is refused (the engine's line full)."""

    def transcribe(self, audio, **kwargs):
        yield QueuePosition(position=1, waiting=2)
        yield Error("the engine's queue is full; try again in a moment", "queue_full")


def test_a_transcription_failing_before_its_first_words_keeps_the_last_transcript(tmp_path):
    """A run refused or failing before any words (its place in line said, then queue_full) emptied the transcript box:
    the last finished transcript was lost to an error. It stays, with its files, and the status says what failed; a
    run that hears nothing at all (its result: no words) still empties it."""
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.0, 16000, 220.0), 16000))
    shown = list(SpeechController(EngineLink(BusyTranscriber())).transcribe_file(str(clip), "", "", None))
    assert "yours is next" in shown[0][1] and "queue is full" in shown[-1][1], shown
    assert all(s[0] == gr.skip() and s[2:] == (gr.skip(), gr.skip()) for s in shown), shown
    assert last(SpeechController(EngineLink(DeafSaver())).transcribe_file(str(clip), "", "", None))[0] == ""


class CountingTranscriber(StoppedTranscriber):
    """StoppedTranscriber that counts the transcriptions asked."""

    def transcribe(self, audio, **kwargs):
        self.sent = getattr(self, "sent", 0) + 1
        yield from super().transcribe(audio, **kwargs)


def test_stop_pressed_before_a_transcription_has_begun_stops_it(tmp_path, capsys):
    """Stop pressed just after Transcribe, while the clip was checked (a video's sound copied out: seconds), said
    "Nothing is being transcribed." and the transcript then came whole. The press is announced (as the Voice and Image
    tabs'): Stop, once or twice, stops it there, nothing is sent and the last transcript stays; once the press's steps
    have ended (or a press was refused), Stop says nothing is being transcribed."""
    from app.ui.common import STOPPED_BEFORE_START

    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.0, 16000, 220.0), 16000))
    me, client = SimpleNamespace(session_hash="stops-early"), CountingTranscriber()
    speech = SpeechController(EngineLink(client))
    kept = speech.press(me, "", "", None)
    speech.stop(me)
    speech.stop(me)
    shown = list(speech.transcribe_file(str(clip), "", "", None, request=me))
    assert shown == [(gr.skip(), STOPPED_BEFORE_START, gr.skip(), gr.skip())] and not getattr(client, "sent", 0)
    assert speech.pressed_done(kept, me)["done"] and "Nothing" not in capsys.readouterr().out
    speech.press(me, "", "", None)
    list(speech.transcribe_file(None, "", "", None, request=me))  # refused: nothing given
    speech.pressed_done(kept, me)
    speech.stop(me)
    assert len(speech.inflight) == 0 and "Nothing is being transcribed." in capsys.readouterr().out


class StoppedPainter(StoppedTranscriber):
    """An engine client whose picture is stopped (or fails) after the preview of step 5 of 40."""

    def __init__(self, end):
        self.end = end

    def imagine(self, prompt, **kwargs):
        picture = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(picture, format="PNG")
        yield ImagePreview(image=picture.getvalue(), step=5, total_steps=40)
        yield self.end


@pytest.mark.parametrize("end", [Done(text="", finish_reason="cancelled"),
                                 Error("the connection to the server was lost", code="connection_lost")],
                         ids=["stopped", "failed"])
def test_a_stopped_or_failed_picture_says_the_result_shown_is_an_unfinished_preview(end):
    """Stop pressed mid-generation left the step-5 preview in the Result box, downloadable as 'image.png', with only
    "finish reason: cancelled (stopped)" said: it read as the picture asked for. The preview stays (it is what was seen)
    and the status says what it is."""
    image = ImageController(EngineLink(StoppedPainter(end)))
    shown, mask, overlay, status, _, gallery, files = last(image.make(
        "Generate", "a cup", None, "(none)", "", AUTO_ASPECT, "", 40, 2.0, 7, 5, []))
    assert shown is not None and shown.size == (8, 8) and gallery == [] and files is None
    assert "the picture shown is the preview after step 5 of 40, not a finished image" in status, status


class InstantPainter(StoppedPainter):
    """An engine client whose picture is made at once (an 8x8 red PNG, with the seed asked)."""

    def imagine(self, prompt, **kwargs):
        picture = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(picture, format="PNG")
        yield ImageDone(image=picture.getvalue(), width=8, height=8, seed=kwargs.get("seed"))
        yield self.end


class QueuedPainter(InstantPainter):
    """InstantPainter whose request first waits in line (second of two)."""

    def imagine(self, prompt, **kwargs):
        yield QueuePosition(position=2, waiting=2)
        yield from super().imagine(prompt, **kwargs)


def test_a_request_waiting_in_line_keeps_the_last_picture_until_the_new_one_comes():
    """The Image tab's place-in-line update emptied the Result box, its mask, overlay and PNG downloads while the new
    request waited: the last picture stays (each output left as it is) until the new one arrives."""
    image = ImageController(EngineLink(QueuedPainter(Done(text="", finish_reason="stop"))))
    waiting, made = list(image.make("Generate", "a cup", None, "(none)", "", AUTO_ASPECT, "", 1, 2.0, 7, 0, [],
                                    progress=lambda *a, **k: None))
    assert [waiting[i] for i in (0, 1, 2, 6)] == [gr.skip()] * 4, waiting
    assert "1 request ahead of yours" in waiting[3] and made[0] is not None and made[6], made


class QueuedSpeaker(StoppedTranscriber):
    """An engine client whose speech first waits in line, then is stopped there (`sound` False, or its cancel set
    meanwhile) or speaks 0.1 s."""

    def __init__(self, sound: bool):
        self.sound = sound

    def speak(self, text, cancel=None, **kwargs):
        yield QueuePosition(position=2, waiting=2)
        speaks = self.sound and not (cancel is not None and cancel.is_set())
        if speaks:
            yield AudioChunk(pcm=np.zeros(2205, "<i2").tobytes(), sample_rate=22050)
        yield Done(text="", finish_reason="stop" if speaks else "cancelled")


def test_a_take_waiting_in_line_or_stopped_there_keeps_the_last_take_playing_and_offered():
    """The Voice tab's place-in-line update emptied the player and took the last take's WAV away while the new request
    waited, and a request stopped in line left them empty: the last take stays until the new one's first sound."""
    args = ("Hi", "Speech", "Default voice", None, None, "", *[None] * 5, "", "", "", None, "", "", "", "", 10, 3)
    waiting, stopped = list(VoiceController(EngineLink(QueuedSpeaker(sound=False))).synthesize(*args))
    assert [waiting[i] for i in (0, 3)] == [gr.skip()] * 2 and "1 request ahead of yours" in waiting[2], waiting
    assert [stopped[i] for i in (0, 3)] == [gr.skip()] * 2 and "cancelled" in stopped[2], stopped
    *_, made = VoiceController(EngineLink(QueuedSpeaker(sound=True))).synthesize(*args)
    assert made[0] is None and Path(made[3]).name.startswith("speech-"), made  # (the new take: the stream's end)


class CountingSpeaker(QueuedSpeaker):
    """QueuedSpeaker that counts the requests sent."""

    def speak(self, text, **kwargs):
        self.sent = getattr(self, "sent", 0) + 1
        yield from super().speak(text, **kwargs)


def test_stop_pressed_before_the_run_has_begun_stops_it(capsys):
    """Stop pressed just after Make it, before the run had begun (the page's steps before it, the engine asked its
    options), said "Nothing is being made." and the take was then made whole. The press is announced at once: Stop
    stops it there, nothing is sent and the last take stays; a press refused before its run began leaves nothing for
    Stop to find once its steps have ended."""
    from app.ui.common import STOPPED_BEFORE_START

    me, speaker = SimpleNamespace(session_hash="stops-early"), CountingSpeaker(sound=True)
    voices = VoiceController(EngineLink(speaker))
    args = ("Hi", "Speech", "Default voice", None, None, "", *[None] * 5, "", "", "", None, "", "", "", "", 10, 3)
    voices.inflight.announce(me.session_hash, voice_tab.TAB)  # (the press's first step)
    voices.stop(me)
    assert list(voices.synthesize(*args, request=me)) == [voice_tab.refused(STOPPED_BEFORE_START)]
    assert getattr(speaker, "sent", 0) == 0 and len(voices.inflight) == 0 and "Nothing" not in capsys.readouterr().out
    voices.inflight.announce(me.session_hash, voice_tab.TAB)
    list(voices.synthesize("", *args[1:], request=me))  # refused: no text
    voices.inflight.settle(me.session_hash, voice_tab.TAB)  # (the press's last step)
    voices.stop(me)
    assert len(voices.inflight) == 0 and "Nothing is being made." in capsys.readouterr().out
    voices.inflight.announce(me.session_hash, voice_tab.TAB)  # an announced press that runs is not stopped by it
    run = voices.synthesize(*args, request=me)
    next(run)  # (waiting in line)
    voices.inflight.announce(me.session_hash, voice_tab.TAB)  # pressed again meanwhile: the run goes on
    assert Path(last(run)[3]).is_file() and speaker.sent == 1


def test_the_reference_pictures_and_mask_of_a_press_are_copied_once(tmp_path):
    """Each press copied every reference picture and the mask twice: once for the request kept in the browser, once
    for the result in the gallery. The result keeps the copies the kept request made."""
    from app.ui.image import MASK, REFERENCES, kept_image_request

    mask = tmp_path / "mask.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(mask)
    cup = str(REPO / "app" / "assets" / "images" / "cup.png")
    kept = kept_image_request("Edit", "make it blue", "", [cup], str(mask))
    image = ImageController(EngineLink(InstantPainter(Done(text="", finish_reason="stop"))))
    *_, state, _ = last(image.make("Edit", "make it blue", [cup], "(none)", "", AUTO_ASPECT, "", 1, 2.0, 7, 0, [],
                                   mask=str(mask), progress=lambda *a, **k: None))
    made = state[0]["settings"]
    assert (made[REFERENCES], made[MASK]) == (kept[REFERENCES], kept[MASK]), (made, kept)
    Path(kept[MASK]).unlink()  # a copy gone (the temp folder cleaned) is made again
    again = kept_image_request("Edit", "make it blue", "", [cup], str(mask))
    assert again[MASK] != kept[MASK] and Path(again[MASK]).read_bytes() == mask.read_bytes()


def test_two_browser_tabs_keep_each_others_gallery():
    """Two tabs of one browser: each wrote its own gallery whole into the browser's one copy (a gr.BrowserState), so
    the pictures of the tab that wrote first were gone after a reload. After each press the page reads the browser's
    list afresh and adds this tab's new results (keep_results_in_page); a reload gives back both tabs' pictures."""
    from app.ui.image import keep_results_in_page

    image = ImageController(EngineLink(InstantPainter(Done(text="", finish_reason="stop"))))
    browser = "[]"  # the browser's localStorage entry, shared by its tabs (STORED_RESULTS)
    galleries = {"tab-a": [], "tab-b": []}  # each tab's own gallery (its gr.State)
    for tab, seed in (("tab-a", 11), ("tab-b", 22), ("tab-a", 33)):
        *_, end = image.make("Generate", "a cup", None, None, "", "1:1", "", 1, 2.0, seed, 0, galleries[tab],
                             request=SimpleNamespace(session_hash=tab), progress=lambda *a, **k: None)
        galleries[tab] = end[5]
        browser = keep_results_in_page(galleries[tab], browser)
    assert [e["settings"]["seed"] for e in galleries["tab-a"]] == [11, 33]  # each tab's own gallery is its own
    entries, shown = ImageController.restore_gallery_in_page(browser)  # a reload of either tab
    assert sorted(e["settings"]["seed"] for e in entries) == [11, 22, 33] and len(shown) == 3


def test_a_request_finished_in_one_tab_leaves_the_one_another_tab_kept_since():
    """Two tabs of one browser share its kept request: tab A's run, ending after tab B pressed Make it, wrote A's
    request, finished, over B's, so a reload of B (its run cut off) gave back A's words and said nothing was lost.
    The end of a run marks the browser's request finished only while it is still this tab's."""
    from app.ui.common import interrupted_note, kept_request, request_done, restore_request
    from app.ui.voice import REQUEST_FIELDS

    browser = {}  # the browser's kept request (BrowserRequest.stored), shared by its tabs
    tab_a = browser = kept_request("Hello from A.", "Speech", names=REQUEST_FIELDS)
    tab_b = browser = kept_request("Hello from B.", "Sound", names=REQUEST_FIELDS)
    browser = request_done(browser, tab_a)  # A's run ends
    assert restore_request(browser, REQUEST_FIELDS, "Make it") == ("Hello from B.", "Sound", interrupted_note("Make it"))
    browser = request_done(browser, tab_b)  # B's ends: nothing to say at the next load
    assert restore_request(browser, REQUEST_FIELDS, "Make it")[2] == gr.skip()


class RecordingTranscriber(StoppedTranscriber):
    """An engine client that keeps what each transcription was asked with."""

    def __init__(self):
        self.asked = []

    def transcribe(self, audio, **kwargs):
        self.asked.append(kwargs)
        yield from super().transcribe(audio, **kwargs)


def test_hotwords_listed_with_a_chinese_comma_go_out_as_separate_words(tmp_path):
    """The Hotwords box says "comma-separated": a list written with the Chinese enumeration comma ('、') went out as one
    hotword ("甘肃省、维吾尔族"), so neither word was one; every comma the box may hold separates them."""
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.0, 16000, 220.0), 16000))
    client = RecordingTranscriber()
    last(SpeechController(EngineLink(client)).transcribe_file(str(clip), "", "甘肃省、维吾尔族，铜锅\nGansu, Uyghur", None))
    assert client.asked[-1]["hotwords"] == ["甘肃省", "维吾尔族", "铜锅", "Gansu", "Uyghur"]


def test_a_transcript_cut_at_the_token_limit_says_so(tiny_engine, tmp_path):
    """A transcript that hit the token cap said "finish reason: stop (complete)": the transcription wire had no
    finish reason and the client assumed "stop". The server sends it (here every request is cut at 6 tokens)."""
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.0, 16000, 220.0), 16000))
    with running_server(tiny_engine, max_new_tokens=6, default_max_tokens=6) as srv:
        speech = SpeechController(EngineLink(EngineClient(srv.url)))
        text, status, txt, srt = last(speech.transcribe_file(str(clip), "", "", "上海"))
        speech.link.status().info.is_demo = False  # the same engine, taken for a real model: the advice is to cut
        real = speech._run(clip.read_bytes(), "", "", None, None)[1]
    assert "finish reason: length (the token limit was reached)" in status and status.endswith(CUT_ON_DEMO), status
    assert text and txt and srt  # what was heard is still kept and offered
    assert real.endswith(CUT_AT_LIMIT), real


def test_a_transcript_of_a_short_clip_cut_on_the_demo_weights_does_not_ask_for_a_shorter_clip(engine_server):
    """The tiny random model runs every transcript to the cap: a 2 s example clip said "the transcript was cut at the
    engine's token limit: transcribe the rest as a separate, shorter clip", sending the user after a shorter clip."""
    speech = SpeechController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    text, status, *_ = last(speech.transcribe_file(str(REPO / "app" / "assets" / "speech" / "what_do_you_see_en.wav"),
                                                   "", "", None))
    assert "finish reason: length" in status and "shorter clip" not in status, status
    assert "random demo weights never end a transcript" in status


def test_a_seed_left_at_random_draws_a_new_seed_each_time(engine_server):
    assert [chosen_seed(v) for v in (RANDOM_SEED, None, "", -7, 0, 42, 3.0)] == [None, None, None, None, 0, 42, 3]
    image = ImageController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    seeds = []
    for seed in (RANDOM_SEED, RANDOM_SEED, RANDOM_SEED, 5):
        *_, last = image.make("Generate", "a cup", None, None, "", "1:1", "32x32", 2, 2.0, seed, 0, [],
                              progress=lambda *a, **k: None)
        seeds.append(last[5][-1]["settings"]["seed"])  # the gallery state's newest entry
    assert len(set(seeds[:3])) == 3 and seeds[3] == 5, seeds


def test_a_seed_the_engine_takes_is_sent_as_typed_up_to_the_largest_the_page_holds_exactly(engine_server):
    """The seed boxes refused anything above 2147483647 ("Seed: -1 for a random one, or 0 to 2147483647.") while the
    engine takes seeds up to 2**63 - 1. They take every seed the page's number box holds exactly (a JavaScript number:
    whole numbers up to 2**53 - 1); a longer one is rounded by the browser, always upward of that limit, so it is
    refused rather than run as another seed."""
    image = ImageController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    for seed in (2**31, SEED_MAX):
        *_, last = image.make("Generate", "a cup", None, None, "", "1:1", "32x32", 2, 2.0, seed, 0, [],
                              progress=lambda *a, **k: None)
        assert f"seed {seed} " in last[3] and last[5][-1]["settings"]["seed"] == seed, last[3]
    assert int(float(SEED_MAX)) == SEED_MAX  # as the browser holds it (an IEEE double)
    rounded = int(float(SEED_MAX + 2))
    assert rounded != SEED_MAX + 2 and seed_problem(rounded) == SEED_RANGE  # arrives changed, above the limit


@pytest.mark.parametrize("seed", [-5, SEED_MAX + 1, "abc"])
def test_a_seed_out_of_range_is_said_in_the_tabs_words_before_sending(seed):
    """A seed below -1 showed Gradio's raw "Value -5 is less than minimum value -1." with an Error badge, one above
    the engine's range "'seed' must be in [0, ...]". Each tab says the range itself and sends nothing (the
    link here has no client: anything sent would fail), keeping the user's input: Chat's turn goes back in the box."""
    import gradio as gr

    assert seed_box().minimum is None  # Gradio's own check would answer first
    no_engine = SimpleNamespace()
    out = list(ImageController(no_engine).make("Generate", "a cup", None, None, "", "1:1", "32x32", 2, 2.0, seed, 0,
                                               [], progress=lambda *a, **k: None))
    assert len(out) == 1 and out[0][3] == SEED_RANGE and [out[0][i] for i in (0, 1, 2, 6)] == [gr.skip()] * 4
    out = list(VoiceController(no_engine).synthesize("Hello.", "Speech", "Default voice", None, None, "", *[None] * 5,
                                                     "", "", "", None, "", "", "", "", 10, seed))
    assert len(out) == 1 and out[0][2] == SEED_RANGE and [out[0][i] for i in (0, 1, 3)] == [gr.skip()] * 3
    turn = [{"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]}]
    history, box, figures, _ = last(ChatController(no_engine).respond(turn, 12, 0.0, 1.0, 0, 1.0, seed, "", False,
                                                                      False, ""))
    assert history == [] and box["text"] == "Tell me a story." and figures == SEED_RANGE
    assert str(RANDOM_SEED) in SEED_RANGE and str(SEED_MAX) in SEED_RANGE
    assert [seed_problem(v) for v in (RANDOM_SEED, None, "", 0, SEED_MAX, 3.0)] == [None] * 6  # what is sent


def test_a_studio_started_before_its_engine_shows_what_the_engine_serves_once_it_is_up(tiny_engine):
    """launch.py --engine URL starts the page while the engine is down: the tabs said "This engine has no
    talker" (no image generator, ...) and kept the instruction and saved-voice lists empty after it came back.
    Each page load asks the engine again (one link per tab here: none is refreshed by another's asking)."""
    from engine.server import ServerHandle, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chat, voice, notes, live = (EngineLink(EngineClient(f"http://127.0.0.1:{port}", token="test-token"), recheck_s=0)
                                for _ in range(4))
    voice = VoiceController(voice)
    assert note_text(notes, SPEECH_OUT, "no talker") == note_text(notes, IMAGE_OUT, "no image generator") == ""
    # Live said "Replies are text for now: this engine has no speech output yet" of an engine it never reached
    assert engine_settings(live)()["speech_output"] is True
    speak, speech = speech_controls(chat)
    assert speak == {"interactive": False, "info": "the engine is not reachable"} and speech == {"visible": False}
    assert [u["choices"] for u in voice.page_load()[:6]] == [[NO_CHOICE]] * 5 + [[]]

    server = ServerHandle(create_app(tiny_engine, token="test-token"), host="127.0.0.1", port=port).start()
    try:  # the pages loaded now
        assert speech_controls(chat) == ({"interactive": True, "info": ""}, {"visible": True})
        *instructions, saved, _, _, _, _ = voice.page_load()
        assert all(len(u["choices"]) > 1 and u["choices"][0] == NO_CHOICE for u in instructions), instructions
        assert saved["choices"] == voice.voice_names()
        assert note_text(notes, SPEECH_OUT, "no talker") == ""
        assert engine_settings(live)()["speech_output"] is True
    finally:
        server.stop()
    assert note_text(notes, SPEECH_OUT, "no talker") == "" and not notes.status().ok  # seen serving a talker
    notes.status().info.capabilities.discard(SPEECH_OUT)  # as an engine without a talker
    assert note_text(notes, SPEECH_OUT, "no talker") == "no talker"
    live.status().info.capabilities.discard(SPEECH_OUT)
    assert engine_settings(live)()["speech_output"] is False  # an engine seen without a talker: replies are text


def test_music_that_ends_before_the_duration_asked_says_so(engine_server):
    """Music with Duration 10 s came back 3.84 s long, and nothing said why: the duration is asked of the model,
    which may end sooner. The status line says how much was made of what was asked."""
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    *_, last = voices.synthesize("", "Music", "Default voice", None, None, "", *[None] * 5, "", "", "", None,
                                 "Lo-fi", "Calm", "Piano", "Rain", 60, 3)
    assert "finish reason: stop" in last[2], last[2]
    assert "of the 60 s asked: the model ended the music sooner" in last[2], last[2]


def test_an_edit_or_segment_with_the_tabs_defaults_keeps_the_reference_shape(engine_server):
    """The Aspect ratio box started at 1:1 and was always sent, and the engine crops an Edit's (or a Segment's)
    reference to the aspect asked (spec §8.8): the 512x384 cup came back square, cut at both sides. The box starts
    at Auto: a Generate is square, an Edit or a Segment keeps the reference's shape; an aspect chosen is sent."""
    from PIL import Image

    assert ASPECTS[0] == AUTO_ASPECT
    image = ImageController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    cup = str(REPO / "app" / "assets" / "images" / "cup.png")
    shapes = {}
    asks = (("Edit", "make it blue", "", AUTO_ASPECT), ("Segment", "", "the cup", AUTO_ASPECT),
            ("Edit", "make it blue", "", "1:1"), ("Generate", "a cup", "", AUTO_ASPECT))
    for mode, prompt, target, aspect in asks:
        refs = [cup] if mode != "Generate" else None
        *_, last = image.make(mode, prompt, refs, "(none)", target, aspect, "", 1, 2.0, 1, 0, [],
                              progress=lambda *a, **k: None)
        assert "finish reason: stop" in last[3] and DEMO_PICTURE in last[3], last[3]  # (the tiny random weights)
        w, h = Image.open(last[6][0]).size
        shapes[(mode, aspect)] = w / h
        # the downloads are named for what was made and its seed (all were 'image-<time>.png')
        kinds = ("", "-mask", "-overlay") if mode == "Segment" else ("",)
        names = [re.sub(r"-\d{8}-\d{6}\.png$", "", Path(f).name) for f in last[6]]
        assert names == [f"{mode.lower()}-seed1{k}" for k in kinds], last[6]
        # an Edit's or a Segment's picture is kept with its result, to come back when the result is reopened
        kept = last[5][-1]["settings"].get("references")
        assert kept is None if mode == "Generate" else [Path(k).read_bytes() for k in kept] == [Path(cup).read_bytes()]
        assert kept is None or Path(kept[0]).name == "cup.png"
    assert abs(shapes[("Edit", AUTO_ASPECT)] - 4 / 3) < 0.1, shapes
    assert abs(shapes[("Segment", AUTO_ASPECT)] - 4 / 3) < 0.1, shapes
    assert shapes[("Edit", "1:1")] == 1.0 and shapes[("Generate", AUTO_ASPECT)] == 1.0, shapes


class Transcriber(StoppedTranscriber):
    """An engine client whose transcription completes with 'hello'."""

    def transcribe(self, audio, **kwargs):
        yield Done(text="hello", finish_reason="stop", result={"text": "hello"})


class SlowTranscriber(StoppedTranscriber):
    """An engine client whose transcription waits in line, then writes its transcript in pieces."""

    def transcribe(self, audio, **kwargs):
        yield QueuePosition(position=2, waiting=3)
        yield TextDelta("hello")
        yield TextDelta(" world")
        yield Done(text="hello world", finish_reason="stop", result={"text": "hello world"})


def test_a_transcription_shows_its_place_in_line_and_the_transcript_as_it_is_written(tmp_path):
    """Transcribe showed nothing until the whole transcript was done (a long clip: minutes of a spinner), not even
    its place in the engine's line; it now streams both, and offers the files only once it is done."""
    import gradio as gr

    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.0, 16000, 220.0), 16000))
    shown = list(SpeechController(EngineLink(SlowTranscriber())).transcribe_file(str(clip), "", "", None))
    keep = (gr.skip(), gr.skip())  # (the last finished transcript's files stay until this one is done)
    assert "1 request ahead of yours" in shown[0][1] and shown[0][2:] == keep, shown[0]
    assert [s[0] for s in shown[1:3]] == ["hello", "hello world"] and all(s[2:] == keep for s in shown[:3]), shown
    text, status, txt, srt = shown[-1]
    assert text == "hello world" and "finish reason: stop" in status
    assert Path(txt).read_text(encoding="utf-8") == "hello world\n" and srt


@pytest.mark.parametrize("fmt, codec", [("flac", "flac"), ("mp3", "libmp3lame"), ("wav", "pcm_f32le")])
def test_the_srt_of_a_clip_that_is_not_16_bit_wav_spans_the_clip(tmp_path, fmt, codec):
    """The .srt's cue was timed by Python's wave module alone: an MP3 or FLAC upload (or a 32-bit float WAV) got
    '00:00:00,000 --> 00:00:00,001', a millisecond for a 2.5 s clip; the cue spans the clip whatever its format."""
    av = pytest.importorskip("av")
    clip, rate = tmp_path / f"clip.{fmt}", 16000
    with av.open(str(clip), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone_pcm16(2.5, rate, 220.0)[None], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    text, status, txt, srt = last(SpeechController(EngineLink(Transcriber())).transcribe_file(str(clip), "", "", None))
    assert text == "hello" and txt, status
    cue = Path(srt).read_text(encoding="utf-8").splitlines()[1]
    assert cue.startswith("00:00:00,000 --> 00:00:02,"), cue
    assert abs(int(cue[-3:]) - 500) <= 60, cue  # 2.5 s, give or take an encoder's padding


WINDOWS = [{"start": 0.0, "end": 29.4, "text": " hello there "}, {"start": 29.4, "end": 30.2, "text": "  "},
           {"start": 30.2, "end": 3725.0004, "text": "and goodbye"}]
WINDOWS_SRT = ("1\n00:00:00,000 --> 00:00:29,400\nhello there\n\n"
               "2\n00:00:30,200 --> 01:02:05,000\nand goodbye\n")  # (the window with no text has no cue)


class WindowedTranscriber(StoppedTranscriber):
    """An engine client whose transcription of a long recording comes back in windows, one of them silent."""

    def transcribe(self, audio, **kwargs):
        yield Done(text="hello there and goodbye", finish_reason="stop",
                   result={"text": "hello there and goodbye", "segments": WINDOWS})


def test_the_speech_tabs_srt_is_the_engines_own_srt_answer(tmp_path):
    """The Speech tab timed its .srt cues with a copy of the server's subtitle code; both now write them with one
    function (engine.client.subtitles, the server's response_format srt): a cue per window holding text."""
    from engine.client import subtitles

    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(0.5, 16000, 220.0), 16000))
    *_, srt = last(SpeechController(EngineLink(WindowedTranscriber())).transcribe_file(str(clip), "", "", None))
    assert Path(srt).read_text(encoding="utf-8") == WINDOWS_SRT == subtitles("", 0.5, "srt", WINDOWS)
    assert subtitles("hello", 2.5, "srt") == "1\n00:00:00,000 --> 00:00:02,500\nhello\n"  # (no windows: one cue)


def test_controls_left_from_another_task_do_not_change_or_break_this_one(engine_server):
    """A preset left chosen from an Edit made a Generate fail ('edit presets need an input image'), a picture left
    from an Edit turned a Generate into an edit of it, and a Segment of two pictures (the box says the first one is
    used) failed ('segmentation takes exactly one input image'): each task sends only what it uses."""
    from PIL import Image

    image = ImageController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    cup, sign = (str(REPO / "app" / "assets" / "images" / f) for f in ("cup.png", "sign.png"))
    for mode, prompt, target, refs, preset in (("Generate", "a cup", "", None, "Remove an object"),
                                               ("Generate", "a cup", "", [cup], "Remove an object"),
                                               ("Segment", "", "the cup", [cup, sign], "Replace the background")):
        *_, last = image.make(mode, prompt, refs, preset, target, AUTO_ASPECT, "", 1, 2.0, 1, 0, [],
                              progress=lambda *a, **k: None)
        assert "finish reason: stop" in last[3], (mode, last[3])
        w, h = Image.open(last[6][0]).size
        assert abs(w / h - (1.0 if mode == "Generate" else 4 / 3)) < 0.1, (mode, w, h)  # text to image; the cup
        assert (REFS_NOT_USED in last[3]) == (mode == "Generate" and bool(refs)), last[3]  # said, not dropped silently


def test_what_music_or_a_sound_does_not_use_is_said_not_dropped_silently(engine_server):
    """Music is made from the Music section alone and a sound effect or music takes no voice (the talker refuses
    one): text typed for Music, or a saved voice or clip chosen for them, was dropped without a word. It is still
    not sent, and the status line says so."""
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    music = ("Lo-fi", "Calm", "Piano", "Rain", 2)
    *_, last = voices.synthesize("a sad violin piece", "Music", "Saved voice", "anna", None, "", *[None] * 5, "", "",
                                 "", None, *music, 3)
    assert "finish reason: stop" in last[2] and MUSIC_TEXT_UNUSED in last[2], last[2]
    assert VOICE_UNUSED.format(what="music") in last[2], last[2]
    *_, last = voices.synthesize("rain", "Sound effect", "Clone from a clip", None, None, "", *[None] * 5, "", "",
                                 "", None, *music, 3)
    assert "finish reason: stop" in last[2] and VOICE_UNUSED.format(what="a sound effect") in last[2], last[2]
    assert MUSIC_TEXT_UNUSED not in last[2], last[2]
    *_, last = voices.synthesize("", "Music", "Default voice", None, None, "", *[None] * 5, "", "", "", None,
                                 *music, 3)
    assert "not used" not in last[2], last[2]  # nothing given that goes unused: nothing said


def test_a_clip_transcribed_in_the_tab_can_then_be_cloned(engine_server):
    """'Transcribe the clip' asked for up to 512 tokens, where the engine bounds the transcript it fills in itself at
    256 (engine.runtime.REF_TRANSCRIPT_MAX_TOKENS): on the demo weights the 6 s example clip's transcript ran to
    the cap, and Make it then failed with 'the prompt is too long for the talker (3276 tokens with the reference; at
    most 2032): shorten the text or the reference clip'. The tab asks for what the engine itself allows."""
    from engine.runtime import REF_TRANSCRIPT_MAX_TOKENS
    from app.ui.voice import REF_TRANSCRIPT_TOKENS

    assert REF_TRANSCRIPT_TOKENS == REF_TRANSCRIPT_MAX_TOKENS
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    clip = str(REPO / "app" / "assets" / "speech" / "what_is_this_zh.wav")
    transcript, status = voices.transcribe_clip(clip)
    assert transcript and "filled in by speech recognition" in status, status
    *_, last = voices.synthesize("Hello, this is a cloned voice.", "Speech", "Clone from a clip", None, clip,
                                 transcript, *[None] * 5, "", "", "", None, "", "", "", "", 10, 3)
    assert "finish reason: stop" in last[2], last[2]


def test_text_too_long_to_speak_is_said_in_the_tabs_words(engine_server):
    """11,297 characters to speak came back as "Error (invalid_value): 'input' is too long: 11,297 characters, at
    most 10,000", in the wire's words; the tab says it of the text box with the engine's limit (speech options'
    max_input_chars) and what to do, before sending anything, on the status line and in a toast (as the engine's
    refusals are; it had no toast)."""
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    most = voices.options()["max_input_chars"]
    text = "Hello there. " * (most // 13 + 100)
    with pytest.warns(UserWarning, match="engine speaks at most") as toasts:  # (gr.Warning outside a page: a warning)
        *_, last = voices.synthesize(text, "Speech", "Default voice", None, None, "", *[None] * 5, "", "", "", None,
                                     "", "", "", "", 10, 3)
    assert last[2] == TEXT_TOO_LONG.format(n=len(text), most=most), last[2]
    assert [str(t.message) for t in toasts] == [last[2]]  # said in a toast too, as the engine's refusals are
    assert f"{len(text):,}" in last[2] and "'input'" not in last[2]


def test_a_request_refused_before_sending_leaves_the_last_result_in_place(engine_server, tmp_path):
    """Make it (or Transcribe) pressed with something missing wiped what the tab had just made: the picture, its mask,
    overlay and PNG downloads, the clip playing and its WAV, the transcript and its files, to show only the message.
    The message is shown and the last result stays (each output is left unchanged)."""
    import gradio as gr

    link = EngineLink(EngineClient(engine_server.url, token="test-token"))
    unchanged = gr.skip()
    image = ImageController(link)
    for mode, prompt, refs, target in (("Generate", " ", None, ""), ("Edit", "blue", None, ""),
                                       ("Segment", "", [str(REPO / "app" / "assets" / "images" / "cup.png")], "")):
        out = list(image.make(mode, prompt, refs, "(none)", target, AUTO_ASPECT, "", 1, 2.0, 1, 0, [],
                              progress=lambda *a, **k: None))
        assert len(out) == 1 and out[0][3], out
        assert [out[0][i] for i in (0, 1, 2, 6)] == [unchanged] * 4, (mode, out)
    # a size the engine refuses ("1024 by 768", typed by a careless user) left an empty Result box and no PNG
    refused = last(image.make("Generate", "a cup", None, "(none)", "", AUTO_ASPECT, "1024 by 768", 1, 2.0, 1, 0, [],
                              progress=lambda *a, **k: None))
    assert refused[3] == SIZE_FORM.format(size="1024 by 768"), refused  # (said before sending, in the tab's words)
    assert [refused[i] for i in (0, 1, 2, 6)] == [unchanged] * 4, refused
    voices = VoiceController(link)
    for text, task, source in (("", "Speech", "Default voice"), ("Hi", "Podcast (speaker_1: / speaker_2: lines)",
                                                                  "Default voice"), ("Hi", "Speech", "Saved voice")):
        out = list(voices.synthesize(text, task, source, None, None, "", *[None] * 5, "", "", "", None,
                                     "", "", "", "", 10, 3))
        assert len(out) == 1 and out[0][2] and [out[0][i] for i in (0, 1, 3)] == [unchanged] * 3, out
    # a voice design the engine refuses (100,000 characters) took the last take's player and WAV away
    out = last(voices.synthesize("Hi", "Speech", "Default voice", None, None, "", *[None] * 5, "word " * 20_000, "",
                                 "", None, "", "", "", "", 10, 3))
    assert "too long" in out[2] and [out[i] for i in (0, 1, 3)] == [unchanged] * 3, out
    transcript, status, txt, srt = last(SpeechController(link).transcribe_file(None, "", "", None))
    assert status and [transcript, txt, srt] == [unchanged] * 3
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    transcript, status, txt, srt = last(SpeechController(link).transcribe_file(str(empty), "", "", None))
    assert "empty" in status and [transcript, txt, srt] == [unchanged] * 3


def test_the_voice_tab_offers_what_the_engines_talker_does(tiny_engine):
    """A Preview engine's talker speaks text only (spec §7.11): the tab still offered Sound effect, Music and
    Podcast and showed the Instructions and Music sections, each refused once pressed. The tab now offers
    what /v1/audio/speech/options says; an engine that cannot say is offered everything."""
    from engine.server import ServerHandle, create_app

    preview = {"tasks": ["tts"], "instructions": False, "dialects": {}}
    task, instructions, music = VoiceController.offered(preview)
    assert task["choices"] == ["Speech"] and task["value"] == "Speech"
    assert instructions["visible"] is False and music["visible"] is False
    task, instructions, music = VoiceController.offered({})  # (engine down)
    assert len(task["choices"]) == 4 and "value" not in task and instructions["visible"] and music["visible"]
    with ServerHandle(create_app(tiny_engine, token="test-token"), host="127.0.0.1", port=0) as server:
        voice = VoiceController(EngineLink(EngineClient(server.url, token="test-token")))
        *_, task, instructions, music, status = voice.page_load()  # the 2.0 talker: everything
        assert len(task["choices"]) == 4 and instructions["visible"] and music["visible"]
        assert status == gr.skip()  # (nothing said of options that came)


@contextmanager
def engine_hung_on_speech_options(card: bytes):
    """An engine that answers its model card (so the studio finds it up, with a talker) and never answers the speech
    options: the request is held until the test ends."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path.startswith("/v1/models"):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(card)))
                self.end_headers()
                self.wfile.write(card)
            else:
                release.wait(30)

        def log_message(self, *args):
            pass

    with serving(Handler) as url:
        try:
            yield url
        finally:
            release.set()


def test_an_engine_hung_on_the_speech_options_holds_the_voice_tab_a_bounded_time(engine_server, monkeypatch):
    """The Voice tab asked the engine's speech options with the client's whole timeout (60 s): an engine hung on them
    held the studio's start, each page load and each Make it for a minute (its saved voices list as long), and the lists
    came up empty without a word.
    The wait is bounded, the status line says the options did not come and that Refresh asks again."""
    card = httpx.get(f"{engine_server.url}/v1/models", headers={"Authorization": "Bearer test-token"}).content
    monkeypatch.setattr(voice_tab, "OPTIONS_TIMEOUT_S", 0.2)
    monkeypatch.setattr(common, "VOICE_LIST_TIMEOUT_S", 0.2)  # (the saved voices: held as long)
    with engine_hung_on_speech_options(card) as url:
        voices = VoiceController(EngineLink(EngineClient(url, timeout=60)))
        started = time.monotonic()
        *lists, saved, _, _, _, status = voices.page_load()
        waited = time.monotonic() - started
    assert waited < 5, waited
    assert [u["choices"] for u in lists] == [[NO_CHOICE]] * 5
    assert "did not say its voice options" in status and "Refresh" in status, status


def test_a_refused_token_is_said_as_what_to_do_in_the_page(engine_server, monkeypatch):
    """A studio started with the wrong --engine-token: each tab's Make it said "Error (unauthorized): missing or wrong
    token: send 'Authorization: Bearer <token>' (or '?token=<token>')", advice for a client program, and the banner
    "Requests fail until it is back", as if waiting would do. Both now say to start the studio with the engine's token."""
    from app.ui.banner import banner_html

    monkeypatch.setattr("gradio.Warning", lambda *a, **k: None)
    link = EngineLink(EngineClient(engine_server.url, token="wrong-token"))
    banner = banner_html(link.status())
    assert "--engine-token" in banner and "until it is back" not in banner, banner
    *_, image = ImageController(link).make("Generate", "a cup", None, None, "", "1:1", "32x32", 2, 2.0, 1, 0, [],
                                           progress=lambda *a, **k: None)
    *_, voice = VoiceController(link).synthesize("Hi", "Speech", "Default voice", None, None, "", *[None] * 5, "", "",
                                                 "", None, "", "", "", "", 10, 3)
    for said in (image[3], voice[2]):
        assert "refused this studio's token" in said and "--engine-token" in said, said
        assert "Authorization" not in said, said


def test_a_long_text_says_how_much_audio_is_made_while_it_is_made(engine_server):
    """A long text to speak said only "Generating…" until it was done (minutes for a few pages); each piece of audio
    made now says how much there is so far."""
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    shown = list(voices.synthesize("Hello there, this is a longer text. " * 6, "Speech", "Default voice", None, None,
                                   "", *[None] * 5, "", "", "", None, "", "", "", "", 10, 3))
    so_far = [float(s[2].split()[1]) for s in shown[:-1] if s[2].endswith("s of audio so far")]
    assert len(so_far) >= 2 and so_far == sorted(so_far) and so_far[0] > 0, [s[2] for s in shown]
    assert "finish reason: stop" in shown[-1][2]


def test_the_image_tab_starts_at_the_loaded_models_steps_and_guidance(tiny_engine, monkeypatch):
    """The Guidance slider was fixed at 2.0 (2.0's image_gen_cfg), so every Preview request ran at 2.0 instead of
    the Preview's 5.0 (spec §8.10). The card now says the loaded DiT's defaults and the tab starts there."""
    from app.ui.image import model_defaults
    from engine.models.imagegen.config import SD3

    with running_server(tiny_engine) as srv:
        link = EngineLink(EngineClient(srv.url))
        assert link.status().info.image_defaults == {"steps": 30, "guidance": 2.0}
        steps, guidance, image_guidance = model_defaults(link)
        assert steps["value"] == 30 and guidance["value"] == 2.0 and image_guidance["visible"] is False
        monkeypatch.setattr(tiny_engine.image_generator, "kind", SD3)  # what a Preview checkpoint loads
        link.refresh(force=True)
        assert link.status().info.image_defaults == {"steps": 30, "guidance": 5.0, "image_guidance": 2.0}
        _, guidance, image_guidance = model_defaults(link)
        assert guidance["value"] == 5.0 and image_guidance == {**image_guidance, "value": 2.0, "visible": True}


def test_the_image_guidance_slider_goes_with_a_preview_edit_or_segment_only(tiny_engine, preview_engine, tmp_path):
    """The Preview's reference-picture guidance: an Edit sends the slider's value (1.0 turns the reference's guidance
    off: another picture), and so does a Segment (it ran at the engine's default whatever the slider said); a
    Generate does not (the server refuses it there), nor does any request to a 2.0 engine, whose card does not offer
    it. The gallery keeps the value sent with the picture's other settings."""
    cup = tmp_path / "cup.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(cup)

    def made(engine, mode, image_guidance):
        with running_server(engine) as srv:
            *_, out = ImageController(EngineLink(EngineClient(srv.url))).make(
                mode, "make it blue", [str(cup)], "(none)", "the cup", AUTO_ASPECT, "32x32", 2, 5.0, 1, 0, [],
                image_guidance, progress=lambda *a, **k: None)
        assert out[0] is not None, out[3]  # the picture (else the status line says why)
        return Path(out[0]).read_bytes(), out[5][-1]["settings"]

    default, settings = made(preview_engine, "Edit", 2.0)
    assert made(preview_engine, "Edit", 1.0)[0] != default and settings["image_guidance"] == 2.0
    segmented, settings = made(preview_engine, "Segment", 3.0)
    assert made(preview_engine, "Segment", 1.0)[0] != segmented and settings["image_guidance"] == 3.0
    generated, settings = made(preview_engine, "Generate", 1.0)
    assert made(preview_engine, "Generate", 2.0)[0] == generated and "image_guidance" not in settings
    edited, settings = made(tiny_engine, "Edit", 1.0)
    assert made(tiny_engine, "Edit", 2.0)[0] == edited and "image_guidance" not in settings


def test_a_picture_reopened_from_the_gallery_brings_back_its_image_guidance(tmp_path):
    """A click on a gallery picture put back every setting but the Image guidance slider: a Preview edit reopened at
    1.5 was made again at whatever the slider said. It comes back (from the browser's kept gallery too); an entry
    made without it (a Generate, a 2.0 engine, an earlier studio's) leaves the slider as it is."""
    import gradio as gr

    settings = {"mode": "Edit", "prompt": "make it blue", "preset": "(none)", "target": "", "aspect": AUTO_ASPECT,
                "size": "", "steps": 8, "guidance": 5.0, "seed": 7}
    made = _save_png(b"png", "image")
    kept = kept_results([{"image": made, "settings": {**settings, "image_guidance": 1.5}},
                         {"image": made, "settings": settings}])
    assert [e["settings"].get("image_guidance") for e in kept] == [1.5, None]

    def reused(index):
        return ImageController.reuse(kept, SimpleNamespace(index=index))

    assert reused(0) == ("Edit", "make it blue", "(none)", "", AUTO_ASPECT, "", 8, 5.0, 7, 1.5, gr.update(), None)
    assert reused(1)[:9] == reused(0)[:9] and reused(1)[9] == gr.update()
    assert len(ImageController.reuse(kept, SimpleNamespace(index=5))) == 12  # nothing there: every control as it is


def test_a_reopened_edit_brings_back_the_pictures_it_edited(tmp_path):
    """A click on an Edit in the gallery put its prompt and settings back but not its pictures: Make it then edited
    whatever the upload box held (nothing after a reload). The copies kept with the result come back, from the
    browser's kept gallery too, only where this studio saved all of them (a path anywhere else is not opened)."""
    settings = {"mode": "Edit", "prompt": "make it blue", "preset": "(none)", "target": "", "aspect": AUTO_ASPECT,
                "size": "", "steps": 8, "guidance": 2.0, "seed": 7}
    made, picture = _save_png(b"png", "edit-seed7"), _keep_copy(b"jpeg", "/uploads/photo.jpg")
    elsewhere = tmp_path / "photo.jpg"
    elsewhere.write_bytes(b"jpeg")
    kept = kept_results([{"image": made, "settings": {**settings, "references": [picture]}},
                         {"image": made, "settings": {**settings, "references": [picture, str(elsewhere)]}}])
    assert Path(picture).name == "photo.jpg" and Path(picture).read_bytes() == b"jpeg"
    assert [e["settings"].get("references") for e in kept] == [[str(Path(picture).resolve())], None]
    assert ImageController.reuse(kept, SimpleNamespace(index=0))[-2] == [str(Path(picture).resolve())]


class MaskRecorder(InstantPainter):
    """InstantPainter that keeps what each imagine call sent."""

    def __init__(self, end):
        super().__init__(end)
        self.sent = []

    def imagine(self, prompt, **kwargs):
        self.sent.append(kwargs)
        yield from super().imagine(prompt, **kwargs)


def test_an_edit_sends_its_mask_and_the_gallery_says_it_was_masked(tmp_path):
    """The Image tab had no mask (the server and engine.client take OpenAI's): an Edit sends the Mask box's PNG, the
    gallery caption says 'masked' and the result keeps a copy, given back by a click (and after a reload); a Generate
    leaves a mask in the (hidden) box unsent, and an unmasked Edit reopened empties the box."""
    from app.ui.image import MASK_LABEL, build_image_tab, mask_box

    mask = tmp_path / "mask.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(mask)
    painter = MaskRecorder(Done(text="", finish_reason="stop"))
    image, cup = ImageController(EngineLink(painter)), str(REPO / "app" / "assets" / "images" / "cup.png")
    quiet = {"progress": lambda *a, **k: None}
    *_, gallery, state, _ = last(image.make("Edit", "make it blue", [cup], "(none)", "", AUTO_ASPECT, "", 1, 2.0, 7, 0,
                                            [], mask=str(mask), **quiet))
    assert painter.sent[-1]["mask"] == mask.read_bytes() and gallery[0][1].startswith("Edit · masked · seed 7")
    kept = kept_results(state)
    assert Path(kept[0]["settings"]["mask"]).read_bytes() == mask.read_bytes()
    assert ImageController.reuse(kept, SimpleNamespace(index=0))[-1] == kept[0]["settings"]["mask"]
    *_, gallery, state, _ = last(image.make("Generate", "a cup", None, "(none)", "", AUTO_ASPECT, "", 1, 2.0, 8, 0,
                                            state, mask=str(mask), **quiet))
    assert painter.sent[-1]["mask"] is None and "masked" not in gallery[1][1]
    *_, state, _ = last(image.make("Edit", "make it blue", [cup], "(none)", "", AUTO_ASPECT, "", 1, 2.0, 9, 0, state,
                                   **quiet))
    assert ImageController.reuse(state, SimpleNamespace(index=2))[-1] is None
    assert [mask_box(mode)["visible"] for mode in ("Generate", "Edit", "Segment")] == [False, True, False]
    with gr.Blocks() as demo:
        build_image_tab(EngineLink(painter))
    assert [b.visible for b in demo.blocks.values() if getattr(b, "label", None) == MASK_LABEL] == [False]


@pytest.mark.parametrize("mask, says", [(Image.new("RGB", (512, 384)), "has no alpha channel"),
                                        (Image.new("RGBA", (32, 32)), "it must be the size of the picture it marks"),
                                        (Image.new("RGBA", (512, 384), (0, 0, 0, 255)), "opaque everywhere")],
                         ids=["no-alpha", "other-size", "opaque"])
def test_a_mask_the_engine_refuses_is_said_on_the_status_line(engine_server, tmp_path, mask, says):
    """The engine's refusals of a mask (no alpha, another size than the picture, opaque everywhere) reach the status
    line as the tab says its other failures, and nothing is added to the gallery."""
    path = tmp_path / "mask.png"
    mask.save(path)
    image = ImageController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    cup = str(REPO / "app" / "assets" / "images" / "cup.png")
    assert Image.open(cup).size == (512, 384)
    _, _, _, status, _, gallery, files = last(image.make("Edit", "make it blue", [cup], "(none)", "", AUTO_ASPECT, "",
                                                         1, 2.0, 1, 0, [], mask=str(path),
                                                         progress=lambda *a, **k: None))
    assert says in status and gallery == [] and files == gr.skip(), status  # (the last picture's PNGs stay offered)


def test_a_picture_the_engine_refuses_is_named_by_its_file(engine_server, tmp_path):
    """The engine's refusal of the second reference (1x400: over its 200:1) reached the status line as "'image[1]':
    image aspect ratio 400.0 ... is too extreme", naming none of the files given; it names the file."""
    thin = tmp_path / "thin-strip.png"
    Image.new("RGB", (1, 400)).save(thin)
    image = ImageController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    cup = str(REPO / "app" / "assets" / "images" / "cup.png")
    *_, status, _, gallery, _ = last(image.make("Edit", "make it blue", [cup, str(thin)], "(none)", "", AUTO_ASPECT, "",
                                                1, 2.0, 1, 0, [], progress=lambda *a, **k: None))
    assert "'thin-strip.png': image aspect ratio" in status and "image[1]" not in status and gallery == [], status


@pytest.mark.parametrize("fmt, vcodec, acodec", [("mp4", "mpeg4", "aac"), ("webm", "libvpx", "libopus")])
def test_the_sound_of_a_video_is_transcribed_even_when_the_video_is_over_the_upload_limit(tiny_engine, tmp_path, fmt,
                                                                                         vcodec, acodec):
    """The Speech tab took audio only: a video with sound got Gradio's own file-type message. A video's sound track
    is transcribed, and only the sound is sent: a video larger than the engine's upload limit whose sound is small
    is transcribed too, its .srt spanning the video."""
    video = video_file(tmp_path / f"talk.{fmt}", fmt, vcodec, acodec)
    limit = 96 * 1024
    assert video.stat().st_size > limit  # the file as a whole could not be sent
    with running_server(tiny_engine, max_upload_bytes=limit, default_max_tokens=4) as srv:
        speech = SpeechController(EngineLink(EngineClient(srv.url)))
        text, status, txt, srt = last(speech.transcribe_file(None, "", "", None, video=str(video)))
    assert "finish reason" in status and text and txt, status
    cue = Path(srt).read_text(encoding="utf-8").splitlines()[1]
    assert cue.startswith("00:00:00,000 --> 00:00:02,"), cue


def test_a_recording_too_large_to_upload_is_sent_as_the_speech_the_model_hears(tiny_engine, tmp_path):
    """A clip over the engine's upload limit (30 minutes of WAV is 160 MiB; the limit is 25 MiB) was refused before
    sending; it is sent as its first channel at 16 kHz in Opus (what the model's front end takes of it), and
    transcribed."""
    import wave

    rate, seconds = 48000, 4.0
    tone = tone_pcm16(seconds, rate, 220.0)
    clip = tmp_path / "meeting.wav"
    with wave.open(str(clip), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.stack([tone, np.zeros_like(tone)], 1).tobytes())  # speech on the first channel only
    limit = 96 * 1024
    assert clip.stat().st_size > 7 * limit
    with running_server(tiny_engine, max_upload_bytes=limit, max_new_tokens=2, default_max_tokens=2) as srv:
        speech = SpeechController(EngineLink(EngineClient(srv.url)))
        text, status, txt, srt = last(speech.transcribe_file(str(clip), "", "", None))
    assert "finish reason" in status and text and txt, status
    assert Path(srt).read_text(encoding="utf-8").splitlines()[1] == "00:00:00,000 --> 00:00:04,000"


def test_a_video_without_sound_or_with_a_clip_beside_it_is_said_and_nothing_is_lost(tmp_path):
    """A video with no sound track is named as such (not sent, no empty files), a damaged one as a video (not as "an
    audio clip" of the audio formats), and a clip given beside a video asks which to transcribe; the last transcript and its files stay in place."""
    import gradio as gr

    silent_film = REPO / "app" / "assets" / "video" / "cup_on_table.mp4"
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.0, 16000, 220.0), 16000))
    speech = SpeechController(EngineLink(Transcriber()))
    shown = list(speech.transcribe_file(None, "", "", None, video=str(silent_film)))
    assert len(shown) == 1 and shown[0][1].startswith("'cup_on_table.mp4' is a video with no sound track"), shown
    assert shown[0][0] == shown[0][2] == shown[0][3] == gr.skip()  # the last transcript and files are kept
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(silent_film.read_bytes()[:200])
    damaged = last(speech.transcribe_file(None, "", "", None, video=str(broken)))[1]
    assert damaged.startswith("'broken.mp4' is not a video the engine can read (an MP4"), damaged
    both = list(speech.transcribe_file(str(clip), "", "", None, video=str(silent_film)))
    assert [s[1] for s in both] == [BOTH_GIVEN], both
    nothing = list(speech.transcribe_file(None, "", "", None))
    assert [s[1] for s in nothing] == [NOTHING_GIVEN], nothing


def test_a_context_longer_than_the_model_can_read_is_said_in_the_tabs_words(engine_server):
    """A context pasted whole (a long document) came back as "Error (invalid_value): 'prompt' is too long (200000
    characters)": the engine's field name, not the tab's, and no limit. It is refused before sending, naming the
    model's context, and the last transcript stays; a context that fits is sent."""
    import gradio as gr

    speech = SpeechController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    clip = str(REPO / "app" / "assets" / "speech" / "what_do_you_see_en.wav")
    most = speech.link.status().info.limits["context_tokens"]
    shown = list(speech.transcribe_file(clip, "x" * 200_000, "", None))
    assert len(shown) == 1 and shown[0][1].startswith("The context and hotwords are 200,000 characters"), shown
    assert f"at most {most:,} tokens" in shown[0][1] and shown[0][0] == shown[0][2] == gr.skip()
    text, status, *_ = last(speech.transcribe_file(clip, "A talk about cooking.", "Gansu, Uyghur", None))
    assert "finish reason" in status, status


def test_a_recording_is_held_to_the_transcription_limit_and_transcribed_in_windows(tiny_engine, tmp_path, monkeypatch):
    """A video's sound and a clip are held to the engine's transcription limit (the model card's
    max_transcription_seconds), said before sending. The tab held them to the clip limit (max_audio_seconds), so a
    10-minute talk was refused though the engine transcribes it in windows; the status says which window it is on and
    the .srt has a cue per window."""
    from engine.models.thinker.asr_windows import Windowing

    monkeypatch.setattr(tiny_engine, "asr_windowing", Windowing(window_s=1.5, search_s=0.5))
    video = video_file(tmp_path / "lecture.mp4", "mp4", "mpeg4", "aac", seconds=3.0, size=(64, 48))
    clip = tmp_path / "talk.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.9, 8000, 220.0), 8000))  # over the clip limit, within the transcription's
    with running_server(tiny_engine, max_audio_seconds=1.0, max_transcription_seconds=2.0, max_new_tokens=2,
                        default_max_tokens=2) as srv:  # (2 transcript tokens a window)
        speech = SpeechController(EngineLink(EngineClient(srv.url)))
        refused = list(speech.transcribe_file(None, "", "", None, video=str(video)))
        shown = list(speech.transcribe_file(str(clip), "", "", None))
    assert len(refused) == 1 and refused[0][1].startswith("'lecture.mp4' is 3 s long; the engine takes at most 2 s")
    statuses = [status for _, status, *_ in shown]
    assert "Transcribing… part 1 of 2" in statuses and "Transcribing… part 2 of 2" in statuses, statuses
    text, status, txt, srt = shown[-1]
    cues = Path(srt).read_text(encoding="utf-8").strip().split("\n\n")
    assert "finish reason" in status and text and len(cues) == 2 and cues[1].startswith("2\n"), cues


class AssumedRateSpeaker(StoppedTranscriber):
    """An engine client whose speech came without a sample rate: the client played it at one it assumed and said so
    in Done's result (sample_rate_note), as engine.client does."""

    def speak(self, text, **kwargs):
        from engine.events import AudioChunk
        from engine.server.protocol import ASSUMED_RATE_NOTE, OPENAI_PCM_RATE

        for start in range(3):
            yield AudioChunk(tone_pcm16(0.1, OPENAI_PCM_RATE, 220.0).tobytes(), OPENAI_PCM_RATE, "", start * 0.1)
        yield Done(text="", finish_reason="stop", result={"sample_rate": OPENAI_PCM_RATE,
                                                          "sample_rate_note": ASSUMED_RATE_NOTE})


def test_speech_played_at_an_assumed_sample_rate_says_so_once_in_the_status_line():
    """Speech whose rate the engine did not say played at 24 kHz (maybe too fast or slow) and the Voice tab said
    nothing of it: the client's sample_rate_note was dropped. The finished take's status line says it, once."""
    from engine.server.protocol import ASSUMED_RATE_NOTE

    statuses = [out[2] for out in VoiceController(EngineLink(AssumedRateSpeaker())).synthesize(
        "Hello.", "Speech", "Default voice", None, None, "", *[None] * 5, "", "", "", None, "", "", "", "", 10, 3)]
    said = ASSUMED_RATE_NOTE[1:]  # (the status line starts the note with a capital)
    assert statuses[-1].count(said) == 1 and not any(said in s for s in statuses[:-1]), statuses


@contextmanager
def engine_whose_answers_head_never_ends():
    """An engine that answers its model card, and every POST with the start of an answer's head that never ends (a
    proxy or a server stuck mid-answer); `hung_up` is set once the studio closed such an answer's connection."""
    card = b'{"object": "list", "data": [{"id": "m"}]}'
    hung_up = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(card)))
            self.end_headers()
            self.wfile.write(card)

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
            self.wfile.flush()
            try:
                closed = self.connection.recv(1) == b""  # (waits for the studio to close the connection)
            except OSError:
                closed = True
            if closed:
                hung_up.set()

        def log_message(self, *args):
            pass

    with serving(Handler) as url:
        yield url, hung_up


def test_stop_while_the_engines_answer_is_starting_says_stopped_at_once(tmp_path):
    """Stop pressed while the engine's answer had begun but its head had not all come (a proxy or a server stuck
    mid-answer) was heard only when the client's whole timeout (60 s) had passed. The tab now says it stopped at once,
    and the studio closes the request's connection."""
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(0.5, 16000, 220.0), 16000))
    me = SimpleNamespace(session_hash="stops-a-stuck-answer")
    with engine_whose_answers_head_never_ends() as (url, hung_up):
        speech = SpeechController(EngineLink(EngineClient(url, timeout=60)))
        threading.Timer(0.2, speech.stop, args=(me,)).start()
        started = time.monotonic()
        *_, (text, status, *_) = speech.transcribe_file(str(clip), "", "", None, request=me)
        took = time.monotonic() - started
        assert hung_up.wait(1.0)
    assert took < 2.0 and status == "finish reason: cancelled (stopped)", (took, status)
