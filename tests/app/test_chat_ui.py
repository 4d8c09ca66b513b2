"""The studio served for real (tiny random checkpoint) and driven through its API with
gradio_client: streaming, multi-turn history, Stop, errors, empty input, and the banner."""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import replace

import pytest

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from app.ui.banner import DEMO_HEADLINE, banner_text, human_count  # noqa: E402
from app.ui.chat import EMPTY_HINT, ChatController, ChatRuns, content_text, history_to_messages  # noqa: E402
from engine.events import Done  # noqa: E402
from engine.runtime import REAL_MODEL_HINT  # noqa: E402
from engine.sampling import GenerationParams  # noqa: E402

# message, history, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, system, thinking
GREEDY = dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None)


def chat_args(message, history, max_new_tokens=12, system="", thinking=False, **overrides):
    p = {**GREEDY, **overrides}
    return (message, history, max_new_tokens, p["temperature"], p["top_p"], p["top_k"],
            p["repetition_penalty"], p["seed"], system, thinking)


def engine_reply(engine, messages, max_new_tokens=12, system=None, thinking=False) -> Done:
    params = GenerationParams(max_new_tokens=max_new_tokens)
    done = [ev for ev in engine.chat(messages, params, system_prompt=system, thinking=thinking)
            if isinstance(ev, Done)]
    assert len(done) == 1
    return done[0]


@pytest.fixture()
def client(studio):
    return Client(studio, verbose=False)


def test_chat_streams_partial_outputs_and_matches_the_engine(client, tiny_engine):
    job = client.submit(*chat_args("Hello, studio!", [], max_new_tokens=24), api_name="/chat")
    history, textbox, figures = job.result(timeout=60)
    outputs = job.outputs()
    replies = [content_text(out[0][-1]["content"]) for out in outputs if out[0][-1]["role"] == "assistant"]
    non_empty = [r for r in replies if r]
    assert len(non_empty) > 1, f"expected several streamed updates, got {outputs}"
    for shorter, longer in zip(replies, replies[1:]):  # each update extends the previous one
        assert longer.startswith(shorter)
    assert textbox == ""
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert content_text(history[0]["content"]) == "Hello, studio!"
    final = content_text(history[-1]["content"])
    assert final, "the final assistant message is empty"
    expected = engine_reply(tiny_engine, [{"role": "user", "content": "Hello, studio!"}], max_new_tokens=24)
    assert final.strip() == expected.text.strip()  # greedy: the UI shows what the engine generated (Gradio trims the ends)
    assert f"new tokens {expected.stats.new_tokens}" in figures and "finish reason: length" in figures


def test_multi_turn_history_reaches_the_engine(client, tiny_engine):
    first, _, _ = client.predict(*chat_args("First question", []), api_name="/chat")
    history, _, figures = client.predict(*chat_args("Second question", first, system="Be brief.", thinking=True),
                                         api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    messages = [{"role": "user", "content": "First question"},
                {"role": "assistant", "content": content_text(first[-1]["content"])},
                {"role": "user", "content": "Second question"}]
    expected = engine_reply(tiny_engine, messages, system="Be brief.", thinking=True)
    assert content_text(history[-1]["content"]).strip() == expected.text.strip()
    assert f"prompt tokens {expected.stats.prompt_tokens}" in figures


def test_stop_cancels_the_running_generation(client):
    job = client.submit(*chat_args("Tell me a very long story", [], max_new_tokens=4000), api_name="/chat")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(job.outputs()) < 3:
        time.sleep(0.02)
    assert len(job.outputs()) >= 3, "the reply never started streaming"
    t_stop = time.monotonic()
    client.predict(api_name="/stop")
    history, _, figures = job.result(timeout=30)
    assert "finish reason: cancelled" in figures
    new_tokens = int(figures.split("new tokens ")[1].split(",")[0])
    assert 0 < new_tokens < 4000
    assert time.monotonic() - t_stop < 15
    assert content_text(history[-1]["content"])  # the partial reply stays visible
    # The engine is free again: the next request runs to completion.
    _, _, figures2 = client.predict(*chat_args("Are you there?", [], max_new_tokens=4), api_name="/chat")
    assert "finish reason: length" in figures2


def test_stop_only_reaches_its_own_session(studio):
    """Another user's Stop must not cancel this user's reply."""
    alice, bob = Client(studio, verbose=False), Client(studio, verbose=False)
    job = alice.submit(*chat_args("Count slowly", [], max_new_tokens=4000), api_name="/chat")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(job.outputs()) < 2:
        time.sleep(0.02)
    bob.predict(api_name="/stop")
    seen = len(job.outputs())
    while time.monotonic() < deadline and len(job.outputs()) < seen + 3 and not job.done():
        time.sleep(0.02)
    assert not job.done() and len(job.outputs()) >= seen + 3, "Bob's Stop ended Alice's reply"
    alice.predict(api_name="/stop")
    _, _, figures = job.result(timeout=30)
    assert "finish reason: cancelled" in figures


def test_a_cancelled_or_abandoned_request_frees_the_engine(client, tiny_engine):
    """When the page goes away (Gradio cancels the event and closes the generator), generation
    must end at once rather than hold the engine until max_new_tokens."""
    job = client.submit(*chat_args("Tell me a very long story", [], max_new_tokens=4000, temperature=0.8, seed=7),
                        api_name="/chat")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(job.outputs()) < 3:
        time.sleep(0.02)
    assert not job.done()
    job.cancel()
    assert tiny_engine._lock.acquire(timeout=10), "the engine is still generating for a cancelled request"
    tiny_engine._lock.release()


def test_engine_error_is_reported_and_the_app_keeps_serving(client, tiny_engine):
    context = tiny_engine.model.config.llm.max_position_embeddings
    too_long = "x" * (context + 100)  # one token per byte in the tiny vocabulary: over the context
    history, textbox, figures = client.predict(*chat_args(too_long, []), api_name="/chat")
    assert history == []  # nothing generated: the turn is not kept...
    assert textbox == too_long  # ...and the message is given back for editing
    assert figures.startswith("Error (context_length_exceeded)") and str(context) in figures
    history, _, figures = client.predict(*chat_args("short one", [], max_new_tokens=3), api_name="/chat")
    assert len(history) == 2 and "finish reason" in figures


def test_setting_the_engine_rejects_is_a_message_not_a_crash(tiny_engine):
    """The sliders keep values in range; a caller of the callback can still pass one the engine
    rejects (its Error event), which must come back as a readable message."""
    controller = ChatController(tiny_engine)
    updates = list(controller.respond(*chat_args("hi", [], repetition_penalty=0.0)))
    history, textbox, figures = updates[-1]
    assert history == [] and textbox == "hi"
    assert figures.startswith("Error (invalid_request)") and "repetition_penalty" in figures
    assert len(controller.runs) == 0  # the request was unregistered when it ended


def test_empty_input_is_ignored_with_a_hint(client):
    prior = [{"role": "user", "content": [{"type": "text", "text": "earlier"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "reply"}]}]
    history, _, figures = client.predict(*chat_args("   \n ", prior), api_name="/chat")
    assert history_to_messages(history) == [{"role": "user", "content": "earlier"},
                                            {"role": "assistant", "content": "reply"}]
    assert figures == EMPTY_HINT


def test_clear_empties_the_conversation(client):
    history, textbox, figures = client.predict(api_name="/clear")
    assert history == [] and textbox == "" and figures == ""


def test_banner_warns_about_random_demo_weights(studio):
    with urllib.request.urlopen(studio + "config", timeout=10) as resp:
        config = json.load(resp)
    banner = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "model-banner"]
    assert len(banner) == 1
    text = banner[0]["props"]["value"]
    assert "RANDOM DEMO WEIGHTS" in text and "meaningless" in text
    assert "--model inclusionAI/Ming-flash-omni-2.0" in text
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    assert tabs == ["Chat"]


def test_banner_for_a_real_model_shows_its_figures(tiny_engine):
    info = replace(tiny_engine.info(), is_demo=False, name="Ming-flash-omni-2.0", release="2.0",
                   parameters=103_200_000_000, dtype="bfloat16", device="cuda:0")
    text = banner_text(info)
    assert DEMO_HEADLINE not in text and REAL_MODEL_HINT not in text
    for part in ("Ming-flash-omni-2.0", "release 2.0", "103 B parameters", "bfloat16", "cuda:0"):
        assert part in text
    assert "placement" not in text  # everything on one device: nothing to say
    spread = replace(info, placement="1 GPU(s) + host; routed experts (7,936, 25 MB each) on GPU 0: 2,667, "
                                     "host memory (CPU compute): 5,269; predicted decode 8.1 tokens/s")
    assert "placement: 1 GPU(s) + host" in banner_text(spread) and "host memory (CPU compute)" in banner_text(spread)
    assert human_count(2_306_320) == "2.31 M"


def test_history_conversion_handles_gradio_message_shapes():
    history = [
        {"role": "user", "metadata": None, "content": [{"text": "Hi", "type": "text"}], "options": None},
        {"role": "assistant", "content": [{"text": "Hel", "type": "text"}, {"text": "lo", "type": "text"}]},
        {"role": "assistant", "content": [{"type": "file", "file": {"path": "/tmp/x.png"}}]},
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "plain string"},
    ]
    assert history_to_messages(history) == [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello"},
                                            {"role": "user", "content": "plain string"}]


def test_runs_are_per_session_and_per_request():
    runs = ChatRuns()
    a1 = runs.begin("a")
    b = runs.begin("b")
    assert runs.stop("a") and a1.cancel.is_set() and not b.cancel.is_set()
    a2 = runs.begin("a")  # a new request gets a fresh, unset Event
    assert a2.cancel is not a1.cancel and not a2.cancel.is_set()
    runs.end("a", a1)  # ending a stale run does not drop the current one
    assert runs.running("a")
    runs.end("a", a2)
    assert not runs.running("a") and not runs.stop("a")


def test_stop_withdraws_a_request_still_waiting_in_the_queue(tiny_engine):
    """Stop pressed while the request waits for the engine (another user's reply runs): when its turn
    comes it ends at once, generates nothing and gives the message back; later requests run."""
    from types import SimpleNamespace

    from app.ui.chat import WITHDRAWN

    controller = ChatController(tiny_engine)
    bob = SimpleNamespace(session_hash="bob")
    controller.enqueue(bob)  # Send pressed: the request enters the queue
    controller.stop(bob)  # Stop pressed before it started
    calls = []
    original = tiny_engine.chat
    tiny_engine.chat = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        outputs = list(controller.respond(*chat_args("Hello", [], max_new_tokens=4), request=bob))
        assert outputs == [([], "Hello", WITHDRAWN)] and not calls
        controller.enqueue(bob)
        history, _, figures = list(controller.respond(*chat_args("Hello again", [], max_new_tokens=4), request=bob))[-1]
    finally:
        tiny_engine.chat = original
    assert calls == [1] and "finish reason: length" in figures
    assert content_text(history[0]["content"]) == "Hello again"
    assert len(controller.runs) == 0 and controller.runs.start("bob") is None  # nothing left over
    # Clear while queued: the conversation stays empty (the old history is not brought back).
    controller.enqueue(bob)
    assert controller.clear(bob) == ([], "", "")
    assert list(controller.respond(*chat_args("Later", history), request=bob)) == [([], "", "")]
    assert controller.runs.start("bob") is None
