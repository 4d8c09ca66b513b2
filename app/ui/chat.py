"""The Chat tab: a streaming conversation with the loaded model.

Send (or Enter) streams the reply token by token. Stop sets the `threading.Event` of the session's
running request; the engine checks it between decode steps, so the generation really ends there
(and frees the engine for the next request). Every request gets its own Event, registered per
browser session, so one user's Stop never cancels another user's reply. A request still waiting in
the queue (another user's reply holds the engine) is withdrawn by Stop: when its turn comes it ends
at once and gives the message back. Errors from the engine are shown as a warning and in the figures
line; the app keeps serving.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

import gradio as gr

from engine.events import Done, Error, TextDelta
from engine.models.thinker.prompt import DEFAULT_SYSTEM_PROMPT
from engine.runtime import Engine
from engine.sampling import GenerationParams

CHAT_API_NAME = "chat"
STOP_API_NAME = "stop"
EMPTY_HINT = "Type a message first, then press Send (or Enter)."
GENERATING = "Generating…"
WITHDRAWN = "Stopped before it started (it was waiting for the engine). Your message is back in the box."


def content_text(content) -> str:
    """The text of a Chatbot message's content: a string, a {"type": "text", "text": ...} part, or
    a list of parts (Gradio 6 hands history back as lists of parts). Non-text parts are skipped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return ""


def history_to_messages(history: list | None) -> list[dict]:
    """Chatbot history -> [{"role": "user"|"assistant", "content": str}] for `Engine.chat`.
    Other roles and empty messages are left out."""
    out = []
    for msg in history or []:
        role = msg.get("role") if isinstance(msg, dict) else getattr(msg, "role", None)
        content = msg.get("content") if isinstance(msg, dict) else getattr(msg, "content", None)
        text = content_text(content)
        if role in ("user", "assistant") and text:
            out.append({"role": role, "content": text})
    return out


def figures_line(done: Done) -> str:
    reason = {"stop": "stop (end of reply)", "length": "length (max new tokens reached)",
              "cancelled": "cancelled (stopped)"}.get(done.finish_reason, done.finish_reason)
    return f"{done.stats.summary()} · finish reason: {reason}"


def build_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) -> GenerationParams:
    """UI values (floats from sliders, None or a float from the seed box) -> GenerationParams.
    Range problems are left to the engine, which reports them as an Error event."""
    return GenerationParams(
        max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
        top_k=int(top_k), repetition_penalty=float(repetition_penalty),
        seed=None if seed is None or seed == "" else int(seed))


@dataclass
class _Run:
    cancel: threading.Event = field(default_factory=threading.Event)
    cleared: bool = False  # Clear was pressed: the reply is discarded, not shown


class ChatRuns:
    """The running request of each browser session, so Stop / Clear reach exactly that one; and its
    queued requests (sent while another user's reply holds the engine), so Stop withdraws those too."""

    def __init__(self):
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._queued: dict[str, int] = {}  # requests sent but not started yet
        self._withdrawn: dict[str, int] = {}  # of those, how many Stop / Clear withdrew
        self._cleared: set[str] = set()  # ...and whether Clear did (the conversation is to stay empty)

    def enqueue(self, session: str) -> None:
        """A request of this session entered the queue (called, unqueued, as Send is pressed)."""
        with self._lock:
            self._queued[session] = self._queued.get(session, 0) + 1

    def start(self, session: str) -> str | None:
        """A request of this session leaves the queue: None to run it, or "stopped" / "cleared" when
        Stop / Clear withdrew it meanwhile."""
        with self._lock:
            if self._queued.get(session, 0) > 0:
                self._queued[session] -= 1
                if not self._queued[session]:
                    del self._queued[session]
            if self._withdrawn.get(session, 0) > 0:
                self._withdrawn[session] -= 1
                if not self._withdrawn[session]:
                    del self._withdrawn[session]
                cleared = session in self._cleared
                if session not in self._withdrawn:
                    self._cleared.discard(session)
                return "cleared" if cleared else "stopped"
            return None

    def begin(self, session: str) -> _Run:
        run = _Run()
        with self._lock:
            previous = self._runs.get(session)
            if previous is not None:  # one reply per session at a time
                previous.cancel.set()
            self._runs[session] = run
        return run

    def end(self, session: str, run: _Run) -> None:
        with self._lock:
            if self._runs.get(session) is run:
                del self._runs[session]

    def stop(self, session: str, clear: bool = False) -> bool:
        """Cancel the session's running request and withdraw its queued ones; False when there is none."""
        with self._lock:
            queued = self._queued.get(session, 0)
            if queued:
                self._withdrawn[session] = queued
                if clear:
                    self._cleared.add(session)
            run = self._runs.get(session)
            if run is None:
                return bool(queued)
            run.cleared = run.cleared or clear
            run.cancel.set()
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)

    def running(self, session: str) -> bool:
        with self._lock:
            return session in self._runs


def _session_of(request: gr.Request | None) -> str:
    session = getattr(request, "session_hash", None) if request is not None else None
    return session or f"anonymous-{uuid.uuid4().hex}"


class ChatController:
    """The Chat tab's callbacks, independent of the components (so they can be tested directly)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.runs = ChatRuns()

    def respond(self, message: str | None, history: list | None, max_new_tokens, temperature, top_p, top_k,
                repetition_penalty, seed, system_prompt: str | None, thinking: bool,
                request: gr.Request | None = None):
        """Stream (chat history, textbox value, figures line) while the reply is generated."""
        history = list(history or [])
        message = message or ""
        if not message.strip():
            gr.Info(EMPTY_HINT)
            yield history, message, EMPTY_HINT
            return
        try:
            params = build_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        except (TypeError, ValueError) as e:
            yield from self._failed(history, message, f"invalid setting: {e}")
            return
        messages = history_to_messages(history) + [{"role": "user", "content": message}]
        shown = history + [{"role": "user", "content": message}]
        system = (system_prompt or "").strip() or None
        session = _session_of(request)
        withdrawn = self.runs.start(session)
        if withdrawn == "cleared":  # Clear was pressed while this request waited in the queue
            yield [], "", ""
            return
        if withdrawn == "stopped":  # Stop was pressed while it waited: the message goes back to the box
            yield history, message, WITHDRAWN
            return
        run = self.runs.begin(session)
        stream = self.engine.chat(messages, params, cancel=run.cancel, system_prompt=system, thinking=bool(thinking))
        reply = ""
        try:
            yield shown + [{"role": "assistant", "content": ""}], "", GENERATING
            for event in stream:
                if run.cleared:
                    yield [], "", ""
                    return
                if isinstance(event, TextDelta):
                    reply += event.text
                    yield shown + [{"role": "assistant", "content": reply}], "", GENERATING
                elif isinstance(event, Done):
                    yield shown + [{"role": "assistant", "content": event.text}], "", figures_line(event)
                    return
                elif isinstance(event, Error):
                    if reply:  # keep what was generated before the error
                        gr.Warning(f"Generation failed: {event.message}")
                        yield (shown + [{"role": "assistant", "content": reply}], "",
                               f"Error ({event.code}): {event.message}")
                    else:
                        yield from self._failed(history, message, f"{event.message}", code=event.code)
                    return
            yield from self._failed(history, message, "the engine ended the reply without a result")
        except Exception as e:  # never crash the page: report and keep serving
            yield from self._failed(history, message, f"{type(e).__name__}: {e}")
        finally:
            run.cancel.set()  # also covers a closed page / a cancelled event: the engine stops
            stream.close()  # releases the engine (its lock) right away
            self.runs.end(session, run)

    @staticmethod
    def _failed(history: list, message: str, text: str, code: str = "error"):
        """Nothing was generated: show the error, and give the message back for a retry."""
        gr.Warning(f"Generation failed: {text}")
        yield history, message, f"Error ({code}): {text}"

    def enqueue(self, request: gr.Request | None = None) -> None:
        self.runs.enqueue(_session_of(request))

    def stop(self, request: gr.Request | None = None) -> None:
        if not self.runs.stop(_session_of(request)):
            gr.Info("Nothing is being generated.")

    def clear(self, request: gr.Request | None = None):
        self.runs.stop(_session_of(request), clear=True)
        return [], "", ""


def build_chat_tab(engine: Engine) -> ChatController:
    """Build the Chat tab's components inside the current Blocks/Tab context."""
    controller = ChatController(engine)
    chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chat-history",
                         feedback_options=None, placeholder="Ask the model something.")
    with gr.Row():
        textbox = gr.Textbox(placeholder="Type a message and press Enter or Send", show_label=False,
                             lines=2, max_lines=10, scale=6, elem_id="chat-input", submit_btn=False)
        with gr.Column(scale=1, min_width=120):
            send = gr.Button("Send", variant="primary", elem_id="chat-send")
            stop = gr.Button("Stop", variant="stop", elem_id="chat-stop")
            clear = gr.Button("Clear", elem_id="chat-clear")
    figures = gr.Markdown("", elem_id="chat-figures")
    with gr.Accordion("Advanced", open=False, elem_id="chat-advanced"):
        with gr.Row():
            max_new_tokens = gr.Slider(1, 8192, value=256, step=1, label="Max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="Top-p")
        with gr.Row():
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
            repetition_penalty = gr.Slider(0.5, 2.0, value=1.0, step=0.01, label="Repetition penalty (1 = off)")
            seed = gr.Number(value=None, precision=0, label="Seed (empty = random)")
        system_prompt = gr.Textbox(label="System prompt (empty = the model's default)", lines=2,
                                   placeholder=DEFAULT_SYSTEM_PROMPT)
        thinking = gr.Checkbox(value=False, label="Thinking (detailed thinking on)")

    inputs = [textbox, chatbot, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
              system_prompt, thinking]
    outputs = [chatbot, textbox, figures]
    # Both triggers share one concurrency group: one reply generates at a time, others queue. The
    # unqueued first step registers the request, so that Stop can withdraw it while it waits.
    send.click(controller.enqueue, None, None, queue=False, api_visibility="private").then(
        controller.respond, inputs, outputs, api_name=CHAT_API_NAME, concurrency_id="engine")
    textbox.submit(controller.enqueue, None, None, queue=False, api_visibility="private").then(
        controller.respond, inputs, outputs, api_visibility="private", concurrency_id="engine")
    # queue=False: Stop and Clear run at once, even while the reply occupies the queue.
    stop.click(controller.stop, None, None, queue=False, api_name=STOP_API_NAME)
    clear.click(controller.clear, None, outputs, queue=False, api_name="clear")
    # The chatbot's own trash icon empties the history client-side: stop the reply as well.
    chatbot.clear(controller.clear, None, outputs, queue=False, api_visibility="private")
    return controller
