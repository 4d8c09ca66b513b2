"""The Speech tab's live recording, transcribed as it grows: the engine cuts a recording longer than one window (30 s)
into windows (their `segments` in a transcription's result), and a window that is followed by another is finished:
the audio after it cannot change it. So each partial transcript keeps the windows it finished and the next one
sends only the audio after them (the open window); the final transcript does the same. A partial therefore costs at
most one window's transcription however long the recording is (it re-sent the whole recording: 120 s of speech took
four windows' time every few seconds). The windows kept are the ones a transcription of the whole recording would
cut (each cut depends only on the audio before it), so the kept text joined with the open window's is that
transcript's structure: the same windows, joined as the engine joins them (engine.events.transcript_joint)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.events import transcript_joint


@dataclass
class KeptWindows:
    """The finished windows of a live recording: their transcript, their segments (seconds from the recording's
    start), where the audio after them starts (`upto`, in samples), and the settings they were transcribed with
    (other settings: nothing is kept)."""

    settings: tuple = ()
    upto: int = 0
    text: str = ""
    segments: list[dict] = field(default_factory=list)
    language: str | None = None

    def open_audio(self, samples: np.ndarray) -> np.ndarray:
        """The recording after the finished windows: what is still to transcribe."""
        return samples[self.upto:]

    def joined(self, open_text: str) -> str:
        """The transcript of the whole recording: the finished windows' then the open audio's."""
        open_text = open_text.strip()
        return self.text + transcript_joint(self.text, open_text) + open_text

    def keep(self, result: dict | None, rate: int) -> None:
        """Keep the windows a transcription of the open audio finished (all but its last), from its result."""
        windows = (result or {}).get("segments") or []
        offset = self.upto / rate
        for window in windows[:-1]:
            text = window["text"].strip()
            self.text += transcript_joint(self.text, text) + text
            self.segments.append({"start": round(offset + window["start"], 3), "end": round(offset + window["end"], 3),
                                  "text": text})
            self.language = self.language or (result or {}).get("language")
        if len(windows) > 1:
            self.upto += round(windows[-2]["end"] * rate)

    def whole(self, open_result: dict, open_seconds: float, rate: int) -> dict:
        """The whole recording's result from the open audio's: its text joined to the kept windows', its segments
        (or one spanning the open audio) after theirs."""
        if not self.segments:
            return open_result
        offset = self.upto / rate
        windows = open_result.get("segments") or [{"start": 0.0, "end": open_seconds,
                                                   "text": open_result.get("text", "")}]
        later = [{"start": round(offset + w["start"], 3), "end": round(offset + w["end"], 3), "text": w["text"].strip()}
                 for w in windows]
        return {**open_result, "text": self.joined(open_result.get("text", "")), "segments": self.segments + later,
                "language": self.language or open_result.get("language")}
