"""Long recordings for ASR: a clip longer than one window is transcribed a window at a time, each cut placed at
the quietest moment near the window's end (not in the middle of a word), and the windows' transcripts are joined
into one, streamed as they come. The windowing is ours, not upstream's: the model's audio encoder holds 300 s at
most (spec §5.2) and a transcript has a token limit (512 upstream, §6.5), so a lecture or a meeting needs it; 30 s
is Whisper's own window, short enough that a window of dense speech stays far under the token limit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from engine.events import TRANSCRIBING_STAGE as STAGE
from engine.events import Done, Error, Event, GenerationStats, Progress, TextDelta, transcript_joint


@dataclass(frozen=True)
class Windowing:
    window_s: float = 30.0     # the longest piece of a recording transcribed at once
    search_s: float = 5.0      # each cut is placed in the window's last seconds ...
    quiet_frame_s: float = 0.05  # ... at the middle of its quietest frame of this length


def window_bounds(samples: np.ndarray, rate: int, windowing: Windowing = Windowing()) -> list[tuple[int, int]]:
    """(start, end) sample indices of the windows covering `samples`, each at most `window_s` long; one window
    when the clip fits in one."""
    n, most = len(samples), int(windowing.window_s * rate)
    bounds, start = [], 0
    while n - start > most:
        end = start + most - quietest_offset(samples[start + most - int(windowing.search_s * rate):start + most],
                                             int(windowing.quiet_frame_s * rate))
        bounds.append((start, end))
        start = end
    return bounds + [(start, n)]


def quietest_offset(tail: np.ndarray, frame: int) -> int:
    """How many samples before the end of `tail` the middle of its quietest `frame`-long stretch lies."""
    frame = max(1, min(frame, len(tail)))
    frames = len(tail) // frame
    energy = np.square(tail[len(tail) - frames * frame:].astype(np.float64)).reshape(frames, frame).sum(axis=1)
    quietest = frames - 1 - int(np.argmin(energy[::-1]))  # (the latest of equally quiet frames: longer windows)
    return (frames - quietest) * frame - frame // 2


@dataclass
class Segment:
    start_s: float
    end_s: float
    text: str
    tokens: list[int] = field(default_factory=list)  # the ids the model wrote for this window
    avg_logprob: float | None = None  # its transcript tokens' mean log probability (when they were asked for)

    def wire(self) -> dict:
        out = {"start": round(self.start_s, 3), "end": round(self.end_s, 3), "text": self.text, "tokens": self.tokens}
        return out if self.avg_logprob is None else {**out, "avg_logprob": self.avg_logprob}


@dataclass
class Joined:
    """The windows' transcripts so far."""

    text: str = ""
    language: str | None = None
    cut: bool = False  # a window's transcript ran to the token limit
    segments: list[Segment] = field(default_factory=list)
    stats: list[GenerationStats] = field(default_factory=list)

    def separator(self, next_text: str) -> str:
        """What goes between the transcript so far and a window's first text (engine.events.transcript_joint)."""
        return transcript_joint(self.text, next_text)

    def done(self, finish_reason: str) -> Done:
        reason = "length" if finish_reason == "stop" and self.cut else finish_reason
        result = {"language": self.language, "text": self.text, "segments": [s.wire() for s in self.segments]}
        return Done(text=self.text, finish_reason=reason, stats=summed(self.stats), result=result)


def summed(stats: list[GenerationStats]) -> GenerationStats:
    """The figures of the windows' generations as one response's: tokens and times added, the first window's time
    to first token, the decode rate over all the windows' decoding."""
    if not stats:
        return GenerationStats()
    new = sum(s.new_tokens for s in stats)
    decode_s = sum(s.new_tokens / s.decode_tokens_per_s for s in stats if s.decode_tokens_per_s)
    return GenerationStats(prompt_tokens=sum(s.prompt_tokens for s in stats), new_tokens=new,
                           prompt_audio_tokens=sum(s.prompt_audio_tokens for s in stats),
                           time_to_first_token_s=stats[0].time_to_first_token_s,
                           decode_tokens_per_s=new / decode_s if decode_s else 0.0,
                           total_s=sum(s.total_s for s in stats), media_encode_s=sum(s.media_encode_s for s in stats))


def transcribe_windows(transcribe: Callable[[np.ndarray], Iterator[Event]], samples: np.ndarray, rate: int,
                       windowing: Windowing = Windowing()) -> Iterator[Event]:
    """`transcribe` (one clip's ASR events) over each window of a long clip: Progress before each window, the
    transcript deltas joined by `Joined.separator`, then one Done whose result holds the joined text, the first
    language the model named and each window's `segments` (start, end, text); its finish_reason is "length" when a
    window was cut at the token limit. A cancelled or failed window ends it there (what was transcribed stays in
    the cancelled Done)."""
    bounds = window_bounds(samples, rate, windowing)
    joined = Joined()
    for index, (start, end) in enumerate(bounds):
        yield Progress(STAGE, index, len(bounds))
        final, before, logprobs = None, len(joined.text), []
        for ev in transcribe(samples[start:end]):
            if isinstance(ev, TextDelta) and ev.text:
                if sep := (joined.separator(ev.text) if len(joined.text) == before else ""):
                    yield TextDelta(sep, None if ev.logprobs is None else [])
                joined.text += sep + ev.text
                logprobs += [e.logprob for e in ev.logprobs or ()]
                yield ev
            elif isinstance(ev, Error):
                yield ev
                return
            elif isinstance(ev, Done):
                final = ev
            else:
                yield ev
        if final is not None:
            joined.stats.append(final.stats)  # (a cancelled window's tokens count too: they were generated)
        if final is None or final.finish_reason == "cancelled":
            yield joined.done("cancelled")
            return
        joined.cut = joined.cut or final.finish_reason == "length"
        joined.language = joined.language or (final.result or {}).get("language")
        joined.segments.append(Segment(start / rate, end / rate, joined.text[before:].strip(), list(final.token_ids),
                                       sum(logprobs) / len(logprobs) if logprobs else None))
    yield Progress(STAGE, len(bounds), len(bounds))
    yield joined.done("stop")
