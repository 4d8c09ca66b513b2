"""A page opened while the engine was down, in a real browser: when the engine comes back, the banner shows the
model and the controls that depend on the engine follow it, with no reload (they kept "Answer with speech too"
disabled, "the engine is not reachable", and the Voice tab's instruction lists empty, until the page was
reloaded)."""

from __future__ import annotations

import socket

import pytest

from tests.app.test_browser import sync_api

pytest.importorskip("gradio")


def test_the_controls_follow_an_engine_that_comes_back(tiny_engine, new_context):
    from app.engine_link import EngineLink
    from app.studio import build_studio, close_studio, launch_options
    from engine.client import EngineClient
    from engine.server import ServerHandle, create_app

    with socket.socket() as s:  # a port nothing listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    link = EngineLink(EngineClient(f"http://127.0.0.1:{port}", timeout=2), recheck_s=1.0)
    demo = build_studio(link)
    demo.launch(**launch_options(demo), prevent_thread_lock=True, server_name="127.0.0.1", server_port=None,
                quiet=True)
    engine = None
    try:
        page = new_context(viewport={"width": 1280, "height": 1000}).new_page()
        page.goto(demo.local_url, wait_until="load", timeout=60_000)
        sync_api.expect(page.locator("#model-banner")).to_contain_text("ENGINE UNAVAILABLE", timeout=30_000)
        page.locator("#chat-advanced").click()
        speak = page.get_by_label("Answer with speech too")
        sync_api.expect(speak).to_be_disabled()
        engine = ServerHandle(create_app(tiny_engine), host="127.0.0.1", port=port).start()
        sync_api.expect(page.locator("#model-banner")).to_contain_text("RANDOM DEMO WEIGHTS", timeout=30_000)
        sync_api.expect(speak).to_be_enabled(timeout=10_000)
        assert "not reachable" not in page.locator("#chat-advanced").inner_text()
        page.get_by_role("tab", name="Voice").click()
        page.get_by_text("Instructions: dialect, emotion, speed, voice design").click()
        page.get_by_role("combobox", name="Emotion").click()
        options = page.locator("ul[role=listbox] li")
        sync_api.expect(options.nth(1)).to_be_visible(timeout=10_000)  # more than "(model default)"
        page.context.close()  # (the page leaves before the studio closes)
    finally:
        close_studio(demo)
        if engine is not None:
            engine.stop()
