"""The studio page: the model banner above the capability tabs (only Chat so far)."""

from __future__ import annotations

import app  # noqa: F401  (sets GRADIO_ANALYTICS_ENABLED before gradio is imported)

import gradio as gr

from app.ui.banner import build_banner
from app.ui.chat import build_chat_tab
from engine.runtime import Engine

TITLE = "Ming Omni Studio"


def build_studio(engine: Engine) -> gr.Blocks:
    """The whole page for a loaded engine, with its queue configured (one generation at a time:
    the engine runs one request at a time anyway). Launch it with `demo.launch(...)`."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}")
        build_banner(engine)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                build_chat_tab(engine)
    demo.queue(default_concurrency_limit=1)
    return demo
