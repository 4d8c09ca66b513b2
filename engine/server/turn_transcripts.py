"""Partial transcripts of a realtime user turn while it is spoken (server_vad sessions with input audio
transcription on): the turn's audio is transcribed a piece at a time as it arrives, each piece once, cut at the
quietest moment of its last second (engine.models.thinker.asr_windows.quietest_offset), so
`conversation.item.input_audio_transcription.delta` events come while the user speaks; when the turn ends only the
audio after the last piece is transcribed, and `.completed` carries the pieces' transcripts joined as a long
recording's windows are (engine.events.transcript_joint). At most one piece is in the engine at a time, and a
piece is at least `piece_s` long: the work is bounded by the turn's length, never redone."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from engine.events import TokenLogprob, transcript_joint
from engine.models.thinker.asr_windows import quietest_offset
from engine.server.scheduler import Job


@dataclass(frozen=True)
class TurnPieces:
    piece_s: float = 3.0         # a piece of a turn is transcribed once this much audio follows the last cut ...
    search_s: float = 1.0        # ... cut at the quietest moment of its last second
    quiet_frame_s: float = 0.05  # (the quietest stretch of this length)


def piece_end(samples: np.ndarray, rate: int, pieces: TurnPieces = TurnPieces()) -> int | None:
    """Where the next piece of `samples` (the turn's audio after the last cut) ends, or None while they are
    shorter than a piece."""
    if len(samples) < pieces.piece_s * rate:
        return None
    tail = samples[len(samples) - int(pieces.search_s * rate):].astype(np.float32)
    return len(samples) - quietest_offset(tail, int(pieces.quiet_frame_s * rate))


@dataclass
class TurnTranscript:
    """One turn's transcript as its pieces are transcribed: what the deltas have said so far, the sample the next
    piece starts at, the piece in the engine (at most one), and the task that streams the latest piece (the next
    one waits for it, so deltas come in the turn's order)."""

    item_id: str
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cut: int = 0
    in_engine: Job | None = None
    tail: asyncio.Task | None = None
    failed: bool = False

    def add(self, delta: str, piece_begins: bool) -> str:
        """Append a piece's delta; returns it as the client is sent it (a piece's first text after another's is
        preceded by the separator the windows of a recording get)."""
        sent = (transcript_joint(self.text, delta) if piece_begins and self.text else "") + delta
        self.text += sent
        return sent
