"""HTTP as a demanding client uses it (beyond the JSON fields): HEAD of a GET resource, a 405 saying
which methods the route takes, a plain HTTP request to the websocket route, and request bodies sent
with a Content-Encoding."""

from __future__ import annotations

import httpx
import pytest

from tests.server import fake_server


@pytest.fixture(scope="module")
def fake():
    with fake_server() as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        yield c


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/v1/models/default"])
def test_a_get_resource_answers_head_with_its_status_and_no_body(fake, path):
    got, head = fake.get(path), fake.head(path)
    assert got.status_code == 200
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


@pytest.mark.parametrize("method, path, allowed", [("GET", "/v1/chat/completions", {"POST"}),
                                                   ("OPTIONS", "/v1/models", {"GET", "HEAD"}),
                                                   ("DELETE", "/health", {"GET", "HEAD"})])
def test_a_method_the_route_does_not_take_is_a_405_that_names_the_ones_it_does(fake, method, path, allowed):
    r = fake.request(method, path)
    assert r.status_code == 405
    assert set(m.strip() for m in r.headers["allow"].split(",")) == allowed
    err = r.json()["error"]
    assert err["code"] == "method_not_allowed" and all(m in err["message"] for m in allowed)


def test_a_plain_http_get_of_the_realtime_route_says_it_needs_a_websocket(fake):
    r = fake.get("/v1/realtime")
    assert r.status_code == 426, r.text
    assert r.headers["upgrade"] == "websocket"
    err = r.json()["error"]
    assert err["code"] == "upgrade_required" and "websocket" in err["message"]


def test_head_of_a_route_without_get_is_a_405_naming_head(fake):
    r = fake.head("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""
