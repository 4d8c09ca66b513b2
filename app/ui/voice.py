"""The Voice tab: text to speech with the talker's instruction captions (dialect, emotion, speed,
pitch, volume, a free-text voice design, a character voice), voice cloning from an uploaded or
recorded clip with its transcript (filled in by the model's ASR when left empty, and editable), a
voice library (save, reuse, delete), sound effects and music from a description, and podcast-style
dialogue. Audio plays while it is made; the finished clip is a WAV download, and every take stays offered (the
last MAX_KEPT_TAKES, kept by the browser across a page reload)."""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
import wave
from pathlib import Path

import gradio as gr
import numpy as np

from app.engine_link import SPEECH_OUT, EngineLink
from app.media_check import AUDIO_FORMATS, VOICE_CLIP_SECONDS, media_problem
from app.ui.common import (GENERATING, STOPPED_BEFORE_START, InFlight, capability_note, chosen_seed,
                           engine_limits, error_line,
                           error_text, failure, figures_line, from_json, on_engine_change, on_page_load,
                           queue_line, run_button, runs_tab, saved_voice_names, seed_box, seed_problem, session_of,
                           toolbar, wire_stop,
                           BrowserRequest, check_on_upload, says_refused,
                           say_refused_files)
from engine.events import TRANSCRIBING_STAGE, AudioChunk, Done, Error, Progress, QueuePosition, TextDelta

TAB = "voice"
TASKS = {"Speech": "tts", "Sound effect": "sound", "Music": "music", "Podcast (speaker_1: / speaker_2: lines)": "podcast"}
DEFAULT_VOICE = "Default voice"
NO_CHOICE = "(model default)"
VOICE_SOURCES = ("Default voice", "Saved voice", "Clone from a clip")
REPLACE_LABEL = "Replace a saved voice of that name"
CONFIRM_DELETE, KEEP_VOICE = "Yes, delete it", "No, keep it"
# The engine's "podcast needs one reference clip (or saved voice) per speaker" read as if two could be given here.
PODCAST_NEEDS_A_VOICE = ("A podcast needs a reference voice: choose Voice \"Clone from a clip\" or \"Saved voice\" "
                         "(the voice of speaker_1; this tab takes one).")
# The most tokens 'Transcribe the clip' asks for: the engine's own bound on a reference transcript it fills in
# (engine.runtime.REF_TRANSCRIPT_MAX_TOKENS; a clip is at most 30 s). The transcription default (512) let the demo
# weights' runaway transcript of a 6 s clip into the talker prompt, and Make it failed as "too long for the talker".
REF_TRANSCRIPT_TOKENS = 256
# The longest name the engine saves a voice under (engine.server.params.MAX_VOICE_NAME_CHARS; not imported: that
# module loads torch, which a UI-only studio has not): a longer one came back as "'name' is too long (5000 characters)".
VOICE_NAME_CHARS = 64
NAME_TOO_LONG = "The name is {n:,} characters; a saved voice's name is at most {most} characters: shorten it."
# Text over the engine's limit (speech options' max_input_chars) came back as "'input' is too long: ...".
TEXT_TOO_LONG = ("The text is {n:,} characters; the engine speaks at most {most:,} at a time: split it and make each "
                 "part in turn.")
# What a task does not use (not sent: the talker takes music from the Music section alone, and refuses a voice for
# a sound or music), said on the status line: it was dropped without a word.
MUSIC_TEXT_UNUSED = "the text box was not used: music is made from the Music section (genre, mood, ...)"
VOICE_UNUSED = "the Voice chosen was not used: {what} takes no voice"
# A clip cloned without its transcript is first transcribed (seconds, before any sound): the line said "Generating…".
NAME_TAKEN = ("A voice named '{name}' is already saved: tick \"{replace}\" to overwrite it, or choose another "
              "name.")
SAVE_STOPPED = "Stopped: the voice '{name}' was not saved."
# A voice deleted meanwhile elsewhere (another browser tab), deleted again here: the list still offered it, and the
# engine's "unknown voice ...; saved voices: ..." was shown in the wire's words
ALREADY_DELETED = ("The voice '{name}' is not saved any more (it was deleted elsewhere, in another tab?): the list "
                   "is up to date now.")
# Make it refused for a saved voice that is not saved any more (the engine's code): said in the tab's words (it was
# "Error (voice_not_found): unknown voice 'x'; saved voices: ..."), the list brought up to date
VOICE_NOT_FOUND = "voice_not_found"
VOICE_GONE = ("The voice '{name}' is not saved any more (deleted in another tab, or while this request waited its "
              "turn): the Saved voices list is up to date now; choose another voice.")
CLIP_TEXT = "What the clip says"  # the transcript box
# The tab's own transcription of a clip to save heard no words: the save passed no transcript and the engine transcribed
# the clip again (the same nothing), where Stop could not stop it. The voice is not saved; the user types the words.
NOTHING_HEARD = ("Speech recognition heard no words in the clip, so the voice '{name}' was not saved: type what the "
                 f"clip says in \"{CLIP_TEXT}\", or choose a clip in which someone speaks.")
TRANSCRIBING_CLIP = ("Transcribing the reference clip (no transcript was given; type what it says to skip this)… "
                     "Stop stops it.")
REQUEST_KEY = "ming-studio-voice-request-json"  # the browser's key of the last request (common.BrowserRequest)
REQUEST_FIELDS = ("text", "task")
# The browser's localStorage key of the takes made (kept across a page reload), read and written by the page itself at
# each take: a gr.BrowserState, written whole from each tab's own copy, made the takes of one tab overwrite another's.
KEPT_TAKES_KEY = "ming-studio-voice-takes-list"
STORED_TAKES = f"localStorage.getItem({KEPT_TAKES_KEY!r}) || '[]'"  # (a JavaScript expression)
WRITE_TAKES_JS = f"(takes) => {{ try {{ localStorage.setItem({KEPT_TAKES_KEY!r}, takes); }} catch {{}} return []; }}"
# Make it again replaced the WAV download: the take before was gone. Every take stays offered, newest first, up to:
MAX_KEPT_TAKES = 20
STEMS = {"tts": "speech", "sound": "sound", "music": "music", "podcast": "podcast"}  # a take's file name: what it is
# A take cut short says so in its name (a stopped take was offered as 'speech-<time>.wav', as if whole):
STOPPED_TAKE, FAILED_TAKE = "stopped", "failed"
TAKE_NAME = re.compile(rf"({'|'.join(STEMS.values())})-\d{{8}}-\d{{6}}(-\d{{3}})?(-{STOPPED_TAKE}|-{FAILED_TAKE})?\.wav")
INSTRUCTION_KEYS = ("dialects", "emotions", "speeds", "pitches", "volumes")  # speech_options() lists, in that order
# The most the tab waits for the engine's speech options (the instruction lists, the text limit): a hung engine held
# the studio's start, each page load and each Make it for the client's whole request timeout (60 s).
OPTIONS_TIMEOUT_S = 5.0
OPTIONS_UNANSWERED = ("The engine did not say its voice options ({why}): the Dialect, Emotion, Speed, Pitch and Volume "
                      "lists offer their default only for now. Press Refresh to ask again.")


_last_take_ms = [0]  # the last take's time (ms): each take's is later
_take_lock = threading.Lock()


def take_stamp() -> str:
    """'20261203-160500-123': now, to the millisecond, and later than the last take's (two takes never share one)."""
    with _take_lock:
        ms = _last_take_ms[0] = max(time.time_ns() // 1_000_000, _last_take_ms[0] + 1)
    return f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(ms / 1000))}-{ms % 1000:03d}"


def write_wav(chunks: list[np.ndarray], rate: int, task: str = "tts", cut: str | None = None) -> str:
    """The clip as a WAV file named for what it is (speech, sound, music, podcast: music was 'speech-….wav') and when,
    to the millisecond (two takes of one second, a short sound made twice, were offered under one name), and, for a
    take cut short, how (`cut`: STOPPED_TAKE or FAILED_TAKE)."""
    stem = STEMS.get(task, task)
    ending = f"-{cut}" if cut else ""
    path = Path(tempfile.mkdtemp(prefix="ming-voice-")) / f"{stem}-{take_stamp()}{ending}.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        for c in chunks:
            w.writeframes(c.astype("<i2").tobytes())
    return str(path)


def kept_takes(saved) -> list[str]:
    """The takes the browser kept (gr.BrowserState, KEPT_TAKES_KEY) that can still be offered: a WAV named as
    write_wav names one, under the temp folder (the browser holds what it gives back: a path anywhere else is not
    opened), still there (gone when the machine cleaned its temp folder); at most MAX_KEPT_TAKES, newest first."""
    temp = Path(tempfile.gettempdir()).resolve()
    out: list[str] = []
    for entry in saved if isinstance(saved, list) else []:
        path = Path(str(entry)).resolve() if isinstance(entry, str) else None
        if (path is not None and TAKE_NAME.fullmatch(path.name) and path.is_relative_to(temp) and path.is_file()
                and str(path) not in out):
            out.append(str(path))
    return out[:MAX_KEPT_TAKES]


def keep_take(latest, saved) -> tuple[list[str], list[str] | None]:
    """After Make it: (the takes the browser keeps, the Takes list), the take in the WAV download first (a run refused
    or failed before any sound leaves the download, and so the list, as it was)."""
    takes = kept_takes([latest, *(saved if isinstance(saved, list) else [])])
    return takes, takes or None


def keep_take_in_page(latest, saved: str | None) -> tuple[str, list[str] | None]:
    """keep_take for the page: the takes kept in this browser come and go as JSON (STORED_TAKES, WRITE_TAKES_JS)."""
    takes, offered = keep_take(latest, from_json(saved))
    return json.dumps(takes), offered


def restore_takes_in_page(saved: str | None) -> tuple[str, list[str] | None]:
    """restore_takes for the page (see keep_take_in_page)."""
    takes, offered = restore_takes(from_json(saved))
    return json.dumps(takes), offered


def restore_takes(saved) -> tuple[list[str], list[str] | None]:
    """At page load: (the takes kept, the Takes list) as the browser kept them (see kept_takes)."""
    takes = kept_takes(saved)
    return takes, takes or None


def music_length_note(made_s: float, asked_s) -> str:
    """What the status line adds when music ended well before the Duration asked (10 s asked, 3.84 s made, and nothing
    said why): the duration is asked of the model, which may end sooner; it is stopped a few seconds after it."""
    if not asked_s or made_s >= float(asked_s) - 1.0:
        return ""
    return (f" · {made_s:.1f} s made of the {float(asked_s):.0f} s asked: the model ended the music sooner (the "
            "duration is asked of the model, not imposed)")


def warning_note(warning: str | None) -> str:
    """The status line's note of a warning, as the engine or the client said it; "" when none was said. Those of a
    take: a reference clip that was cloned but will not clone well (a clipped one: how much of it sits at full scale
    and what to do), and audio whose sample rate the engine did not say (the client's sample_rate_note: it plays at a
    rate assumed, maybe too fast or too slow)."""
    return f" · ⚠ {warning[:1].upper()}{warning[1:]}" if warning else ""


def instruction(dialect, emotion, speed, pitch, volume, style, ip, env, snr) -> dict:
    """The instruction caption fields the user set (choices left at the default are left out)."""
    fields = {"dialect": dialect, "emotion": emotion, "speed": speed, "pitch": pitch, "volume": volume,
              "style": (style or "").strip(), "ip": (ip or "").strip()}
    out = {k: v for k, v in fields.items() if v and v != NO_CHOICE}
    bgm = {k: v for k, v in {"ENV": (env or "").strip(), "SNR": snr}.items() if v not in (None, "", 0)}
    if bgm:
        out["bgm"] = bgm
    return out


def refused(message: str, voices=None) -> tuple:
    """What Make it yields for a request refused before anything is sent: the message on the status line, the last
    clip made left playing and offered (a press with no text wiped the player and the WAV just made); `voices`: the
    Saved voices list's update (left as it is by default)."""
    return gr.skip(), gr.skip(), message, gr.skip(), gr.skip() if voices is None else voices


def refused_aloud(message: str) -> tuple:
    """refused(), with the message in a toast too, as the engine's own refusals are said ("Speech failed: ..."): the
    tab's "text too long" came on the status line alone, where a long text pushed it out of sight."""
    gr.Warning(message)
    return refused(message)


class VoiceController:
    def __init__(self, link: EngineLink):
        self.link = link
        self.inflight = InFlight()

    def options(self) -> dict:
        """Valid instruction values, tasks and the sample rate from the engine (empty when it cannot say)."""
        return self.asked_options()[0]

    def asked_options(self) -> tuple[dict, str | None]:
        """(the engine's speech options, None), or ({}, what the page says) when it did not give them within
        OPTIONS_TIMEOUT_S or failed; not asked while the link finds the engine down or without a talker ({}, None)."""
        try:
            if not (self.link.status().ok and self.link.has(SPEECH_OUT)):
                return {}, None
            return self.link.client.speech_options(timeout=OPTIONS_TIMEOUT_S), None
        except Exception as e:  # noqa: BLE001  (the dropdowns then offer their default only)
            late = getattr(e, "code", None) == "timeout"
            return {}, OPTIONS_UNANSWERED.format(why=f"no answer within {OPTIONS_TIMEOUT_S:.0f} s" if late else e)

    def voice_names(self) -> list[str]:
        return saved_voice_names(self.link)

    def synthesize(self, text, task_label, source, saved, clip, clip_text, dialect, emotion, speed, pitch, volume,
                   style, ip, env, snr, genre, mood, instrument, theme, duration, seed,
                   request: gr.Request | None = None):
        """Stream (audio chunk, transcript box, status, WAV file) while the audio is made."""
        task = TASKS.get(task_label, "tts")
        if task != "music" and not (text or "").strip():
            yield refused("Type the text to speak (or the sound to make) first.")
            return
        most = self.options().get("max_input_chars") if task != "music" else None
        if most and len(text) > most:
            yield refused_aloud(TEXT_TOO_LONG.format(n=len(text), most=most))
            return
        if problem := seed_problem(seed):
            yield refused(problem)
            return
        kwargs: dict = {"task": task, "seed": chosen_seed(seed)}
        unused = [*([MUSIC_TEXT_UNUSED] if task == "music" and (text or "").strip() else []),
                  *([VOICE_UNUSED.format(what={"sound": "a sound effect"}.get(task, task))]
                    if task in ("sound", "music") and source != DEFAULT_VOICE else [])]
        if task == "music":
            kwargs["music"] = {k: v for k, v in {"genre": genre, "mood": mood, "instrument": instrument, "theme": theme,
                                                 "duration": duration}.items() if v not in (None, "")}
        if task in ("tts", "podcast"):
            kwargs["instruct"] = instruction(dialect, emotion, speed, pitch, volume, style, ip, env, snr) or None
            if task == "podcast" and source not in ("Saved voice", "Clone from a clip"):
                yield refused(PODCAST_NEEDS_A_VOICE)
                return
            if source == "Saved voice":
                if not saved:
                    yield refused("Choose a saved voice (or save one from a clip first).")
                    return
                kwargs["voice"] = saved
            elif source == "Clone from a clip":
                if not clip:
                    yield refused("Upload or record a reference clip to clone.")
                    return
                limits = engine_limits(self.link)
                if problem := media_problem(clip, "audio", limits, max_seconds=VOICE_CLIP_SECONDS):
                    yield refused(problem)
                    return
                kwargs["reference_audio"] = Path(clip).read_bytes()
                kwargs["reference_text"] = (clip_text or "").strip() or None
        session = session_of(request)
        cancel = self.inflight.begin(session, TAB)
        if cancel.is_set():  # Stop pressed since Make it was (the press announced)
            self.inflight.end(session, TAB, cancel)
            yield refused(STOPPED_BEFORE_START)
            return
        chunks, rate, status, transcript, final = [], None, GENERATING, gr.update(), None
        try:
            for event in self.link.client.speak(text or "", cancel=cancel, **kwargs):
                # (before any sound: the last take stays playing and offered until the new one's first sound)
                if isinstance(event, QueuePosition):
                    yield gr.skip(), transcript, queue_line(event), gr.skip(), gr.skip()
                elif isinstance(event, Progress) and event.stage == TRANSCRIBING_STAGE:  # (seconds)
                    yield gr.skip(), transcript, TRANSCRIBING_CLIP, gr.skip(), gr.skip()
                elif isinstance(event, AudioChunk):
                    pcm = np.frombuffer(event.pcm, dtype="<i2")
                    rate = event.sample_rate
                    chunks.append(pcm)
                    # how far it is (a long text said only "Generating…" for minutes)
                    made = sum(len(c) for c in chunks) / rate
                    yield (rate, pcm), transcript, f"{GENERATING} {made:.1f} s of audio so far", None, gr.skip()
                elif isinstance(event, (Done, Error)):
                    final = event
                    break
                elif isinstance(event, TextDelta):
                    continue
        except Exception as e:  # noqa: BLE001
            final = failure(e)
        finally:
            self.inflight.end(session, TAB, cancel)
        if isinstance(final, Done):
            asr = (final.result or {}).get("ref_text_from_asr")
            if asr is not None:
                transcript = asr  # the transcript our ASR filled in: shown, editable for the next take
            status = figures_line(final) + (" · the clip's transcript was filled in by speech recognition"
                                            if asr is not None else "")
            said = final.result or {}
            status += warning_note(said.get("reference_warning")) + warning_note(said.get("sample_rate_note"))
            if task == "music" and final.finish_reason == "stop":
                status += music_length_note(sum(len(c) for c in chunks) / (rate or 1), duration)
            status += "".join(f" · {note}" for note in unused)
            # the stream ends with its last value; with no audio made (stopped in line) the last take stays
            cut = STOPPED_TAKE if final.finish_reason == "cancelled" else None
            yield (None if chunks else gr.skip(), transcript, status,
                   write_wav(chunks, rate, task, cut) if chunks else gr.skip(), gr.skip())
        else:
            final = final or Error("the engine ended without a result", code="engine_error")
            voices = self.voices_without_gone(final, kwargs.get("voice"))
            said = error_line(final) if voices is None else VOICE_GONE.format(name=kwargs["voice"])
            gr.Warning(f"Speech failed: {error_text(final)}" if voices is None else said)
            if not chunks:  # refused by the engine (a style of 100,000 characters): the last take stays offered
                yield refused(said, voices)
                return
            yield None, transcript, said, write_wav(chunks, rate, task, FAILED_TAKE), voices or gr.skip()

    def voices_without_gone(self, final: Error, voice: str | None):
        """The Saved voices list brought up to date with nothing selected when the engine refused the saved `voice` as
        not saved (deleted meanwhile, in another tab or while the request waited: the list kept offering it until
        Refresh); None otherwise."""
        if voice is None or final.code != VOICE_NOT_FOUND:
            return None
        return gr.update(choices=self.voice_names(), value=None)

    def heard(self, data: bytes, cancel: threading.Event | None = None) -> tuple[str | None, str]:
        """(what the model's ASR hears in a clip, "") or (None, the error line); `cancel` set stops it."""
        text = ""
        try:
            for event in self.link.client.transcribe(data, max_tokens=REF_TRANSCRIPT_TOKENS, cancel=cancel):
                if isinstance(event, Done):
                    return (event.result or {}).get("text", text), ""
                if isinstance(event, Error):
                    return None, error_line(event)
                if isinstance(event, TextDelta):
                    text += event.text
        except Exception as e:  # noqa: BLE001
            return None, error_line(failure(e))
        return text, ""

    def transcribe_clip(self, clip):
        """Fill the transcript box from the clip with the model's ASR (editable afterwards)."""
        if not clip:
            return gr.update(), "Upload or record a clip first."
        if problem := media_problem(clip, "audio", engine_limits(self.link), upload=True):
            return gr.update(), problem
        text, problem = self.heard(Path(clip).read_bytes())
        return (gr.update(), problem) if text is None else (text, "Transcript filled in by speech recognition.")

    def save(self, name, clip, clip_text, replace=False, request: gr.Request | None = None):
        name = (name or "").strip()
        if not name or not clip:
            return gr.update(), "Give the voice a name and a reference clip."
        if len(name) > VOICE_NAME_CHARS:
            return gr.update(), NAME_TOO_LONG.format(n=len(name), most=VOICE_NAME_CHARS)
        if problem := media_problem(clip, "audio", engine_limits(self.link), upload=True,
                                     max_seconds=VOICE_CLIP_SECONDS):
            return gr.update(), problem
        data, transcript = Path(clip).read_bytes(), (clip_text or "").strip() or None
        if transcript is None:
            # transcribed here, where Stop stops it (within the save, the engine's transcription could not be stopped)
            if not replace and name in self.voice_names():  # (said before the transcription, as the engine says it)
                return gr.update(), NAME_TAKEN.format(name=name, replace=REPLACE_LABEL)
            session = session_of(request)
            cancel = self.inflight.begin(session, TAB)
            try:
                transcript, problem = self.heard(data, cancel)
            finally:
                self.inflight.end(session, TAB, cancel)
            if cancel.is_set():
                return gr.update(), SAVE_STOPPED.format(name=name)
            if transcript is None:
                return gr.update(), problem
            transcript = transcript.strip()
            if not transcript:  # (passed as none, the engine's own, unstoppable transcription heard the same nothing)
                return gr.update(), NOTHING_HEARD.format(name=name)
            from_asr = True
        else:
            from_asr = False
        try:
            info = self.link.client.save_voice(name, data, transcript, replace=bool(replace))
        except Exception as e:  # noqa: BLE001
            if getattr(e, "code", None) == "voice_exists":
                return gr.update(), NAME_TAKEN.format(name=name, replace=REPLACE_LABEL)
            return gr.update(), error_line(failure(e))
        names = self.voice_names()
        note = f"Saved the voice '{name}'."
        if from_asr or info.get("ref_text_from_asr") is not None or info.get("transcript_from_asr"):
            note += " Its transcript was filled in by speech recognition."
        note += warning_note(info.get("reference_warning"))
        return gr.update(choices=names, value=name), note

    @staticmethod
    def ask_delete(name):
        """"Delete the selected saved voice": (the confirmation row, the voice asked about, the status line). A
        voice was deleted at one press, with no way back: the confirmation names it and asks."""
        if not name:
            return gr.update(visible=False), None, "Choose a saved voice to delete."
        return (gr.update(visible=True), name,
                f"Delete the saved voice '{name}'? It cannot be undone: press \"{CONFIRM_DELETE}\" "
                f"or \"{KEEP_VOICE}\".")

    def confirm_delete(self, name):
        """"Yes, delete it": (the Saved voices list, the status line, the confirmation row hidden, no voice asked
        about). `name` is the voice the confirmation named, whatever the list shows meanwhile."""
        voices, note = self.delete(name)
        return voices, note, gr.update(visible=False), None

    @staticmethod
    def keep_voice(name):
        """"No, keep it": (the confirmation row hidden, no voice asked about, the status line)."""
        return gr.update(visible=False), None, f"Kept the voice '{name}'." if name else ""

    def delete(self, name):
        if not name:
            return gr.update(), "Choose a saved voice to delete."
        try:
            self.link.client.delete_voice(name)
        except Exception as e:  # noqa: BLE001
            if getattr(e, "code", None) == VOICE_NOT_FOUND:
                return gr.update(choices=self.voice_names(), value=None), ALREADY_DELETED.format(name=name)
            return gr.update(), error_line(failure(e))
        return gr.update(choices=self.voice_names(), value=None), f"Deleted the voice '{name}'."

    def refresh(self):
        return gr.update(choices=self.voice_names())

    def page_load(self) -> tuple:
        """The choices of the instruction dropdowns (dialect, emotion, speed, pitch, volume) and of the saved
        voices, asked of the engine at each page load (one that was down when the studio started left them
        empty for good)."""
        self.link.status()  # the engine asked again if not asked lately (its capabilities decide what is asked)
        options, problem = self.asked_options()
        return (*(gr.update(choices=_choices(options, key)) for key in INSTRUCTION_KEYS), self.refresh(),
                *self.offered(options), problem or gr.skip())

    @staticmethod
    def offered(options: dict) -> tuple:
        """The task choices and whether the Instructions and Music sections show, as the engine's talker says (the
        Preview talker speaks text only, spec §7.11: no sound, music, podcast or instructions); an engine that
        cannot say (down, or OpenAI-compatible) is offered everything."""
        tasks = options.get("tasks")
        labels = [label for label, task in TASKS.items() if tasks is None or task in tasks] or list(TASKS)
        task = gr.update(choices=labels) if len(labels) == len(TASKS) else gr.update(choices=labels, value=labels[0])
        return (task, gr.update(visible=bool(options.get("instructions", True))),
                gr.update(visible=tasks is None or "music" in tasks))

    def stop(self, request: gr.Request | None = None) -> None:
        if not self.inflight.cancel(session_of(request), TAB):
            gr.Info("Nothing is being made.")


def _choices(options: dict, key: str) -> list[str]:
    return [NO_CHOICE, *options.get(key, [])]


def refused_clip(name: str, is_video: bool) -> str:
    """What the reference clip box says of a file that is not audio (app/static/uploads.js)."""
    what = "a video: a reference clip is sound alone" if is_video else "not an audio clip"
    return (f"'{name}' is {what}: give a {AUDIO_FORMATS} file of one speaker (0.5 to 30 s), or record one with the "
            "microphone.")


def build_voice_tab(link: EngineLink, examples: list[str] | None = None) -> VoiceController:
    """Build the Voice tab inside the current Tab (the last request and the takes are kept in the browser's
    localStorage: REQUEST_KEY, KEPT_TAKES_KEY)."""
    controller = VoiceController(link)
    capability_note(link, SPEECH_OUT, "**This engine has no talker**, so it cannot speak, make sounds or music. "
                                      "(A checkpoint without `talker/`, or an engine that "
                                      "does not serve speech.)")
    options = controller.options()
    with gr.Row():
        with gr.Column(scale=3):
            text = gr.Textbox(label="Text to speak, or the sound to make", lines=4, elem_id="voice-text",
                              placeholder="Hello! This is Ming speaking.", **runs_tab("Make it"))
            task = gr.Radio(list(TASKS), value="Speech", label="What to make", elem_id="voice-task")
            source = gr.Radio(list(VOICE_SOURCES), value=DEFAULT_VOICE, label="Voice", elem_id="voice-source")
            with gr.Row():
                # value=None: Gradio selects the first choice by default, and "Delete the selected saved voice"
                # pressed before choosing one deleted it
                saved = gr.Dropdown(controller.voice_names(), value=None, label="Saved voices", allow_custom_value=False,
                                    elem_id="voice-saved")
                refresh = gr.Button("Refresh", scale=0, min_width=90)  # 60 px: the bold label spilled out
            with gr.Accordion("Clone from a clip / save a voice", open=False):
                clip = gr.Audio(sources=["upload", "microphone"], type="filepath", buttons=toolbar("download"),
                                label="Reference clip (0.5 to 30 s of one speaker)", **says_refused("voice-clip"))
                clip_text = gr.Textbox(label=f"{CLIP_TEXT} (empty = filled in by speech recognition)",
                                       elem_id="voice-clip-text", **runs_tab())
                fill = gr.Button("Transcribe the clip")
                with gr.Row():
                    name = gr.Textbox(label="Save as (name)", scale=2, elem_id="voice-name")
                    replace = gr.Checkbox(value=False, label=REPLACE_LABEL, elem_id="voice-replace")
                with gr.Row():
                    save = gr.Button("Save voice", elem_id="voice-save")
                    delete = gr.Button("Delete the selected saved voice", variant="stop", elem_id="voice-delete")
                with gr.Row(visible=False, elem_id="voice-confirm-delete") as confirm_row:  # shown by Delete
                    confirm = gr.Button(CONFIRM_DELETE, variant="stop", elem_id="voice-delete-yes")
                    keep = gr.Button(KEEP_VOICE, elem_id="voice-delete-no")
                if examples:
                    gr.Examples([[e] for e in examples], [clip], label="Example clips")
            with gr.Accordion("Instructions: dialect, emotion, speed, voice design", open=False) as instructions_box:
                with gr.Row():
                    dialect = gr.Dropdown(_choices(options, "dialects"), value=NO_CHOICE, allow_custom_value=True,
                                          label="Dialect")
                    emotion = gr.Dropdown(_choices(options, "emotions"), value=NO_CHOICE, allow_custom_value=True,
                                          label="Emotion")
                with gr.Row():
                    speed = gr.Dropdown(_choices(options, "speeds"), value=NO_CHOICE, label="Speed")
                    pitch = gr.Dropdown(_choices(options, "pitches"), value=NO_CHOICE, label="Pitch")
                    volume = gr.Dropdown(_choices(options, "volumes"), value=NO_CHOICE, label="Volume")
                style = gr.Textbox(label="Voice design (free text: gender, age, timbre, pace…; used without a "
                                         "reference voice)", lines=2, **runs_tab())
                ip = gr.Textbox(label="Character voice (e.g. 水浒传_武松)", **runs_tab())
                with gr.Row():
                    env = gr.Textbox(label="Background ambience (e.g. Birds chirping)", **runs_tab())
                    snr = gr.Number(value=None, label="Speech-to-background SNR (dB; 0 = not set)")
            with gr.Accordion("Music", open=False) as music_box:
                with gr.Row():
                    genre = gr.Textbox(label="Genre", value="Lo-fi", **runs_tab())
                    mood = gr.Textbox(label="Mood", value="Calm", **runs_tab())
                with gr.Row():
                    instrument = gr.Textbox(label="Instrument", value="Piano", **runs_tab())
                    theme = gr.Textbox(label="Theme", value="Rainy afternoon", **runs_tab())
                duration = gr.Slider(2, 60, value=10, step=1, label="Duration (s)")
            seed = seed_box()
            with gr.Row():
                go = run_button("Make it", "voice-go")
                stop = gr.Button("Stop", variant="stop", elem_id="voice-stop")
        with gr.Column(scale=2):
            # no download here: the player's gave the stream as 'audio-stream.mp3' beside the WAV download named
            # for what was made
            player = gr.Audio(label="Playing as it is made", streaming=True, autoplay=True, interactive=False,
                              buttons=toolbar(),
                              elem_id="voice-player")
            status = gr.Markdown("", elem_id="voice-figures")
            # not interactive: an input of keep_take_in_page below, Gradio drew it as an upload box ("Drop File Here -
            # or - Click to Upload") under the label "WAV download"
            wav = gr.File(label="WAV download", interactive=False, elem_id="voice-wav")
            takes = gr.File(label=f"Every take (newest first, the last {MAX_KEPT_TAKES})", file_count="multiple",
                            interactive=False, elem_id="voice-takes")
    inputs = [text, task, source, saved, clip, clip_text, dialect, emotion, speed, pitch, volume, style, ip, env,
              snr, genre, mood, instrument, theme, duration, seed]
    # the request is kept in the browser when Make it is pressed, and marked finished once it is: a reload lost the
    # text typed and the run without a word
    ask = BrowserRequest(REQUEST_KEY, REQUEST_FIELDS, "Make it", runs=(controller.inflight, TAB))
    kept = gr.Textbox(visible="hidden")  # the takes kept in this browser, as JSON (STORED_TAKES), read fresh
    hidden = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}
    ask.when_done(ask.on_press(go, [text, task]).then(
        controller.synthesize, inputs, [player, clip_text, status, wav, saved], api_name="speak",
        concurrency_limit=None)).then(
        keep_take_in_page, [wav, kept], [kept, takes], js=f"(wav) => [wav, {STORED_TAKES}]", **hidden).then(
        None, [kept], None, js=WRITE_TAKES_JS, **hidden)
    on_page_load(restore_takes_in_page, [kept, takes], inputs=[kept], js=f"() => [{STORED_TAKES}]")
    ask.restore_at_load([text, task, status])
    wire_stop(stop, controller.stop, api_visibility="private")
    check_on_upload(link, clip, "audio", status, max_seconds=VOICE_CLIP_SECONDS)
    say_refused_files("voice-clip", status, refused_clip)
    fill.click(controller.transcribe_clip, [clip], [clip_text, status], concurrency_limit=None,
               api_visibility="private")
    save.click(controller.save, [name, clip, clip_text, replace], [saved, status], concurrency_limit=None,
               api_name="save_voice")
    asked = gr.State(None)  # the voice the confirmation names
    delete.click(controller.ask_delete, [saved], [confirm_row, asked, status], queue=False, api_visibility="private")
    confirm.click(controller.confirm_delete, [asked], [saved, status, confirm_row, asked], api_visibility="private")
    keep.click(controller.keep_voice, [asked], [confirm_row, asked, status], queue=False, api_visibility="private")
    loaded = [dialect, emotion, speed, pitch, volume, saved, task, instructions_box, music_box, status]
    on_page_load(controller.page_load, loaded)
    on_engine_change(controller.page_load, loaded)
    # the saved voices and the options asked again (the status line said to press it when the options did not come)
    refresh.click(controller.page_load, None, loaded, queue=False, api_visibility="private")
    # a saved voice chosen, or a clip given to clone, was not used while Voice stayed at "Default voice" (the default
    # voice spoke without a word): choosing one makes it the Voice
    quick = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}
    saved.input(lambda chosen: "Saved voice" if chosen else gr.skip(), [saved], [source], **quick)
    for given in (clip.upload, clip.stop_recording):
        given(lambda: "Clone from a clip", None, [source], **quick)
    return controller
