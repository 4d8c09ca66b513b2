"""Fixtures shared by the server tests: a module's own server around the tiny engine with the default
limits, and an HTTP client for it (a module that needs other limits defines its own `server`)."""

from __future__ import annotations

import httpx
import pytest

from tests.server import running_server


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(tiny_engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
