"""The studio's link to the engine: the client (local in-process server or a remote engine), what
the engine serves (its model description and capabilities), and whether it answers right now. The
page asks `status()` every few seconds, so an engine that was down (or rejected the token) shows
as such and recovers when it comes back."""

from __future__ import annotations

import threading
import time
from http import HTTPStatus
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from engine.client import EngineClient, ModelInfo, is_loopback_host
from engine.client.core import is_redirect, tls_failure

# Capabilities an engine reports (engine.client.ModelInfo.capabilities).
TEXT, IMAGE_IN, VIDEO_IN, AUDIO_IN = "text", "image_in", "video_in", "audio_in"
SPEECH_OUT, IMAGE_OUT = "speech_out", "image_out"
REALTIME = "realtime"  # the engine serves the realtime websocket protocol (the Live tab needs it)

RECHECK_S = 5.0
# The most one "who are you" check may take. A hung engine (or a network that drops packets) held each check for the
# client's whole request timeout (60 s), twice at start, and every page load and tab waited behind it; now it is
# said as not answering after this, and a page load never waits for a check another visitor's page started. What a
# page asks the engine for at load (its saved voices, for Chat, Voice and Live) is given up after this too.
CHECK_TIMEOUT_S = 10.0
# The failures of a check that mean something else answered at the engine's address (a 404 page, a web app's answer).
NOT_AN_ENGINE = ("http_error", "protocol_error")
# What to do when the engine refuses the studio's token, said by the banner and by each tab's error line (the tabs
# showed the engine's wire advice, "send 'Authorization: Bearer <token>'", to someone in a browser).
TOKEN_ADVICE = "start the studio again with the engine's token (--engine-token T, or ENGINE_TOKEN=T)"


def cleartext_token_warning(client: EngineClient) -> str | None:
    """A warning when the studio's token would cross the network unencrypted: http:// or ws:// to an engine that is
    not on this machine (anyone on the path can read the token, and use the engine with it). None otherwise."""
    http = client.endpoints.http
    host = urlsplit(http).hostname or ""
    if not client.endpoints.token or http.startswith("https://") or is_loopback_host(host):
        return None
    return (f"WARNING: the engine's token goes to {host} unencrypted (http:// / ws://): anyone on the network path can "
            "read it and use the engine. Put the engine behind TLS (a reverse proxy) and give its https:// or "
            "wss:// address, or reach it over a private network or an SSH tunnel.")


@dataclass
class LinkStatus:
    ok: bool
    info: ModelInfo | None
    problem: str | None  # why the engine cannot be used right now (None when ok)
    checked_at: float
    code: str | None = None  # the failure's code (unauthorized: the token was refused; it will not pass by itself)


class EngineLink:
    def __init__(self, client: EngineClient, url_label: str | None = None, recheck_s: float = RECHECK_S,
                 check_timeout_s: float = CHECK_TIMEOUT_S, remote: bool = False):
        self.client = client
        self.remote = remote  # the engine runs in another process (launch.py --engine): its server loads the model
        self.url_label = url_label or client.endpoints.http
        self.recheck_s = recheck_s
        self.check_timeout_s = check_timeout_s
        self._lock = threading.Lock()
        self._status = LinkStatus(False, None, "not checked yet", 0.0)
        self._card_readers: list[Callable[[ModelInfo], None]] = []
        self.refresh(force=True)

    def on_card(self, reader: Callable[[ModelInfo], None]) -> None:
        """Call `reader` with the engine's card (what it serves, its limits) each time a check reads it."""
        self._card_readers.append(reader)

    def refresh(self, force: bool = False) -> LinkStatus:
        """Ask the engine who it is (at most every `recheck_s` seconds unless forced). While another thread is
        asking, the last answer is returned at once (forced: that thread's answer is waited for)."""
        if not self._lock.acquire(blocking=force):
            return self._status
        try:
            if force or time.monotonic() - self._status.checked_at >= self.recheck_s:
                self._status = self._check()
                for reader in self._card_readers if self._status.ok else ():
                    reader(self._status.info)
            return self._status
        finally:
            self._lock.release()

    def _check(self) -> LinkStatus:
        try:
            return LinkStatus(True, self.client.info(timeout=self.check_timeout_s), None, time.monotonic())
        except Exception as e:  # noqa: BLE001  (unreachable, refused token, bad answer: all shown)
            code = getattr(e, "code", None)
            if is_redirect(getattr(e, "status", None) or 0):  # (said whole: where the engine's address points)
                problem = e.message
            elif code == "unauthorized":
                problem = f"the engine at {self.url_label} refused this studio's token: {TOKEN_ADVICE}"
            elif code in NOT_AN_ENGINE:  # (said "is not answering" while it answered: the address was looked at last)
                problem = (f"the server at {self.url_label} answered, but not as a Ming engine server does ({e}): "
                           "check the engine's address and port (python -m engine.server's --host / --port)")
            elif getattr(e, "status", None) == HTTPStatus.SERVICE_UNAVAILABLE:  # (it answered, "is not answering"
                # said otherwise: it is starting, or a proxy's engine is down)
                problem = f"the engine at {self.url_label} answered that it cannot serve yet ({e})"
            elif code == "connection_lost":  # (its answer came cut off: "is not answering" while it answered)
                problem = f"the engine at {self.url_label} answered, but {e.message}"
            elif tls_failure(e) is not None:  # (it answered: "is not answering" sent the user to a running engine)
                problem = f"the studio could not open a secure connection to the engine at {self.url_label} ({e})"
            else:
                problem = f"the engine at {self.url_label} is not answering ({e})"
            return LinkStatus(False, self._status.info, problem, time.monotonic(), code)

    def status(self) -> LinkStatus:
        return self.refresh()

    def target(self) -> tuple[str, str | None]:
        """(the engine's realtime URL, its token): what the studio's Live relay connects to."""
        return self.client.endpoints.ws, self.client.endpoints.token

    @property
    def held_back(self) -> str | None:
        """Why the engine's streams arrive all at once (a proxy on the way buffers them) once one was seen so; None
        otherwise. The banner says it."""
        return self.client.held_back

    @property
    def info(self) -> ModelInfo | None:
        """What the engine last said it serves (None: it never answered yet); asks nothing."""
        return self._status.info

    def has(self, capability: str) -> bool:
        info = self.info
        return bool(info is not None and capability in info.capabilities)
