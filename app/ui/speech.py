"""The Speech tab: speech recognition from the microphone, an audio file or a video's sound, with the model's
contextual ASR (a context sentence and a hotword list) and a forced language / dialect tag (spec §6.3), or a
translation into English (the language list's last choice: the engine's /v1/audio/translations). While
recording, a partial transcript of what was said so far is refreshed every few seconds; the final one is copyable and
downloadable as .txt and .srt (one cue spanning the clip: the model gives no word timestamps)."""

from __future__ import annotations

import io
import re
import tempfile
import time
import wave
from pathlib import Path

import gradio as gr
import numpy as np

from app.engine_link import AUDIO_IN, EngineLink
from app.media_check import (AUDIO_FORMATS, TO_TRANSCRIBE, VIDEO_FORMATS, VIDEO_SOUND, clip_seconds, media_problem,
                              upload_size_problem)
from app.sound_track import sound_track, speech_track
from app.ui.common import (GENERATING, STOPPED_BEFORE_START, InFlight, browser_kept, capability_note, engine_limits,
                           error_line, failure, figures_line, queue_line, check_on_upload, run_button, runs_tab, say_refused_files,
                           session_of, toolbar, wire_stop, says_refused, kept_request, on_page_load, request_done,
                           restore_request)
from app.ui.speech_live import KeptWindows
from engine.client import subtitles
from engine.events import TRANSCRIBING_STAGE, Done, Error, Progress, QueuePosition, TextDelta

TAB = "speech"
AUTO = "Auto (detect)"
# Tags confirmed by the upstream code (spec §6.3); the model's other dialect tags are not published,
# so any other tag typed here is passed through as given.
KNOWN_TAGS = {"Chinese": "Chinese (Mandarin)", "上海": "上海 (Shanghainese, Wu)", "English": "English"}
# The dropdown's choice that asks for an English translation (the engine's /v1/audio/translations) instead of a
# transcript: the model is told to translate the speech, whatever its language.
TRANSLATE = "Translate into English (from any language)"
TRANSLATING = "Translating…"
PARTIAL_EVERY_S = 3.0
CUT_AT_LIMIT = "the transcript was cut at the engine's token limit: transcribe the rest as a separate, shorter clip"
# On the random demo weights every transcript runs to the cap (they never end one), whatever the clip's length: the
# advice above sent a user of a 2 s clip looking for a shorter one.
CUT_ON_DEMO = ("the transcript ran to the engine's token limit: the random demo weights never end a transcript by "
               "themselves, whatever the clip's length (the real model ends it where the speech ends)")
MAX_LIVE_SECONDS = 300.0
TRANSCRIBING = "Transcribing…"
NOTHING_GIVEN = "Record or upload a clip, or give a video with sound, first."
BOTH_GIVEN = ("Both a clip and a video are given: remove the one not to transcribe (its ×) and press Transcribe "
              "again.")
# A context and hotwords over what the model's context holds came back in the engine's wire terms ("'prompt' is too
# long (200000 characters)"; the box is "Context"). A token stands for a character at most (the engine's own check).
SETTINGS_TOO_LONG = ("The context and hotwords are {n:,} characters; this model's context holds at most {most:,} tokens, "
                     "so at most {most:,} characters: shorten them to the few words that say what the audio is about.")
# While a transcription runs, and when it fails or is stopped, the .txt and .srt boxes keep the last finished
# transcript's files (they were emptied when the next one started: a stopped or failed run lost the earlier transcript).
KEEP_FILES = (gr.skip(), gr.skip())
# A reload mid-transcription lost the context, hotwords and language typed, and the run, without a word: they are kept in
# the browser when Transcribe is pressed (common.kept_request) and come back, saying so; the clip cannot (give it again).
REQUEST_KEY = "ming-studio-speech-request"
REQUEST_FIELDS = ("context", "hotwords", "dialect")
INTERRUPTED = ("Your last transcription was interrupted (the page was reloaded or closed before it was finished). Its "
               "context, hotwords and language are back: give the clip again and press \"Transcribe\".")
# The video files the Speech tab takes (their sound is transcribed): what phones, cameras and screen recorders write.
VIDEO_FILE_TYPES = [".mp4", ".webm", ".mov", ".mkv", ".m4v"]


def wav_bytes(rate: int, samples: np.ndarray) -> bytes:
    """Mono PCM16 WAV of float or int samples (the browser's microphone chunks)."""
    x = np.asarray(samples)
    if x.ndim == 2:
        x = x.mean(axis=1) if x.shape[1] <= 8 else x.mean(axis=0)
    if x.dtype.kind == "f":
        x = np.clip(x, -1.0, 1.0) * 32767
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(x.astype("<i2").tobytes())
    return buf.getvalue()


def progress_line(event: Progress) -> str:
    """The status of a long recording transcribed in windows (the engine's Progress, counted in windows)."""
    return f"{TRANSCRIBING} part {min(event.done + 1, event.total)} of {event.total}"


# What separates hotwords: a newline and a comma of any script (a Chinese list is written with '，' or '、': the
# enumeration comma '、' left "甘肃省、维吾尔族" one hotword, so neither word was one).
HOTWORD_SEPARATORS = re.compile(r"[\n,，、]")


def hotword_list(text: str | None) -> list[str]:
    return [w.strip() for w in HOTWORD_SEPARATORS.split(text or "") if w.strip()]


def dialect_tag(choice: str | None) -> str | None:
    if not choice or choice == AUTO:
        return None
    for tag, label in KNOWN_TAGS.items():
        if choice in (tag, label):
            return tag
    return choice.strip() or None


def settings_problem(context: str | None, hotwords: str | None, limits: dict) -> str | None:
    """What keeps the context and hotwords from fitting the model's context (ModelInfo.limits' context_tokens), in the
    tab's words; None when they may fit (or the engine does not say)."""
    n, most = len(context or "") + len(hotwords or ""), limits.get("context_tokens")
    return SETTINGS_TOO_LONG.format(n=n, most=int(most)) if most and n > most else None


class SpeechController:
    def __init__(self, link: EngineLink):
        self.link = link
        self.inflight = InFlight()

    def _stream(self, audio: bytes | str, context, hotwords, dialect, request):
        """Transcribe once, saying how it goes: (transcript so far, status line, result, finished) each time either
        changes; `result` is None until the end, and stays None when it failed or was stopped."""
        if problem := settings_problem(context, hotwords, engine_limits(self.link)):  # (a live partial transcript)
            yield "", problem, None, True
            return
        translate = dialect == TRANSLATE
        session = session_of(request)
        cancel = self.inflight.begin(session, TAB)
        if cancel.is_set():  # Stop pressed since Transcribe was (the press announced), before this began
            self.inflight.end(session, TAB, cancel)
            yield None, STOPPED_BEFORE_START, None, True  # (None: no transcript, the last one stays)
            return
        working = TRANSLATING if translate else TRANSCRIBING
        text, status, result = "", working, None
        context = (context or "").strip() or None
        try:
            words = hotword_list(hotwords) or None  # (a translation takes them as a transcription does)
            events = (self.link.client.translate(audio, context=context, hotwords=words, cancel=cancel) if translate
                      else self.link.client.transcribe(audio, context=context, hotwords=words,
                                                       dialect=dialect_tag(dialect), cancel=cancel))
            for event in events:
                if isinstance(event, QueuePosition):
                    status = queue_line(event)
                    if status == GENERATING:
                        status = working
                    yield text, status, None, False
                elif isinstance(event, Progress) and event.stage == TRANSCRIBING_STAGE and event.total > 1:
                    status = progress_line(event)
                    yield text, status, None, False
                elif isinstance(event, TextDelta):
                    text += event.text
                    yield text, status if status.startswith(working) else working, None, False
                elif isinstance(event, Done):
                    status = figures_line(event)
                    if event.finish_reason == "cancelled":  # Stop: what was heard stays, no files (an empty .txt)
                        break
                    result = event.result or {}
                    text = result.get("text", text)
                    if result.get("language"):
                        status = f"language: {result['language']} · " + status
                    if event.finish_reason == "length":  # the wire said so (it read "stop (complete)" before)
                        info = self.link.status().info
                        status += f" · {CUT_ON_DEMO if info is not None and info.is_demo else CUT_AT_LIMIT}"
                    break
                elif isinstance(event, Error):
                    status = error_line(event)
                    break
        except Exception as e:  # noqa: BLE001
            status = error_line(failure(e))
        finally:
            self.inflight.end(session, TAB, cancel)
        yield text, status, result, True

    def _run(self, audio: bytes | str, context, hotwords, dialect, request) -> tuple[str, str, dict | None]:
        """Transcribe once: (transcript, figures line, result or None: failed or stopped)."""
        *_, (text, status, result, _) = self._stream(audio, context, hotwords, dialect, request)
        return text or "", status, result

    def transcribe_file(self, path: str | None, context, hotwords, dialect, request: gr.Request | None = None,
                        video: str | None = None):
        """Transcribe an uploaded or recorded clip, or the sound of a `video` file, streaming (transcript, status,
        .txt file, .srt file): the place in the engine's line and the transcript as it is written, then the figures
        and the files (a long clip showed nothing, not even its place in line, until the whole transcript was
        done). A refused request, or one that fails or is stopped before its first words, leaves the last transcript
        and its files in place."""
        if path and video:
            yield gr.skip(), BOTH_GIVEN, gr.skip(), gr.skip()
            return
        source = path or video
        if not source:
            gr.Info(NOTHING_GIVEN)
            yield gr.skip(), NOTHING_GIVEN, gr.skip(), gr.skip()
            return
        limits = engine_limits(self.link)
        if problem := settings_problem(context, hotwords, limits):
            yield gr.skip(), problem, gr.skip(), gr.skip()
            return
        if problem := media_problem(path, TO_TRANSCRIBE, limits) if path else media_problem(video, VIDEO_SOUND, limits):
            yield gr.skip(), problem, gr.skip(), gr.skip()
            return
        audio, what = self._audio_to_send(path, video, limits)
        if problem := upload_size_problem(what, len(audio), limits):
            yield gr.skip(), problem, gr.skip(), gr.skip()
            return
        heard = False  # (this run's first words, or its result, have come)
        for text, status, result, finished in self._stream(audio, context, hotwords, dialect, request):
            # the last finished transcript's files stay until this one is done, and stay when it fails or is stopped;
            # its text stays until this run's first words (a run failing before any, queue full or the engine gone,
            # emptied it: the user's last transcript lost to an error)
            heard = heard or bool(text) or result is not None
            done = finished and result is not None
            yield (text if heard else gr.skip(), status,
                   *(self._files(text, clip_seconds(source) or 0.0, result) if done else KEEP_FILES))

    @staticmethod
    def _audio_to_send(path: str | None, video: str | None, limits: dict) -> tuple[bytes, str]:
        """(bytes, what they are in words) sent for a clip or a video: a clip as it is or, when it is too large to
        upload, what the model hears of it (speech_track: 30 minutes of WAV in 7 MiB); a video's sound track alone, or
        the whole video when that cannot be copied out (the engine's transcription takes a video's sound too)."""
        if path:
            name = f"'{Path(path).name}'"
            if upload_size_problem(name, Path(path).stat().st_size, limits) and (speech := speech_track(path)):
                return speech, f"{name} as 16 kHz speech"
            return Path(path).read_bytes(), name
        if sound := sound_track(video):
            return sound, f"the sound track of '{Path(video).name}'"
        return Path(video).read_bytes(), f"'{Path(video).name}'"

    @staticmethod
    def _files(text: str, seconds: float, result: dict | None = None) -> tuple[str, str]:
        folder = Path(tempfile.mkdtemp(prefix="ming-asr-"))
        stem = f"transcript-{time.strftime('%Y%m%d-%H%M%S')}"
        txt, srt = folder / f"{stem}.txt", folder / f"{stem}.srt"
        txt.write_text(text.strip() + "\n", encoding="utf-8")
        # SubRip cues as the engine's own srt answer has them: a cue per window of a long recording, else one
        srt.write_text(subtitles(text, seconds, "srt", (result or {}).get("segments")), encoding="utf-8")
        return str(txt), str(srt)

    def stream(self, state: dict | None, chunk, context, hotwords, dialect, request: gr.Request | None = None):
        """A microphone chunk while recording: keep it, and every few seconds transcribe what was said since the
        last finished window (speech_live: the finished windows' text is kept, not transcribed again). Returns
        (state, partial transcript, status)."""
        state = dict(state or {"rate": None, "chunks": [], "seconds": 0.0, "last": 0.0, "text": "",
                               "kept": KeptWindows()})
        if chunk is None:
            return state, state["text"], ""
        rate, samples = chunk
        samples = np.asarray(samples)
        if state["rate"] not in (None, rate):
            return state, state["text"], "the microphone changed its sample rate mid-recording; start again"
        if state["seconds"] >= MAX_LIVE_SECONDS:
            return state, state["text"], f"recording longer than {MAX_LIVE_SECONDS:.0f} s: stop and upload instead"
        state["rate"] = rate
        state["chunks"].append(samples.mean(axis=1) if samples.ndim == 2 else samples)
        state["seconds"] += len(state["chunks"][-1]) / rate
        if state["seconds"] - state["last"] < PARTIAL_EVERY_S:
            return state, state["text"], f"recording… {state['seconds']:.0f} s"
        state["last"] = state["seconds"]
        kept, audio = self._open_audio(state, context, hotwords, dialect)
        text, status, result = self._run(wav_bytes(rate, audio), context, hotwords, dialect, request)
        state["text"] = kept.joined(text)
        kept.keep(result, rate)
        return state, state["text"], f"partial transcript after {state['seconds']:.0f} s · {status}"

    @staticmethod
    def _open_audio(state: dict, *settings) -> tuple[KeptWindows, np.ndarray]:
        """The recording's finished windows (none when the settings changed since they were transcribed) and the
        audio after them."""
        kept = state.get("kept")
        if kept is None or kept.settings != settings:
            kept = state["kept"] = KeptWindows(settings)
        return kept, kept.open_audio(np.concatenate(state["chunks"]))

    def finish(self, state: dict | None, context, hotwords, dialect, request: gr.Request | None = None):
        """Recording stopped: the final transcript of the whole recording (the windows the partials finished are
        kept; the audio after them is transcribed now)."""
        state = state or {}
        if not state.get("chunks"):
            return None, gr.skip(), "Nothing was recorded.", *KEEP_FILES
        kept, audio = self._open_audio(state, context, hotwords, dialect)
        text, status, result = self._run(wav_bytes(state["rate"], audio), context, hotwords, dialect, request)
        if kept.segments:
            status += f" · the first {kept.upto / state['rate']:.0f} s were transcribed while recording"
        result = None if result is None else kept.whole(result, len(audio) / state["rate"], state["rate"])
        files = self._files(result["text"], state["seconds"], result) if result is not None else KEEP_FILES
        return None, kept.joined(text), status, *files

    def press(self, request: gr.Request, *settings) -> dict:
        """Transcribe's first step: the settings kept in the browser (REQUEST_KEY), and the press announced
        (InFlight.announce): Stop pressed while the clip was checked, or a video's sound copied out, before the
        transcription had begun, said "Nothing is being transcribed." and the transcript then came whole."""
        self.inflight.announce(session_of(request), TAB)
        return kept_request(*settings, names=REQUEST_FIELDS)

    def pressed_done(self, kept, request: gr.Request | None = None) -> dict:
        """Transcribe's last step: the kept request marked finished, and a press refused before its transcription
        began leaves nothing for Stop to find (InFlight.settle)."""
        self.inflight.settle(session_of(request), TAB)
        return request_done(kept)

    def stop(self, request: gr.Request | None = None) -> None:
        if not self.inflight.cancel(session_of(request), TAB):
            gr.Info("Nothing is being transcribed.")


def refused_clip(name: str, is_video: bool) -> str:
    """What the clip box says of a file that is not audio (app/static/uploads.js): a video goes in the video box."""
    if is_video:
        return f"'{name}' is a video: give it in the box below (\"…or a video with sound\"), which transcribes its sound."
    return f"'{name}' is not an audio clip: give a {AUDIO_FORMATS} file, or a video with sound in the box below."


def refused_video(name: str, is_video: bool) -> str:
    """What the video box says of a file that is not one of its video formats (app/static/uploads.js)."""
    if is_video:
        return f"'{name}' is a video in a format this box does not take: give an {VIDEO_FORMATS} file."
    return f"'{name}' is not a video ({VIDEO_FORMATS}): an audio clip goes in the box above."


def restore_settings(kept) -> tuple:
    """At page load: (context, hotwords, language, status) as kept when Transcribe was last pressed (REQUEST_KEY); the
    status says when that transcription was interrupted."""
    *fields, status = restore_request(kept, REQUEST_FIELDS, "Transcribe")
    return (*fields, status if isinstance(status, dict) else INTERRUPTED)  # (a dict: gr.skip(), nothing to say)


def build_speech_tab(link: EngineLink, examples: list[str] | None = None,
                     kept_ask: gr.BrowserState | None = None) -> SpeechController:
    """Build the Speech tab inside the current Tab. `kept_ask`: where the browser keeps the last request's settings,
    made at the page's top level (as the Image tab's); a tab built alone makes its own."""
    controller = SpeechController(link)
    capability_note(link, AUDIO_IN, "This engine serves no audio encoder, so it cannot transcribe speech.")
    with gr.Row():
        with gr.Column():
            clip = gr.Audio(sources=["upload", "microphone"], type="filepath",
                            label="An audio clip to transcribe (a video: give it in the box below)",
                            buttons=toolbar("download"), **says_refused("speech-clip"))
            video = gr.File(label=f"…or a video with sound ({VIDEO_FORMATS}): its sound is transcribed",
                            file_types=VIDEO_FILE_TYPES, **says_refused("speech-video"))
            live = gr.Audio(sources=["microphone"], streaming=True, label="Live: partial transcript while you speak",
                            buttons=toolbar("download"),
                            elem_id="speech-live")
            context = gr.Textbox(label="Context (what the audio is about; optional)", lines=2,
                                 placeholder="This is an audio about Culinary Traditions.",
                                 **runs_tab("Transcribe"))
            hotwords = gr.Textbox(label="Hotwords (comma-separated; optional)",
                                  placeholder="Gansu Province, Uyghur, copper cauldrons", **runs_tab())
            dialect = gr.Dropdown([AUTO, *KNOWN_TAGS.values(), TRANSLATE], value=AUTO, allow_custom_value=True,
                                  label="Language / dialect", info="Auto lets the model detect it. Other tags the "
                                  "model emits can be typed in; its full dialect list is not published. The last "
                                  "choice writes the speech in English instead.")
            with gr.Row():
                go = run_button("Transcribe", "speech-go")
                stop = gr.Button("Stop", variant="stop", elem_id="speech-stop")
            if examples:
                gr.Examples([[e] for e in examples], [clip], label="Examples")
        with gr.Column():
            transcript = gr.Textbox(label="Transcript", lines=8, buttons=["copy"], elem_id="speech-transcript")
            status = gr.Markdown("", elem_id="speech-figures")
            with gr.Row():
                txt = gr.File(label=".txt (the last finished transcript)", elem_id="speech-txt")
                srt = gr.File(label=".srt (the last finished transcript)", elem_id="speech-srt")
    state = gr.State(None)
    settings = [context, hotwords, dialect]
    ask = kept_ask if kept_ask is not None else browser_kept(REQUEST_KEY)
    hidden = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}
    go.click(controller.press, settings, [ask], **hidden).then(
        controller.transcribe_file, [clip, *settings, video], [transcript, status, txt, srt],
        api_name="transcribe", concurrency_limit=None).then(controller.pressed_done, [ask], [ask], **hidden)
    on_page_load(restore_settings, [*settings, status], inputs=[ask])
    live.stream(controller.stream, [state, live, *settings], [state, transcript, status], stream_every=1.0,
                concurrency_limit=None, api_visibility="private")
    live.stop_recording(controller.finish, [state, *settings], [state, transcript, status, txt, srt],
                        concurrency_limit=None, api_visibility="private")
    wire_stop(stop, controller.stop, api_visibility="private")
    check_on_upload(link, clip, TO_TRANSCRIBE, status)  # (one too large to upload is sent as 16 kHz speech)
    say_refused_files("speech-clip", status, refused_clip)
    say_refused_files("speech-video", status, refused_video)
    check_on_upload(link, video, VIDEO_SOUND, status)  # (its sound track alone is sent: its size is checked then)
    return controller
