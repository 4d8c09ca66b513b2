"""Connections closed after an answer that ends them (a refusal): the client still sending gets the answer, not a reset.

Closed at once with what the client still sends unread, or arriving after the close, a connection is reset (RFC 9112
§9.6), and the reset makes the client's side drop the answer it had not read yet: a client sending a large body, or a
websocket client that sent its first frames right after its handshake, met 'connection reset by peer' instead of the
answer. `LingersAfterAnswer.close_after_client` ends our side of the stream instead and reads and drops what still
comes until the client closes, for at most Linger.seconds and Linger.bytes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class Linger:
    """How long, and how much of what a client still sends, is read and dropped after an answer that closes the
    connection before it closes (Limits.refusal_linger_s; the larger body limit)."""

    seconds: float
    bytes: int


class LingersAfterAnswer:
    """A mixin for a uvicorn protocol (before it in the bases); `data_received` must first offer its data to
    `dropped_while_lingering`."""

    def __init__(self, *args, linger: Linger, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.linger = linger
        self.linger_left: int | None = None  # (bytes) once lingering: what may still be read and dropped
        self.linger_timer: asyncio.TimerHandle | None = None

    def close_after_client(self) -> None:
        """End our side of the stream now and close once the client has (at the latest after Linger.seconds, or once
        it has sent more than Linger.bytes)."""
        if self.transport.is_closing() or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.transport.resume_reading()
        self.linger_left = self.linger.bytes
        self.linger_timer = self.loop.call_later(self.linger.seconds, self.transport.close)

    def dropped_while_lingering(self, data: bytes) -> bool:
        """Whether `data` came while lingering (then it is dropped; past Linger.bytes the connection closes)."""
        if self.linger_left is None:
            return False
        self.linger_left -= len(data)
        if self.linger_left < 0:
            self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.linger_timer is not None:
            self.linger_timer.cancel()
        super().connection_lost(exc)
