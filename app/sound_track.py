"""The sound of a video file given to the Speech tab, for the engine's transcription: its first audio stream copied,
packet for packet, into a Matroska audio file (no decoding here: the engine decodes it, as it decodes any uploaded
clip, engine/server/codec.py). A phone video of a few minutes runs to tens of MiB, over the engine's upload limit;
its sound alone is a small part of that. And a recording too large to upload (30 minutes of WAV is 160 MiB at 44.1 kHz
stereo): what the model hears of it, its first channel at 16 kHz (spec §5.1), as Opus speech (its channels' mix
when the first is silent, as the engine reads such a recording)."""

from __future__ import annotations

import io
from pathlib import Path

SOUND_CONTAINER = "matroska"  # holds any audio codec a video carries (AAC, Opus, MP3, AC-3, PCM ...)
MODEL_RATE = 16000  # the rate the model's audio front end resamples to (spec §5.1)
SPEECH_BITS_PER_S = 32_000  # Opus at this rate keeps speech intelligible: 30 minutes in 7 MiB


def sound_track(path: str | Path) -> bytes | None:
    """The first audio stream of the video at `path` as a Matroska file's bytes; None when it cannot be copied out
    (no PyAV, no audio stream, or a stream Matroska cannot hold): the caller then sends the video as it is."""
    try:
        import av
    except ImportError:
        return None
    out = io.BytesIO()
    try:
        with av.open(str(path)) as source:
            if not source.streams.audio:
                return None
            audio = source.streams.audio[0]
            with av.open(out, "w", format=SOUND_CONTAINER) as target:
                copy = target.add_stream_from_template(audio)
                for packet in source.demux(audio):
                    if packet.dts is None:  # the demuxer's flush packet at the end
                        continue
                    packet.stream = copy
                    target.mux(packet)
    except Exception:  # noqa: BLE001  (av.error.* for a stream that cannot be copied: the engine gets the video)
        return None
    return out.getvalue() or None


def speech_track(path: str | Path) -> bytes | None:
    """The first channel of the recording at `path` at the model's 16 kHz, as an Ogg Opus file's bytes (the model
    takes channel 0 and resamples to 16 kHz itself, so it hears the same speech), or the channels' mix when the first
    is silent and they are not (the engine then transcribes the mix: a voice recorded on the right channel alone was
    sent as silence); None when it cannot be read."""
    try:
        import av
    except ImportError:
        return None
    from app.media_check import silent_audio

    out = io.BytesIO()
    try:
        mix = silent_audio(path, first_only=True) and not silent_audio(path)
        with av.open(str(path)) as source, av.open(out, "w", format="ogg") as target:
            opus = target.add_stream("libopus", rate=MODEL_RATE, layout="mono")
            opus.bit_rate = SPEECH_BITS_PER_S
            first = av.AudioResampler(format="s16", layout="mono", rate=MODEL_RATE)
            for frame in source.decode(audio=0):
                for piece in first.resample(frame if mix else first_channel(frame)):
                    target.mux(opus.encode(piece))
            for piece in first.resample(None):
                target.mux(opus.encode(piece))
            target.mux(opus.encode(None))
    except Exception:  # noqa: BLE001  (av.error.* for what FFmpeg cannot read or write)
        return None
    return out.getvalue() or None


def first_channel(frame):
    """An audio frame's first channel alone (a down-mix would blend what the model does not hear)."""
    import av

    if len(frame.layout.channels) == 1:
        return frame
    samples = frame.to_ndarray()
    mono = samples[:1] if frame.format.is_planar else samples[:, ::len(frame.layout.channels)]
    out = av.AudioFrame.from_ndarray(mono.copy(), format=frame.format.name, layout="mono")
    out.sample_rate, out.pts, out.time_base = frame.sample_rate, frame.pts, frame.time_base
    return out
