"""The request queue with real engine jobs: FIFO order and positions, a full queue refused,
a waiting job cancelled, and backpressure: a reader that stops reading stalls its generation
thread (bounded buffer), and one that stays away is cut off."""

import asyncio
import time

import pytest

from engine.events import Done, QueuePosition, TextDelta
from engine.sampling import GenerationParams
from engine.server.limits import ApiError
from engine.server.scheduler import Job, Scheduler
from tests.server import SYSTEM, long_prompt, torch_threads


def chat_job(engine, prompt: str, tokens: int, label: str = "job") -> Job:
    msgs = [{"role": "user", "content": prompt}]
    return Job(lambda cancel: engine.chat(msgs, GenerationParams(max_new_tokens=tokens), cancel, system_prompt=SYSTEM),
               label=label)


async def drain(job: Job) -> list:
    return [ev async for ev in job.events()]


def run(coro):
    with torch_threads(1):
        return asyncio.run(coro)


def test_fifo_order_positions_queue_full_and_cancel_while_waiting(tiny_engine):
    prompt = long_prompt(tiny_engine)

    async def main():
        s = Scheduler(concurrency=1, max_queue=3, stream_buffer=8)
        jobs = [chat_job(tiny_engine, prompt, 24 if i == 0 else 2, f"j{i}") for i in range(4)]
        for j in jobs:
            s.submit(j)
        extra = chat_job(tiny_engine, prompt, 2, "extra")
        with pytest.raises(ApiError) as info:
            s.submit(extra)  # one running + three waiting: the line is full
        assert info.value.code == "queue_full" and info.value.status == 429
        s.cancel(jobs[2])  # leaves the line at once; those behind move up
        results = await asyncio.gather(*(drain(j) for j in jobs))
        s.close()
        return s, jobs, results

    s, jobs, results = run(main())
    positions = [[e.position for e in r if isinstance(e, QueuePosition)] for r in results]
    assert positions[0] == [0]
    assert positions[1] == [1, 0]
    assert positions[2] == [2]  # cancelled while waiting
    assert positions[3] == [3, 2, 1, 0]  # moved up when j2 left, then as j0 and j1 finished
    assert isinstance(results[2][-1], Done) and results[2][-1].finish_reason == "cancelled"
    assert not any(isinstance(e, TextDelta) for e in results[2])
    starts = sorted((j.started_at, j.label) for j in jobs if j.started_at is not None)
    assert [label for _, label in starts] == ["j0", "j1", "j3"]
    assert [r.label for r in s.history] == ["j2", "j0", "j1", "j3"]
    assert s.counts["refused"] == 1 and s.counts["cancelled"] == 1 and s.counts["completed"] == 3


def test_a_reader_that_stops_reading_stalls_generation_then_catches_up(tiny_engine):
    prompt = long_prompt(tiny_engine)

    async def main():
        s = Scheduler(concurrency=1, stream_buffer=2, slow_reader_timeout_s=30)
        job = chat_job(tiny_engine, prompt, 40)
        s.submit(job)
        events = job.events()
        first = await anext(events)  # the position; then read nothing for a while
        assert isinstance(first, QueuePosition)
        await asyncio.sleep(0.4)
        steps_a = job.cancel.checks
        await asyncio.sleep(0.4)
        steps_b = job.cancel.checks
        stalled = (steps_a, steps_b, job.state)
        rest = [ev async for ev in events]
        s.close()
        return job, stalled, rest

    job, (steps_a, steps_b, state), rest = run(main())
    assert state == "running" and steps_a == steps_b  # the generation thread waits for the reader
    assert steps_a < 40
    assert job.record.max_buffered <= 2  # never more than the buffer in flight
    done = rest[-1]
    assert isinstance(done, Done) and done.finish_reason == "length" and done.stats.new_tokens == 40
    assert "".join(e.text for e in rest if isinstance(e, TextDelta)) == done.text  # nothing lost


def test_a_reader_that_stays_away_is_cut_off(tiny_engine):
    prompt = long_prompt(tiny_engine)

    async def main():
        s = Scheduler(concurrency=1, stream_buffer=2, slow_reader_timeout_s=0.3)
        job = chat_job(tiny_engine, prompt, 200)
        s.submit(job)
        t0 = time.monotonic()
        while job.state != "finished" and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.05)
        events = [ev async for ev in job.events()]
        s.close()
        return job, events

    job, events = run(main())
    assert job.slow_reader and job.record.finish_reason == "slow_reader"
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "cancelled"
    assert events[-1].stats.new_tokens < 200


def test_a_transcription_cancelled_between_its_windows_ran_no_step_after_the_cancel(tiny_engine, monkeypatch):
    """steps_after_cancel was counted from the first transcript delta, which ASR holds back to the end of a window
    (until the language tag is read): a recording cancelled as its second window began read 8 decode steps after the
    cancel (all of the first window's), and its new_tokens left out the cancelled window's. None ran after it."""
    import numpy as np

    from engine.events import Progress
    from engine.models.thinker.asr_windows import Windowing

    monkeypatch.setattr(tiny_engine, "asr_windowing", Windowing(window_s=1.0, search_s=0.3))
    rate, tokens = 16000, 8
    clip = (0.3 * np.sin(2 * np.pi * 200 * np.arange(int(2.5 * rate)) / rate)).astype(np.float32)

    def run_cancelled_at_second_window(cancel):
        for ev in tiny_engine.transcribe(clip, params=GenerationParams(max_new_tokens=tokens, fit_context=True),
                                         cancel=cancel, sample_rate=rate):
            if isinstance(ev, Progress) and ev.done == 1:
                cancel.set()  # (on the generation thread, before the second window's prompt is read)
            yield ev

    async def main():
        s = Scheduler(concurrency=1, stream_buffer=64)
        job = Job(run_cancelled_at_second_window, label="audio.transcriptions")
        s.submit(job)
        events = await drain(job)
        s.close()
        return job, events

    job, events = run(main())
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "cancelled"
    assert job.record.steps_after_cancel == 0 and job.record.new_tokens == tokens
