"""Generation: greedy/sampling determinism, eos, stop strings, max tokens, cancellation, errors,
and the command line."""

import subprocess
import sys
import threading
import time

import pytest

from engine.events import Done, Error, TextDelta
from engine.generate import StopStringFilter, generate
from engine.sampling import GenerationParams
from tests.paths import REPO

MSG = [{"role": "user", "content": "Hello"}]


def _run(engine, **kw):
    events = list(engine.chat(MSG, GenerationParams(**kw)))
    assert isinstance(events[-1], (Done, Error))
    return events


def _done(events) -> Done:
    assert isinstance(events[-1], Done), events[-1]
    return events[-1]


def test_greedy_is_deterministic_and_deltas_add_up(tiny_engine):
    a, b = _run(tiny_engine, max_new_tokens=12), _run(tiny_engine, max_new_tokens=12)
    da = _done(a)
    assert da.token_ids == _done(b).token_ids and len(da.token_ids) == 12 and da.finish_reason == "length"
    assert "".join(e.text for e in a if isinstance(e, TextDelta)) == da.text
    s = da.stats
    assert s.prompt_tokens > 0 and s.new_tokens == 12 and s.time_to_first_token_s > 0 and s.decode_tokens_per_s > 0


def test_seeded_sampling_reproduces_and_differs_from_greedy(tiny_engine):
    kw = dict(max_new_tokens=16, temperature=1.5, top_p=0.95, top_k=50, repetition_penalty=1.1)
    x = _done(_run(tiny_engine, seed=1, **kw)).token_ids
    assert x == _done(_run(tiny_engine, seed=1, **kw)).token_ids
    assert x != _done(_run(tiny_engine, max_new_tokens=16)).token_ids


def test_eos_stops_generation(tiny_engine):
    ids = _done(_run(tiny_engine, max_new_tokens=8)).token_ids
    prompt = tiny_engine.processor.build(MSG).ids
    events = list(generate(tiny_engine.model, tiny_engine.tokenizer, prompt, GenerationParams(max_new_tokens=8),
                           eos_ids={ids[3]}))
    done = _done(events)
    assert done.finish_reason == "stop" and done.token_ids == ids[:3]


def test_stop_string_is_cut_and_never_streamed(tiny_engine):
    text = _done(_run(tiny_engine, max_new_tokens=24)).text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2]
                and text[i:i + 2] not in text[:i])
    events = _run(tiny_engine, max_new_tokens=24, stop=[stop])
    done = _done(events)
    assert done.finish_reason == "stop" and done.text == text[: text.index(stop)]
    assert stop not in "".join(e.text for e in events if isinstance(e, TextDelta))


def test_stop_filter_holds_back_partial_matches():
    f = StopStringFilter(["END"])
    assert f.feed("abcE") == "abc" and f.feed("N") == "" and f.feed("x") == "ENx" and not f.stopped
    assert f.feed("yEN") == "y" and f.feed("D tail") == "" and f.stopped


def test_cancel_before_start_yields_one_token(tiny_engine):
    cancel = threading.Event()
    cancel.set()
    done = _done(list(tiny_engine.chat(MSG, GenerationParams(max_new_tokens=200), cancel=cancel)))
    assert done.finish_reason == "cancelled" and len(done.token_ids) == 1


def test_cancel_from_another_thread_stops_within_a_step(tiny_engine):
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    t0 = time.perf_counter()
    done = _done(list(tiny_engine.chat(MSG, GenerationParams(max_new_tokens=2000), cancel=cancel)))
    elapsed = time.perf_counter() - t0
    assert done.finish_reason == "cancelled" and len(done.token_ids) < 2000
    step = (elapsed - done.stats.time_to_first_token_s) / max(1, len(done.token_ids) - 1)
    assert elapsed < 0.3 + done.stats.time_to_first_token_s + 3 * step + 0.5


@pytest.mark.parametrize("kw, msg", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(max_new_tokens=10**6), "context"),
])
def test_bad_parameters_give_error_events(tiny_engine, kw, msg):
    ev = _run(tiny_engine, **kw)[-1]
    assert isinstance(ev, Error) and msg in ev.message
    assert isinstance(_run(tiny_engine, max_new_tokens=2)[-1], Done)  # the engine still serves


def test_cli_streams_and_prints_figures(tiny_checkpoint):
    out = subprocess.run([sys.executable, "-m", "engine.generate", "--model", str(tiny_checkpoint), "--prompt", "hi",
                          "--max-new-tokens", "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    for field in ("prompt tokens", "new tokens 5", "time to first token", "tokens/s"):
        assert field in last
    assert "random demo weights" in out.stderr


def test_stream_survives_being_resumed_on_other_threads(tiny_engine, monkeypatch):
    """Web servers (Gradio, Starlette) resume a streaming generator on whichever worker thread is free;
    torch's inference mode is thread-local, so no step may depend on the thread that started it."""
    import threading

    import torch

    from engine.events import Done, Error, TextDelta
    from engine.sampling import GenerationParams

    llm = tiny_engine.model.llm
    modes = []
    forward = llm.forward

    def recording_forward(*args, **kwargs):  # in-place cache updates need inference mode on every step
        modes.append(torch.is_inference_mode_enabled())
        return forward(*args, **kwargs)

    monkeypatch.setattr(llm, "forward", recording_forward)
    stream = tiny_engine.chat([{"role": "user", "content": "Count slowly"}], GenerationParams(max_new_tokens=40))
    events = []

    def pull():
        events.append(next(stream, None))

    while not events or events[-1] is not None and not isinstance(events[-1], (Done, Error)):
        t = threading.Thread(target=pull)  # every step on a fresh thread
        t.start()
        t.join()
    errors = [e for e in events if isinstance(e, Error)]
    assert not errors, errors[0].message
    assert isinstance(events[-1], Done) and events[-1].stats.new_tokens == 40
    assert sum(isinstance(e, TextDelta) for e in events) > 5
    assert len(modes) == 40 and all(modes), f"steps outside inference mode: {modes.count(False)}"
