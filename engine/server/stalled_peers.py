"""Connections whose peer reads nothing: cut off once it has taken nothing for a while.

asyncio pauses a protocol's writing when its transport's buffer passes the high-water mark (the peer's
TCP window is full: it reads nothing) and resumes it when the buffer drains. uvicorn then waits for the
drain for ever: an HTTP answer (an SSE stream whose reader stopped) kept its connection and its task after
the scheduler had cancelled the job, and a realtime session kept one of the server's session slots, until
the client closed. `CutsOffStalledPeers` aborts such a connection once its writing has stayed paused for
`stalled_peer_s` (Limits.slow_reader_timeout_s): its buffer is dropped, the app sees the client leave
(the job is cancelled, the session closed) and it is counted as a client abort (`stalled_reader`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class CutsOffStalledPeers:
    """A mixin for a uvicorn protocol (before it in the bases). `stalled_peer_s`: how long writing may stay
    paused; `on_stalled(what)`: told about each connection cut off (None: nothing is told)."""

    def __init__(self, *args, stalled_peer_s: float, on_stalled: Callable[[str], None] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stalled_peer_s = stalled_peer_s
        self.on_stalled = on_stalled
        self.stall_timer: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.stall_timer is None:
            self.stall_timer = self.loop.call_later(self.stalled_peer_s, self.peer_stalled)

    def resume_writing(self) -> None:
        self.stop_stall_timer()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_stall_timer()
        super().connection_lost(exc)

    def stop_stall_timer(self) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None

    def peer_stalled(self) -> None:
        self.stall_timer = None
        if self.on_stalled is not None:
            peer = self.transport.get_extra_info("peername") or ("?", 0)
            self.on_stalled(f"{peer[0]}:{peer[1]} took nothing of {self.transport.get_write_buffer_size()} bytes "
                            f"for {self.stalled_peer_s:g} s (the connection was cut off)")
        self.transport.abort()
