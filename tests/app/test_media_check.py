"""A file given to the studio is checked before it goes to the engine, and what is wrong is said naming the file:
a 0-byte file, a text file renamed .wav, a PDF renamed .png, a picture over the engine's pixel limit, a clip
over its length limit came back in the engine's wire terms ("'item.content[0].audio' is not an audio file FFmpeg
can read", "'image[0]' is empty", "...; give samples with their sample_rate instead"), naming no file."""

from __future__ import annotations

import struct
import wave
import zlib

import pytest

pytest.importorskip("gradio")
from PIL import Image  # noqa: E402

from app.engine_link import EngineLink  # noqa: E402
from app.media_check import media_problem  # noqa: E402
from app.ui.chat import ChatController  # noqa: E402
from app.ui.image import ImageController  # noqa: E402
from app.ui.speech import SpeechController  # noqa: E402
from app.ui.voice import VoiceController  # noqa: E402
from engine.client import EngineClient  # noqa: E402
from tests.paths import REPO  # noqa: E402

ASSETS = REPO / "app" / "assets"
WIRE_TERMS = ("item.content", "image[0]", "sample_rate", "'file'", "reference_audio")


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "notes.wav").write_text("hello, this is text\n")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "report.png").write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    Image.new("RGB", (5000, 4000)).save(tmp_path / "huge.png")
    with wave.open(str(tmp_path / "long.wav"), "wb") as w:  # 400 s of silence at 1 kHz: over the 300 s limit
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(1000)
        w.writeframes(b"\0\0" * 400_000)
    return tmp_path


def test_media_problem_names_the_file_and_what_is_wrong(files):
    limits = {"max_image_pixels": 16_000_000, "max_audio_seconds": 300.0, "max_upload_bytes": 1000}
    assert media_problem(files / "empty.wav", "audio", limits) == "'empty.wav' is empty (0 bytes): choose another file."
    assert media_problem(files / "notes.wav", "audio", limits).startswith("'notes.wav' is not an audio clip")
    assert media_problem(files / "report.png", "image", limits).startswith("'report.png' is not a picture")
    assert "'huge.png' is too large: 5000x4000 = 20,000,000 pixels" in media_problem(files / "huge.png", "image", limits)
    assert "'long.wav' is 400 s long; the engine takes at most 300 s" in media_problem(files / "long.wav", "audio", limits)
    assert "too large to send" in media_problem(files / "long.wav", "audio", limits, upload=True)
    assert media_problem(ASSETS / "images" / "cup.png", "image", limits) is None
    assert media_problem(ASSETS / "speech" / "what_do_you_see_en.wav", "audio", limits) is None
    assert media_problem(ASSETS / "video" / "cup_on_table.mp4", "video", limits) is None
    assert media_problem(ASSETS / "images" / "cup.png", "audio", limits) is not None


def test_a_picture_in_a_format_the_engine_does_not_read_names_the_formats_it_does(tmp_path):
    """An SVG said "not a recognised image" naming no format; a PCX (which Pillow reads, the engine's decoder not)
    passed the studio's check and was refused by the engine. Both name the decoder's own list."""
    from engine.client import image_formats_named
    (tmp_path / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>')
    Image.new("RGB", (8, 8)).save(tmp_path / "scan.pcx")
    for name in ("logo.svg", "scan.pcx"):
        problem = media_problem(tmp_path / name, "image", {})
        assert problem.startswith(f"'{name}' is not a picture") and image_formats_named() in problem, problem

def blank_png(side: int) -> bytes:
    """A valid black 1-bit PNG of side x side pixels, written row by row (Pillow takes seconds to make a large one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows, row = zlib.compressobj(1), bytes(1 + (side + 7) // 8)  # (each row: filter 0, then the row's bits)
    pixels = b"".join(rows.compress(row) for _ in range(side)) + rows.flush()
    head = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_a_picture_too_large_to_open_safely_is_said_too_large_not_damaged(tmp_path):
    """A 15000x15000 PNG of a few KB (past Pillow's decompression-bomb bound) was "not a picture the engine can read
    (..., or is damaged)": it is said too large, with the engine's limit, and as a picture where audio is expected."""
    (tmp_path / "poster.png").write_bytes(blank_png(15_000))
    said = media_problem(tmp_path / "poster.png", "image", {"max_image_pixels": 16_000_000})
    assert said.startswith("'poster.png' is too large: more than ") and "at most 16,000,000 pixels" in said, said
    assert "too many to open safely" in media_problem(tmp_path / "poster.png", "image", {})
    (tmp_path / "poster.wav").write_bytes((tmp_path / "poster.png").read_bytes())
    from app.media_check import TO_TRANSCRIBE
    assert media_problem(tmp_path / "poster.wav", TO_TRANSCRIBE).startswith("'poster.wav' is a picture")


def test_a_preview_picture_is_opened_as_the_engine_decoder_opens_one():
    """The Image tab opened an engine's preview with any format Pillow reads (a PCX was shown); it reads the decoder's
    formats only, and another is refused naming them, as the decoder says."""
    import io

    from app.ui.image import _pil
    from engine.client import image_formats_named
    for fmt in ("PCX", "PNG"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, fmt)
        if fmt == "PNG":
            assert _pil(buf.getvalue()).getpixel((0, 0)) == (200, 10, 10)
            continue
        with pytest.raises(ValueError, match="not a picture in a format") as info:
            _pil(buf.getvalue())
        assert image_formats_named() in str(info.value)


def test_a_silent_clip_is_named_before_it_is_sent(engine_server, tmp_path):
    """A silent file given to Speech came back with a transcript (the demo weights made one up; the real model gives
    an empty one, and empty .txt and .srt files); given to Voice, a voice was "cloned" from nothing. The file is named
    as silent, in any encoding, at once; a quiet clip with speech in it is not."""
    av = pytest.importorskip("av")
    from tests.server import tone_pcm16

    with wave.open(str(tmp_path / "silent.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\0\0" * 32000)
    with av.open(str(tmp_path / "silent.flac"), "w", format="flac") as container:
        stream = container.add_stream("flac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone_pcm16(2.0, 16000, 220.0)[None] // 4000, format="s16", layout="mono")
        frame.sample_rate = 16000  # peaks of a few units in 32768: below -60 dBFS
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with wave.open(str(tmp_path / "quiet.wav"), "wb") as w:  # a tone at -50 dBFS: quiet, not silent
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((tone_pcm16(2.0, 16000, 220.0) // 100).astype("<i2").tobytes())
    for name in ("silent.wav", "silent.flac"):
        assert media_problem(tmp_path / name, "audio").startswith(f"'{name}' is silent"), name
    assert media_problem(tmp_path / "quiet.wav", "audio") is None
    link = EngineLink(EngineClient(engine_server.url, token="test-token"))
    transcript, status, txt, srt = list(SpeechController(link).transcribe_file(str(tmp_path / "silent.wav"), "", "",
                                                                               None))[-1]
    assert status.startswith("'silent.wav' is silent") and not any(isinstance(f, str) for f in (txt, srt)), status
    *_, last = VoiceController(link).synthesize("Hello", "Speech", "Clone from a clip", None,
                                                str(tmp_path / "silent.wav"), "", *[None] * 5, "", "", "", None, "",
                                                "", "", "", 10, 3)
    assert last[2].startswith("'silent.wav' is silent"), last[2]


def test_a_float_wav_of_subnormal_dust_shows_the_engines_corrupt_file_reason_not_silence(engine_server, tmp_path):
    """A WAV tagged 32-bit float holding integer samples (read as floats: all subnormal) was called silent by the
    Speech tab, so the engine's reason (a corrupt WAV file, integer samples labelled float) was never shown."""
    av = pytest.importorskip("av")
    import numpy as np

    from tests.server import tone_pcm16

    dust = np.abs(tone_pcm16(0.5, 16000, 220.0)).astype("<i4").view("<f4")  # all below 1.18e-38, not all zero
    with av.open(str(tmp_path / "dust.wav"), "w", format="wav") as container:
        stream = container.add_stream("pcm_f32le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(dust[None], format="flt", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    link = EngineLink(EngineClient(engine_server.url, token="test-token"))
    status = list(SpeechController(link).transcribe_file(str(tmp_path / "dust.wav"), "", "", None))[-1][1]
    assert "is a corrupt WAV file" in status and "subnormal" in status and "silent" not in status, status


def test_every_tab_names_the_bad_file_in_its_own_words(engine_server, files):
    link = EngineLink(EngineClient(engine_server.url, token="test-token"))
    said = []
    # Chat: the turn goes back to the box, the figures line says which file
    chat = ChatController(link, [files])
    turn = [{"role": "user", "content": {"path": str(files / "notes.wav")}}, {"role": "user", "content": "what?"}]
    history, box, figures, _ = list(chat.respond(turn, 8, 0.0, 1.0, 0, 1.0, None, "", False, False, ""))[-1]
    assert history == [] and box == {"text": "what?", "files": [str(files / "notes.wav")]}
    said.append(figures)
    # Speech
    speech = SpeechController(link)
    said.append(list(speech.transcribe_file(str(files / "empty.wav"), "", "", None))[-1][1])
    # Voice: cloning, transcribing and saving a clip
    voice = VoiceController(link)
    *_, last = voice.synthesize("Hello", "Speech", "Clone from a clip", None, str(files / "notes.wav"), "",
                                *[None] * 5, "", "", "", None, "", "", "", "", 10, 3)
    said += [last[2], voice.transcribe_clip(str(files / "empty.wav"))[1],
             voice.save("x", str(files / "notes.wav"), "hi")[1]]
    # Image: a PDF renamed .png, a picture over the pixel limit
    image = ImageController(link)
    for ref in ("report.png", "huge.png"):
        *_, last = image.make("Edit", "make it blue", [str(files / ref)], "(none)", "", "1:1", "", 2, 2.0, 1, 0, [],
                              progress=lambda *a, **k: None)
        said.append(last[3])
    names = ["notes.wav", "empty.wav", "notes.wav", "empty.wav", "notes.wav", "report.png", "huge.png"]
    for name, text in zip(names, said):
        assert f"'{name}'" in text, text
        assert not any(term in text for term in WIRE_TERMS), text


def test_a_voice_clip_over_30_seconds_is_named_before_it_is_sent(engine_server, tmp_path):
    """A 40 s clip to clone came back as "'reference_audio': reference clip is too long (40.0 s)": the Voice tab
    says which clip, with the 30 s a voice clip may last."""
    clip = tmp_path / "interview.wav"
    with wave.open(str(clip), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(1000)
        w.writeframes(b"\0\0" * 40_000)
    voice = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    *_, last = voice.synthesize("Hello", "Speech", "Clone from a clip", None, str(clip), "", *[None] * 5, "", "", "",
                                None, "", "", "", "", 10, 3)
    assert last[2] == "'interview.wav' is 40 s long; a voice clip is at most 30 s: trim it to a few sentences."
    assert voice.save("x", str(clip), "hi")[1] == last[2]


def test_a_picture_given_as_audio_is_named_a_picture_not_a_video(tmp_path):
    """A picture renamed .wav (or .mp4) given to the Speech tab was called "a video with no sound track" (FFmpeg opens
    a PNG as a one-frame video): the walk's user, who gave a photo by mistake, was told it was a video."""
    (tmp_path / "photo.wav").write_bytes((ASSETS / "images" / "cup.png").read_bytes())
    (tmp_path / "photo.mp4").write_bytes((ASSETS / "images" / "cup.png").read_bytes())
    from app.media_check import TO_TRANSCRIBE, VIDEO_SOUND
    assert media_problem(tmp_path / "photo.wav", TO_TRANSCRIBE).startswith("'photo.wav' is a picture, not an audio clip")
    assert media_problem(tmp_path / "photo.mp4", VIDEO_SOUND).startswith("'photo.mp4' is a picture, not a video")
    # a real video without sound is still said to be one
    assert "is a video with no sound track" in media_problem(ASSETS / "video" / "cup_on_table.mp4", TO_TRANSCRIBE)


@pytest.mark.parametrize("voice_on", [0, 1])
def test_a_recording_too_large_to_upload_is_sent_with_its_voice_whichever_channel_it_is_on(tmp_path, voice_on):
    """A recording too large to upload goes as the speech the model hears (speech_track: channel 0 at 16 kHz); one
    whose voice is on the right channel alone went as silence. The channels' mix goes then, as the engine reads such a
    recording; a voice on channel 0 still goes alone."""
    import io

    import av
    import numpy as np

    from app.sound_track import speech_track
    from tests.server import tone_pcm16

    channels = np.zeros((22050, 2), dtype="<i2")
    channels[:, voice_on] = tone_pcm16(1.0, 22050, 220.0)
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(22050), w.writeframes(channels.tobytes())
    with av.open(io.BytesIO(speech_track(path))) as sent:
        peak = max(np.abs(frame.to_ndarray()).max() for frame in sent.decode(audio=0))  # (Opus decodes to floats)
    assert peak > 0.1  # (the tone's 0.3, its mix's 0.15 or so; silence sent was 0)
