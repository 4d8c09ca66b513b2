"""The Chat tab served for real (tiny engine behind its server, the page a client of it) and driven
through its API with gradio_client: streaming, multi-turn history, media, Stop (running and
queued), Clear, errors, empty input, export, and the banner and tabs."""

from __future__ import annotations

import json
import shlex
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio")
import gradio as gr  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from app.engine_link import EngineLink  # noqa: E402
from app.ui.chat import (EMPTY_HINT, INTERRUPTED, LEGACY_CHAT_LOST, NOTHING_TO_EXPORT, NO_SNAPSHOT,  # noqa: E402
                         OPEN_ELSEWHERE, OPEN_ELSEWHERE_MARK,
                         READING, REPLY_SHOWN_EVERY_S, STOPPED_NOTE, STOPPED_READING, WITHDRAWN, ChatController,
                         content_text, export_conversation, history_to_messages, reading_line, restorable,
                         text_part, user_turn)
from engine.client import EngineClient  # noqa: E402
from engine.events import MEDIA_STAGE, Done, Progress  # noqa: E402
from engine.sampling import GenerationParams  # noqa: E402
from tests.paths import REPO  # noqa: E402

GREEDY = dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None)
ASSETS = REPO / "app" / "assets"


def chat_args(history, max_new_tokens=12, system="", thinking=False, speak=False, voice="", **overrides):
    """The /chat endpoint's inputs: the conversation (its last user turn unanswered) and the options."""
    p = {**GREEDY, **overrides}
    return (history, max_new_tokens, p["temperature"], p["top_p"], p["top_k"], p["repetition_penalty"], p["seed"],
            system, thinking, speak, voice)


def ask(text, history=()):
    return [*history, {"role": "user", "content": [{"type": "text", "text": text}]}]


def attach(path):
    return {"role": "user", "content": [{"type": "file", "file": handle_file(str(path))}]}


def engine_reply(engine, messages, max_new_tokens=12, system=None, thinking=False) -> Done:
    params = GenerationParams(max_new_tokens=max_new_tokens)
    done = [ev for ev in engine.chat(messages, params, system_prompt=system, thinking=thinking) if isinstance(ev, Done)]
    assert len(done) == 1
    return done[0]


@pytest.fixture()
def client(studio):
    return Client(studio, verbose=False)


@pytest.fixture()
def controller(engine_server):
    return ChatController(EngineLink(EngineClient(engine_server.url, token="test-token")))


def wait_outputs(job, n, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(job.outputs()) < n and not job.done():
        time.sleep(0.02)
    return len(job.outputs()) >= n


def test_chat_streams_partial_outputs_and_matches_the_engine(client, tiny_engine):
    job = client.submit(*chat_args(ask("Hello, studio!"), max_new_tokens=24), api_name="/chat")
    history, box, figures, _ = job.result(timeout=60)
    # (queue-position updates leave the history out: gradio_client shows that output as an update dict)
    replies = [content_text(o[0][-1]["content"]) for o in job.outputs()
               if isinstance(o[0], list) and o[0][-1]["role"] == "assistant"]
    assert len([r for r in replies if r]) > 1, "expected several streamed updates"
    for shorter, longer in zip(replies, replies[1:]):  # each update extends the previous one
        assert longer.strip().startswith(shorter.strip())
    assert [m["role"] for m in history] == ["user", "assistant"]
    expected = engine_reply(tiny_engine, [{"role": "user", "content": "Hello, studio!"}], max_new_tokens=24)
    assert content_text(history[-1]["content"]).strip() == expected.text.strip()  # greedy: what the engine made
    assert f"new tokens {expected.stats.new_tokens}" in figures and "finish reason: length" in figures


def test_multi_turn_history_system_and_thinking_reach_the_engine(client, tiny_engine):
    first, _, _, _ = client.predict(*chat_args(ask("First question")), api_name="/chat")
    history, _, figures, _ = client.predict(*chat_args(ask("Second question", first), system="Be brief.",
                                                       thinking=True), api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    messages = [{"role": "user", "content": "First question"},
                {"role": "assistant", "content": content_text(first[-1]["content"])},
                {"role": "user", "content": "Second question"}]
    expected = engine_reply(tiny_engine, messages, system="Be brief.", thinking=True)
    assert content_text(history[-1]["content"]).strip() == expected.text.strip()
    assert f"prompt tokens {expected.stats.prompt_tokens}" in figures


def test_an_attached_image_and_audio_clip_reach_the_engine(client):
    text_only = client.predict(*chat_args(ask("What is this?"), max_new_tokens=2), api_name="/chat")[2]
    history = [attach(ASSETS / "images" / "cup.png"), attach(ASSETS / "speech" / "what_do_you_see_en.wav"),
               *ask("What is this?")]
    _, _, figures, _ = client.predict(*chat_args(history, max_new_tokens=2), api_name="/chat")
    tokens = lambda f: int(f.split("prompt tokens ")[1].split(",")[0])  # noqa: E731
    assert "finish reason" in figures and tokens(figures) > tokens(text_only) + 10, (figures, text_only)


def test_stop_cancels_the_running_reply_and_keeps_what_was_said(client):
    job = client.submit(*chat_args(ask("Tell me a very long story"), max_new_tokens=4000), api_name="/chat")
    assert wait_outputs(job, 4), "the reply never started streaming"
    t_stop = time.monotonic()
    client.predict(api_name="/stop")
    history, _, figures, _ = job.result(timeout=30)
    assert "finish reason: cancelled" in figures and time.monotonic() - t_stop < 15
    assert content_text(history[-1]["content"])  # the partial reply stays visible
    _, _, figures2, _ = client.predict(*chat_args(ask("Are you there?"), max_new_tokens=4), api_name="/chat")
    assert "finish reason: length" in figures2  # the engine is free again


def test_stop_only_reaches_its_own_session(studio):
    alice, bob = Client(studio, verbose=False), Client(studio, verbose=False)
    job = alice.submit(*chat_args(ask("Count slowly"), max_new_tokens=4000), api_name="/chat")
    assert wait_outputs(job, 3)
    bob.predict(api_name="/stop")
    seen = len(job.outputs())
    assert wait_outputs(job, seen + 3) and not job.done(), "Bob's Stop ended Alice's reply"
    alice.predict(api_name="/stop")
    assert "finish reason: cancelled" in job.result(timeout=30)[2]


def test_a_queued_request_shows_its_place_and_stop_gives_the_message_back(controller, engine_server):
    """One queue (the server's): Bob waits behind Alice's reply and sees his place; his Stop withdraws
    the request before it starts and his message goes back to the box; Alice's reply is untouched."""
    alice, bob = SimpleNamespace(session_hash="alice"), SimpleNamespace(session_hash="bob")
    alice_out: list = []
    runner = threading.Thread(target=lambda: alice_out.extend(
        controller.respond(*chat_args(ask("long story"), max_new_tokens=4000), request=alice)))
    runner.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not controller.inflight.running("alice", "chat"):
        time.sleep(0.01)
    time.sleep(0.3)  # Alice's reply is generating
    bob_stream = controller.respond(*chat_args(ask("Hello"), max_new_tokens=4), request=bob)
    waiting = next(u for u in bob_stream if "Waiting for the engine" in u[2])
    assert "yours is next" in waiting[2]
    controller.stop(bob)
    last = list(bob_stream)[-1]
    assert last[0] == [] and last[1] == {"text": "Hello", "files": []} and last[2] == WITHDRAWN
    controller.stop(alice)
    runner.join(30)
    assert "finish reason: cancelled" in alice_out[-1][2] and content_text(alice_out[-1][0][-1]["content"])
    assert len(controller.inflight) == 0 and engine_server.ctx.scheduler.running == 0


def test_clear_while_replying_leaves_the_tab_empty(controller):
    me = SimpleNamespace(session_hash="me")
    stream = controller.respond(*chat_args(ask("story"), max_new_tokens=4000), request=me)
    next(u for u in stream if isinstance(u[0], list) and u[0][-1]["role"] == "assistant")
    assert controller.clear(me) == ([], {"text": "", "files": []}, "", None)
    assert list(stream)[-1][:3] == ([], {"text": "", "files": []}, "")


def test_an_engine_error_is_a_message_and_the_turn_goes_back(controller, tiny_engine):
    context = tiny_engine.model.config.llm.max_position_embeddings
    too_long = "x" * (context + 100)  # one token per byte in the tiny vocabulary: over the context
    history, box, figures, _ = list(controller.respond(*chat_args(ask(too_long))))[-1]
    assert history == [] and box["text"] == too_long  # nothing generated: the turn is given back for editing
    assert figures.startswith("Error (context_length_exceeded)")
    history, box, figures, _ = list(controller.respond(*chat_args(ask("hi"), repetition_penalty=0.0)))[-1]
    assert history == [] and box["text"] == "hi" and figures.startswith("Error (")
    assert len(controller.inflight) == 0
    assert "finish reason" in list(controller.respond(*chat_args(ask("short"), max_new_tokens=2)))[-1][2]


def test_an_engine_that_went_away_is_a_message_not_a_crash():
    link = EngineLink(EngineClient("http://127.0.0.1:9", timeout=2))  # nothing listens there
    assert not link.status().ok and "not answering" in link.status().problem
    history, box, figures, _ = list(ChatController(link).respond(*chat_args(ask("anyone?"))))[-1]
    assert history == [] and box["text"] == "anyone?"
    assert figures.startswith("Error (connect_failed): The engine is not reachable right now")


def test_messages_sent_without_a_reply_between_them_are_counted_as_one_against_the_parts_limit():
    """Two sends with no reply between them (the first one's cut before its first word) go to the model as one
    message: 40 + 31 parts came back as "'messages[0].content' has 72 content parts; a message holds at most 64",
    naming neither. The tab counts the parts shown since the last reply and names the limit before sending."""
    from engine.server.codec import MAX_CONTENT_PARTS
    from app.ui.chat import MESSAGE_PARTS, TOO_MANY_PARTS, stopped_note, too_many_parts

    assert MESSAGE_PARTS == MAX_CONTENT_PARTS

    def sent(text, pictures):
        return user_turn({"text": text, "files": [f"/nowhere/picture-{text}-{i}.png" for i in range(pictures)]})
    history = [*sent("first", 39), stopped_note(), *sent("second", 31)]
    link = EngineLink(EngineClient("http://127.0.0.1:9", timeout=2))  # (nothing listens there: nothing is sent)
    shown, box, figures, _ = list(ChatController(link).respond(*chat_args(history)))[-1]
    assert figures == TOO_MANY_PARTS.format(n=72, most=MESSAGE_PARTS, extra=8), figures
    assert shown == history[:-32] and box["text"] == "second" and len(box["files"]) == 31  # the last send, back
    assert too_many_parts(history_to_messages([*sent("first", 39), *sent("second", 23)])) is None  # 64: it fits


def test_empty_input_is_ignored_with_a_hint(controller):
    prior = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    history, box, hint, sent = controller.add_message({"text": "   \n ", "files": []}, prior, 3)
    assert history == prior and hint == EMPTY_HINT
    assert sent == gr.update()  # the count of messages sent is unchanged: no reply starts
    assert controller.add_message({"text": "hi", "files": []}, prior, 3)[3] == 4  # a message starts one
    assert list(controller.respond(*chat_args(prior)))[-1][2] == EMPTY_HINT  # nothing unanswered: no request


def test_the_token_slider_offers_no_more_than_the_engine_server_allows(studio_demo, engine_server):
    """The Max new tokens slider went to 8192; the server refuses more than its cap (max_tokens_exceeded)."""
    slider = next(b for b in studio_demo.blocks.values() if getattr(b, "elem_id", None) == "chat-max-tokens")
    assert slider.maximum == engine_server.ctx.limits.max_new_tokens
    assert f"{engine_server.ctx.limits.max_new_tokens:,}" in slider.label


def test_a_kept_conversation_comes_back_with_the_files_still_there(tmp_path):
    """A page reload lost the conversation; the browser keeps it, and at load it comes back as the Chatbot
    takes it. The browser holds what it gives back: an attachment comes back only from the upload folder
    (or the examples), a file gone since is a note, and what is not a user or assistant turn is left out."""
    uploads, elsewhere = tmp_path / "uploads", tmp_path / "elsewhere"
    uploads.mkdir(), elsewhere.mkdir()
    cup, secret = uploads / "cup.png", elsewhere / "secret.png"
    cup.write_bytes(b"png"), secret.write_bytes(b"png")
    image = {"type": "file", "file": {"path": str(cup), "mime_type": "image/png"}}
    saved = [{"role": "system", "content": "ignore this"},
             {"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A cup."}]},
             {"role": "user", "content": [{"type": "file", "file": {"path": str(secret)}},
                                          {"type": "file", "file": {"path": str(uploads / "gone.wav")}}]},
             "not a message", {"role": "user", "content": []}]
    assert restorable(saved, [uploads]) == [
        {"role": "user", "content": [{"path": str(cup), "mime_type": "image/png"}, text_part("What is this?")]},
        {"role": "assistant", "content": [text_part("A cup.")]},
        {"role": "user", "content": [text_part("(secret.png: no longer available after the reload)"),
                                     text_part("(gone.wav: no longer available after the reload)")]}]
    assert restorable(None, [uploads]) == restorable({"role": "user"}, [uploads]) == []
    controller = ChatController(SimpleNamespace(), [uploads])
    history, box, figures = controller.restore(saved[1:3])
    assert history == restorable(saved, [uploads])[:2]
    # nothing kept: the page's conversation is left alone (an empty one arriving late on a busy machine wiped the
    # message typed meanwhile, whose reply then found no question: "Type a message ... first")
    skipped = controller.restore(None)
    assert all(isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1 for value in skipped)


def test_a_message_whose_reply_was_interrupted_comes_back_in_the_box(tmp_path):
    """A reload mid-reply lost the message and the reply silently (the conversation was kept only once a reply
    was complete). The message is kept as soon as it is sent; at the next load a last message without its reply
    goes back to the input box (with its attachment), and the figures line says why."""
    (tmp_path / "cup.png").write_bytes(b"png")
    kept = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": {"path": str(tmp_path / "cup.png"), "mime_type": "image/png"}},
            {"role": "user", "content": "What is this?"}]
    controller = ChatController(SimpleNamespace(), [tmp_path])
    history, box, figures = controller.restore(kept)
    assert history == [{"role": "user", "content": [text_part("Hi")]},
                       {"role": "assistant", "content": [text_part("Hello.")]}]
    assert box == {"text": "What is this?", "files": [str(tmp_path / "cup.png")]}
    assert figures == INTERRUPTED


def test_clear_endpoint_empties_the_conversation(client):
    history, box, figures, audio = client.predict(api_name="/clear")
    assert history == [] and box == {"text": "", "files": []} and figures == ""


def test_export_writes_the_conversation_as_json(tmp_path):
    history = [{"role": "user", "content": {"path": "/tmp/a/cup.png"}}, {"role": "user", "content": "What?"},
               {"role": "assistant", "content": "A cup."}]
    data = json.loads(Path(export_conversation(history, str(tmp_path))).read_text())
    assert data["messages"] == [{"role": "user", "content": [{"type": "image", "image": "cup.png"},
                                                             {"type": "text", "text": "What?"}]},
                                {"role": "assistant", "content": "A cup."}]


def test_export_of_an_empty_conversation_says_so_instead_of_an_empty_file():
    for history in (None, [], [{"role": "user", "content": ""}]):
        file, figures = ChatController.export(history)
        assert file["visible"] is False and file["value"] is None and figures == NOTHING_TO_EXPORT
    file, _ = ChatController.export([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    assert file["visible"] is True and json.loads(Path(file["value"]).read_text())["messages"][1]["content"] == "Hello."


def test_attach_snapshot_without_a_picture_says_how_to_take_one():
    box, figures = ChatController.attach_snapshot(None, {"text": "look", "files": ["/tmp/a.png"]})
    assert box == {"__type__": "update"} and figures == NO_SNAPSHOT  # the box as it was
    box, figures = ChatController.attach_snapshot("/tmp/cam.png", {"text": "look", "files": ["/tmp/a.png"]}, NO_SNAPSHOT)
    assert box == {"text": "look", "files": ["/tmp/a.png", "/tmp/cam.png"]} and figures == ""  # the hint goes
    assert ChatController.attach_snapshot("/tmp/cam.png", None)[0] == {"text": "", "files": ["/tmp/cam.png"]}


def test_history_conversion_handles_gradio_message_shapes():
    history = [
        {"role": "user", "metadata": None, "content": [{"text": "Hi", "type": "text"}], "options": None},
        {"role": "assistant", "content": [{"text": "Hel", "type": "text"}, {"text": "lo", "type": "text"}]},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/x.png", "mime_type": "image/png"}}]},
        {"role": "user", "content": {"path": "/tmp/y.wav"}},
        {"role": "user", "content": "and this"},
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": {"path": "/tmp/notes.pdf"}},  # not a model input: left out
    ]
    assert history_to_messages(history) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "image", "image": "/tmp/x.png"}, {"type": "audio", "audio": "/tmp/y.wav"},
                                     {"type": "text", "text": "and this"}]}]
    assert user_turn({"text": "hi \n", "files": ["/tmp/x.png"]}) == [
        {"role": "user", "content": {"path": "/tmp/x.png"}}, {"role": "user", "content": text_part("hi")}]


def test_a_pasted_code_snippet_keeps_its_indentation_in_the_page_and_for_the_engine(studio_demo):
    """Gradio dedents a message given as a plain string (inspect.cleandoc) and the box's text was stripped: a pasted
    snippet lost its indentation in the page and on its way to the engine. Only the blank lines around it go."""
    snippet = "    if a < b:\n        print('<b>x</b>')"
    turn = user_turn({"text": f"\n  \n{snippet}\n\n", "files": []})
    chatbot = next(b for b in studio_demo.blocks.values() if getattr(b, "elem_id", None) == "chat-history")
    shown = chatbot.postprocess(turn).model_dump()[0]["content"][0]["text"]
    assert shown == snippet and history_to_messages(chatbot.preprocess(chatbot.postprocess(turn))) == [
        {"role": "user", "content": snippet}]
    restored = ChatController(SimpleNamespace(), []).restore([*turn, {"role": "assistant", "content": "ok"}])[0]
    assert chatbot.postprocess(restored).model_dump()[0]["content"][0]["text"] == snippet


def test_banner_and_tabs(studio):
    with urllib.request.urlopen(studio + "config", timeout=10) as resp:
        config = json.load(resp)
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    assert tabs == ["Chat", "Live", "Speech", "Voice", "Image"]
    with urllib.request.urlopen(studio, timeout=10):
        pass


def test_no_label_on_the_page_names_a_developer_script(studio):
    """The example galleries were labelled 'Examples (made by scripts/make_assets.py)': a path in our repository,
    meaningless to someone using the studio. No label, placeholder or info line names a script."""
    with urllib.request.urlopen(studio + "config", timeout=10) as resp:
        config = json.load(resp)
    texts = [str(c["props"].get(key)) for c in config["components"] for key in ("label", "placeholder", "info")
             if c.get("props", {}).get(key)]
    assert texts and not [t for t in texts if ".py" in t or "scripts/" in t], texts


def test_the_demo_banner_shows_a_command_that_runs_as_copied():
    """The banner's code line read "python launch.py --model inclusionAI/Ming-flash-omni-2.0   (or a local checkpoint
    directory)": copied from the page, the shell refused the parenthesis."""
    from app.ui.banner import banner_parts
    from engine.client import ModelInfo
    info = ModelInfo(id="m", name="ming-tiny-random", is_demo=True, release="", parameters=2_500_000, dtype="float32",
                     device="cpu", placement="", capabilities={"text"})
    headline, details, command = banner_parts(info)
    assert shlex.split(command) == ["python", "launch.py", "--model", "inclusionAI/Ming-flash-omni-2.0"]
    assert "local checkpoint directory" in details


def test_banner_says_where_a_real_model_went_and_what_was_left_out():
    from app.ui.banner import banner_parts
    from engine.client import ModelInfo
    base = dict(id="m", name="Ming-flash-omni-2.0", is_demo=False, release="2.0", parameters=104 * 10**9,
                dtype="bfloat16", device="cpu", capabilities={"text"})
    assert "placement" not in banner_parts(ModelInfo(placement="everything on cpu", **base))[1]
    cpu = ("everything on cpu (bf16, int4 experts, int8 linears): 60.02 GB of the 62.00 GB of host memory available "
           "at load, with an 8,192-token KV cache; speech and image generation NOT loaded: their 20.00 GB do not fit")
    assert "speech and image generation NOT loaded" in banner_parts(ModelInfo(placement=cpu, **base))[1]


def test_an_engine_that_goes_down_mid_reply_is_said_plainly_and_the_tab_recovers(tiny_engine):
    """The engine stopped mid-reply: the page read "Error (connection_lost): the connection to the server was lost:
    connection closed: received 1012 (service restart); then sent 1012 (service restart)" and said nothing of what
    to do. It says the engine stopped answering and to try again once the banner shows the model; what was said
    stays, and the same controller answers once the engine is back on its address (nothing restarted here)."""
    from engine.server import ServerHandle, create_app
    first = ServerHandle(create_app(tiny_engine), host="127.0.0.1", port=0).start()
    link = EngineLink(EngineClient(first.url, timeout=5), recheck_s=0.0)
    controller = ChatController(link)
    stream = controller.respond(*chat_args(ask("Count slowly"), max_new_tokens=4000))
    for history, _, _, _ in stream:
        if len(history) == 2 and content_text(history[-1]["content"]):
            break  # the reply is streaming
    first.stop()
    history, box, figures, _ = list(stream)[-1]
    assert figures.startswith("Error (connection_lost): The engine stopped answering in the middle of this request")
    assert "Try again once the banner at the top shows the model again" in figures
    assert content_text(history[-1]["content"])  # what was said before it stopped stays
    second = ServerHandle(create_app(tiny_engine), host="127.0.0.1", port=first.port).start()
    try:
        assert link.status().ok
        history, box, figures, _ = list(controller.respond(*chat_args(ask("Back?"), max_new_tokens=4)))[-1]
        assert "finish reason" in figures and content_text(history[-1]["content"])
    finally:
        second.stop()


def test_undo_takes_back_the_whole_turn_and_keeps_the_draft(tmp_path):
    """Gradio shows a turn's attachment and its text as two messages, and Undo names the text: the video stayed in
    the conversation, unanswered, only the text came back, and it replaced what the box held. Retry of such a turn
    keeps its attachment."""
    video = str(tmp_path / "clip.mp4")
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    turn = [{"role": "user", "content": {"path": video}}, {"role": "user", "content": "What happens here?"}]
    history = [*earlier, *turn, {"role": "assistant", "content": "A cup."}]
    for named in (3, 4):  # the turn's text, or its reply
        kept, box = ChatController.undo(history, {"text": "next question", "files": []}, gr.UndoData(None, {
            "index": named, "value": ""}))
        assert kept == earlier
        assert box == {"text": "What happens here?\n\nnext question", "files": [video]}
    assert ChatController.cut_for_retry(history, gr.RetryData(None, {"index": 3, "value": ""})) == [*earlier, *turn]
    retried = history_to_messages(ChatController.cut_for_retry(history, gr.RetryData(None, {"index": 4, "value": ""})))
    assert retried[-1] == {"role": "user", "content": [{"type": "video", "video": video},
                                                       {"type": "text", "text": "What happens here?"}]}


def test_a_turn_given_back_joins_what_was_typed_meanwhile(tmp_path):
    """A reply that failed or was stopped before it started gave its turn back by replacing the input box: what the
    user had typed or attached while it waited (the engine gone mid-answer) was lost."""
    clip = str(tmp_path / "clip.wav")
    given = {"text": "What is said here?", "files": [clip]}
    draft = {"text": "and a follow-up", "files": [{"path": str(tmp_path / "b.png")}]}
    box, slot = ChatController.give_back(given, draft)
    assert box == {"text": "What is said here?\n\nand a follow-up", "files": [clip, str(tmp_path / "b.png")]}
    assert slot is None
    assert ChatController.give_back(given, {"text": "", "files": []})[0] == given
    for nothing in (None, {"text": "", "files": []}):  # nothing given back (a reply, or Clear): the box stays as it is
        assert ChatController.give_back(nothing, {"text": "draft", "files": []}) == (gr.skip(), None)


def test_a_long_reply_is_shown_a_few_times_a_second_not_at_every_token(controller):
    """One page update per token made the page render the whole reply's Markdown a few hundred times a second: a
    4,000-token reply froze the page within a few thousand characters (a script call took 34 s; Stop could not be
    pressed). Updates are REPLY_SHOWN_EVERY_S apart at least, the first piece at once and the whole reply at the end."""
    shown = []  # (when, text) of each update of the conversation while the reply streams
    for update in controller.respond(*chat_args(ask("Count slowly"), max_new_tokens=150)):
        if isinstance(update[0], list) and update[0][-1]["role"] == "assistant":
            shown.append((time.monotonic(), content_text(update[0][-1]["content"])))
    *streamed, (_, whole) = shown
    assert streamed and streamed[0][1] and whole.startswith(streamed[-1][1]) and len(whole) > len(streamed[0][1])
    gaps = [later - earlier for (earlier, _), (later, _) in zip(streamed, streamed[1:])]
    assert gaps, "the reply streamed in one piece"
    assert all(gap >= REPLY_SHOWN_EVERY_S * 0.9 for gap in gaps), gaps  # (0.9: the clocks' rounding)


def test_a_long_message_says_how_far_its_reading_is_before_the_reply(controller, tiny_engine):
    """A long message showed only "Generating…" while the engine read it (minutes on a slow machine): the status says
    "Reading your message… N %" from the engine's prefill progress, then "Generating…" once the reply comes."""
    unit = "the quick brown fox jumps over the lazy dog. "
    message = unit * (600 // len(tiny_engine.tokenizer.encode_plain(unit)) + 1)  # two prefill chunks of 512
    statuses = [update[2] for update in controller.respond(*chat_args(ask(message), max_new_tokens=1))
                if isinstance(update[2], str)]
    reading = [i for i, status in enumerate(statuses) if status.startswith(READING)]
    assert reading and statuses[reading[0]] == f"{READING} 0 %", statuses
    assert not statuses[-1].startswith(READING) and reading[-1] < len(statuses) - 1
    # a long video's frames through the ViT come first, said by what they are
    assert reading_line(Progress(MEDIA_STAGE, 0, 1, "1 video")) == f"{READING} (1 video)"


def test_stop_while_a_long_message_is_read_says_so_and_gives_the_message_back(controller, tiny_engine):
    """Stop pressed while the engine read a long message said "Stopped before it started (it was waiting for the
    engine)", which it was not: it says the reading was stopped; the message is back in the box."""
    unit = "the quick brown fox jumps over the lazy dog. "
    message = unit * (1500 // len(tiny_engine.tokenizer.encode_plain(unit)))  # three prefill chunks of 512
    updates, visitor = [], SimpleNamespace(session_hash="reader")
    for update in controller.respond(*chat_args(ask(message), max_new_tokens=1), request=visitor):
        updates.append(update)
        if isinstance(update[2], str) and update[2].startswith(READING):
            controller.stop(visitor)
    history, box, status = updates[-1][:3]
    assert status == STOPPED_READING and history == [] and box["text"] == message, status


def test_stop_pressed_before_the_reply_has_begun_stops_it(capsys):
    """Stop pressed just after Enter, before the reply had begun (its attachments still being checked), said "Nothing
    is being generated." and the reply then came whole. The send is announced: Stop (once or twice) stops it there,
    nothing is sent and the message is back in the box; a send refused before its reply began leaves nothing for Stop
    to find once it has ended (as the Voice and Image tabs)."""
    from app.ui.chat import STOPPED_UNSENT
    from app.ui.common import SEED_RANGE

    me, chats = SimpleNamespace(session_hash="stops-early"), ChatController(
        EngineLink(EngineClient("http://127.0.0.1:9", timeout=2)))  # (nothing listens there: a request fails)
    history = chats.add_message({"text": "hi", "files": []}, [], 0, request=me)[0]
    chats.stop(me)
    chats.stop(me)  # (twice)
    shown, box, status, _ = list(chats.respond(*chat_args(history), request=me))[-1]
    assert (shown, box["text"], status) == ([], "hi", STOPPED_UNSENT) and "Nothing" not in capsys.readouterr().out
    chats.after_reply(box, None, request=me)
    history = chats.add_message({"text": "hi", "files": []}, [], 0, request=me)[0]
    assert list(chats.respond(*chat_args(history, seed="x"), request=me))[-1][2] == SEED_RANGE  # refused
    chats.after_reply(None, None, request=me)
    chats.stop(me)  # (after the run ended)
    assert len(chats.inflight) == 0 and "Nothing is being generated." in capsys.readouterr().out


def test_a_message_edited_to_nothing_leaves_the_conversation_as_it_was(controller):
    """Editing an earlier message to nothing cut the conversation after it and sent the rest, which ended with the
    model's own reply, to the engine; the conversation now stays as it was and no request is made."""
    history = [{"role": "user", "content": "First"}, {"role": "assistant", "content": "One."},
               {"role": "user", "content": "Second"}, {"role": "assistant", "content": "Two."}]
    for nothing in ("", "  \n"):
        with pytest.warns(UserWarning, match="cannot be empty"):
            emptied = gr.EditData(None, {"index": 0, "value": nothing, "previous_value": "First"})
            assert ChatController.cut_for_edit(history, emptied) == history
    assert list(controller.respond(*chat_args(history)))[-1][2] == EMPTY_HINT  # nothing unanswered: nothing sent
    edited = ChatController.cut_for_edit(history, gr.EditData(None, {"index": 2, "value": "Third",
                                                                     "previous_value": "Second"}))
    assert edited == [*history[:2], {"role": "user", "content": text_part("Third")}]


def test_a_message_sent_while_a_reply_streams_stays_in_sight(controller):
    """A message sent while the last reply streamed cut that reply, whose last update then showed its own conversation,
    without the new message, and "cancelled" while the new message was being answered (for as long as it waited)."""
    me = SimpleNamespace(session_hash="impatient")
    first = controller.respond(*chat_args(ask("Tell me a long story"), max_new_tokens=4000), request=me)
    so_far = next(u for u in first if isinstance(u[0], list) and u[0][-1]["role"] == "assistant")[0]
    second = controller.respond(*chat_args(ask("Shorter, please", so_far), max_new_tokens=2), request=me)
    assert next(second)  # the second request is under way: the first is cut
    assert list(first)[-1] == (gr.skip(), gr.skip(), gr.skip(), gr.skip())
    history, _, figures, _ = list(second)[-1]
    assert content_text(history[-2]["content"]) == "Shorter, please" and "finish reason" in figures


def test_a_cut_reply_is_marked_stopped_and_the_engine_gets_it_as_shown(controller):
    """A reply cut by Stop or by a newer message looked like a whole one. It stays as far as it was shown, followed by
    STOPPED_NOTE; the next request gives the engine the cut reply as shown and never the note."""
    me = SimpleNamespace(session_hash="cut-twice")
    first = controller.respond(*chat_args(ask("Tell me a long story"), max_new_tokens=4000), request=me)
    shown = next(u for u in first if isinstance(u[0], list) and u[0][-1]["role"] == "assistant")[0]
    cut_reply = content_text(shown[-1]["content"])
    history, _, _, _ = controller.add_message({"text": "Shorter, please", "files": []}, shown, request=me)
    assert [content_text(m["content"]) for m in history[-3:]] == [cut_reply, STOPPED_NOTE, "Shorter, please"]
    assert history_to_messages(history)[1:] == [{"role": "assistant", "content": cut_reply},
                                                {"role": "user", "content": "Shorter, please"}]
    second = controller.respond(*chat_args(history, max_new_tokens=4000), request=me)
    assert next(second) and list(first)[-1] == (gr.skip(),) * 4  # the first reply is cut, the tab left to the second
    next(u for u in second if isinstance(u[0], list) and u[0][-1]["role"] == "assistant")
    controller.stop(me)
    stopped, _, figures, _ = list(second)[-1]
    assert "finish reason: cancelled" in figures and content_text(stopped[-1]["content"]) == STOPPED_NOTE
    assert content_text(stopped[-2]["content"]) and stopped[-3]["content"] == history[-1]["content"]
    added, _, _, _ = controller.add_message({"text": "Thanks", "files": []}, stopped, request=me)  # nothing runs now
    assert content_text(added[-2]["content"]) == STOPPED_NOTE and len(added) == len(stopped) + 1


def test_the_unreadable_conversation_of_the_version_before_is_said_once_not_lost_without_a_word(tmp_path):
    """The conversation studios before per-tab chats kept (a gr.BrowserState, encrypted with a secret drawn at each
    studio start) cannot be read by a later page: it vanished at the upgrade without a word; the page says so."""
    controller = ChatController(SimpleNamespace(), [tmp_path])
    assert controller.load(None, "[]", "true")[2] == LEGACY_CHAT_LOST
    assert controller.load(None, "[]", "false")[2] == gr.skip()
    cut = json.dumps([{"role": "user", "content": "a question whose reply a reload cut"}])
    assert controller.load(cut, "[]", "true")[2] == INTERRUPTED  # (what the reload did to this tab comes first)


def test_an_earlier_conversation_is_listed_and_not_opened_over_a_reply_being_generated(tmp_path):
    """The Earlier conversations list shows what the page's store gave (hidden when empty); choosing one while this
    tab's reply is generated is refused, saying why (the reply's end would be written over the conversation opened)."""
    controller = ChatController(SimpleNamespace(), [tmp_path])
    earlier = json.dumps([{"id": "a1", "label": "today: Hello"}, {"label": "no id"}, "junk"])
    kept = json.dumps([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}])
    history, _, _, listed = controller.load(kept, earlier)
    assert content_text(history[-1]["content"]) == "Hi." and listed["choices"] == [("today: Hello", "a1")]
    assert listed["visible"] and not controller.load(None, "not json")[3]["visible"]
    me = SimpleNamespace(session_hash="busy")
    assert controller.may_open("a1", me) == ("a1", gr.skip())
    controller.inflight.begin("busy", "chat")
    with pytest.warns(UserWarning, match="Stop the reply first"):
        assert controller.may_open("a1", me)[0] == ""
    assert controller.open_earlier("", kept, earlier)[0] == gr.skip()
    # one open in another tab (the page's js gives OPEN_ELSEWHERE_MARK in its place): this tab's stays, saying why
    with pytest.warns(UserWarning, match="open in another tab"):
        history, _, figures, listed = controller.open_earlier("a1", json.dumps(OPEN_ELSEWHERE_MARK), earlier)
    assert history == gr.skip() and figures == OPEN_ELSEWHERE and listed["choices"] == [("today: Hello", "a1")]
