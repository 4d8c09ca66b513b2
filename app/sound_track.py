"""The sound of a video file given to the Speech tab, for the engine's transcription: its first audio stream copied,
packet for packet, into a Matroska audio file (no decoding here: the engine decodes it, as it decodes any uploaded
clip, engine/server/codec.py). A phone video of a few minutes runs to tens of MiB, over the engine's upload limit;
its sound alone is a small part of that."""

from __future__ import annotations

import io
from pathlib import Path

SOUND_CONTAINER = "matroska"  # holds any audio codec a video carries (AAC, Opus, MP3, AC-3, PCM ...)


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
