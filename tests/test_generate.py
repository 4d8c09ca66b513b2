"""Generation: greedy/sampling determinism, eos, stop strings, max tokens, cancellation, errors,
and the command line."""

import subprocess
import sys
import threading
import time
import types

import pytest

from engine.events import PREFILL_STAGE, Done, Error, Progress, TextDelta
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


def test_top_p_zero_samples_the_greedy_reply(tiny_engine):
    greedy = _done(_run(tiny_engine, max_new_tokens=12)).token_ids
    assert _done(_run(tiny_engine, max_new_tokens=12, temperature=1.0, top_p=0.0, seed=9)).token_ids == greedy


def test_a_reply_cut_inside_a_character_drops_it_instead_of_ending_in_a_replacement_character(tiny_engine,
                                                                                             scripted_tokens):
    """A reply stopped by its token limit between the bytes of one character ended with U+FFFD (the held-back
    bytes decoded); the cut drops the partial character, and a whole one still comes through."""
    tok = tiny_engine.tokenizer
    a, zh = tok.encode_plain("a"), tok.encode_plain("中")
    assert len(zh) == 3  # (one byte a token: the character is split over three)
    scripted_tokens(a + zh[:2])
    events = _run(tiny_engine, max_new_tokens=3)
    done = _done(events)
    assert done.finish_reason == "length" and done.text == "a" and done.token_ids == a + zh[:2]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "a"
    scripted_tokens(a + zh)
    assert _done(_run(tiny_engine, max_new_tokens=4)).text == "a中"


def test_a_reply_cancelled_inside_a_character_drops_it_instead_of_ending_in_a_replacement_character(
        tiny_engine, scripted_tokens):
    """A reply cancelled (the studio's Stop, a realtime response.cancel) between the bytes of one character ended
    with U+FFFD, as one cut by its token limit did: the partial character is dropped the same way."""
    tok = tiny_engine.tokenizer
    a, zh = tok.encode_plain("a"), tok.encode_plain("中")
    cancel = threading.Event()
    scripted_tokens(a + zh[:2], after_last=cancel.set)
    events = list(tiny_engine.chat(MSG, GenerationParams(max_new_tokens=10), cancel=cancel))
    done = _done(events)
    assert done.finish_reason == "cancelled" and done.token_ids == a + zh[:2]
    assert done.text == "a" and "".join(e.text for e in events if isinstance(e, TextDelta)) == "a"


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


def test_cancel_before_start_yields_nothing(tiny_engine):
    cancel = threading.Event()
    cancel.set()
    done = _done(list(tiny_engine.chat(MSG, GenerationParams(max_new_tokens=200), cancel=cancel)))
    assert done.finish_reason == "cancelled" and done.token_ids == [] and done.text == ""


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
    (dict(top_p=-0.1), "top_p"), (dict(max_new_tokens=10**6), "context"),
])
def test_bad_parameters_give_error_events(tiny_engine, kw, msg):
    ev = _run(tiny_engine, **kw)[-1]
    assert isinstance(ev, Error) and msg in ev.message
    assert isinstance(_run(tiny_engine, max_new_tokens=2)[-1], Done)  # the engine still serves


def test_cli_streams_and_prints_figures(tiny_checkpoint):
    out = subprocess.run([sys.executable, "-m", "engine.generate", "--model", str(tiny_checkpoint), "--prompt", "hi",
                          "--max-new-tokens", "5", "--temperature", "1", "--top-p", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
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

    from engine.events import PREFILL_STAGE, Done, Error, Progress, TextDelta
    from engine.sampling import GenerationParams

    model = tiny_engine.model.llm.model
    modes = []

    def recording(method):
        def call(*args, **kwargs):  # in-place cache updates need inference mode on every step
            modes.append(torch.is_inference_mode_enabled())
            return method(*args, **kwargs)
        return call

    monkeypatch.setattr(model, "forward", recording(model.forward))  # prefill (one chunk here)
    monkeypatch.setattr(model, "forward_step", recording(model.forward_step))  # each decode step
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


# ------------------------------------------------------------------------------------------------
# prefill / decode step pieces

import torch  # noqa: E402

from engine.generate import DecodeStep, TokenReader, prefill  # noqa: E402
from engine.kernels.dispatch import SYNC_FREE_ENV  # noqa: E402
from engine.models.thinker.model import load_model  # noqa: E402
from engine.models.thinker.positions import PositionTokens, decode_positions, rope_index  # noqa: E402
from engine.sampling import Sampler  # noqa: E402
from engine.tools.host_sync import HostSyncCounter  # noqa: E402
from tests.paths import fixture_case  # noqa: E402
from tests.cli_checks import check_unloadable_checkpoint  # noqa: E402


def _prefilled(engine, n_prompt=24, capacity=None, chunk=None, keep_hidden=False):
    llm, num = engine.model.llm, engine.model.numerics
    ids = (torch.arange(n_prompt) * 7 % 200 + 20).view(1, -1)
    pos, deltas = rope_index(ids, PositionTokens.from_config(llm.config))
    cache = llm.new_cache(1, num, "cpu", capacity=capacity or n_prompt + 16)
    cache.rope_deltas = deltas
    pre = prefill(llm, num, cache, llm.model.embed(ids), pos, chunk_tokens=chunk, keep_hidden=keep_hidden)
    return llm, num, ids, cache, deltas, pre


@pytest.fixture(scope="module")
def stacked_engine(tiny_checkpoint):
    """The tiny model with its weights as stored (stacked experts, plain linears), i.e. the torch path an
    accelerator runs; the default CPU load re-lays them out for oneDNN, which reads expert ids on the host."""
    return types.SimpleNamespace(model=load_model(tiny_checkpoint, dtype="fp32", device="cpu", pack_cpu_experts=False))


SAMPLING = {"greedy": dict(), "sampled": dict(temperature=0.9, top_p=0.8, top_k=20, repetition_penalty=1.2, seed=4)}
LOGPROBS = dict(logprobs=True, top_logprobs=5)


@pytest.mark.parametrize("mode", [*SAMPLING, "sampled with logprobs"])
def test_decode_step_reads_nothing_back_to_the_host(stacked_engine, mode, monkeypatch):
    """The GPU-shaped decode path (positions, masks, rotary, KV slot, routing, experts, sampling, the
    log probabilities when asked and the repetition history on the device) counted on the CPU: 0 host syncs
    per step; reading what a step sampled (the loop's own, explicit read) is one read of each of its tensors
    (on CUDA: one copy each under one event, waited for once)."""
    monkeypatch.setenv(SYNC_FREE_ENV, "1")  # the torch MoE path takes its accelerator (sync-free) variant
    kw = SAMPLING["sampled"] | LOGPROBS if mode == "sampled with logprobs" else SAMPLING[mode]
    with torch.inference_mode():
        llm, num, ids, cache, _, pre = _prefilled(stacked_engine)
        sampler = Sampler(GenerationParams(**kw), llm.config.vocab_size)
        sampler.observe(ids)
        step = DecodeStep(llm, num, cache)
        reader = TokenReader(torch.device("cpu"), 1)
        step.feed(sampler.sample(pre.logits).ids)
        with HostSyncCounter() as steps:
            for _ in range(6):
                sampled = sampler.sample(step.step())
                step.feed(sampled.ids)
        with HostSyncCounter() as reads:
            reader.wait(reader.push(*sampled.tensors()))
    assert steps.count.total == 0, steps.count.syncs
    assert steps.count.ops > 6 * 100  # the counter did see the steps
    tensors = 4 if "logprobs" in mode else 1  # (the ids; with logprobs, the chosen one's and the top ids, values)
    assert reads.count.total == tensors and reads.count.syncs["tolist"] == tensors


@pytest.mark.parametrize("native_kernels", [False, True])
def test_host_sync_counter_sees_the_cpu_fast_path(tiny_engine, monkeypatch, native_kernels):
    """Without the sync-free preference the CPU keeps its fastest MoE path. torch's reads the k expert
    ids on the host, and the counter must see that (one read per MoE layer); the native decode kernel
    (engine.kernels.native, where it builds) takes the ids as a tensor and reads none."""
    from engine.kernels import native

    monkeypatch.delenv(SYNC_FREE_ENV, raising=False)
    if not native_kernels:
        monkeypatch.setenv(native.DISABLE_ENV, "0")
    elif not native.available():
        pytest.skip(f"native kernels not built here: {native.status()}")
    with torch.inference_mode():
        llm, num, _, cache, _, pre = _prefilled(tiny_engine)
        step = DecodeStep(llm, num, cache)
        step.feed(pre.logits.argmax(-1))
        with HostSyncCounter() as c:
            step.step()
    n_moe = sum(layer.is_moe for layer in llm.model.layers)
    assert c.count.syncs["tolist"] == (0 if native_kernels else n_moe)


def test_decode_steps_match_the_host_path_with_any_window(tiny_engine):
    """Device steps (slot tensors, fixed window, static cache) give the logits of plain host steps,
    whether the window is exactly the cached slots or a larger bucket with masked slots."""
    with torch.inference_mode():
        llm, num, ids, cache, deltas, pre = _prefilled(tiny_engine, capacity=64)
        tokens = [int(pre.logits.argmax())]
        want = []
        for _ in range(4):  # host steps
            pos = decode_positions(cache.length, deltas)
            want.append(llm(llm.model.embed(torch.tensor([[tokens[-1]]])), pos, num, None, cache, logits_to_keep=1)[0, -1])
            tokens.append(int(want[-1].argmax()))
        for window in ("exact", 40):
            static = llm.new_cache(1, num, "cpu", capacity=64, static=True)
            static.rope_deltas = deltas
            pos, _ = rope_index(ids, PositionTokens.from_config(llm.config))
            prefill(llm, num, static, llm.model.embed(ids), pos, chunk_tokens=10)
            static.start_device_steps()
            for i in range(4):
                w = static.length + 1 if window == "exact" else window
                hidden = llm.model.forward_step(torch.tensor([[tokens[i]]]), static, num, w)
                static.advance(1)
                torch.testing.assert_close(llm.logits(hidden[:, -1])[0], want[i], atol=1e-4, rtol=1e-4)
            assert int(static.positions[torch.device("cpu")]) == static.length == ids.shape[1] + 4


def test_chunked_prefill_equals_one_pass(tiny_engine):
    with torch.inference_mode():
        *_, whole = _prefilled(tiny_engine, n_prompt=50, keep_hidden=True)
        *_, chunked = _prefilled(tiny_engine, n_prompt=50, chunk=7, keep_hidden=True)
    assert chunked.chunks == 8 and whole.chunks == 1
    torch.testing.assert_close(chunked.hidden, whole.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-4, rtol=1e-4)
    assert whole.hidden.shape == (1, 50, tiny_engine.model.config.llm.hidden_size)


@pytest.mark.parametrize("case", ["llm_b1", "llm_b2"])
def test_chunks_may_split_image_audio_spans_and_padding(case):
    """Reference cases with image / video / audio spans (and left padding in b2): chunks of 5 tokens
    cut through every span; positions, padding masks and gate choices are per token, so the final-norm
    hidden states and the cache equal one pass."""
    from engine.models.thinker.model import load_model
    from engine.tools.parity import llm_case_inputs

    case_dir = fixture_case(case)
    loaded = load_model(case_dir, dtype="fp32", device="cpu")
    llm, num = loaded.llm, loaded.numerics
    ids, mask, mm, image_grid, video_grid = llm_case_inputs(case_dir)
    runs = {}
    with torch.inference_mode():
        pos, deltas = rope_index(ids, PositionTokens.from_config(llm.config), image_grid, video_grid, mask)
        embeds, image_mask, audio_mask = llm.prepare_inputs(ids, mm)
        assert image_mask is not None and bool(image_mask.any()) and bool(audio_mask.any())
        for chunk in (ids.shape[1], 5):
            cache = llm.new_cache(ids.shape[0], num, "cpu")
            runs[chunk] = (prefill(llm, num, cache, embeds, pos, step_mask=mask, image_mask=image_mask,
                                   audio_mask=audio_mask, chunk_tokens=chunk, keep_hidden=True), cache)
    (one, c1), (five, c5) = runs[ids.shape[1]], runs[5]
    valid = mask.bool()
    torch.testing.assert_close(five.hidden[valid], one.hidden[valid], atol=1e-5, rtol=1e-5)
    keys = [c.k[-1][:, :, : c.length].transpose(1, 2)[valid] for c in (c5, c1)]  # (padded slots hold junk)
    torch.testing.assert_close(keys[0], keys[1], atol=1e-5, rtol=1e-5)
    if case == "llm_b2":  # left padding: the cache remembers the padded slots, chunk by chunk
        assert torch.equal(c5.key_mask[:, : c5.length], c1.key_mask[:, : c1.length])
        assert torch.equal(c1.key_mask[:, : c1.length], valid)
    else:
        assert c5.key_mask is None and c1.key_mask is None


class CountingCancel(threading.Event):
    """A cancel flag that turns itself on at its n-th check."""

    def __init__(self, at: int):
        super().__init__()
        self.checks, self.at = 0, at

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks >= self.at or super().is_set()


@pytest.mark.parametrize("at_check", ["between chunks", "inside a chunk"])
def test_cancel_stops_a_long_prompt_between_prefill_layers(tiny_engine, monkeypatch, at_check):
    """A cancel during a long prompt is seen after the layer running when it came, not at the end of the chunk
    (a chunk of the real model on a CPU takes a minute): checked after each layer and before each chunk."""
    model = tiny_engine.model.llm.model
    layers = len(model.layers)
    chunks, layer_runs = [], []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: chunks.append(a[0].shape[1]) or forward(*a, **k))
    hooks = [layer.register_forward_hook(lambda *_: layer_runs.append(1)) for layer in model.layers]
    prompt = [20 + i % 150 for i in range(300)]
    # each chunk: one check before it, then one after each of its layers
    at = layers + 2 if at_check == "between chunks" else layers + 3
    try:
        done = _done(list(generate(tiny_engine.model, tiny_engine.tokenizer, prompt,
                                   GenerationParams(max_new_tokens=5), CountingCancel(at=at), prefill_chunk=64)))
    finally:
        for hook in hooks:
            hook.remove()
    assert done.finish_reason == "cancelled" and done.token_ids == [] and done.text == ""
    if at_check == "between chunks":
        assert chunks == [64] and len(layer_runs) == layers  # chunk 2 never started
    else:
        assert chunks == [64, 64] and len(layer_runs) == layers + 1  # chunk 2 stopped after its first layer


LONG_PROMPT = [20 + i % 150 for i in range(300)]  # 5 prefill chunks of 64 tokens


def _prefill_run(tiny_engine, monkeypatch, prompt, cancel_at_done=None, **kw):
    """generate()'s events for `prompt` in chunks of 64, and the sizes of the prefill forwards it ran; with
    `cancel_at_done`, the consumer cancels when a report says that many prompt tokens are read."""
    model = tiny_engine.model.llm.model
    forwards, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: forwards.append(a[0].shape[1]) or forward(*a, **k))
    cancel, events = threading.Event(), []
    for ev in generate(tiny_engine.model, tiny_engine.tokenizer, prompt, GenerationParams(max_new_tokens=3), cancel,
                       prefill_chunk=64, **kw):
        events.append(ev)
        if isinstance(ev, Progress) and ev.done == cancel_at_done:
            cancel.set()
    return events, forwards


def test_a_long_prompt_says_how_far_its_prefill_is_chunk_by_chunk(tiny_engine, monkeypatch):
    """A long message showed nothing but "Generating..." until its first token: each prefill chunk now reports the
    prompt tokens read (before the reply's first text); a prompt of one chunk is read at once, unreported."""
    events, forwards = _prefill_run(tiny_engine, monkeypatch, LONG_PROMPT, report_every_s=0.0)
    reports = [ev for ev in events if isinstance(ev, Progress)]
    assert [(r.stage, r.done, r.total) for r in reports] == [(PREFILL_STAGE, n, 300) for n in (0, 64, 128, 192, 256)]
    assert forwards[:5] == [64, 64, 64, 64, 44]
    first_text = next(i for i, ev in enumerate(events) if isinstance(ev, (TextDelta, Done)))
    assert all(isinstance(ev, Progress) for ev in events[:first_text]) and _done(events).token_ids
    short, _ = _prefill_run(tiny_engine, monkeypatch, LONG_PROMPT[:64], report_every_s=0.0)
    assert not any(isinstance(ev, Progress) for ev in short)


def test_prefill_reports_are_throttled(tiny_engine, monkeypatch):
    """Reports come at most once per `report_every_s` (a GPU reads a chunk in milliseconds): the first at once."""
    events, _ = _prefill_run(tiny_engine, monkeypatch, LONG_PROMPT, report_every_s=3600.0)
    assert [ev.done for ev in events if isinstance(ev, Progress)] == [0]


def test_a_cancel_during_the_prefill_stops_it_at_the_next_chunk(tiny_engine, monkeypatch):
    """The consumer cancels when told 128 of 300 tokens are read: no further chunk runs, no token comes."""
    events, forwards = _prefill_run(tiny_engine, monkeypatch, LONG_PROMPT, cancel_at_done=128, report_every_s=0.0)
    done = _done(events)
    assert forwards == [64, 64] and done.finish_reason == "cancelled" and done.token_ids == []


def test_generate_is_the_same_for_any_prefill_chunk(tiny_engine):
    prompt = tiny_engine.processor.build([{"role": "user", "content": "Tell me a long story " * 8}]).ids
    params = GenerationParams(max_new_tokens=10)
    a = _done(list(generate(tiny_engine.model, tiny_engine.tokenizer, prompt, params, prefill_chunk=16)))
    b = _done(list(generate(tiny_engine.model, tiny_engine.tokenizer, prompt, params, prefill_chunk=4096)))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 10


def test_cpu_decode_loop_runs_each_half_layer_in_one_native_call(tiny_checkpoint, tiny_engine, monkeypatch):
    """The decode loop's device steps on the CPU (slot tensors, exact window) take the bound native layer
    kernels (engine.kernels.native.AttentionDecode / MlpDecode: one call per half layer) where the layers'
    projections bind (here: all, by lowering the bound), write the KV slots the loop advances (known on the
    host: no tensor read), and give the torch path's logits within fp32 summation-order error."""
    from engine.kernels import native

    if not native.available():
        pytest.skip(f"native kernels not built here: {native.status()}")
    monkeypatch.setattr(native, "BIND_MIN_BYTES", 0)
    fast = types.SimpleNamespace(model=load_model(tiny_checkpoint, dtype="fp32", device="cpu"))
    assert all(layer.cpu_decode is not None for layer in fast.model.llm.model.layers)
    calls = []
    real = native.AttentionDecode.__call__
    monkeypatch.setattr(native.AttentionDecode, "__call__", lambda self, *a: calls.append(a[-1]) or real(self, *a))
    logits = {}
    with torch.inference_mode():
        for name, engine in (("torch", tiny_engine), ("native", fast)):
            llm, num, _, cache, _, pre = _prefilled(engine)
            step = DecodeStep(llm, num, cache)
            step.feed(pre.logits.argmax(-1))
            out = []
            with HostSyncCounter() as syncs:
                for _ in range(5):
                    out.append(step.step())
                    step.feed(out[-1].argmax(-1))
            logits[name] = torch.stack(out)
            cpu = torch.device("cpu")
            assert cache.length == 24 + 5 and int(cache.positions[cpu]) == cache.cpu_slots[cpu] == cache.length
            if name == "native":  # the slot is taken from the cache's host copy, not read from its tensor
                assert syncs.count.total == 0, syncs.count.syncs
    layers = len(fast.model.llm.model.layers)
    assert calls == [slot for slot in range(24, 29) for _ in range(layers)]  # every layer, at the loop's slots
    torch.testing.assert_close(logits["native"], logits["torch"], atol=1e-4, rtol=1e-4)


def short_context_engine(engine, context: int):
    """`engine` (shared weights and lock) as if its checkpoint's context were `context` tokens."""
    import copy
    import dataclasses

    cfg = engine.model.config
    model = dataclasses.replace(engine.model, config=dataclasses.replace(
        cfg, llm=dataclasses.replace(cfg.llm, max_position_embeddings=context)))
    short = copy.copy(engine)
    short.model = model
    return short


def test_a_limit_nobody_asked_for_ends_at_the_context_with_finish_length(tiny_engine):
    """A prompt leaving 5 tokens of the context: with max_new_tokens a default ceiling (fit_context: a server
    request naming no max_tokens, Engine.chat without params) the reply runs to the context's end and says
    "length" (it was refused with context_length_exceeded for a limit the request never set); a limit the
    request names still cannot pass the context, and a prompt filling the context is still refused."""
    prompt = tiny_engine.processor.build(MSG).ids
    short = short_context_engine(tiny_engine, len(prompt) + 5)
    done = _done(list(short.chat(MSG, GenerationParams(max_new_tokens=50, fit_context=True))))
    assert done.finish_reason == "length" and len(done.token_ids) == 5
    assert done.token_ids == _done(_run(tiny_engine, max_new_tokens=5)).token_ids
    done = _done(list(short.chat(MSG)))  # no params: the default ceiling is not a request
    assert done.finish_reason == "length" and len(done.token_ids) == 5
    events = list(generate(short.model, short.tokenizer, prompt, GenerationParams(max_new_tokens=50, fit_context=True)))
    assert _done(events).finish_reason == "length" and len(_done(events).token_ids) == 5
    refused = list(short.chat(MSG, GenerationParams(max_new_tokens=50)))
    assert len(refused) == 1 and refused[0].code == "context_length_exceeded"
    full = short_context_engine(tiny_engine, len(prompt))
    refused = list(full.chat(MSG, GenerationParams(max_new_tokens=50, fit_context=True)))
    assert len(refused) == 1 and refused[0].code == "context_length_exceeded"
    assert "no room is left for a reply" in refused[0].message  # (it named a max_new_tokens nobody asked for)


def test_one_stop_string_given_as_a_str_is_one_stop_string(tiny_engine):
    text = _done(_run(tiny_engine, max_new_tokens=24)).text
    stop = " " + text.split()[2]  # the third word: some of its characters come earlier (one by one, they stop there)
    cut = text.index(stop)
    assert any(c in text[:cut] for c in stop)
    as_str = _done(_run(tiny_engine, max_new_tokens=24, stop=stop))
    assert as_str.text == _done(_run(tiny_engine, max_new_tokens=24, stop=[stop])).text == text[:cut]
    assert as_str.finish_reason == "stop"


# ------------------------------------------------------------------------------------------------
# log probabilities

LOGPROB_TOLERANCE = 1e-3  # the decode loop's logits against one forward pass of the whole sequence (fp32)


def _entries(events) -> list:
    return [e for ev in events if isinstance(ev, TextDelta) for e in ev.logprobs]


def _sequence_logprobs(engine, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position before a reply token, from one prefill of the prompt and
    the reply together (apart from the decode loop)."""
    llm, num = engine.model.llm, engine.model.numerics
    ids = torch.tensor([prompt + reply])
    pos, deltas = rope_index(ids, PositionTokens.from_config(llm.config))
    cache = llm.new_cache(1, num, "cpu", capacity=ids.shape[1])
    cache.rope_deltas = deltas
    with torch.inference_mode():
        hidden = prefill(llm, num, cache, llm.model.embed(ids), pos, keep_hidden=True).hidden
        return llm.logits(hidden[0, len(prompt) - 1:-1]).float().log_softmax(-1)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_logprobs_are_the_models_own_distribution(tiny_engine, mode):
    """Each token's logprob is the log-softmax of the raw logits at its position (before penalty, temperature,
    top-k, top-p), as one separate forward pass of the whole sequence gives it; its top_logprobs are that
    distribution's best, most likely first; a greedy token is the best of them."""
    top = 5
    events = _run(tiny_engine, max_new_tokens=10, logprobs=True, top_logprobs=top, **SAMPLING[mode])
    done, entries = _done(events), _entries(events)
    assert 0 < len(entries) <= len(done.token_ids)
    reference = _sequence_logprobs(tiny_engine, tiny_engine.processor.build(MSG).ids, done.token_ids)
    tok = tiny_engine.tokenizer
    for i, entry in enumerate(entries):
        token = done.token_ids[i]
        assert entry.bytes == list(tok.piece_bytes(token))
        assert entry.logprob == pytest.approx(reference[i, token].item(), abs=LOGPROB_TOLERANCE)
        best = reference[i].topk(top)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=LOGPROB_TOLERANCE)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        if mode == "greedy":
            assert entry.logprob == max(t.logprob for t in entry.top_logprobs)
            assert entry.bytes == entry.top_logprobs[0].bytes


def test_no_logprobs_unless_asked(tiny_engine):
    events = _run(tiny_engine, max_new_tokens=6)
    assert all(ev.logprobs is None for ev in events if isinstance(ev, TextDelta))
    assert all(ev.logprobs is not None and all(e.top_logprobs == [] for e in ev.logprobs)
               for ev in _run(tiny_engine, max_new_tokens=6, logprobs=True) if isinstance(ev, TextDelta))


def test_a_special_token_the_reply_skips_is_not_in_its_logprobs(tiny_engine, scripted_tokens):
    """The text leaves a special token out (as skip_special_tokens does): its entry would make the entries spell
    something the reply never said, so it has none; the tokens around it keep theirs."""
    tok = tiny_engine.tokenizer
    special = tok.token_id("[gMASK]")
    assert special in tok.special_ids
    scripted_tokens(tok.encode_plain("a") + [special] + tok.encode_plain("b"))
    events = _run(tiny_engine, max_new_tokens=3, logprobs=True)
    assert _done(events).text == "ab"
    assert "".join(e.token for e in _entries(events)) == "ab"


def test_a_character_split_over_tokens_reports_each_tokens_own_bytes(tiny_engine, scripted_tokens):
    """"中" drawn as three one-byte tokens: three entries, each its own byte and U+FFFD as its text, all with the
    delta that carries the character; cut by the token limit inside it, the partial character's tokens (whose text
    is dropped) are not reported."""
    tok = tiny_engine.tokenizer
    a, zh = tok.encode_plain("a"), tok.encode_plain("中")
    scripted_tokens(a + zh)
    events = _run(tiny_engine, max_new_tokens=4, logprobs=True)
    deltas = [ev for ev in events if isinstance(ev, TextDelta)]
    assert [ev.text for ev in deltas] == ["a", "中"]
    assert [e.bytes for e in deltas[1].logprobs] == [[b] for b in "中".encode()]
    assert [e.token for e in deltas[1].logprobs] == ["\ufffd"] * 3
    assert all(e.logprob <= 0 for ev in deltas for e in ev.logprobs)
    scripted_tokens(a + zh[:2])
    assert [e.token for e in _entries(_run(tiny_engine, max_new_tokens=3, logprobs=True))] == ["a"]


def test_tokens_cut_by_a_stop_string_are_not_reported(tiny_engine):
    text = _done(_run(tiny_engine, max_new_tokens=24)).text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2]
                and text[i:i + 2] not in text[:i])
    events = _run(tiny_engine, max_new_tokens=24, stop=[stop], logprobs=True, top_logprobs=2)
    done, entries = _done(events), _entries(events)
    reported = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace")
    assert done.text.startswith(reported) and len(entries) < len(done.token_ids)
    # the next token drawn is the one the stop string cut: its text runs past the reply's
    cut = b"".join(bytes(tiny_engine.tokenizer.piece_bytes(t)) for t in done.token_ids[:len(entries) + 1])
    assert not done.text.startswith(cut.decode("utf-8", errors="replace"))


def test_cli_names_a_checkpoint_it_cannot_load_and_exits_2(tmp_path, capsys):
    """Another model's checkpoint (or a broken config.json) was a ConfigError traceback."""
    from engine.generate import main

    check_unloadable_checkpoint(main, tmp_path, capsys, ["--prompt", "hi"], 2)


@pytest.mark.parametrize("flags, says", [(["--max-new-tokens", "-1"], "max_new_tokens must be a positive integer"),
                                         (["--temperature", "nan"], "temperature must be in [0, 100]"),
                                         (["--top-p", "2"], "top_p must be in [0, 1]"),
                                         (["--prompt", ""], "--prompt is empty"),
                                         (["--presence-penalty", "3"], "presence_penalty must be in [-2, 2]"),
                                         (["--frequency-penalty", "nan"], "frequency_penalty must be in [-2, 2]"),
                                         (["--logit-bias", "5=500"], "logit_bias values must be in [-100, 100]"),
                                         (["--logit-bias", "five=1"], "expected TOKEN_ID=BIAS")])
def test_cli_refuses_settings_before_the_model_loads(capsys, flags, says):
    """--max-new-tokens -1 or --temperature nan loaded the model (minutes for the real one), then ended in an
    'error:' line with exit 1, the code of a failed generation; they are usage errors: exit 2 before the load (the
    --model here does not exist, so a load would say so instead)."""
    from engine.generate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "/never/loaded", "--prompt", "hi", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and says in err and "could not load" not in err, err


@pytest.mark.parametrize("stdin, prompt, says", [("héllo\n".encode(), "héllo", None),
                                                  (b"", None, "--prompt is empty (nothing came on stdin)"),
                                                  (b"\xff\xfe", None, "stdin is not UTF-8 text")])
def test_cli_reads_the_prompt_from_stdin_for_a_dash(capsys, monkeypatch, stdin, prompt, says):
    """`--prompt -` sent the one-character message '-'; it is stdin's text (nothing there, or bytes that are not
    text: a usage error before the model loads)."""
    import io

    from engine.generate import _cli_parser, _cli_request

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    ap = _cli_parser()
    args = ap.parse_args(["--prompt", "-"])
    if says is None:
        assert _cli_request(ap, args)[0] == prompt
        return
    with pytest.raises(SystemExit) as exit_info:
        _cli_request(ap, args)
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_cli_takes_openai_penalties_and_logit_bias(tiny_engine, monkeypatch, capsys):
    """The server honoured presence_penalty / frequency_penalty / logit_bias; the command line had no way to ask.
    --logit-bias ID=100 forces that token (greedy); the penalties reach the engine as the server's do; a token id
    the model has not is refused naming the range (exit 2)."""
    from engine.generate import main
    from engine.runtime import Engine

    asked, chat = [], Engine.chat

    def chat_asked(self, messages, params, **kw):
        asked.append(params)
        return chat(self, messages, params, **kw)

    monkeypatch.setattr(Engine, "load", lambda *a, **k: tiny_engine)
    monkeypatch.setattr(Engine, "chat", chat_asked)
    forced = tiny_engine.tokenizer.encode_plain(" cat")[0]
    assert main(["--prompt", "hi", "--max-new-tokens", "3", "--logit-bias", f"{forced}=100"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == tiny_engine.tokenizer.decode([forced] * 3)
    main(["--prompt", "hi", "--max-new-tokens", "2", "--presence-penalty", "1.5", "--frequency-penalty", "-0.5"])
    assert (asked[-1].presence_penalty, asked[-1].frequency_penalty) == (1.5, -0.5)
    assert main(["--prompt", "hi", "--logit-bias", "99999999=1"]) == 2
    assert "this model's tokens are 0 to " in capsys.readouterr().err


def test_cli_says_how_far_a_long_prompts_reading_is(tiny_engine, monkeypatch, capsys):
    """A long --prompt (or stdin) printed nothing until its first token: stderr says how far its reading is."""
    from engine.generate import main
    from engine.runtime import Engine

    monkeypatch.setattr(Engine, "load", lambda *a, **k: tiny_engine)
    unit = "the quick brown fox jumps over the lazy dog. "
    prompt = unit * (600 // len(tiny_engine.tokenizer.encode_plain(unit)) + 1)  # two prefill chunks of 512
    assert main(["--prompt", prompt, "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr()
    assert "[reading the prompt: 0 of " in out.err and "reading" not in out.out
