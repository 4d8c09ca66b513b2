"""The studio page: the engine banner above the tabs Chat, Live, Speech, Voice and Image. The page is
a client of the engine server (in this process on a loopback port, or a remote one): it reaches the
engine only through `engine.client`, and every request waits in the server's one queue."""

from __future__ import annotations

import app  # noqa: F401  (sets GRADIO_ANALYTICS_ENABLED before gradio is imported)

import asyncio
import time
from pathlib import Path

import anyio.to_thread
import gradio as gr

from app.engine_link import REALTIME, SPEECH_OUT, EngineLink
from app.live_proxy import LiveProxy
from app.ui.banner import build_banner
from app.ui.chat import build_chat_tab
from app.ui.common import browser_kept, capability_note, engine_lacks, share_css
from app.ui.image import build_image_tab, kept_before as image_kept_before
from app.ui.live import build_live_tab, engine_settings
from app.ui.speech import REQUEST_KEY as SPEECH_REQUEST_KEY, build_speech_tab
from app.ui.voice import build_voice_tab
from engine.client import EngineClient, ModelInfo

TITLE = "Ming Omni Studio"
ASSETS = Path(__file__).resolve().parent / "assets"
STATIC = Path(__file__).resolve().parent / "static"
# The page's scripts, each a function (Gradio runs one at page load: it calls them in turn): the names of the fields
# Gradio leaves unnamed and Ctrl+Enter (a11y.js), the audio boxes' refused files said in the tab's words (uploads.js),
# the user's chat messages shown as typed, not rendered as Markdown and HTML (typed.js).
PAGE_SCRIPTS = ("a11y.js", "uploads.js", "typed.js")
PAGE_JS = "() => {\n" + "".join(f"({(STATIC / name).read_text(encoding='utf-8').strip()})();\n"
                                 for name in PAGE_SCRIPTS) + "}"
# The Image results: Gradio gives a gallery of n < columns pictures n columns, so one picture filled the 220 px box
# at 700 px square, its caption (mode, prompt, seed) out of sight below; four columns (two on a phone) keep each
# picture with its caption in the box.
# Their captions wrap inside the picture (Gradio's one line cut them to "Generate: a lighthous…", the seed out of
# sight), in the grid and in the preview a click opens; in the preview the picture takes what its caption and the strip
# of thumbnails leave (Gradio keeps it at the box less 60 px: a caption of two lines, on a phone, lay under the strip).
# A download's file name wraps (the size column keeps 8 rem: the .txt and .srt side by side on a phone showed ".t"
# and ".s", the name cut to nothing).
# Narrow screens: the page keeps a thin margin (Gradio's is 32 px a side) and the five tabs' names less room around
# them, so all fit down to 320 px (Gradio hid Voice and Image behind its '⋯' More tabs button on a phone). A <style>
# in the page's head: Gradio rewrites each rule of launch(css=...) inside an @media to apply only within its
# `.contain` element, so these (given as css) never applied.
# The banner's words take its box's own dark colour: in dark mode Gradio gives <strong> and <code> its light text
# colour, so on the light yellow (or red) box "RANDOM DEMO WEIGHTS" (or "ENGINE UNAVAILABLE") and the command read
# light on light, out of sight.
# Keyboard focus is in sight on every control: Gradio took the outline off its radio buttons and sliders and showed
# nothing around the Chat message box (its frame is an inner box of the block), so Tab reached them unseen. Radios and
# sliders get the browser's focus ring (as the buttons have), the message box's frame a focused text box's colours.
# Every text reads at 4.5:1 at least (WCAG AA) in light and dark mode: Gradio's light theme wrote its info text under a
# label, the slider's bounds, "- or -", the footer and the boxes' example text (placeholder; 3.1:1 in dark mode) in a
# grey of 1.9:1 on white, the open tab's name in orange of 2.8:1, and white on its orange (2.8:1) and red (3.8:1)
# buttons; they take darker shades of the same colours (the dark theme's orange button too: 3.6:1).
PAGE_STYLE = """<style>
:root { --body-text-color-subdued: #4b5563 !important; --color-accent: #c2410c !important;
  --input-placeholder-color: #6b7280 !important; }
:root.dark, :root .dark { --input-placeholder-color: #a1a1aa !important; }
:root, :root.dark, :root .dark {
  --button-primary-background-fill: #c2410c !important; --button-primary-background-fill-hover: #9a3412 !important;
  --button-cancel-background-fill: #b91c1c !important; --button-cancel-background-fill-hover: #991b1b !important; }
#model-banner .prose > div * { color: inherit !important; }
.gradio-container input[type=radio]:focus-visible, .gradio-container input[type=range]:focus-visible {
  outline: auto !important; outline-offset: 2px; }
#chat-input:has(textarea:focus) .full-container { border-color: var(--input-border-color-focus);
  box-shadow: var(--input-shadow-focus); }
#image-gallery .grid-container { grid-template-columns: repeat(4, minmax(0, 1fr)) !important; }
#image-gallery .caption-label, #image-gallery .caption { white-space: normal !important; text-overflow: clip !important;
  overflow-wrap: anywhere; }
#image-gallery .preview { padding-bottom: var(--size-14); }
#image-gallery .preview .media-button { height: auto !important; flex: 1 1 0; min-height: 0; }
#image-gallery .caption-label { max-width: calc(100% - 8px) !important; max-height: calc(100% - 8px);
  overflow-y: auto !important; line-height: 1.25; }
.gradio-container .file-preview .filename { flex-wrap: wrap; }
.gradio-container .file-preview .filename .stem { white-space: normal !important; overflow-wrap: anywhere; }
.gradio-container .file-preview .download { min-width: 0 !important; width: auto !important; }
@media (max-width: 640px) {
  #image-gallery .grid-container { grid-template-columns: repeat(2, minmax(0, 1fr)) !important; }
  .gradio-container .main.app { padding-left: 4px !important; padding-right: 4px !important; }
  .gradio-container .tab-container button { padding-left: 8px !important; padding-right: 8px !important; }
}
</style>"""


# Gradio's worker threads (launch's max_threads; Gradio's default, 40, is starlette's). A tab's streaming request (a
# chat, a transcription, a voice, an image) holds one while it waits for the engine's next event, and every page action
# (an upload checked, Stop, a page load) needs one too: ~45 slow streams (a 5 s/token engine) slowed every page action
# from 0.25 to 0.67 s, and more would have blocked the page. Sized for one stream per realtime session the engine holds
# (its card's limits.max_sessions, `python -m engine.server --max-sessions`; the default, 64, when it does not say, and
# never less: chats past the cap wait in the engine's line, still streaming) and half as many again for the page's own
# actions meanwhile. An engine not reached at start runs no stream: its studio starts with threads for a few
# (CARD_UNREAD_STREAMS; it started with 96 for the default) and grows them when the card is read (WorkerThreads).
ENGINE_DEFAULT_SESSIONS: int = 64  # engine.server.limits.Limits.max_sessions (not imported: a UI-only studio lacks it)
CARD_UNREAD_STREAMS: int = 16
PAGE_ACTION_SHARE: float = 0.5


def worker_threads(info: ModelInfo | None) -> int:
    """Gradio's worker threads for an engine that says `info` (None: its card was not read yet)."""
    streams = CARD_UNREAD_STREAMS if info is None else max(info.max_sessions or 0, ENGINE_DEFAULT_SESSIONS)
    return streams + int(streams * PAGE_ACTION_SHARE)


class WorkerThreads:
    """A studio's Gradio worker threads: worker_threads of the card read at start, grown (never shrunk: streams may hold
    them) on the server's own loop when a later check reads a card that asks for more (an engine that was down)."""

    def __init__(self, demo: gr.Blocks):
        self.demo, self.loop = demo, None
        self.size = worker_threads(demo.link.info)
        demo.extra_startup_events.append(self._started)
        demo.link.on_card(self.card_read)

    async def _started(self) -> None:  # (Gradio runs it on the server's loop, once its limiter and queue exist)
        self.loop = asyncio.get_running_loop()
        if self.demo.link.info is not None:  # (a card read between launch_options and the server's start)
            self.card_read(self.demo.link.info)

    def card_read(self, info: ModelInfo) -> None:
        wanted = worker_threads(info)
        if self.loop is not None and wanted > self.size:
            self.size = wanted
            self.loop.call_soon_threadsafe(self._grow, wanted)

    def _grow(self, size: int) -> None:
        """On the server's loop: Gradio's thread limiter (anyio's default one when Gradio made none: 40 threads) and
        its queue's slots for jobs running at once."""
        limiter = self.demo.limiter or anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, size)
        queue = self.demo._queue
        queue.max_thread_count = max(queue.max_thread_count, size)
        queue.active_jobs.extend([None] * (queue.max_thread_count - len(queue.active_jobs)))


def _assets(*patterns: str) -> list[str]:
    return sorted(str(p) for pattern in patterns for p in ASSETS.glob(pattern)) if ASSETS.is_dir() else []


def build_studio(client: EngineClient | EngineLink) -> gr.Blocks:
    """The whole page for an engine client. Launch it with `demo.launch(**launch_options(demo), ...)`
    (the Live tab's relay route and the page's CSS ride on those options)."""
    link = client if isinstance(client, EngineLink) else EngineLink(client)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}")
        build_banner(link)
        # what the browser keeps across a page reload, at the top level: the tabs read it at page load
        speech_ask = browser_kept(SPEECH_REQUEST_KEY)
        image_before = image_kept_before()  # (what earlier studios kept, carried over once)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                build_chat_tab(link, ASSETS if ASSETS.is_dir() else None)
            with gr.Tab("Live", id="live"):
                capability_note(link, REALTIME, "**Live needs the engine's realtime protocol**, which this engine "
                                                "does not serve (an OpenAI-compatible server: use Chat, Speech, "
                                                "Voice and Image).")
                build_live_tab(speech_output=not engine_lacks(link, SPEECH_OUT), settings=engine_settings(link))
            with gr.Tab("Speech", id="speech"):
                build_speech_tab(link, examples=_assets("speech/*.wav"), kept_ask=speech_ask)
            with gr.Tab("Voice", id="voice"):
                build_voice_tab(link, examples=_assets("speech/*.wav"))
            with gr.Tab("Image", id="image"):
                build_image_tab(link, examples=_assets("images/*.png"), before=image_before)
    demo.link = link  # type: ignore[attr-defined]  (tests and launch.py reach the engine link here)
    demo.live_proxy = LiveProxy(link.target)  # type: ignore[attr-defined]
    return demo


def launch_options(demo: gr.Blocks) -> dict:
    """What `demo.launch` needs besides host/port/auth: the Live relay's route, the page CSS (the Share buttons that
    only work on a Space hidden elsewhere, common.share_css) and narrow-screen style, the page's scripts
    (PAGE_SCRIPTS in app/static/) and the worker threads for as many streams as the engine holds sessions
    (WorkerThreads: grown when an engine down at start is reached)."""
    threads = WorkerThreads(demo)  # (from the answer of the check at start: no new check)
    return {"app_kwargs": demo.live_proxy.app_kwargs(), "css": share_css(), "head": PAGE_STYLE, "js": PAGE_JS,
            "max_threads": threads.size}


# How long close_studio waits for the server's loop to set Gradio's stop event before closing anyway.
STOP_EVENT_WAIT_S = 2.0


def close_studio(demo: gr.Blocks) -> None:
    """``demo.close()``, with Gradio's stop event set on the server's own event loop first. Gradio sets that
    asyncio.Event from the calling thread, which races with the server thread's heartbeats waiting on it
    (CI saw "RuntimeError: deque mutated during iteration" there, and a close that fails half-way leaves
    the port taken); set on its loop, the event is already set when close() reaches it."""
    event = getattr(getattr(demo, "app", None), "stop_event", None)
    loop = getattr(event, "_loop", None)  # the loop the event is bound to (asyncio's mixin), if any waited
    if event is not None and loop is not None and loop.is_running() and not event.is_set():
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the loop closed meanwhile: nothing waits on the event any more
            pass
        deadline = time.monotonic() + STOP_EVENT_WAIT_S
        while not event.is_set() and loop.is_running() and time.monotonic() < deadline:
            time.sleep(0.01)
    demo.close()
