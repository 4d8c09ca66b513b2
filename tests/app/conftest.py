"""The studio served for real on a free loopback port, as launch.py serves it: the tiny engine behind
an engine server on another loopback port (with a token), the page a client of it. One per module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def engine_server(tiny_engine):
    """The tiny engine served over HTTP + realtime websockets, with a token."""
    from engine.server import ServerHandle, create_app

    handle = ServerHandle(create_app(tiny_engine, token="test-token"), host="127.0.0.1", port=0).start()
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def studio_demo(engine_server):
    pytest.importorskip("gradio")
    from app.studio import build_studio, close_studio, launch_options
    from engine.client import EngineClient

    demo = build_studio(EngineClient(engine_server.url, token="test-token"))
    demo.launch(**launch_options(demo), prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, show_error=True,
                quiet=True)
    try:
        yield demo
    finally:
        close_studio(demo)


@pytest.fixture(scope="module")
def studio(studio_demo):
    """The page's URL."""
    return studio_demo.local_url
