"""The engine API end to end on the tiny checkpoint: text, image, video, webcam and audio chat,
the ASR tasks, and bad input answered with clear errors while the engine keeps serving."""

import io
import wave

import numpy as np
import pytest

from engine.models.thinker.asr import asr_instruction, parse_transcript
from engine.events import MEDIA_STAGE, PREFILL_STAGE, Done, Error, Progress, TextDelta
from engine.media.video import WebcamClip
from engine.sampling import GenerationParams
from tests.test_generate import short_context_engine

P = GenerationParams(max_new_tokens=4)


def _finish(events):
    assert events and isinstance(events[-1], (Done, Error))
    return events[-1]


def _image(h=70, w=90, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _wav_bytes(seconds=1.0, rate=48000, channels=2):
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(tone[:, None], channels, axis=1).tobytes())
    return buf.getvalue()


def test_image_chat_puts_image_tokens_in_the_prompt(tiny_engine):
    msgs = [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "What is it?"}]}]
    prompt = tiny_engine.processor.build(msgs)
    assert "<image><imagePatch>" in prompt.text and "</image>\nWhat is it?" in prompt.text
    done = _finish(list(tiny_engine.chat(msgs, P)))
    assert isinstance(done, Done) and done.stats.new_tokens == 4
    assert done.stats.prompt_tokens == len(prompt.ids) and done.stats.media_encode_s > 0


def test_a_prompt_with_long_media_says_so_before_its_encoders_run(tiny_engine):
    """A long video showed only "Generating..." while the ViT read its frames: media of more tokens than one prefill
    chunk is announced first (Progress MEDIA_STAGE: how many, of which kind), then the prefill reports; a small
    picture is read at once, unannounced."""
    big = [{"role": "user", "content": [{"type": "image", "image": _image(768, 768)}, {"type": "text", "text": "?"}]}]
    assert tiny_engine.processor.build(big).image_tokens > 512  # (the CPU's prefill chunk)
    events = list(tiny_engine.chat(big, GenerationParams(max_new_tokens=1)))
    reports = [(e.stage, e.done, e.total, e.message) for e in events if isinstance(e, Progress)]
    assert reports[0] == (MEDIA_STAGE, 0, 1, "1 picture") and reports[1][:2] == (PREFILL_STAGE, 0), reports
    assert isinstance(_finish(events), Done)
    small = [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "?"}]}]
    assert not any(isinstance(e, Progress) for e in tiny_engine.chat(small, GenerationParams(max_new_tokens=1)))


def test_webcam_clip_chat_uses_interleaved_frames(tiny_engine):
    clip = WebcamClip()
    for i in range(10):
        clip.add_frame(_image(120, 160, seed=i), capture_time=i * 0.5)
    msgs = [{"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": "What happens?"}]}]
    prompt = tiny_engine.processor.build(msgs)
    assert prompt.text.count("seconds><image>") == prompt.video_grid_thw.shape[0] >= 2
    assert isinstance(_finish(list(tiny_engine.chat(msgs, P))), Done)


def test_audio_chat_from_browser_style_48k_stereo_wav(tiny_engine):
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": _wav_bytes()}, {"type": "text", "text": "?"}]}]
    prompt = tiny_engine.processor.build(msgs)
    assert prompt.audio_spans and prompt.audio_spans[0][1] == 25  # 1 s -> 100 mel frames -> 25 tokens
    assert isinstance(_finish(list(tiny_engine.chat(msgs, P))), Done)


def test_transcribe_builds_the_asr_prompts_and_returns_a_result(tiny_engine):
    audio = _wav_bytes(0.5, 16000, 1)
    events = list(tiny_engine.transcribe(audio, context="This is about cooking.", hotwords=["Gansu", "Uyghur"],
                                         dialect="上海", params=P))
    done = _finish(events)
    assert isinstance(done, Done) and done.result["language"] == "上海"
    assert done.result["text"] == done.text.strip()
    assert asr_instruction("ctx.", ["a", "b"]) == ("Please recognize the language of this speech and transcribe it. "
                                                  "Format: oral.ctx.This audio may contains the following words or phrases:a,b.")
    assert parse_transcript("English\thello world") .language == "English"


@pytest.mark.parametrize("part, message", [
    ({"type": "image", "image": b"not an image"}, "image"),
    ({"type": "image", "image": np.zeros((0, 5, 3), dtype=np.uint8)}, "image"),
    ({"type": "image", "image": _image(2, 500)}, "aspect"),
    ({"type": "audio", "audio": b""}, "audio"),
    ({"type": "audio", "audio": np.zeros(0, dtype=np.float32), "sample_rate": 16000}, "audio"),
    ({"type": "audio", "audio": b"RIFF garbage"}, "audio"),
    ({"type": "video", "video": []}, "video"),
    ({"type": "image", "image": 42}, "image"),
])
def test_bad_media_is_a_clear_error_and_the_engine_keeps_serving(tiny_engine, part, message):
    err = _finish(list(tiny_engine.chat([{"role": "user", "content": [part]}], P)))
    assert isinstance(err, Error) and message in err.message.lower()
    ok = _finish(list(tiny_engine.chat([{"role": "user", "content": "hi"}], P)))
    assert isinstance(ok, Done)


def test_a_recording_longer_than_a_window_is_transcribed_window_by_window(tiny_engine):
    """A 61 s recording was refused as too long (the encoder takes 30 s at once); it is transcribed in windows of at
    most Engine.asr_windowing.window_s, said by Progress and covering the whole clip in the result's segments."""
    long = np.zeros(16000 * 61, dtype=np.float32)
    events = list(tiny_engine.transcribe(long, sample_rate=16000, params=P))
    done = _finish(events)
    assert isinstance(done, Done), done
    segments = done.result["segments"]
    assert segments[0]["start"] == 0 and segments[-1]["end"] == 61.0 and len(segments) == 3
    assert all(s["end"] - s["start"] <= tiny_engine.asr_windowing.window_s for s in segments)
    assert [e.done for e in events if isinstance(e, Progress)][-1] == 3


# --------------------------------------------------------------------------- chat that speaks

def test_chat_answers_in_speech_with_both_figures(tiny_engine):
    from engine.events import AudioChunk

    events = list(tiny_engine.chat([{"role": "user", "content": "Tell me a story."}],
                                   GenerationParams(max_new_tokens=16), modalities=("text", "audio")))
    done = _finish(events)
    audio = [e for e in events if isinstance(e, AudioChunk)]
    assert isinstance(done, Done) and audio and all(a.sample_rate == 44100 for a in audio)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == done.text
    s = done.stats
    assert s.time_to_first_token_s > 0 and s.time_to_first_audio_s > s.time_to_first_token_s
    assert s.audio_seconds == pytest.approx(sum(a.seconds for a in audio)) and s.audio_real_time_factor > 0
    only_audio = list(tiny_engine.chat([{"role": "user", "content": "Hi"}], GenerationParams(max_new_tokens=6),
                                       modalities=["audio"]))
    assert not any(isinstance(e, TextDelta) for e in only_audio) and any(isinstance(e, AudioChunk) for e in only_audio)


def test_a_seeded_spoken_reply_is_the_same_each_time(tiny_engine):
    """The request's seed reached the thinker but not the talker, whose noise was drawn afresh: the same seeded
    request spoke differently each time (found as whole and streamed HTTP answers with different audio lengths)."""
    from engine.events import AudioChunk

    def spoken(seed):
        events = list(tiny_engine.chat([{"role": "user", "content": "Tell me a story."}],
                                       GenerationParams(max_new_tokens=12, seed=seed), modalities=("text", "audio")))
        return b"".join(e.pcm for e in events if isinstance(e, AudioChunk)), _finish(events).text

    first = spoken(7)
    assert first[0] and spoken(7) == first
    assert spoken(8)[0] != first[0]  # (another seed: other noise)


def test_chat_speaks_while_the_thinker_is_still_writing(tiny_engine, monkeypatch):
    """Engine.chat feeds the thinker's text to the talker segment by segment: audio of the first
    sentence arrives before the thinker's last word (a scripted thinker, whose text has sentences)."""
    import threading
    import time

    from engine.events import AudioChunk

    spoke = threading.Event()
    words = ("Hello there my dear friend, how are you doing on this fine day? I am doing very well, thank you so "
             "much for asking me about it.").split(" ")

    def thinker(*args, **kwargs):
        for i, word in enumerate(words):
            if i == len(words) - 3:
                spoke.wait(30)  # the talker must not need the whole text
            time.sleep(0.001)
            yield TextDelta(word + " ")
        yield Done(" ".join(words) + " ", "stop")

    monkeypatch.setattr(tiny_engine, "_chat_text", thinker)
    kinds = []
    for ev in tiny_engine.chat([{"role": "user", "content": "hi"}], modalities=("text", "audio")):
        if isinstance(ev, AudioChunk):
            spoke.set()
        kinds.append(type(ev).__name__)
    assert kinds[-1] == "Done" and kinds.index("AudioChunk") < max(i for i, k in enumerate(kinds) if k == "TextDelta")


def test_a_cancelled_spoken_chat_sends_no_audio_after_the_cancel(tiny_engine, monkeypatch):
    import threading

    from engine.events import AudioChunk

    def thinker(*args, **kwargs):
        for _ in range(40):
            yield TextDelta("One more sentence to say, ")
        yield Done("", "stop")

    monkeypatch.setattr(tiny_engine, "_chat_text", thinker)
    cancel = threading.Event()
    after = []
    for ev in tiny_engine.chat([{"role": "user", "content": "hi"}], cancel=cancel, modalities=("text", "audio")):
        if cancel.is_set():
            after.append(ev)
        if isinstance(ev, AudioChunk):
            cancel.set()
    assert not any(isinstance(e, AudioChunk) for e in after)
    assert isinstance(after[-1], Done) and after[-1].finish_reason == "cancelled"


def test_a_chat_cancelled_while_its_pictures_are_read_reads_no_more_of_them(tiny_engine, monkeypatch):
    """Decoding and resizing big pictures takes seconds before the ViT starts: a cancel meanwhile stops before
    the next picture is read, with a cancelled reply of no tokens."""
    import threading

    cancel, read = threading.Event(), []
    prepare = tiny_engine.processor._image

    def image_then_cancel(source, options):
        read.append(source)
        cancel.set()  # the client hangs up while the first picture is read
        return prepare(source, options)

    monkeypatch.setattr(tiny_engine.processor, "_image", image_then_cancel)
    content = [{"type": "image", "image": _image(seed=i)} for i in range(3)] + [{"type": "text", "text": "and?"}]
    events = list(tiny_engine.chat([{"role": "user", "content": content}], P, cancel))
    assert len(read) == 1
    assert len(events) == 1 and isinstance(events[0], Done) and events[0].finish_reason == "cancelled"
    assert events[0].text == "" and events[0].stats.new_tokens == 0


def test_chat_refuses_outputs_it_cannot_give(tiny_engine):
    import torch

    from engine.runtime import Engine

    (err,) = list(tiny_engine.chat([{"role": "user", "content": "draw"}], modalities=("text", "image")))
    assert err.code == "modality_not_supported" and "/v1/images/generations" in err.message
    (err,) = list(tiny_engine.chat([{"role": "user", "content": "hi"}], modalities=("smell",)))
    assert err.code == "invalid_request"
    mute = Engine.__new__(Engine)
    mute.model = tiny_engine.model
    mute._load_talker(tiny_engine.model.path / "no-such-folder", "fp32", torch.device("cpu"))
    (err,) = list(mute.chat([{"role": "user", "content": "hi"}], modalities=("text", "audio")))
    assert err.code == "modality_not_supported" and "no talker" in err.message


@pytest.mark.parametrize("damage", ["weights_missing", "config_broken", "folder_missing"])
def test_a_partly_downloaded_image_generator_leaves_the_rest_serving_and_says_why(tiny_checkpoint, tmp_path, damage):
    """Only part of the image generator on disk (an interrupted download) or a broken file in it: the model
    still loads and chats, speaks with its talker, and the engine says what is missing (as for the talker)."""
    import shutil

    from engine.runtime import Engine

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    if damage == "weights_missing":
        next((ckpt / "transformer").glob("*.safetensors")).unlink()
    elif damage == "config_broken":
        (ckpt / "vae" / "config.json").write_text("{")
    else:
        shutil.rmtree(ckpt / "vae")
    engine = Engine.load(ckpt, dtype="fp32", device="cpu")
    assert not engine.has_image_generator and engine.has_talker
    where = {"weights_missing": "transformer", "config_broken": "vae", "folder_missing": "vae"}[damage]
    assert where in engine.image_generator_error and "image generator" in engine.image_generator_error
    assert "image generator not loaded" in engine.placement
    assert isinstance(_finish(list(engine.chat([{"role": "user", "content": "hi"}], P))), Done)
    refused = _finish(list(engine.imagine("a cat")))
    assert isinstance(refused, Error) and where in refused.message


@pytest.mark.parametrize("damage, error, named", [
    ("tokenizer.json", "TokenizerError", "tokenizer.json"),
    ("preprocessor_config.json", "ConfigError", "preprocessor_config.json: invalid JSON"),
])
def test_a_broken_small_file_is_named_before_any_weight_is_read(tiny_checkpoint, tmp_path, damage, error, named):
    """The tokenizer and the processor settings are read before the weights (minutes for the real model): a
    truncated one is a clear error naming the file, said before the first tensor is read."""
    import shutil

    from engine.runtime import Engine

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / damage).write_text("{")
    read = []
    with pytest.raises(Exception) as e:
        Engine.load(ckpt, dtype="fp32", device="cpu", progress=lambda *a: read.append(a))
    assert type(e.value).__name__ == error and named in str(e.value) and str(ckpt) in str(e.value)
    assert read == []


def test_a_partly_downloaded_talker_is_said_in_the_placement_line_the_server_logs_and_shows(tiny_checkpoint, tmp_path):
    """talker/ there but its weights not (an interrupted download): the rest serves, and the one line the server
    logs and the studio banner shows (the placement) says the talker was not loaded and which file is missing,
    as it does for the image generator."""
    import shutil

    from engine.runtime import Engine

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "talker" / "model.safetensors").unlink()
    (ckpt / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    logged = []
    engine = Engine.load(ckpt, dtype="fp32", device="cpu", log=logged.append)
    assert not engine.has_talker and "talker" in engine.talker_error
    line = next(x for x in logged if x.startswith("placement:"))
    assert f"talker not loaded ({ckpt / 'talker'}" in line and "image generator not loaded" in line
    assert line.endswith(engine.placement) and engine.info().placement == engine.placement


def test_what_the_engine_cannot_do_and_why_reaches_the_studios_tabs(tiny_checkpoint, tmp_path):
    """The model card listed the capabilities only, so the Voice and Image tabs said a generic 'this engine has no
    talker (a checkpoint without talker/ ...)' for a talker whose weights were missing. The card's `unavailable`
    gives the engine's reason for each output it lacks, the client reads it, and the tab's note shows it."""
    import shutil

    from app.engine_link import SPEECH_OUT, EngineLink
    from app.ui.common import note_text
    from engine.client import EngineClient
    from engine.runtime import Engine
    from engine.server import ServerHandle, create_app

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "talker" / "model.safetensors").unlink()
    engine = Engine.load(ckpt, dtype="fp32", device="cpu")
    with ServerHandle(create_app(engine, token="t"), host="127.0.0.1", port=0) as server:
        with EngineClient(server.url, token="t") as client:
            info = client.info()
            assert set(info.unavailable) == {"speech_out"} and info.unavailable["speech_out"] == engine.talker_error
            note = note_text(EngineLink(client), SPEECH_OUT, "No talker.")
    assert note.startswith("No talker. The engine says: ") and "model.safetensors" in note.replace("\\", "")


def test_pictures_past_the_context_are_refused_before_the_rest_are_read(tiny_engine, monkeypatch):
    """A history of many pictures whose tokens cannot fit the context: every picture was decoded, resized and
    normalised (up to hundreds of MB of pixels each, tens of seconds on a CPU) before the prompt was counted and
    refused; the refusal (context_length_exceeded, naming the counts) now comes once the pictures read pass what the
    context leaves for the prompt, and the rest are never read."""
    read = []
    prepare = tiny_engine.processor._image

    def counted(source, options):
        read.append(source)
        return prepare(source, options)

    monkeypatch.setattr(tiny_engine.processor, "_image", counted)
    picture = {"type": "image", "image": _image(h=128, w=128)}
    per_picture = tiny_engine.processor.build([{"role": "user", "content": [picture]}]).image_tokens
    read.clear()
    history = [m for _ in range(5) for m in ({"role": "user", "content": [picture, {"type": "text", "text": "and?"}]},
                                              {"role": "assistant", "content": "ok"})][:-1]
    short = short_context_engine(tiny_engine, 2 * per_picture + 4 + 1)  # room for two pictures, not three
    events = list(short.chat(history, GenerationParams(max_new_tokens=4)))
    assert len(events) == 1 and isinstance(events[0], Error), events
    assert events[0].code == "context_length_exceeded" and len(read) == 3
    assert f"{3 * per_picture:,} tokens with 3 of them read" in events[0].message
    assert f"context: {2 * per_picture + 5:,} tokens, 4 of them kept for the reply" in events[0].message
    two = tiny_engine.processor.build(history[:3], max_prompt_tokens=2 * per_picture)  # (pictures at the bound pass)
    assert two.image_tokens == 2 * per_picture
