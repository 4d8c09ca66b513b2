"""What every endpoint shares: the engine, the model id, the limits, the token, the scheduler, the
realtime session registry (one per app) and whether the server speaks OpenAI's shapes only
(--openai-only). The engine is an `engine.runtime.Engine` or any object with its interface (info(),
is_demo, chat(), transcribe(); optionally has_talker, speak(), voices, has_image_generator, imagine())."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.runtime import Engine
from engine.server.limits import Limits
from engine.server.scheduler import Scheduler
from engine.server.sessions import SessionRegistry


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

    @classmethod
    def create(cls, engine: Engine, limits: Limits | None = None, token: str | None = None,
               model_id: str | None = None, openai_only: bool = False) -> "ServerContext":
        limits = limits or Limits()
        scheduler = Scheduler(concurrency=limits.concurrency, max_queue=limits.max_queue,
                              stream_buffer=limits.stream_buffer, slow_reader_timeout_s=limits.slow_reader_timeout_s)
        return cls(engine=engine, model_id=model_id or engine.info().name, limits=limits, token=token,
                   scheduler=scheduler, sessions=SessionRegistry(limits), openai_only=openai_only)

    def check_model(self, requested) -> None:
        """Requests may name the served model (its id or checkpoint path) or leave it out."""
        from engine.server.protocol import ApiError  # noqa: PLC0415

        if requested is None:
            return
        if not isinstance(requested, str):
            raise ApiError("'model' must be a string", code="invalid_type", param="model")
        if requested not in (self.model_id, self.engine.info().path, "default"):
            raise ApiError(f"model {requested!r} is not served here; this server serves {self.model_id!r}",
                           code="model_not_found", status=404, param="model")
