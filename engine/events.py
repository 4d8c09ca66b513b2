"""The event stream every engine call returns: the one vocabulary shared by the runtime, the
server protocol and the UI. Each event serialises to a JSON-ready dict with a `type`.

Text generation emits `text.delta` events then exactly one `done` (or `error`). Speech and image
output will add `audio.delta` (PCM chunk + sample rate) and `image.preview` / `image.done`
events of the same shape when those parts of the engine land.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    queue_wait_s: float = 0.0
    media_encode_s: float = 0.0

    def summary(self) -> str:
        return (f"prompt tokens {self.prompt_tokens}, new tokens {self.new_tokens}, "
                f"time to first token {self.time_to_first_token_s * 1000:.1f} ms, "
                f"{self.decode_tokens_per_s:.1f} tokens/s")


@dataclass
class TextDelta:
    text: str
    type: str = "text.delta"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Done:
    """End of a response. finish_reason: 'stop' (eos or stop string), 'length', 'cancelled'."""

    text: str
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    token_ids: list[int] = field(default_factory=list)
    result: dict | None = None  # task-specific result, e.g. ASR {"language", "text"}
    type: str = "done"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Error:
    message: str
    code: str = "engine_error"
    type: str = "error"

    def to_dict(self) -> dict:
        return asdict(self)


Event = TextDelta | Done | Error
