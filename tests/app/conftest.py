"""The studio served for real on a free loopback port (tiny random checkpoint), one server per test module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def studio(tiny_engine):
    """The page's URL; the server is closed when the module's tests are done."""
    pytest.importorskip("gradio")
    from app.studio import build_studio

    demo = build_studio(tiny_engine)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()
