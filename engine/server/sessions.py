"""Realtime session state: one per websocket connection, nothing shared between them.

A session holds its settings, its input audio buffer (push-to-talk) or its turn detector
(server_vad), its webcam frames (the explicit clip a client commits itself, or the rolling video
context attached to each user turn), its conversation items, and at most one active response.
The registry caps how many sessions are open at once.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.media.video import WebcamClip
from engine.sampling import GenerationParams
from engine.server.audio_out import OPENAI_PCM_RATE
from engine.server.limits import ApiError, Limits
from engine.server.turns import ServerVad, TurnDetector
from engine.server.video_context import VideoContext, VideoContextConfig


ROOT = "root"  # previous_item_id naming the start of the conversation (OpenAI's), never an item's id


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


@dataclass
class SessionSettings:
    instructions: str | None = None  # system prompt; None = the model's own
    output_modalities: list[str] = field(default_factory=lambda: ["text"])
    input_audio_sample_rate: int = OPENAI_PCM_RATE  # OpenAI's default input format: PCM16 at 24 kHz
    input_audio_encoding: str = "pcm16"  # or G.711 "pcmu" / "pcma" (8 kHz)
    thinking: bool = False
    voice: str | None = None  # the talker's voice (None = its default)
    params: GenerationParams = field(default_factory=GenerationParams)
    turn_detection: ServerVad | None = None  # None: push-to-talk (the client commits its turns)
    video: VideoContextConfig | None = None  # None: frames wait for input_video_buffer.commit
    output_rate: int = OPENAI_PCM_RATE  # the reply audio's rate (OpenAI's default: PCM16 at 24 kHz)
    output_encoding: str = "pcm16"  # or G.711 "pcmu" / "pcma" (8 kHz)
    transcription: dict | None = None  # {"model", "language", "prompt"}: each committed audio turn is transcribed
    include: tuple[str, ...] = ()  # what the server's events add (OpenAI's: the transcription's logprobs)

    @property
    def video_context(self) -> VideoContextConfig | None:
        """The rolling video context's settings (`video`, or its defaults under server_vad); None
        when webcam frames wait for the client's input_video_buffer.commit."""
        if self.video is not None:
            return self.video
        return VideoContextConfig() if self.turn_detection is not None else None

    def to_dict(self, session_id: str, model: str) -> dict:
        """The GA session object, with our sampling fields (the penalties too) and `thinking` as extensions."""
        p = self.params
        return {"type": "realtime", "id": session_id, "object": "realtime.session", "model": model,
                "instructions": self.instructions, "output_modalities": list(self.output_modalities),
                "audio": {"input": {"format": audio_format(self.input_audio_encoding, self.input_audio_sample_rate),
                                    "turn_detection": self.turn_detection.to_wire() if self.turn_detection else None,
                                    "transcription": dict(self.transcription) if self.transcription else None},
                          "output": {"format": audio_format(self.output_encoding, self.output_rate),
                                     "voice": self.voice}},
                "video": self.video_context.to_wire() if self.video_context else None, "include": list(self.include),
                "max_output_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
                "top_k": p.top_k, "repetition_penalty": p.repetition_penalty, "seed": p.seed, "stop": list(p.stop),
                "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
                "thinking": self.thinking}


def audio_format(encoding: str, rate: int) -> dict:
    """An audio format as OpenAI's GA session states it: {"type": "audio/pcm", "rate"} or G.711's
    {"type": "audio/pcmu"} / {"type": "audio/pcma"} (8 kHz)."""
    return {"type": "audio/pcm", "rate": rate} if encoding == "pcm16" else {"type": f"audio/{encoding}"}


def media_nbytes(parts: list[dict]) -> int:
    """Memory the decoded media of some engine parts hold: a video file's bytes count with what the
    front end decodes them into at every response that reads the conversation (codec.VideoBytes)."""
    total = 0
    for part in parts:
        for value in part.values():
            if isinstance(value, np.ndarray):
                total += value.nbytes
            elif isinstance(value, (bytes, bytearray)):  # a video file: + what it decodes into (codec.VideoBytes)
                total += len(value) + getattr(value, "decoded_nbytes", 0)
            elif isinstance(value, WebcamClip):  # a turn's frames (uint8)
                total += value.nbytes
            elif hasattr(value, "pixel_values"):  # VideoInputs
                total += value.pixel_values.numel() * value.pixel_values.element_size()
    return total


def continued_reply(messages: list[dict]) -> tuple[list[dict], str | None]:
    """A conversation that ends with assistant messages is answered as it is (OpenAI's chat completions and realtime
    response.create take it): the model's prompt ends with the user's turn (spec §6.1), so the text of those last
    assistant messages becomes the start of its reply, which the model continues (the engine's assistant_prefix).
    Returns (the messages up to the user's last one, that text; None when the conversation ends with the user)."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    if end == len(messages):
        return messages, None
    texts = ["".join(p["text"] for p in m["content"] if p.get("type") == "text") for m in messages[end:]]
    return messages[:end], "\n".join(texts)


@dataclass
class AudioSpan:
    """One audio chunk of an assistant reply: where it starts in the reply's audio, how long it
    is, and the text it starts speaking (what conversation.item.truncate cuts by)."""

    start_s: float
    seconds: float
    text: str


@dataclass
class Item:
    id: str
    role: str
    parts: list[dict]  # engine parts
    public: list[dict]  # what clients see
    status: str = "completed"
    turn_video: bool = False  # its video part is the rolling webcam context (dropped after keep_turns)
    audio: list[AudioSpan] = field(default_factory=list)  # an assistant reply's audio chunks, as sent
    nbytes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.nbytes = media_nbytes(self.parts)

    def drop_video(self) -> None:
        """Take the video out of the conversation (the public part says so)."""
        self.parts = [p for p in self.parts if p.get("type") != "video"]
        self.public = [{**p, "dropped": True} if p.get("type") == "input_video" else p for p in self.public]
        self.turn_video = False
        self.nbytes = media_nbytes(self.parts)

    def to_dict(self) -> dict:
        return {"id": self.id, "object": "realtime.item", "type": "message", "role": self.role,
                "status": self.status, "content": self.public}


class AudioBuffer:
    """PCM16 appended in chunks, all at one sample rate."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.samples = 0
        self.sample_rate: int | None = None

    def seconds_with(self, n: int, rate: int) -> float:
        return (self.samples + n) / rate

    def append(self, samples: np.ndarray, rate: int) -> None:
        self.chunks.append(samples)
        self.samples += len(samples)
        self.sample_rate = rate

    def peek(self) -> tuple[np.ndarray, int]:
        data = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.int16)
        return data, self.sample_rate or OPENAI_PCM_RATE

    def clear(self) -> None:
        self.chunks, self.samples, self.sample_rate = [], 0, None


class Session:
    def __init__(self, limits: Limits, registry: "SessionRegistry | None" = None):
        self.id = new_id("sess")
        self.registry = registry  # the server's open sessions: their media count against max_total_media_bytes
        self.created_at = time.time()
        self.limits = limits
        self.settings = SessionSettings(params=GenerationParams(max_new_tokens=limits.default_max_tokens,
                                                                fit_context=True))
        self.audio = AudioBuffer()
        self.clip = WebcamClip(max_buffer_frames=limits.max_video_frames, history_seconds=float("inf"),
                               max_buffer_bytes=limits.max_session_media_bytes)
        self.video = VideoContext(max_frames=limits.max_video_frames)  # used when settings.video is set
        self.detector: TurnDetector | None = None  # set with settings.turn_detection
        self.items: list[Item] = []
        self.active = None  # the running response (realtime.Response), if any

    @property
    def text_chars(self) -> int:
        """Characters of text in the conversation (what the per-session text budget counts)."""
        return sum(len(p["text"]) for it in self.items for p in it.parts
                   if p.get("type") == "text" and isinstance(p.get("text"), str))

    @property
    def media_bytes(self) -> int:
        """Decoded media the conversation's items hold (what max_session_media_bytes bounds)."""
        return sum(it.nbytes for it in self.items)

    @property
    def held_bytes(self) -> int:
        """Memory the session holds: conversation media, buffered audio and frames, the detector."""
        return (sum(it.nbytes for it in self.items) + 2 * self.audio.samples + self.clip.nbytes + self.video.nbytes
                + (self.detector.held_bytes if self.detector is not None else 0))

    def add_item(self, item: Item, after: str | None = None) -> None:
        """Append an item, or put it right after the item `after` (an assistant reply whose
        response ran while the user's next turn joined; an item created with previous_item_id), or
        first when `after` is ROOT."""
        if len(self.items) >= self.limits.max_conversation_items:
            raise ApiError(f"the conversation already holds {len(self.items)} items, the limit per session",
                           code="conversation_too_long")
        held = self.media_bytes
        mib = 1024 * 1024
        if held + item.nbytes > self.limits.max_session_media_bytes:
            raise ApiError(f"the session's media would take {(held + item.nbytes) / mib:.0f} MiB, the limit is "
                           f"{self.limits.max_session_media_bytes / mib:.0f} MiB; delete items "
                           "(conversation.item.delete) or start a new session", code="session_media_limit")
        # (a committed buffer becomes the item: the session's buffers are left out of the count, not counted twice)
        self.check_server_room(item.nbytes, "this item's", "delete items (conversation.item.delete)",
                               with_own_buffers=False)
        index = 0 if after == ROOT else next((i + 1 for i, it in enumerate(self.items) if it.id == after),
                                             len(self.items))
        self.items.insert(index, item)

    def check_server_room(self, nbytes: int, what: str, remedy: str, with_own_buffers: bool = True) -> None:
        """server_media_limit (503) when `nbytes` more of decoded media (`what`: "this item's", "this frame's" ...)
        would pass Limits.max_total_media_bytes with what every session holds (their buffers too; this session's
        only `with_own_buffers`) and the requests in line hold."""
        if not nbytes:
            return
        everyone = self.registry.media_bytes() + self.registry.other_media() if self.registry is not None else \
            self.held_bytes
        if not with_own_buffers:
            everyone -= self.held_bytes - self.media_bytes
        mib = 1024 * 1024
        if everyone + nbytes > self.limits.max_total_media_bytes:
            raise ApiError(f"the server already holds {everyone / mib:.0f} MiB of media for sessions and requests, and "
                           f"{what} {nbytes / mib:.1f} MiB would pass the server's limit of "
                           f"{self.limits.max_total_media_bytes / mib:.0f} MiB; try again later, or {remedy}",
                           code="server_media_limit", status=503)

    def make_room(self, item: Item, reply_slots: int = 1, keep: str | None = None) -> list[str]:
        """Drop the oldest items (system items stay) until `item` and `reply_slots` more items fit in
        the item and media limits, and the conversation still opens with the user: what a
        hands-free session does instead of refusing its next turn. `keep`: the item a running reply
        answers (the reply joins right after it): neither it nor what follows it is dropped, even
        when the limits are still passed (adding `item` may then be refused). Returns the dropped ids."""
        dropped = []

        def full() -> bool:
            held = sum(it.nbytes for it in self.items)
            return (len(self.items) + 1 + reply_slots > self.limits.max_conversation_items
                    or held + item.nbytes > self.limits.max_session_media_bytes)

        def oldest() -> Item | None:
            first = next((it for it in self.items if it.role != "system"), None)
            return None if first is None or first.id == keep else first

        while (full() or (dropped and getattr(oldest(), "role", "user") != "user")) and oldest() is not None:
            it = oldest()
            self.items.remove(it)
            dropped.append(it.id)
        return dropped

    def drop_old_turn_video(self, keep: int) -> int:
        """Keep the rolling-video part of the newest `keep` user turns only; returns how many
        turns lost theirs."""
        turns = [it for it in self.items if it.turn_video]
        old = turns[:max(0, len(turns) - keep)]
        for it in old:
            it.drop_video()
        return len(old)

    def find_item(self, item_id: str) -> Item | None:
        return next((it for it in self.items if it.id == item_id), None)

    def messages(self, items: list[Item] | None = None) -> list[dict]:
        """The conversation (or `items`) as engine messages (consecutive items of one role stay separate
        turns)."""
        return [{"role": it.role, "content": list(it.parts)} for it in (self.items if items is None else items)
                if it.role != "system"]

    def system_text(self, items: list[Item] | None = None) -> str | None:
        """The text of the conversation's (or `items`') system items."""
        texts = [p["text"] for it in (self.items if items is None else items) if it.role == "system"
                 for p in it.parts if p.get("type") == "text"]
        return "\n".join(texts) if texts else None


class SessionRegistry:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.open: dict[str, Session] = {}
        self.other_media: Callable[[], int] = lambda: 0  # media held elsewhere under max_total_media_bytes (requests)
        self.total = itertools.count(1)
        self.created = 0

    def create(self) -> Session:
        if len(self.open) >= self.limits.max_sessions:
            raise ApiError(f"too many realtime sessions: {len(self.open)} are open, the limit is "
                           f"{self.limits.max_sessions}; try again later", code="session_limit_reached", status=503)
        s = Session(self.limits, self)
        self.open[s.id] = s
        self.created = next(self.total)
        return s

    def close(self, session: Session) -> None:
        self.open.pop(session.id, None)
        session.audio.clear()
        session.clip.clear()
        session.video.clear()
        session.detector = None
        session.items.clear()

    def media_bytes(self) -> int:
        """Decoded media all open sessions hold: their conversations, and their buffered audio and frames (counted
        against max_total_media_bytes: buffers bounded per session only let 64 sessions hold 64 x 512 MiB of frames)."""
        return sum(s.held_bytes for s in list(self.open.values()))

    def __len__(self) -> int:
        return len(self.open)
