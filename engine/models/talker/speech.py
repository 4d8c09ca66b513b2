"""Speech as engine events (engine.events): `speak_events` turns a synthesis into AudioChunk events
(PCM16 at the VAE's true rate, each with the text span it starts speaking) and one Done with
time to first audio, audio seconds and real-time factor (or one Error); `speak_while_thinking`
interleaves a thinker's TextDelta stream with the audio of its closed segments, feeding the talker
segment by segment while the thinker keeps generating.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator

from engine.errors import MingError
from engine.events import AudioChunk, Done, Error, Event, GenerationStats, TextDelta
from engine.models.talker.pipeline import SpeechRequest, SynthesisReport, TalkerPipeline
from engine.models.talker.text import Segmenter, fragments_of


def _error(e: Exception) -> Error:
    if isinstance(e, MingError):
        return Error(str(e), code=e.code)
    return Error(f"speech synthesis failed: {type(e).__name__}: {e}", code="engine_error")


def audio_stats(t_start: float, first_audio: float | None, audio_s: float) -> GenerationStats:
    total = time.perf_counter() - t_start
    return GenerationStats(time_to_first_audio_s=first_audio or 0.0, audio_seconds=audio_s, total_s=total,
                           audio_real_time_factor=total / audio_s if audio_s else 0.0)


def speak_events(pipe: TalkerPipeline, req: SpeechRequest, cancel: threading.Event | None = None,
                 t_start: float | None = None, result: dict | None = None) -> Iterator[Event]:
    t_start = time.perf_counter() if t_start is None else t_start
    report = SynthesisReport()
    first, audio_s = None, 0.0
    with pipe.lock:
        try:
            for chunk in pipe.synthesize(req, cancel, report):
                ev = AudioChunk.from_samples(chunk.samples, pipe.sample_rate, text=chunk.text, start_s=audio_s)
                if first is None:
                    first = time.perf_counter() - t_start
                audio_s += ev.seconds
                yield ev
        except Exception as e:  # every failure ends the stream with one Error, never a crash or a hang
            yield _error(e)
            return
    out = {"sample_rate": pipe.sample_rate, "task": req.task, "fragments": report.fragments,
           "patches": report.patches, **(result or {})}
    yield Done(text=" ".join(report.fragments), finish_reason="cancelled" if report.cancelled else "stop",
               stats=audio_stats(t_start, first, audio_s), result=out)


def speak_while_thinking(pipe: TalkerPipeline, thinker_events: Iterable[Event], req: SpeechRequest | None = None,
                         cancel: threading.Event | None = None) -> Iterator[Event]:
    """Yield the thinker's events as they come, plus AudioChunk events for each text segment once it
    closes (spec §7.9 rules), synthesised on a second thread while the thinker goes on. Ends with one
    Done: the thinker's, with the audio figures added (time to first audio counts from this call), or
    one Error. Pass the same `cancel` Event to the thinker call: it is set when the consumer stops early."""
    req = req or SpeechRequest()
    cancel = cancel or threading.Event()
    t_start = time.perf_counter()
    out: queue.Queue = queue.Queue()
    segments: queue.Queue = queue.Queue()
    report = SynthesisReport()

    def pump():
        seg = Segmenter(pipe.segment_closers)
        try:
            # read to the thinker's own end even once cancelled (it stops within a token): its Done("cancelled") is
            # the reply's end (leaving at the cancel ended a stopped spoken reply in an engine_error, "the thinker
            # stream ended without a final event": Stop in Chat, a barge-in or a message typed in a Live call)
            for ev in thinker_events:
                out.put(("thinker", ev))
                if isinstance(ev, TextDelta) and not cancel.is_set():
                    for s in seg.feed(ev.text):
                        segments.put(s)
            for s in seg.flush():
                segments.put(s)
        except Exception as e:  # the thinker stream itself failed
            out.put(("thinker", _error(e)))
        finally:
            segments.put(None)
            out.put(("thinker_end", None))

    def talk():
        audio_s = 0.0
        try:
            while (s := segments.get()) is not None:
                frags = fragments_of([s])
                if not frags or cancel.is_set():
                    continue
                with pipe.lock:
                    for chunk in pipe.synthesize(req, cancel, report, fragments=frags):
                        ev = AudioChunk.from_samples(chunk.samples, pipe.sample_rate, text=chunk.text, start_s=audio_s)
                        audio_s += ev.seconds
                        out.put(("audio", ev))
        except Exception as e:
            out.put(("talker_error", _error(e)))
            cancel.set()
        finally:
            out.put(("talker_end", None))

    threads = [threading.Thread(target=pump, daemon=True, name="ming-think"),
               threading.Thread(target=talk, daemon=True, name="ming-talk")]
    for t in threads:
        t.start()
    final: Event | None = None
    talker_error: Error | None = None
    first, audio_s, ended = None, 0.0, 0
    try:
        while ended < 2:
            kind, ev = out.get()
            if kind in ("thinker_end", "talker_end"):
                ended += 1
            elif kind == "talker_error":
                talker_error = talker_error or ev
            elif kind == "audio":
                if first is None:
                    first = time.perf_counter() - t_start
                audio_s += ev.seconds
                yield ev
            elif isinstance(ev, (Done, Error)):
                final = ev
                if isinstance(ev, Error):
                    cancel.set()
            else:
                yield ev
    finally:
        if ended < 2:  # the consumer stopped early
            cancel.set()
    if talker_error is not None and not (isinstance(final, Done) and final.finish_reason == "cancelled"):
        yield talker_error
        return
    if isinstance(final, Done):
        a = audio_stats(t_start, first, audio_s)
        final.stats.time_to_first_audio_s = a.time_to_first_audio_s
        final.stats.audio_seconds = a.audio_seconds
        final.stats.audio_real_time_factor = a.audio_real_time_factor
        final.stats.audio_tokens = report.patches
        final.result = {**(final.result or {}), "audio": {"sample_rate": pipe.sample_rate, "fragments": report.fragments}}
        if report.cancelled and final.finish_reason != "cancelled":
            final.finish_reason = "cancelled"
    yield final if final is not None else Error("the thinker stream ended without a final event", code="engine_error")
