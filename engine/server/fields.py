"""What each endpoint takes, by name: the request fields it honours, OpenAI's fields it accepts with
no effect, OpenAI's fields it refuses because it cannot honour them (`unsupported_parameter`, saying
why), and the model ids it answers to. Every other field is refused with `unknown_parameter`: a
field is never silently ignored unless it is listed here as having no effect (docs/protocol.md,
"Fields and model ids", lists the same tables).

Model ids: a request may name the served model (its id, its checkpoint path, "default") or leave it
out; a drop-in OpenAI client may also name one of OpenAI's models of the endpoint's kind (whisper-1
for transcriptions, gpt-4o-mini-tts for speech, gpt-image-1 for images, gpt-4o-mini for chat,
gpt-realtime for realtime, and their dated snapshots), which the served model answers. Any other id
is refused with `model_not_found` naming the served one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.server.codec import bad, shown
from engine.server.protocol import ApiError

Harmless = Callable[[Any], bool]  # a value of a refused field that asks for nothing (e.g. tool_choice "none")


@dataclass(frozen=True)
class Fields:
    """`taken`: honoured (or checked by the endpoint itself); `ignored`: accepted, no effect;
    `refused`: name -> (why, the values that ask for nothing and pass); `types`: a refused field's JSON types as
    OpenAI takes them, another type being invalid_type (not a request for what is refused)."""

    taken: tuple[str, ...]
    ignored: tuple[str, ...] = ()
    refused: dict[str, tuple[str, Harmless]] = field(default_factory=dict)
    types: dict[str, tuple[type, ...]] = field(default_factory=dict)

    def check(self, body: dict, prefix: str = "") -> None:
        for key, value in body.items():
            if key in self.taken or key in self.ignored or value is None:
                continue
            name = f"{prefix}{key}"
            if key in self.types and not isinstance(value, self.types[key]):
                kinds = " or ".join(JSON_TYPE_NAMES[t] for t in self.types[key])
                raise bad(f"'{name}' must be {kinds}, got {type(value).__name__}", "invalid_type", name)
            base = key.split("[", 1)[0]  # an object sent as form fields: chunking_strategy[type]=server_vad
            if key in self.refused or base in self.refused:
                why, harmless = self.refused.get(key) or self.refused[base]
                if key in self.refused and harmless(value):
                    continue
                name = f"{prefix}{key if key in self.refused else base}"
                raise bad(f"'{name}' is not supported by this server: {why}", "unsupported_parameter", name)
            raise bad(f"unknown field {name[:60]!r}; known: {', '.join(sorted(self.taken + self.ignored))}",
                      "unknown_parameter", name[:60])


NO_TOOLS = "this model has no tool calling"
JSON_TYPE_NAMES = {str: "a string", dict: "an object"}
# OpenAI's tool_choice / function_call: a mode ("none", "auto", "required") or an object naming a tool
TOOL_CHOICE_TYPES = {"tool_choice": (str, dict), "function_call": (str, dict)}


def no_tool_calling(name: str, value: Any = None) -> ApiError:
    """The one refusal of what asks for tool calling: the field `name` (and the `value` sent there, when it says what
    was asked: a message's role "tool", an item's type "function_call_output") is unsupported_parameter."""
    said = f"'{name}'" if value is None else f"'{name}' {shown(str(value))}"
    return bad(f"{said} is not supported by this server: {NO_TOOLS}", "unsupported_parameter", name)


def check_tool_list(value: Any, name: str) -> None:
    """A list of tools (chat's `tools` / `functions`, a realtime session's `tools`): an empty one asks for nothing and
    passes, one holding tools is refused naming the field (`name`), anything else is not a list (false passed)."""
    if value is not None and not isinstance(value, list):
        raise bad(f"'{name}' must be a list of tools, got {type(value).__name__}", "invalid_type", name)
    if value:
        raise no_tool_calling(name)


NO_REASONING = "none"  # OpenAI's reasoning_effort asking for no reasoning: what a chat does unless 'thinking' is true

# our extension fields per endpoint (refused with unknown_parameter under --openai-only)
CHAT_EXTENSIONS = ("top_k", "repetition_penalty", "thinking")
HOTWORDS = ("hotwords", "hotwords[]")  # ours: words the speech is likely to hold (a transcription's or a translation's)
TRANSCRIPTION_EXTENSIONS = HOTWORDS + ("dialect",)
SPEECH_INSTRUCTION_FIELDS = ("dialect", "emotion", "pitch", "volume", "style", "ip")
SPEECH_EXTENSIONS = ("task", "reference_audio", "reference_text", "instruct", "bgm", "music", "seed",
                     "max_seconds") + SPEECH_INSTRUCTION_FIELDS
IMAGE_EXTENSIONS = ("aspect", "steps", "guidance", "cfg_truncation", "cfg_normalization", "seed", "preview_every",
                    "negative_prompt", "preset", "mask_color")
# ours on edits and segmentations only: the reference picture's guidance (the Preview's image_cfg, spec §8.10)
IMAGE_REFERENCE_EXTENSIONS = ("image_guidance",)

CHAT = Fields(
    taken=("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "seed", "stop", "modalities", "audio", "n", "response_format", "frequency_penalty",
           "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "tools", "functions") + CHAT_EXTENSIONS,
    ignored=("user", "metadata", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
             "prompt_cache_options", "parallel_tool_calls"),
    refused={
        "tool_choice": (NO_TOOLS, lambda v: v in ("none", "auto")),
        "function_call": (NO_TOOLS, lambda v: v in ("none", "auto")),
        "reasoning_effort": ("there is no reasoning budget; the extension field 'thinking': true turns on the "
                             "model's detailed thinking; 'none' (no thinking, as by default) is accepted",
                             lambda v: v == NO_REASONING),
        "verbosity": ("there is no verbosity control", lambda v: False),
        "service_tier": ("there is one tier (one queue for every request); 'auto' and 'default' are accepted",
                         lambda v: v in ("auto", "default")),
        "store": ("nothing is stored (no stored completions); false is accepted", lambda v: v is False),
        "prediction": ("predicted outputs are not supported", lambda v: False),
        "web_search_options": ("this server does not search the web", lambda v: False),
        "moderation": ("this server runs no moderation model (no moderated completions)", lambda v: False),
    },
    types=TOOL_CHOICE_TYPES)

SPEECH = Fields(taken=("model", "input", "voice", "instructions", "response_format", "speed", "stream_format")
                + SPEECH_EXTENSIONS)

IMAGE_TAKEN = ("prompt", "model", "n", "size", "response_format", "output_format", "output_compression",
               "background", "stream", "partial_images", "quality") + IMAGE_EXTENSIONS
IMAGE_IGNORED = ("style", "moderation", "user", "safety_identifier", "input_fidelity",
                 "complexity")  # OpenAI's, no effect here (engine.server.images_api checks their values)
NO_ANIMATION = "GIF and SVG output are not made here (output_format png, jpeg or webp)"
IMAGE_REFUSED = {name: (NO_ANIMATION, lambda v: False) for name in ("frame_count", "frame_duration_ms", "svg")}
IMAGE_GENERATIONS = Fields(taken=IMAGE_TAKEN, ignored=IMAGE_IGNORED, refused={
    **IMAGE_REFUSED, "image_guidance": ("it guides an edit's reference picture and a generation has none (send it "
                                        "to /v1/images/edits)", lambda v: False)})
IMAGE_EDITS = Fields(taken=IMAGE_TAKEN + IMAGE_REFERENCE_EXTENSIONS + ("image", "images", "image[]", "mask"),
                     ignored=IMAGE_IGNORED,
                     refused={**IMAGE_REFUSED, "markup": ("a markup overlay is not read: describe the edit in the "
                                                          "prompt", lambda v: False)})

VOICES_JSON = Fields(taken=("name", "reference_audio", "reference_text", "replace"))
VOICES_FORM = Fields(taken=("name", "file", "reference_text", "replace"))

NO_TIMESTAMPS = ("the model gives no word timestamps; a recording over 30 s is transcribed in 30 s windows: "
                 "response_format verbose_json has a segment per window ('segment' granularity) and srt or vtt gives "
                 "a cue per window")
SEGMENT_GRANULARITY = "segment"  # the one timestamp granularity served: verbose_json's segments (a window each)
NO_DIARIZATION = "there is no diarization"
TRANSCRIPTION_KEYWORDS = ("keywords", "keywords[]")  # OpenAI's name for what our hotwords are
TRANSCRIPTION = Fields(
    taken=("file", "model", "prompt", "response_format", "temperature", "language", "stream", "max_tokens", "include",
           "include[]")
    + TRANSCRIPTION_KEYWORDS + TRANSCRIPTION_EXTENSIONS,
    ignored=("languages", "languages[]"),  # candidates: the model tells the language itself (`language` forces one)
    refused={name: (why, harmless) for names, why, harmless in (
        (("timestamp_granularities", "timestamp_granularities[]"), NO_TIMESTAMPS,
         lambda v: all(g == SEGMENT_GRANULARITY for g in (v if isinstance(v, list) else [v]))),
        (("chunking_strategy",), "a recording over 30 s is cut into 30 s windows at their quietest moments; only "
         "'auto' (that) is taken", lambda v: v == "auto"),
        (("known_speaker_names", "known_speaker_names[]", "known_speaker_references",
          "known_speaker_references[]"), NO_DIARIZATION, lambda v: False)) for name in names})
TRANSLATION = Fields(
    taken=("file", "model", "prompt", "response_format", "temperature", "max_tokens") + HOTWORDS,  # (ours: max_tokens,
    # hotwords)
    refused={"language": ("a translation is always into English and the model tells the spoken language itself "
                          "('language', the language of the audio, is a /v1/audio/transcriptions field)",
                          lambda v: False),
             "stream": ("a translation comes as a whole answer (a streamed transcript: /v1/audio/transcriptions)",
                        lambda v: str(v).lower() == "false")})

# realtime: the fields of each client event (besides type and event_id), of response.create's
# `response`, and of a conversation item
REALTIME_EVENTS: dict[str, tuple[str, ...]] = {
    "session.update": ("session",),
    "input_audio_buffer.append": ("audio", "sample_rate"),
    "input_audio_buffer.commit": (), "input_audio_buffer.clear": (),
    "input_video_buffer.append": ("image", "capture_time"),
    "input_video_buffer.commit": (), "input_video_buffer.clear": (),
    "conversation.item.create": ("item", "previous_item_id"),
    "conversation.item.delete": ("item_id",), "conversation.item.retrieve": ("item_id",),
    "conversation.item.truncate": ("item_id", "content_index", "audio_end_ms"),
    "response.create": ("response",),
    "response.cancel": ("response_id",),
}
REALTIME_RESPONSE = Fields(
    taken=("instructions", "max_output_tokens", "max_response_output_tokens", "output_modalities", "modalities",
           "audio", "conversation", "input", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop",
           "thinking", "metadata", "voice", "output_audio_format", "presence_penalty", "frequency_penalty",
           "logit_bias"),
    ignored=("object",),
    refused={"tools": (NO_TOOLS, lambda v: v == []), "tool_choice": (NO_TOOLS, lambda v: v in ("none", "auto")),
             "prompt": ("stored prompts are not supported", lambda v: False)},
    types={"tool_choice": TOOL_CHOICE_TYPES["tool_choice"]})
REALTIME_ITEM = Fields(taken=("type", "role", "content", "id"), ignored=("object", "status"))


def check_event_fields(event: dict) -> None:
    """A realtime client event naming a field its type does not have: unknown_parameter."""
    taken = REALTIME_EVENTS.get(event.get("type"), ())
    Fields(taken=("type", "event_id") + taken).check(event)


# --------------------------------------------------------------------------- model ids

_DATED = r"(-\d{4}-\d{2}-\d{2}|-\d{4})?"  # a snapshot: gpt-4o-2024-08-06, gpt-4-0613
OPENAI_MODELS: dict[str, tuple[str, ...]] = {  # OpenAI's model names a drop-in client sends, per endpoint kind
    "chat": ("gpt-3.5-turbo", "gpt-3.5-turbo-16k", "gpt-4", "gpt-4-32k", "gpt-4-turbo", "gpt-4-turbo-preview",
             "gpt-4-0125-preview", "gpt-4-1106-preview", "gpt-4-vision-preview", "gpt-4o", "gpt-4o-mini",
             "gpt-4o-audio-preview", "gpt-4o-mini-audio-preview", "gpt-4o-search-preview", "gpt-4o-mini-search-preview",
             "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o1", "o1-mini", "o1-preview", "o3", "o3-mini", "o4-mini",
             "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-5-chat-latest", "gpt-5.1", "gpt-5.1-mini", "gpt-5.1-codex",
             "gpt-5.1-chat-latest", "gpt-5.2", "gpt-5.2-pro", "gpt-5.2-chat-latest", "gpt-5.3-chat-latest", "gpt-5.4",
             "gpt-5.4-mini", "gpt-5.4-nano", "gpt-5.5", "gpt-5.6-sol", "gpt-5.6-terra", "gpt-5.6-luna", "gpt-6-sol",
             "gpt-6-luna", "gpt-6-astra", "gpt-6.1-sol", "gpt-6.1-terra", "gpt-audio", "gpt-audio-mini",
             "chatgpt-4o-latest", "codex-mini-latest"),
    "transcription": ("whisper-1", "gpt-transcribe", "gpt-4o-transcribe", "gpt-4o-mini-transcribe",
                      "gpt-4o-transcribe-diarize", "gpt-realtime-whisper"),
    "speech": ("tts-1", "tts-1-hd", "gpt-4o-mini-tts"),
    "image": ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2", "gpt-image-2.5-sunburst",
              "gpt-image-2.5-flare", "gpt-image-2.6-sunburst", "gpt-image-2.6-flare", "chatgpt-image-latest",
              "dall-e-2", "dall-e-3"),
    "realtime": ("gpt-realtime", "gpt-realtime-mini", "gpt-realtime-1.5", "gpt-realtime-2", "gpt-realtime-2.1",
                 "gpt-realtime-2.1-mini", "gpt-4o-realtime-preview", "gpt-4o-mini-realtime-preview"),
}
_ALIAS = {kind: re.compile("^(" + "|".join(map(re.escape, names)) + ")" + _DATED + "$")
          for kind, names in OPENAI_MODELS.items()}


def is_openai_alias(model: str, kind: str | None) -> bool:
    """True when `model` is one of OpenAI's models of this endpoint kind (any kind: None), or a dated
    snapshot of one (gpt-4o-2024-08-06)."""
    kinds = OPENAI_MODELS if kind is None else (kind,)
    return any(_ALIAS[k].match(model) for k in kinds)


def check_model(requested: Any, served: tuple[str, ...], model_id: str, kind: str | None) -> None:
    """Refuse a model id that is neither the served model (`served`: its id, path, "default") nor one
    of OpenAI's models of this endpoint's `kind`."""
    if requested is None:
        return
    if not isinstance(requested, str):
        raise ApiError("'model' must be a string", code="invalid_type", param="model")
    if requested in served or is_openai_alias(requested, kind):
        return
    names = OPENAI_MODELS[kind] if kind else sorted(n for v in OPENAI_MODELS.values() for n in v)
    listed = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
    raise ApiError(f"model {shown(requested)} is not served here: this server serves {model_id!r} (ask for it by "
                   f"that id, 'default', or one of OpenAI's names for this endpoint: {listed})",
                   code="model_not_found", status=404, param="model")
