"""The Chat tab: a conversation with text, images, videos and audio (uploaded, pasted, recorded or a
webcam snapshot), answered as streamed text and, when the engine has a talker, streamed speech.

Enter (or Send) adds the message and streams the reply through the engine client; while the request
waits in the engine server's one queue the figures line shows its place. Stop cancels it, queued or
running (a request stopped before it started gives the message back). A user turn can be edited or
retried (the conversation is cut there and answered again), the last one undone, and the conversation
exported as JSON. Errors are messages: whatever was generated before stays, nothing typed is lost.
"""

from __future__ import annotations

import json
import mimetypes
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
import gradio.utils as gradio_utils
import numpy as np

from app.engine_link import SPEECH_OUT, EngineLink
from app.media_check import AUDIO_FORMATS, IMAGE_FORMATS, VIDEO_FORMATS, media_problem
from app.ui.common import (GENERATING, STOPPED_BEFORE_START, InFlight, chosen_seed, engine_lacks, engine_limits,
                           error_line, error_text, failure, figures_line, from_json, no_audio, on_engine_change,
                           on_page_load, queue_line, saved_voice_names, say_refused_files, says_refused, seed_box, seed_problem,
                           session_of, toolbar, wire_stop)
from engine.events import MEDIA_STAGE, PREFILL_STAGE, AudioChunk, Done, Error, Progress, QueuePosition, TextDelta

# The Max new tokens slider stops at the engine's cap, which its model card reports (limits.max_new_tokens: a
# server started with --max-new-tokens 16384 offers 16384). A server that does not say (an OpenAI-compatible
# one, or an engine not reached yet) gets the engine server's default cap.
ASSUMED_TOKEN_CAP = 4096
DEFAULT_NEW_TOKENS = 256

TAB = "chat"
CHAT_API_NAME = "chat"
EMPTY_HINT = "Type a message or attach a file first, then press Enter (or Send)."
WITHDRAWN = "Stopped before it started (it was waiting for the engine). Your message is back in the box."
STOPPED_UNSENT = f"{STOPPED_BEFORE_START} Your message is back in the box."  # (Stop before the reply began)
STOPPED_READING = "Stopped while the engine was reading your message. Your message is back in the box."
NO_SNAPSHOT = "No picture to attach yet: open the camera (Click to Access Webcam), take one, then Attach snapshot."
EMPTY_EDIT = "An edited message cannot be empty: the conversation is as it was (Undo takes the last message back)."
NOTHING_TO_EXPORT = "Nothing to export yet: the conversation is empty."
INTERRUPTED = ("The reply to your last message was interrupted (the page was reloaded or closed before it ended). "
               "Your message is back in the box: press Enter to ask again.")
# The mark after a reply that was cut (by Stop, or by a message sent while it streamed): a message of its own, shown in
# the conversation and never sent to the engine (history_to_messages), which is given the cut reply as it was shown.
STOPPED_NOTE = "⏹ *stopped: the reply was cut here (Stop, or a newer message); the model is given it as far as shown*"
# The most parts (each text and each attachment shown) the engine takes in one message (engine.server.codec's
# MAX_CONTENT_PARTS; not imported: that module loads torch, which a UI-only studio has not). The messages sent since the
# model's last reply go to it as one message (a reply cut before its first word leaves none between two sends), and
# past the limit the engine said "'messages[0].content' has 72 content parts; ...", naming neither the parts nor the
# messages the user saw.
MESSAGE_PARTS = 64
TOO_MANY_PARTS = ("The model reads everything since its last reply as one message, and that is {n} parts here (each "
                  "attachment and each text shown since then), more than the {most} one message holds: remove {extra} "
                  "(your last message is back in the box), or send them over several messages, each after a reply.")
DEFAULT_SYSTEM_HINT = "empty = the model's own default system prompt"
MEDIA_KINDS = ("image", "video", "audio")
# A streamed reply is shown again at most this often (its first piece at once, its end when it ends): the page
# renders the whole reply's Markdown at each update, and one update per token froze it within a few thousand
# characters (Stop could no longer be pressed).
REPLY_SHOWN_EVERY_S = 0.1
READING = "Reading your message…"  # the status while a long prompt is read (the engine's prefill), before any reply
# The conversations kept in this browser, one per browser tab (app/static/chats.js): an event's js calls them.
# Studios before per-tab chats kept one conversation as a gr.BrowserState, which Gradio encrypts with a secret drawn at
# each studio start: no later page can read it, so the page says so, once (chats.js's legacy()).
LEGACY_CHAT_LOST = ("A conversation kept in this browser by an earlier version of the studio cannot be brought back "
                    "(it was stored encrypted with a key that ended when that studio stopped). From now on each tab's "
                    "conversation is kept, and listed under Earlier conversations.")
CHATS_JS = (Path(__file__).resolve().parent.parent / "static" / "chats.js").read_text(encoding="utf-8").strip()
EARLIER_LABEL = "Earlier conversations (kept in this browser): open one here"
OPEN_WHILE_REPLYING = "Stop the reply first (or wait for it to end), then open an earlier conversation."
# An earlier conversation another tab has open (chats.js's claims): opened here too, the two tabs wrote it in turn and
# the later write lost the other's turns
OPEN_ELSEWHERE = "That conversation is open in another tab: go on there (or close that tab first, then open it here)."
OPEN_ELSEWHERE_MARK = "open_elsewhere"  # what the page's js gives instead of the conversation it did not open


def reading_line(event: Progress) -> str:
    """The status while a long message is read: its media through the encoders ("Reading your message… (1 video)"),
    then the engine's prefill, in prompt tokens read ("Reading your message… 40 %")."""
    if event.stage == MEDIA_STAGE:
        return f"{READING} ({event.message})" if event.message else READING
    return f"{READING} {100 * event.done // max(event.total, 1)} %"


# --------------------------------------------------------------------------- conversation <-> engine


def media_kind(path: str, mime: str | None = None) -> str | None:
    """'image' | 'video' | 'audio' for an attached file (by MIME type, else by extension)."""
    mime = mime or mimetypes.guess_type(path)[0] or ""
    kind = mime.split("/", 1)[0]
    return kind if kind in MEDIA_KINDS else None


def _parts(content: Any) -> list[dict]:
    """A Chatbot message's content as a list of parts (Gradio hands back strings, dicts or lists)."""
    if content is None:
        return []
    if isinstance(content, (list, tuple)):
        return [p for c in content for p in _parts(c)]
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, dict):
        if content.get("type") == "text" or "text" in content:
            return [{"type": "text", "text": str(content.get("text") or "")}]
        file = content.get("file") if isinstance(content.get("file"), dict) else content
        if file.get("path"):
            return [{"type": "file", "path": file["path"], "mime": file.get("mime_type")}]
    return []


def content_text(content: Any) -> str:
    return "".join(p["text"] for p in _parts(content) if p["type"] == "text")


def stopped_note() -> dict:
    """The message marking a cut reply (STOPPED_NOTE)."""
    return {"role": "assistant", "content": STOPPED_NOTE}


def history_to_messages(history: list | None) -> list[dict]:
    """Chatbot history -> engine messages: user turns keep their text and media (as file paths the
    client encodes), assistant turns their text. Empty turns, other roles and the marks of cut replies
    (STOPPED_NOTE) are left out."""
    out: list[dict] = []
    for msg in history or []:
        role = msg.get("role") if isinstance(msg, dict) else getattr(msg, "role", None)
        content = msg.get("content") if isinstance(msg, dict) else getattr(msg, "content", None)
        if role not in ("user", "assistant") or (role == "assistant" and content_text(content) == STOPPED_NOTE):
            continue
        parts = []
        for p in _parts(content):
            if p["type"] == "text" and p["text"]:
                parts.append({"type": "text", "text": p["text"]})
            elif p["type"] == "file" and role == "user":
                kind = media_kind(p["path"], p.get("mime"))
                if kind:
                    parts.append({"type": kind, kind: p["path"]})
        if not parts:
            continue
        if out and out[-1]["role"] == role:  # Gradio shows a file and its text as separate messages
            out[-1]["content"].extend(parts)
        else:
            out.append({"role": role, "content": parts})
    for m in out:
        if all(p["type"] == "text" for p in m["content"]):
            m["content"] = "".join(p["text"] for p in m["content"])
    return out


def too_many_parts(messages: list[dict]) -> str | None:
    """What to say when the message sent last (history_to_messages: all the user's since the model's last reply) holds
    more parts than the engine takes in one (MESSAGE_PARTS), counted as the user sees them; None when it fits."""
    content = messages[-1]["content"] if messages and messages[-1]["role"] == "user" else ""
    n = len(content) if isinstance(content, list) else 1
    if n <= MESSAGE_PARTS:
        return None
    return TOO_MANY_PARTS.format(n=n, most=MESSAGE_PARTS, extra=n - MESSAGE_PARTS)


def user_turn(message: dict | str | None) -> list[dict]:
    """A MultimodalTextbox value -> Chatbot messages for the user's turn (files first, then text)."""
    if isinstance(message, str):
        message = {"text": message, "files": []}
    message = message or {}
    turn = []
    for f in message.get("files") or []:
        path = f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", None))
        if path:
            turn.append({"role": "user", "content": {"path": path}})
    if text := typed_text(message.get("text")):
        turn.append({"role": "user", "content": text_part(text)})
    return turn


def typed_text(text: str | None) -> str:
    """What a user typed, as sent: without the blank lines and spaces around it, but with the first line's indentation
    (a code snippet pasted lost it)."""
    return _LEADING_BLANK_LINES.sub("", (text or "").rstrip())


_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\r?\n)+")


def text_part(text: str) -> dict:
    """A text message as the Chatbot keeps it exactly: a plain string is dedented by Gradio (inspect.cleandoc), so a
    pasted code snippet lost its indentation, in the page and on its way to the engine."""
    return {"type": "text", "text": text}


def turn_to_box(turn: list[dict]) -> dict:
    """The user's turn given back to the input box (after Stop before start, undo, or an error)."""
    text, files = [], []
    for msg in turn:
        for p in _parts(msg.get("content")):
            if p["type"] == "text":
                text.append(p["text"])
            elif p["type"] == "file":
                files.append(p["path"])
    return {"text": "\n".join(text), "files": files}


def _is_user(message: Any) -> bool:
    return (message.get("role") if isinstance(message, dict) else getattr(message, "role", None)) == "user"


def split_last_user_turn(history: list) -> tuple[list, list]:
    """(history before the last user turn, that turn's messages)."""
    start, _ = user_turn_bounds(history, len(history))
    return list(history[:start]), list(history[start:])


def user_turn_bounds(history: list, index: int) -> tuple[int, int]:
    """(start, end) of the user turn holding message `index` (or, for `index` == len(history), ending there): Gradio
    shows each attachment of a turn as a message of its own, followed by the turn's text, and its Undo, Retry and
    Edit name one of them (the text)."""
    start = end = index
    while start > 0 and _is_user(history[start - 1]):
        start -= 1
    while end < len(history) and _is_user(history[end]):
        end += 1
    return start, end


def into_box(turn: dict, draft: dict | str | None) -> dict:
    """A turn given back to the input box (turn_to_box) joined with what the box holds now: the turn first, then
    what was typed or attached since (it replaced that draft)."""
    draft = {"text": draft, "files": []} if isinstance(draft, str) else (draft or {})
    typed = (draft.get("text") or "").strip()
    files = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", None))
             for f in draft.get("files") or []]
    return {"text": "\n\n".join(t for t in (turn["text"], typed) if t),
            "files": [*turn["files"], *(f for f in files if f and f not in turn["files"])]}


def export_conversation(history: list | None, directory: str | None = None) -> str:
    """Write the conversation as JSON (engine message format; media as file names) and return its path."""
    messages = history_to_messages(history)
    for m in messages:
        if isinstance(m["content"], list):
            m["content"] = [p if p["type"] == "text" else {"type": p["type"], p["type"]: Path(p[p["type"]]).name}
                            for p in m["content"]]
    path = Path(directory or tempfile.mkdtemp(prefix="ming-chat-")) / f"conversation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"messages": messages}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return str(path)


def restorable(saved: Any, file_roots: list[Path]) -> list[dict]:
    """A conversation the browser kept (app/static/chats.js) as the Chatbot takes it: user and
    assistant turns. An attachment comes back only while its file is still in one of `file_roots` (Gradio's
    upload folder, the example assets): the browser holds what it gives back, so a path anywhere else is not
    opened, and a file gone since (the studio restarted) is a note instead."""
    out = []
    for msg in saved if isinstance(saved, list) else []:
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("user", "assistant"):
            continue
        content: list = []
        for part in _parts(msg.get("content")):
            if part["type"] == "text":
                content += [text_part(part["text"])] if part["text"] else []
                continue
            path = Path(str(part["path"])).resolve()
            if path.is_file() and any(path.is_relative_to(root) for root in file_roots):
                content.append({"path": str(path), "mime_type": part.get("mime")})
            else:
                content.append(text_part(f"({path.name}: no longer available after the reload)"))
        if content:
            out.append({"role": role, "content": content})
    return out


def chats_js(call: str) -> str:
    """An event's js running `call` with `chats`, the page's store of conversations (app/static/chats.js), and the
    event's values as `args` (its inputs, then its outputs); what it returns replaces the inputs."""
    return f"(...args) => {{ const chats = ({CHATS_JS})(); {call} }}"


def earlier_choices(earlier: Any) -> dict:
    """The Earlier conversations list for what chats.js's earlier() gave (label and id of each), hidden when empty."""
    choices = [(str(c.get("label") or c["id"]), str(c["id"])) for c in earlier if isinstance(c, dict) and c.get("id")] \
        if isinstance(earlier, list) else []
    return gr.update(choices=choices, value=None, visible=bool(choices))


def chat_examples(assets: Path | None) -> tuple[list[list[dict]], list[str]]:
    """Example turns for the input box (text alone, and text with our own example media) and their labels: what
    each example says and attaches (a spoken question alone was a button with no text, named by nothing)."""
    examples, labels = [[{"text": "Hello! What can you do?", "files": []}]], ["Hello! What can you do?"]
    if assets is None:
        return examples, labels
    for text, rel in (("What is on the table?", "images/cup.png"), ("Read the sign.", "images/sign.png"),
                      ("", "speech/what_do_you_see_en.wav"), ("What happens in this clip?", "video/cup_on_table.mp4")):
        if (assets / rel).is_file():
            examples.append([{"text": text, "files": [str(assets / rel)]}])
            name = Path(rel).name
            labels.append(f"{text} (+ {name})" if text else f"A spoken question ({name})")
    return examples, labels


def speech_controls(link: EngineLink) -> tuple[dict, dict]:
    """The settings of the "Answer with speech too" box and of the spoken-reply player for what the engine
    serves (set at each page load: the engine may have come back, or changed, since the page was built)."""
    if link.status().ok and link.has(SPEECH_OUT):  # status(): the engine asked again if not asked lately
        return {"interactive": True, "info": ""}, {"visible": True}
    why = "this engine has no talker" if engine_lacks(link, SPEECH_OUT) else "the engine is not reachable"
    return {"interactive": False, "info": why}, {"visible": False}


def token_slider(link: EngineLink) -> dict:
    """The Max new tokens slider's maximum, value and label: up to the cap the engine reports, else
    ASSUMED_TOKEN_CAP (said so in the label)."""
    info = link.status().info
    cap = info.max_new_tokens if info is not None else None
    if cap:
        label = f"Max new tokens (up to {cap:,}, the engine's cap)"
    else:
        cap = ASSUMED_TOKEN_CAP
        label = f"Max new tokens (up to {cap:,}; the engine does not say its cap)"
    return {"maximum": cap, "value": min(DEFAULT_NEW_TOKENS, cap), "label": label}


def page_state(link: EngineLink, keep_value: bool = False) -> tuple:
    """Updates of (the speak box, the spoken-reply player, the voice list, the Max new tokens slider) for
    each page load (`keep_value`: the slider keeps what the user set, when the engine came back meanwhile)."""
    speak, speech = speech_controls(link)
    slider = token_slider(link)
    if keep_value:
        del slider["value"]
    return (gr.update(**speak), gr.update(**speech), gr.update(choices=saved_voice_names(link)),
            gr.update(**slider))


# --------------------------------------------------------------------------- the controller


class ChatController:
    """The Chat tab's callbacks, independent of the components (tests call them directly)."""

    def __init__(self, link: EngineLink, file_roots: list[Path] | None = None):
        self.link = link
        self.inflight = InFlight()
        # where an attachment of a conversation kept by the browser may come back from (see restorable)
        self.file_roots = [Path(r).resolve() for r in file_roots or [gradio_utils.get_upload_folder()]]

    def add_message(self, message, history: list | None, sent: int = 0, request: gr.Request | None = None):
        """Enter / Send: the user's turn joins the conversation, the box empties and the count of messages `sent`
        goes up by one, which starts the reply (respond). An empty box changes nothing but the figures line (it
        queued a reply that had nothing to answer). A reply still streaming is cut by it (respond): it stays as far
        as it came, marked stopped (a cut reply looked like a whole one)."""
        history = list(history or [])
        turn = user_turn(message)
        if not turn:  # (said on the figures line: a gr.Info from this unqueued event never reaches the page)
            return history, gr.update(), EMPTY_HINT, gr.update()
        session = session_of(request)
        cut = [stopped_note()] if self.inflight.running(session, TAB) else []
        self.inflight.announce(session, TAB)  # (Stop pressed before the reply has begun stops it: respond)
        return history + cut + turn, {"text": "", "files": []}, GENERATING, (sent or 0) + 1

    def respond(self, history: list | None, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                system_prompt: str | None, thinking: bool, speak: bool, voice: str | None,
                request: gr.Request | None = None):
        """Stream (history, the turn given back for the input box (give_back), figures line, audio chunk) while the
        reply is generated."""
        history = list(history or [])
        before, turn = split_last_user_turn(history)
        if not turn:
            yield history, gr.update(), EMPTY_HINT, gr.skip()
            return
        # said in the page's words (an attachment's naming the file); the turn goes back in the box, to send again
        messages = history_to_messages(history)
        if problem := seed_problem(seed) or too_many_parts(messages) or self.attachment_problem(turn):
            gr.Warning(problem)
            yield before, turn_to_box(turn), problem, gr.skip()
            return
        session = session_of(request)
        cancel = self.inflight.begin(session, TAB)
        if cancel.is_set():  # Stop pressed since the message was sent (the send announced it), before this began
            self.inflight.end(session, TAB, cancel)
            yield before, turn_to_box(turn), STOPPED_UNSENT, gr.skip()
            return
        reply, audio_seen, final, shown_at, read_from = "", False, None, None, False
        modalities = ("text", "audio") if speak and self.link.has(SPEECH_OUT) else ("text",)
        try:
            stream = self.link.client.chat(
                # "off" values (top-k 0, repetition penalty 1) are not sent: an OpenAI-compatible engine
                # has no such fields
                messages, max_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                top_k=int(top_k) or None,
                repetition_penalty=None if float(repetition_penalty) == 1.0 else float(repetition_penalty),
                seed=chosen_seed(seed), system=(system_prompt or "").strip() or None,
                thinking=bool(thinking), modalities=modalities, voice=voice or None, cancel=cancel)
            for event in stream:
                if isinstance(event, QueuePosition):
                    yield gr.skip(), gr.skip(), queue_line(event), gr.skip()  # the history is unchanged: not sent again
                elif isinstance(event, Progress) and event.stage in (MEDIA_STAGE, PREFILL_STAGE):
                    read_from = True
                    yield gr.skip(), gr.skip(), reading_line(event), gr.skip()
                elif isinstance(event, TextDelta):
                    reply += event.text
                    if shown_at is not None and time.monotonic() - shown_at < REPLY_SHOWN_EVERY_S:
                        continue  # shown with the next piece (or the end)
                    yield (history + [{"role": "assistant", "content": reply}], gr.update(), GENERATING,
                           no_audio() if not (audio_seen or shown_at) else gr.skip())  # the last reply's speech goes
                    shown_at = time.monotonic()
                elif isinstance(event, AudioChunk):
                    audio_seen = True
                    pcm = np.frombuffer(event.pcm, dtype="<i2")
                    yield (history + [{"role": "assistant", "content": reply}], gr.update(), GENERATING,
                           (event.sample_rate, pcm))
                elif isinstance(event, (Done, Error)):
                    final = event
                    break
                else:  # an event kind this tab does not show (e.g. progress): say so, keep going
                    continue
        except Exception as e:  # noqa: BLE001  (the engine went away mid-stream: a message, not a crash)
            final = failure(e)
        finally:
            self.inflight.end(session, TAB, cancel)
        # the stream of a spoken reply ends with its last value; a reply without speech never opens one
        end = None if audio_seen else no_audio()
        if getattr(cancel, "cleared", False):  # Clear was pressed meanwhile: the tab stays empty
            yield [], {"text": "", "files": []}, "", end
            return
        if cancel.is_set() and self.inflight.running(session, TAB):
            # a message sent while this reply streamed cut it: the tab shows that message's turn (with this reply as
            # far as it had come); this conversation, without that message, and "cancelled" replaced it meanwhile
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        if final is None:
            final = Error("the engine ended the reply without a result", code="engine_error")
        if isinstance(final, Done):
            if final.finish_reason == "cancelled" and not reply and not audio_seen:
                yield before, turn_to_box(turn), STOPPED_READING if read_from else WITHDRAWN, end
                return
            text = final.text or reply
            shown = history + ([{"role": "assistant", "content": text}] if text or audio_seen else [])
            if final.finish_reason == "cancelled":
                shown.append(stopped_note())
            yield shown, gr.update(), figures_line(final), end
            return
        if reply:  # keep what was generated before the error
            gr.Warning(f"The reply failed: {error_text(final)}")
            yield history + [{"role": "assistant", "content": reply}], gr.update(), error_line(final), end
        else:  # nothing generated: the turn goes back to the box for another try
            gr.Warning(f"The reply failed: {error_text(final)}")
            yield before, turn_to_box(turn), error_line(final), end

    def attachment_problem(self, turn: list[dict]) -> str | None:
        """What is wrong with a file of the user's turn (app.media_check), or None. A text file renamed .wav came
        back as "'item.content[0].audio' is not an audio file FFmpeg can read", naming no file."""
        limits = engine_limits(self.link)
        for msg in turn:
            for part in _parts(msg.get("content")):
                kind = media_kind(part["path"], part.get("mime")) if part["type"] == "file" else None
                if kind and (problem := media_problem(part["path"], kind, limits)):
                    return problem
        return None

    def stop(self, request: gr.Request | None = None) -> None:
        if not self.inflight.cancel(session_of(request), TAB):
            gr.Info("Nothing is being generated.")

    @staticmethod
    def attach_snapshot(image: str | None, message: dict | None, figures: str | None = None):
        """Attach snapshot: (the input box with the webcam picture added, the figures line). Without a picture
        it says how to take one (the press did nothing at all); that hint goes once a picture is attached."""
        if not image:
            return gr.update(), NO_SNAPSHOT
        message = message or {}
        return ({"text": message.get("text") or "", "files": [*(message.get("files") or []), image]},
                "" if figures == NO_SNAPSHOT else gr.skip())

    def after_reply(self, given: dict | None, draft: dict | None, request: gr.Request | None = None):
        """give_back, once a reply's run has ended: a send whose reply never began (refused before it was sent) leaves
        nothing for Stop to find (InFlight.settle)."""
        self.inflight.settle(session_of(request), TAB)
        return self.give_back(given, draft)

    @staticmethod
    def give_back(given: dict | None, draft: dict | None):
        """After a reply: (the input box, the given-back slot emptied). A turn the reply gave back (stopped before it
        started, failed, the engine gone) joins what was typed meanwhile; it replaced that draft, which was lost."""
        if not isinstance(given, dict) or not (given.get("text") or given.get("files")):
            return gr.skip(), None
        return into_box({"text": given.get("text") or "", "files": list(given.get("files") or [])}, draft), None

    def restore(self, saved: Any):
        """At page load: (the conversation the browser kept (see restorable), the input box, the figures line). A
        message whose reply had not ended when the page went (a reload mid-reply) is kept as soon as it is sent, and
        comes back in the input box, saying so: a reload lost the question and the reply silently."""
        history = restorable(saved, self.file_roots)
        if not history:  # nothing kept: the page's empty conversation is left alone (an empty one sent back late, on
            return gr.skip(), gr.skip(), gr.skip()  # a busy machine, wiped a message typed meanwhile)
        before, turn = split_last_user_turn(history)
        if not turn:
            return history, gr.skip(), gr.skip()
        return before, turn_to_box(turn), INTERRUPTED

    def load(self, saved: str | None, earlier: str | None, legacy: str | None = None):
        """At page load: restore() of this browser tab's conversation, and the Earlier conversations list (both as
        JSON, from app/static/chats.js); `legacy` "true": the earlier version's conversation was found, which cannot
        be read (LEGACY_CHAT_LOST, said when the figures line has nothing else to say)."""
        history, box, figures = self.restore(from_json(saved))
        if from_json(legacy) is True and not isinstance(figures, str):
            figures = LEGACY_CHAT_LOST
        return history, box, figures, earlier_choices(from_json(earlier))

    def may_open(self, chosen: str | None, request: gr.Request | None = None):
        """An earlier conversation chosen: (its id, the figures line); no id while this tab's reply is being generated
        (its end would be written over the conversation opened)."""
        if self.inflight.running(session_of(request), TAB):
            gr.Warning(OPEN_WHILE_REPLYING)
            return "", OPEN_WHILE_REPLYING
        return chosen or "", gr.skip()

    def open_earlier(self, chosen: str | None, saved: Any, earlier: Any):
        """The conversation `chosen` (kept by the browser, `saved`) in place of this tab's, which stays in the list;
        one open in another tab (OPEN_ELSEWHERE_MARK in place of it) is not: this tab's stays, saying why."""
        if not chosen:
            return gr.skip(), gr.skip(), gr.skip(), gr.update(value=None)
        if from_json(saved) == OPEN_ELSEWHERE_MARK:
            gr.Warning(OPEN_ELSEWHERE)
            return gr.skip(), gr.skip(), OPEN_ELSEWHERE, earlier_choices(from_json(earlier))
        return self.load(saved, earlier)

    @staticmethod
    def export(history: list | None):
        """Export JSON: (the file offered for download, the figures line). An empty conversation is not
        exported (it gave a download of {"messages": []} without a word)."""
        if not history_to_messages(history):
            return gr.update(value=None, visible=False), NOTHING_TO_EXPORT
        return gr.update(value=export_conversation(history), visible=True), gr.skip()

    def clear(self, request: gr.Request | None = None):
        self.inflight.cancel(session_of(request), TAB, clear=True)
        return [], {"text": "", "files": []}, "", None

    @staticmethod
    def cut_for_edit(history: list | None, edit: gr.EditData):
        """An edited user message: the conversation is cut after it (it is then answered again). A message edited to
        nothing leaves the conversation as it was, saying so: it went to the engine as a conversation ending with the
        model's own reply, and everything after the message was gone."""
        history = list(history or [])
        i = edit.index if isinstance(edit.index, int) else edit.index[0]
        if not any(part["type"] == "file" or part["text"].strip() for part in _parts(edit.value)):
            gr.Warning(EMPTY_EDIT)
            return history
        history = history[: i + 1]
        history[i] = {"role": "user", "content": text_part(edit.value) if isinstance(edit.value, str) else edit.value}
        return history

    @staticmethod
    def cut_for_retry(history: list | None, retry: gr.RetryData):
        """Retry: keep the conversation up to the retried user turn (answered again)."""
        history = list(history or [])
        return history[: user_turn_bounds(history, retry.index if isinstance(retry.index, int) else retry.index[0])[1]]

    @staticmethod
    def undo(history: list | None, draft: dict | None, undo: gr.UndoData):
        """Undo: the last user turn (its attachments too) and its reply leave the conversation; the turn goes back
        to the box, before whatever the box held (an undone picture stayed in the conversation, unanswered, and
        the box's draft was replaced)."""
        history = list(history or [])
        start, end = user_turn_bounds(history, undo.index if isinstance(undo.index, int) else undo.index[0])
        return history[:start], into_box(turn_to_box(history[start:end]), draft)


def refused_attachment(name: str, is_video: bool) -> str:
    """What the message box says of a file the model cannot read (app/static/uploads.js); the text typed stays."""
    return (f"'{name}' cannot be attached: the model reads pictures ({IMAGE_FORMATS}), videos ({VIDEO_FORMATS}) "
            f"and audio clips ({AUDIO_FORMATS}).")


def build_chat_tab(link: EngineLink, assets: Path | None = None) -> ChatController:
    """Build the Chat tab's components inside the current Blocks/Tab context. `assets`: the folder of
    example media (scripts/make_assets.py) the examples use."""
    controller = ChatController(link, [gradio_utils.get_upload_folder(), *([assets] if assets else [])])
    chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chat-history", editable="user",
                         buttons=toolbar("copy", "copy_all"),
                         feedback_options=None, placeholder="Ask the model something, or attach an image, "
                                                            "a video or a recording.")
    # the label names the box for screen readers (it was named by its placeholder only); app/static/a11y.js
    # hands it to the text area, which Gradio leaves unlabelled
    box = gr.MultimodalTextbox(placeholder="Message (Enter sends, Shift+Enter: new line); attach, paste or record media",
                               label="Message", show_label=False, sources=["upload", "microphone"],
                               file_count="multiple", file_types=["image", "video", "audio"],
                               submit_btn="Send", **says_refused("chat-input"))
    examples, example_labels = chat_examples(assets)
    gr.Examples(examples, [box], label="Examples", example_labels=example_labels)
    with gr.Row():
        stop = gr.Button("Stop", variant="stop", elem_id="chat-stop", scale=1, min_width=80)
        clear = gr.Button("Clear", elem_id="chat-clear", scale=1, min_width=80)
        export = gr.Button("Export JSON", elem_id="chat-export", scale=1, min_width=80)
    figures = gr.Markdown("", elem_id="chat-figures")
    earlier = gr.Dropdown([], value=None, label=EARLIER_LABEL, visible=False, elem_id="chat-earlier")
    say_refused_files("chat-input", figures, refused_attachment)
    speech = gr.Audio(label="Spoken reply", streaming=True, autoplay=True, interactive=False,
                      buttons=toolbar("download"),
                      elem_id="chat-speech", **speech_controls(link)[1])
    exported = gr.File(label="Conversation (JSON)", visible=False, elem_id="chat-exported")
    with gr.Accordion("Camera snapshot", open=False):
        snapshot = gr.Image(sources=["webcam"], type="filepath", buttons=toolbar("download", "fullscreen"),
                            label="Take a picture, then attach it",
                            elem_id="chat-webcam")
        attach = gr.Button("Attach snapshot")
    with gr.Accordion("Options", open=False, elem_id="chat-advanced"):
        with gr.Row():
            speak = gr.Checkbox(value=False, label="Answer with speech too", **speech_controls(link)[0])
            # the engine has no preset voices (the label said "a preset or a saved voice"): the saved ones
            voice = gr.Dropdown(saved_voice_names(link), value=None, allow_custom_value=True, elem_id="chat-voice",
                                label="Voice (one saved in the Voice tab; empty = the default voice)")
            thinking = gr.Checkbox(value=False, label="Thinking (detailed thinking on)")
        with gr.Row():
            # at most what the engine allows (8192 went out and came back as max_tokens_exceeded); set again
            # at each page load (the engine may have been down when the studio started, or restarted since)
            max_new_tokens = gr.Slider(minimum=1, step=1, elem_id="chat-max-tokens", **token_slider(link))
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Top-p")
        with gr.Row():
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
            repetition_penalty = gr.Slider(0.5, 2.0, value=1.0, step=0.01, label="Repetition penalty (1 = off)")
            seed = seed_box()
        system_prompt = gr.Textbox(label=f"System prompt ({DEFAULT_SYSTEM_HINT})", lines=2)

    options = [max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, system_prompt, thinking, speak,
               voice]
    # A turn a reply gives back goes here, then into the box with what was typed meanwhile (give_back): the box is
    # read when the reply ends, not when it began (/chat API callers get it as the second output, as before).
    given_back = gr.JSON(None, visible="hidden", elem_id="chat-given-back")
    outputs = [chatbot, given_back, figures, speech]
    to_box = {"fn": controller.after_reply, "inputs": [given_back, box], "outputs": [box, given_back], "queue": False,
              "show_progress": "hidden", "api_visibility": "private"}
    # The conversation survives a page reload: the browser keeps it (chats.js: this browser tab's own), written once
    # each change is complete (not at each streamed piece), given back at page load.
    kept, kept_list, chosen, legacy = (gr.Textbox(visible="hidden") for _ in range(4))  # (the store's values as JSON)
    keep = {"fn": None, "inputs": [chatbot], "js": chats_js("chats.keep(args[0]); return [];"),
            "show_progress": "hidden", "api_visibility": "private"}
    # Every request goes straight to the engine server, whose one queue orders them and reports
    # positions (concurrency_limit=None: Gradio does not hold a second line of its own).
    # kept once the message is in (a reload before the reply ended lost it), again once the reply is complete
    # messages sent from the box: each one starts a reply (a hidden component: the change of a gr.State set by an
    # unqueued event starts nothing); "multiple": one sent while a reply streams starts its own at once (a change's
    # default, "always_last", held it back and it was lost)
    sent = gr.Number(0, precision=0, visible="hidden", elem_id="chat-sent")
    box.submit(controller.add_message, [box, chatbot, sent], [chatbot, box, figures, sent], queue=False).then(**keep)
    sent.change(controller.respond, [chatbot, *options], outputs, api_name=CHAT_API_NAME, trigger_mode="multiple",
                concurrency_limit=None).then(**to_box).then(**keep)
    chatbot.retry(controller.cut_for_retry, [chatbot], [chatbot], queue=False).then(
        controller.respond, [chatbot, *options], outputs, api_visibility="private", concurrency_limit=None).then(
        **to_box).then(**keep)
    chatbot.edit(controller.cut_for_edit, [chatbot], [chatbot], queue=False).then(
        controller.respond, [chatbot, *options], outputs, api_visibility="private", concurrency_limit=None).then(
        **to_box).then(**keep)
    chatbot.undo(controller.undo, [chatbot, box], [chatbot, box], queue=False).then(**keep)
    wire_stop(stop, controller.stop, api_name="stop")
    cleared = [chatbot, box, figures, speech]
    clear.click(controller.clear, None, cleared, queue=False, api_name="clear").then(**keep)
    chatbot.clear(controller.clear, None, cleared, queue=False, api_visibility="private").then(**keep)
    on_page_load(lambda: page_state(link), [speak, speech, voice, max_new_tokens])
    on_engine_change(lambda: page_state(link, keep_value=True), [speak, speech, voice, max_new_tokens])
    on_page_load(controller.load, [chatbot, box, figures, earlier], inputs=[kept, kept_list, legacy],
                 js=chats_js("chats.hold(); "  # (this tab's conversation is claimed while the page lives)
                             "return [chats.mine(), chats.earlier(), chats.legacy()].map(JSON.stringify);"))
    earlier.input(controller.may_open, [earlier], [chosen, figures], concurrency_limit=None, show_progress="hidden",
                  api_visibility="private").then(
        controller.open_earlier, [chosen, kept, kept_list], [chatbot, box, figures, earlier], queue=False,
        show_progress="hidden", api_visibility="private",
        js=chats_js(f"if (!args[0]) return [args[0], '', '']; const opened = chats.heldElsewhere(args[0]) ? "
                    f"{OPEN_ELSEWHERE_MARK!r} : chats.open(args[0]); "
                    "return [args[0], ...[opened, chats.earlier()].map(JSON.stringify)];"))
    voice.focus(lambda: page_state(link)[2], None, voice, queue=False, show_progress="hidden",
                api_visibility="private")  # a voice saved in the Voice tab meanwhile is offered
    export.click(controller.export, [chatbot], [exported, figures], queue=False, api_visibility="private")
    attach.click(controller.attach_snapshot, [snapshot, box, figures], [box, figures], queue=False,
                 api_visibility="private")
    return controller
