"""What every endpoint shares: the engine, the model id, the limits, the token, the scheduler, the
realtime session registry (one per app), whether the server speaks OpenAI's shapes only
(--openai-only), the prompt text bound the model implies, and the count of clients that left early.
The engine is an `engine.runtime.Engine` or any object with its interface (info(), is_demo, chat(),
transcribe(); optionally has_talker, speak(), voices, has_image_generator, imagine())."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from engine.runtime import Engine
from engine.server.fields import check_model
from engine.server.limits import Limits
from engine.server.scheduler import Scheduler
from engine.server.sessions import SessionRegistry
from engine.server.text import PromptBound

# How a client can leave before its request is read or its answer sent (counted in /health):
# truncated_upload (the body stopped short), invalid_utf8_frame (a websocket text frame, or a close frame's reason,
# that is not UTF-8: the connection is closed with 1007), invalid_frame (a websocket frame that breaks RFC 6455: closed
# with 1002; or one past the largest message: 1009), left_mid_response (the connection closed or was reset
# while the answer was being made or sent), stalled_reader (the connection's peer took nothing of what the server
# wrote for slow_reader_timeout_s: it was cut off, engine.server.stalled_peers).
CLIENT_ABORTS = ("truncated_upload", "invalid_utf8_frame", "invalid_frame", "left_mid_response", "stalled_reader")


@dataclass
class ServerContext:
    engine: Engine
    model_id: str
    limits: Limits
    token: str | None
    scheduler: Scheduler
    sessions: SessionRegistry
    started_at: float = field(default_factory=time.time)
    openai_only: bool = False  # OpenAI's routes and fields only: no realtime, no extensions
    prompt_bound: PromptBound | None = None  # the most text a prompt can hold (None: the engine does not say)
    client_aborts: Counter = field(default_factory=lambda: Counter(dict.fromkeys(CLIENT_ABORTS, 0)))
    # saved voice -> when (time.time()) this server deleted it, the last few (a request waiting for it is told when)
    voices_deleted: dict[str, float] = field(default_factory=dict)

    @classmethod
    def create(cls, engine: Engine, limits: Limits | None = None, token: str | None = None,
               model_id: str | None = None, openai_only: bool = False) -> "ServerContext":
        limits = limits or Limits()
        # HTTP requests in line and realtime conversations share max_total_media_bytes of decoded media
        sessions = SessionRegistry(limits)
        scheduler = Scheduler(concurrency=limits.concurrency, max_queue=limits.max_queue,
                              stream_buffer=limits.stream_buffer, slow_reader_timeout_s=limits.slow_reader_timeout_s,
                              max_media_bytes=limits.max_total_media_bytes, other_media=sessions.media_bytes)
        sessions.other_media = lambda: scheduler.media_bytes
        return cls(engine=engine, model_id=model_id or engine.info().name, limits=limits, token=token,
                   scheduler=scheduler, sessions=sessions, openai_only=openai_only,
                   prompt_bound=PromptBound.of_engine(engine))

    def check_model(self, requested, kind: str | None = None) -> None:
        """Requests may name the served model (its id or checkpoint path, or "default"), one of OpenAI's
        models of the endpoint's `kind` (engine.server.fields.OPENAI_MODELS; None: any kind), or leave
        it out; any other id is model_not_found."""
        check_model(requested, (self.model_id, self.engine.info().path, "default"), self.model_id, kind)
