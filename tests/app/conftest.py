"""The studio served for real on a free loopback port, as launch.py serves it: the tiny engine behind
an engine server on another loopback port (with a token), the page a client of it. One per module.
The browser tests share one Playwright driver and one Chromium per set of flags (starting them took 2-3 s a test);
each test gets contexts of its own (their own storage, cookies and permissions)."""

from __future__ import annotations

import pytest

from tests.app.browser import CHROMIUM, CHROMIUM_ARGS


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


@pytest.fixture(scope="module")
def playwright():
    """The Playwright driver of one file's browser tests. While it runs, the main thread's asyncio loop is marked as
    running (Playwright's sync API), so a test that runs asyncio.run while it lives fails ("cannot be called from a
    running event loop"): it is module-scoped, ended with the file that used it (package-scoped, it failed
    test_engine_link's asyncio.run, the file after the first browser files)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def chromium(playwright):
    """`chromium(*flags)`: the Chromium of this file's browser tests started with CHROMIUM_ARGS and `flags` (a fake
    camera, ...), launched at the first call with those flags and shared by the file's tests after it."""
    launched = {}

    def browser(*flags: str):
        if flags not in launched:
            args = CHROMIUM_ARGS + list(flags)
            launched[flags] = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        return launched[flags]
    try:
        yield browser
    finally:
        for started in launched.values():
            started.close()


@pytest.fixture
def new_context(chromium):
    """`new_context(*flags, **options)`: a fresh context (browser.new_context(**options)) of `chromium(*flags)`, closed
    with its pages when the test ends."""
    contexts = []

    def open_context(*flags: str, **options):
        contexts.append(chromium(*flags).new_context(**options))
        return contexts[-1]
    try:
        yield open_context
    finally:
        for context in contexts:
            context.close()
