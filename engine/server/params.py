"""OpenAI-style generation fields -> GenerationParams, type-checked, within the server's limits; and
the output modalities a request may ask of the loaded engine.

Field names accepted for the token limit (two that disagree are refused): max_completion_tokens,
max_tokens, max_output_tokens, max_response_output_tokens (realtime; "inf" = the server's cap). A limit
the request names must fit the context with the prompt; none (the server's default) or "inf" is a
ceiling that stops at the context's end (GenerationParams.fit_context);
temperature (absent = 0, greedy), top_p, seed, stop (string or list), presence_penalty and frequency_penalty
(OpenAI's, in [-2, 2]), and the extensions top_k and repetition_penalty.
"""

from __future__ import annotations

from typing import Any

from engine.sampling import MAX_LOGIT_BIAS, MAX_OPENAI_PENALTY, GenerationParams
from engine.server.codec import bad, check_keys, need_dict, need_number, need_str, shown, shown_number
from engine.server.limits import Limits
from engine.server.protocol import ApiError

TOKEN_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens", "max_response_output_tokens")
OPENAI_PENALTIES = ("presence_penalty", "frequency_penalty")
OUTPUT_MODALITIES = ("text", "audio", "image")
IMAGE_ENDPOINTS = "POST /v1/images/generations or /v1/images/edits"
TRANSCRIPTION_MAX_TOKENS = 512  # a transcription's token limit when the request sets none


def check_output_modalities(value: Any, name: str, engine) -> list[str]:
    """A non-empty list of "text" and "audio" (when the engine has a talker), each named once; anything the engine
    cannot give is refused with modality_not_supported, and so is "image": chat and realtime responses
    never draw (images come from the image endpoints)."""
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        raise bad(f"'{name}' must be a non-empty list of strings such as [\"text\"]", "invalid_type", name)
    if len(set(value)) < len(value):  # (["text", "text"] was taken as ["text"])
        raise bad(f"'{name}' names a modality twice: {shown(value)}; name each once, e.g. [\"text\", \"audio\"]",
                  "invalid_value", name)
    for m in value:
        if m not in OUTPUT_MODALITIES:
            raise bad(f"'{name}': unknown modality {shown(m)} (known: {', '.join(OUTPUT_MODALITIES)})", "invalid_value",
                      name)
        if m == "image":
            raise ApiError(f"chat and realtime responses do not draw images: use {IMAGE_ENDPOINTS}; ask for "
                           "[\"text\"] or [\"text\", \"audio\"]", code="modality_not_supported", param=name)
        if m == "audio" and not getattr(engine, "has_talker", False):
            why = getattr(engine, "talker_error", None) or "the loaded model has no talker"
            raise ApiError(f"audio output is not supported by this engine ({why}); ask for [\"text\"]",
                           code="modality_not_supported", param=name)
    return list(value)


DEFAULT_VOICE = "default"  # names the talker's own voice (as leaving the voice out does)
# OpenAI's built-in voices, which its SDK's speech call must name: the talker's own voice, unless one is saved so
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
MAX_VOICE_NAME_CHARS = 64  # engine.models.talker.voices.MAX_NAME_CHARS (not imported: the talker loads torch)


def voice_name(value: Any, field: str, engine=None) -> str:
    """A voice a request names: DEFAULT_VOICE, or a name the voice library can hold
    (engine.models.talker.voices.check_name: never a path), else a 400 naming `field`. With `engine`
    (where a voice is used, not where one is saved), a voice its talker has not saved is refused too:
    voice_not_found listing the saved ones (a voice deleted after it was set fails the response), except one of
    OPENAI_VOICES, which is then DEFAULT_VOICE. OpenAI's custom voice object, {"id": name}, names a voice too."""
    if isinstance(value, dict):
        check_keys(value, field, ("id",))
        value, field = value.get("id"), f"{field}.id"
    need_str(value, field)
    if value == DEFAULT_VOICE:
        return value
    if len(value) > MAX_VOICE_NAME_CHARS:
        raise bad(f"'{field}' is too long: {len(value):,} characters, at most {MAX_VOICE_NAME_CHARS}", "invalid_value",
                  field)
    from engine.models.talker.voices import VoiceError, check_name  # noqa: PLC0415

    try:
        check_name(value)
        if getattr(engine, "has_talker", False):
            engine.voices.check_saved(value)
    except VoiceError as e:
        if e.code == "voice_not_found" and value in OPENAI_VOICES:
            return DEFAULT_VOICE
        raise bad(str(e), e.code if e.code == "voice_not_found" else "invalid_value", field) from None
    return value


def output_kwargs(modalities: list[str], voice: str | None) -> dict:
    """What engine.chat is told about the outputs beyond text: nothing for a text-only response,
    else `modalities` and `voice` (a saved voice's name; None for the talker's own voice)."""
    if modalities == ["text"]:
        return {}
    return {"modalities": list(modalities), "voice": None if voice == DEFAULT_VOICE else voice}


def max_tokens_from(body: dict, limits: Limits, default: int | None = None, where: str = "",
                    inf_ok: bool = False) -> int:
    """The token limit a request asks for under any of TOKEN_FIELDS; two of them that disagree are
    refused (which one was meant cannot be told). `where`: the fields' path in errors ("session.");
    `inf_ok`: "inf" names the server's cap (OpenAI's realtime fields take it, HTTP bodies do not)."""
    given = {}
    for field in TOKEN_FIELDS:
        value = body.get(field)
        name = where + field
        if value is not None:
            given[name] = limits.max_new_tokens if inf_ok and value == "inf" else need_integer(value, name)
    if len(set(given.values())) > 1:
        names = list(given)
        values = ", ".join(shown_number(given[n]) for n in names)
        raise bad(f"{' and '.join(repr(n) for n in names)} disagree ({values}): "
                  "they name the same limit, give one of them", "invalid_value", names[0])
    for name, n in given.items():
        if n > limits.max_new_tokens:
            raise bad(f"'{name}' is {shown_number(n)}; this server allows at most {limits.max_new_tokens}",
                      "max_tokens_exceeded", name)
    return next(iter(given.values()), default if default is not None else limits.default_max_tokens)


def need_integer(value: Any, name: str) -> int:
    """A token count of at least 1, as an int (an int kept as it is: a LongInteger, engine.server.text, keeps the
    text the client wrote for the error that refuses it)."""
    number = need_number(value, name, 1, None, integer=True)
    return number if isinstance(number, int) else int(number)


def generation_params(body: dict, limits: Limits, base: GenerationParams | None = None,
                      where: str = "", inf_ok: bool = False) -> GenerationParams:
    """`base` holds session defaults (realtime); fields present in `body` override them. `where`: the fields'
    path in errors ("session.", "response."; HTTP bodies: none); `inf_ok`: a token limit may be "inf"."""
    base = base or GenerationParams(max_new_tokens=limits.default_max_tokens, fit_context=True)
    # a limit the request names is kept (or refused when the prompt leaves less room); the server's default
    # and realtime's "inf" are ceilings nobody asked for, cut to the context's room (finish_reason "length")
    named = [body[f] for f in TOKEN_FIELDS if body.get(f) is not None]
    p = GenerationParams(max_new_tokens=max_tokens_from(body, limits, base.max_new_tokens, where, inf_ok),
                         temperature=base.temperature, top_p=base.top_p, top_k=base.top_k,
                         repetition_penalty=base.repetition_penalty, presence_penalty=base.presence_penalty,
                         frequency_penalty=base.frequency_penalty, seed=base.seed, stop=list(base.stop),
                         fit_context=all(inf_ok and v == "inf" for v in named) if named else base.fit_context)
    if body.get("temperature") is not None:
        p.temperature = float(need_number(body["temperature"], where + "temperature", 0, 2))
    if body.get("top_p") is not None:
        p.top_p = float(need_number(body["top_p"], where + "top_p", 0, 1))  # (0: the most likely token only)
    if body.get("top_k") is not None:
        p.top_k = int(need_number(body["top_k"], where + "top_k", 0, 1_000_000, integer=True))
    if body.get("repetition_penalty") is not None:
        p.repetition_penalty = float(need_number(body["repetition_penalty"], where + "repetition_penalty", 0.01, 10))
    if body.get("seed") is not None:
        p.seed = int(need_number(body["seed"], where + "seed", -(2 ** 63), 2 ** 63 - 1, integer=True))
    if body.get("stop") is not None:
        stop = body["stop"]
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > limits.max_stop_strings:  # (a number is of the wrong type)
            raise bad(f"'{where}stop' must be a string or a list of at most {limits.max_stop_strings} strings",
                      "invalid_value" if isinstance(stops, list) else "invalid_type", where + "stop")
        p.stop = [need_str(s, where + "stop", allow_empty=False) for s in stops]
    for name in OPENAI_PENALTIES:
        if body.get(name) is not None:
            setattr(p, name, float(need_number(body[name], where + name, -MAX_OPENAI_PENALTY, MAX_OPENAI_PENALTY)))
    try:
        return p.validate()
    except ValueError as e:
        raise bad(str(e), "invalid_value") from None


MAX_LOGIT_BIAS_TOKENS = 1024  # the most tokens one logit_bias may name (a bound on the body's work, no more)
MAX_TOKEN_ID_DIGITS = 12  # a longer token id is past any vocabulary (and int() of thousands of digits is refused)


def vocab_size(engine) -> int | None:
    """The loaded model's tokens (those the tokenizer and the output head both have), None when not known."""
    try:
        return min(int(engine.tokenizer.vocab_size), int(engine.model.config.llm.vocab_size))
    except (AttributeError, TypeError, ValueError):
        return None


def logit_bias(value: Any, vocab_size: int | None, name: str = "logit_bias") -> dict[int, float]:
    """OpenAI's `logit_bias`: {"token id": bias in [-100, 100]} -> {id: bias}; an id that is not a number, or not
    one of this model's tokens (`vocab_size`: the tokenizer's, when known), is refused naming the field (`name`)."""
    if value is None:
        return {}
    value = need_dict(value, name)
    if len(value) > MAX_LOGIT_BIAS_TOKENS:
        raise bad(f"'{name}' names {len(value):,} tokens; at most {MAX_LOGIT_BIAS_TOKENS}", "invalid_value", name)
    out = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()) or len(key) > MAX_TOKEN_ID_DIGITS:
            raise bad(f"'{name}' keys are token ids such as \"1234\", got {shown(key)}", "invalid_value", name)
        token = int(key)
        if vocab_size is not None and token >= vocab_size:
            raise bad(f"'{name}' names token {token}; this model's tokens are 0 to {vocab_size - 1}", "invalid_value",
                      name)
        out[token] = float(need_number(bias, f"{name}.{key}", -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS))
    return out


MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's metadata limits


def check_metadata(value: Any, name: str) -> dict | None:
    """A `metadata` field (chat's, realtime response.create's), as OpenAI's `Metadata`: at most 16 string keys
    (64 characters) to string values (512)."""
    if value is None:
        return None
    value = need_dict(value, name)
    if len(value) > MAX_METADATA_KEYS:
        raise bad(f"'{name}' has {len(value)} keys; at most {MAX_METADATA_KEYS}", "invalid_value", name)
    for key, v in value.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise bad(f"'{name}' keys are at most {MAX_METADATA_KEY_CHARS} characters", "invalid_value", name)
        need_str(v, f"{name}.{key[:MAX_METADATA_KEY_CHARS]}")
        if len(v) > MAX_METADATA_VALUE_CHARS:
            raise bad(f"'{name}.{key}' is {len(v)} characters; at most {MAX_METADATA_VALUE_CHARS}", "invalid_value",
                      f"{name}.{key}")
    return dict(value)


def flag(body: dict, name: str, default: bool = False) -> bool:
    value: Any = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {type(value).__name__}", "invalid_type", name)
    return value


def transcription_tag(value: str | None, name: str) -> str | None:
    """A transcription `language` / `dialect` field (None or "" = not given), refused when it cannot be
    a tag (the model's tag ends at a tab: engine.models.thinker.asr); an ISO 639-1 code is mapped to the
    model's tag for it ("zh" -> "Chinese", "en-US" -> "English"), one it has none for is refused (a dialect, and
    any other tag, is given as the model names it: "上海")."""
    if not value:
        return None
    if any(c in value for c in "\t\n\r"):
        raise bad(f"'{name}' is a language or dialect tag such as 'en', 'Chinese' or '上海': it cannot "
                  f"hold a tab or a line break, got {shown(value)}", "invalid_value", name)
    from engine.models.thinker.asr import iso_language  # noqa: PLC0415

    try:
        return iso_language(value) or value
    except KeyError:
        raise bad(f"'{name}' {shown(value)} is not an ISO 639-1 code the model has a language for; give one such as "
                  "'en', 'zh' or 'ja', or the model's own tag ('Chinese', '上海')", "invalid_value", name) from None
