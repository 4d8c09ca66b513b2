"""Small reads of what is still owed (a request body, a websocket frame) paced, so a trickle costs few wake-ups.

A client that sends a request body or a realtime message one byte per packet as fast as it can had each packet read
on its own: each read costs the event loop a wake-up and the parser's work (4 clients trickling Content-Length bodies
took 34 % of a core here, 40-70 % reported). After a read under Limits.min_read_bytes that leaves the request or frame
unfinished, `PacesSmallReads` pauses reading for SMALL_READ_PAUSE_S: what the client sends meanwhile waits in the
socket and comes in one read, so a connection costs at most 1 / SMALL_READ_PAUSE_S such wake-ups a second. A read that
ends what was owed is not followed by a pause: nothing a client waits for is delayed.
"""

from __future__ import annotations

from engine.server.limits import SMALL_READ_PAUSE_S


class PacesSmallReads:
    """A mixin for a uvicorn protocol (before it in the bases): its data_received calls `pace_small_read(size)` after a
    read that left something owed; `may_resume_reading()` says whether the protocol's own flow control lets reading
    go on."""

    def __init__(self, *args, min_read_bytes: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.min_read_bytes = min_read_bytes

    def may_resume_reading(self) -> bool:
        raise NotImplementedError

    def pace_small_read(self, size: int) -> None:
        if size < self.min_read_bytes and self.may_resume_reading() and not self.transport.is_closing():
            self.transport.pause_reading()
            self.loop.call_later(SMALL_READ_PAUSE_S, self.resume_after_small_read)

    def resume_after_small_read(self) -> None:
        if self.may_resume_reading() and not self.transport.is_closing():
            self.transport.resume_reading()
