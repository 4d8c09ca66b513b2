"""The multimodal processor: chat messages with text, image, video and audio parts become the
exact prompt string and token ids the reference processor builds (spec §6), plus the media
tensors for the encoders and the audio spans for the MultiRouter.

Rendering (spec §6.2): content parts are concatenated without separators; an image part expands
to `<image>` + `<imagePatch>`×n + `</image>\\n` (a list of images is joined by `\\n`); a 2.0 video to
`<video>` + per temporal patch `<{t:.1f} seconds><image><framePatch>…</image>` + `</video>`; a
Preview video to `<video><framePatch>…</video>\\n`; an audio clip to `<audio>` + `<audioPatch>`×T₃ +
`</audio>` (a list joined by `\\n`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from engine.models.thinker.config import ConfigError, MingConfig, sub_config_errors
from engine.media.audio import AudioFeatures, AudioFrontendConfig, TimeConv, pack_audio_features, prepare_audio
from engine.media.errors import MediaError
from engine.media.image import FETCH_OPTION_KEYS, ImageInputs, ImageProcessorConfig, prepare_image
from engine.media.sources import local_source
from engine.media.video import (VideoInputs, VideoOptions, WebcamClip, prepare_video, prepare_video_preview,
                                video_prompt_text)
from engine.models.thinker.vision import VisionConfig
from engine.models.thinker.prompt import DEFAULT_SYSTEM_PROMPT, ROLE_NAMES, THINKING_SUFFIX, PromptError
from engine.models.thinker.tokenizer import (AUDIO_END, AUDIO_PATCH, AUDIO_START, IMAGE_END, IMAGE_PATCH, IMAGE_START, ROLE_END_TAG,
                              ROLE_START, TURN_END, MingTokenizer)

TEXT_TYPES = ("text", "input_text")
IMAGE_TYPES = ("image", "input_image", "image_url")
VIDEO_TYPES = ("video", "input_video")
AUDIO_TYPES = ("audio", "input_audio")
# Read by the Preview's video reader (a time range), not implemented here: refused rather than ignored.
PREVIEW_UNSUPPORTED_VIDEO_KEYS = ("video_start", "video_end")


@dataclass
class MediaSettings:
    """Processor settings of a checkpoint: image processor, audio front end, video layout."""

    image: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)
    audio: AudioFrontendConfig = field(default_factory=AudioFrontendConfig)
    interleaved_video: bool = True

    @classmethod
    def for_checkpoint(cls, root: str | Path, cfg: MingConfig, settings: dict | None = None) -> "MediaSettings":
        """From the checkpoint's `preprocessor_config.json` (or `settings`, the same keys, when given).
        Without either, the release's shipped values, except what the model itself fixes: the ViT's
        patch, temporal patch and merge sizes (`vision_config`) and Whisper's mel bins (`audio_config`),
        so the processor always makes the rows the encoders take."""
        path = Path(root) / "preprocessor_config.json"
        release = "preview" if cfg.release == "preview" else "2.0"
        source = str(path) if settings is None else "the processor settings"
        if settings is None:
            try:
                settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: invalid JSON ({e})") from e
            if not isinstance(settings, dict):
                raise ConfigError(f"{path}: top level must be a JSON object")
        data = dict(settings) if settings else _settings_from_model(cfg, ImageProcessorConfig.for_release(release))
        whisper = (cfg.audio.get("whisper_encoder_config") or {}) if cfg.audio else {}
        with sub_config_errors(str(path.parent), path.name):  # a key of the wrong type, named with the file
            image = ImageProcessorConfig.from_dict(data, release=release)
            audio = AudioFrontendConfig.from_dict(data, n_ctx=whisper.get("n_ctx"), projector=_projector_conv(cfg))
        _check_fits_the_encoders(image, audio, cfg, source)
        return cls(image=image, audio=audio, interleaved_video=cfg.llm.use_interleaved_frame_timestamp)


def _check_fits_the_encoders(image: ImageProcessorConfig, audio: AudioFrontendConfig, cfg: MingConfig,
                             source: str) -> None:
    """The processor's sizes that the model's encoders fix (the ViT's patch, temporal patch and merge sizes, Whisper's
    mel bins) must be the ones config.json builds them with: otherwise every picture or clip would be cut into rows
    the encoder cannot take, a crash at the first chat that sends one. ConfigError naming both values."""
    whisper = (cfg.audio.get("whisper_encoder_config") or {}) if cfg.audio else {}
    with sub_config_errors(cfg.source or "config.json", "vision_config"):
        vit = VisionConfig.from_dict(cfg.vision) if cfg.vision else None
    pairs = [("whisper_frontend_args.n_mels", audio.n_mels, "audio_config.whisper_encoder_config.n_mels",
              whisper.get("n_mels", audio.n_mels))]
    if vit is not None:
        pairs += [("patch_size", image.patch_size, "vision_config.patch_size", vit.patch_size),
                  ("temporal_patch_size", image.temporal_patch_size, "vision_config.temporal_patch_size",
                   vit.temporal_patch_size),
                  ("merge_size", image.merge_size, "vision_config.spatial_merge_size", vit.spatial_merge_size)]
    bad = [f"{key} {ours} where config.json's {model_key} is {theirs}" for key, ours, model_key, theirs in pairs
           if int(ours) != int(theirs)]
    if bad:
        raise ConfigError(f"{source}: {'; '.join(bad)}: the processor would cut pictures and sound into rows the "
                          "encoders do not take; give the preprocessor_config.json made with this checkpoint")


def _projector_conv(cfg: MingConfig) -> TimeConv:
    """The audio projector's conv as the model builds it (`audio_config.ds_kernel_size` / `ds_stride`, the encoder
    config's defaults when omitted): it fixes each clip's `<audioPatch>` count (spec §5.4)."""
    audio, shipped = cfg.audio or {}, TimeConv()
    return TimeConv(int(audio.get("ds_kernel_size", shipped.kernel_size)), int(audio.get("ds_stride", shipped.stride)))


def _settings_from_model(cfg: MingConfig, shipped: ImageProcessorConfig) -> dict:
    """preprocessor_config.json keys for a checkpoint without that file: the release's shipped values with
    the sizes the model's encoders fix."""
    whisper = (cfg.audio.get("whisper_encoder_config") or {}) if cfg.audio else {}
    # the sizes the ViT itself is built with (its config class's defaults for keys the file omits)
    vit = VisionConfig.from_dict(cfg.vision) if cfg.vision else None
    data: dict[str, Any] = {
        "patch_size": vit.patch_size if vit else shipped.patch_size,
        "temporal_patch_size": vit.temporal_patch_size if vit else shipped.temporal_patch_size,
        "merge_size": vit.spatial_merge_size if vit else shipped.merge_size,
        "min_pixels": shipped.min_pixels, "max_pixels": shipped.max_pixels,
        "image_mean": list(shipped.image_mean), "image_std": list(shipped.image_std),
    }
    if "n_mels" in whisper:
        data["whisper_frontend_args"] = {"n_mels": int(whisper["n_mels"])}
    return data


@dataclass
class ProcessedPrompt:
    """Everything one prefill needs."""

    text: str
    ids: list[int]
    images: list[ImageInputs] = field(default_factory=list)
    videos: list[VideoInputs] = field(default_factory=list)
    audios: list[AudioFeatures] = field(default_factory=list)
    audio_spans: list[tuple[int, int]] = field(default_factory=list)  # (first <audioPatch> index, count)

    @property
    def image_grid_thw(self) -> torch.Tensor | None:
        return torch.cat([i.grid_thw for i in self.images]) if self.images else None

    @property
    def video_grid_thw(self) -> torch.Tensor | None:
        return torch.cat([v.grid_thw for v in self.videos]) if self.videos else None

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return torch.cat([i.pixel_values for i in self.images]) if self.images else None

    @property
    def pixel_values_videos(self) -> torch.Tensor | None:
        return torch.cat([v.pixel_values for v in self.videos]) if self.videos else None

    @property
    def image_tokens(self) -> int:
        """The prompt's image and video patch tokens (those the vision encoder's rows fill)."""
        return sum(sum(i.num_tokens) for i in self.images) + sum(v.num_tokens for v in self.videos)

    @property
    def media_items(self) -> int:
        return len(self.images) + len(self.videos) + len(self.audios)

    @property
    def media_tokens(self) -> int:
        """Tokens of the pictures, videos and audio clips read so far (known before the prompt is tokenised)."""
        return self.image_tokens + sum(a.n_tokens for a in self.audios)

    @property
    def audio_tokens(self) -> int:
        """The prompt's audio tokens (those the audio encoder's rows fill)."""
        return sum(n for _, n in self.audio_spans)

    def packed_audio(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.audios:
            return None
        feats, lengths, _ = pack_audio_features(self.audios)
        return feats, lengths


class MediaPastContext(PromptError):
    """The prompt's media alone take more tokens than the model's context leaves for a prompt: refused as soon as
    the media read so far pass it, before the rest is decoded and resized (each picture's pixels take up to
    hundreds of MB until the ViT reads them)."""

    code = "context_length_exceeded"

    def __init__(self, prompt: "ProcessedPrompt", max_prompt_tokens: int):
        super().__init__(f"the prompt's pictures, videos and audio take {prompt.media_tokens:,} tokens with "
                         f"{prompt.media_items} of them read, more than the {max_prompt_tokens:,} tokens the model's "
                         "context leaves for a prompt: send fewer or smaller ones (a picture's tokens grow with its "
                         "pixels)")


def check_media_budget(prompt: "ProcessedPrompt", max_prompt_tokens: int | None) -> None:
    """MediaPastContext when the media read so far already pass `max_prompt_tokens` (None: no bound)."""
    if max_prompt_tokens is not None and prompt.media_tokens > max_prompt_tokens:
        raise MediaPastContext(prompt, max_prompt_tokens)


def image_prompt_text(n_tokens: int) -> str:
    """Expansion of one image placeholder (spec §6.2): `<image>` + `<imagePatch>`×n + `</image>` + newline."""
    return IMAGE_START + IMAGE_PATCH * n_tokens + IMAGE_END + "\n"


def _content_parts(content: Any) -> list:
    """A message's content as a list of parts: a string is one text part, a single part dict is itself,
    None is empty; anything else (a number, a part that is neither text nor a dict) is a PromptError."""
    if content is None:
        return []
    if isinstance(content, (str, dict)):
        return [content]
    if not isinstance(content, list):
        raise PromptError(f"message content must be a string or a list of parts, not {type(content).__name__}")
    bad = [type(part).__name__ for part in content if not isinstance(part, (str, dict))]
    if bad:
        raise PromptError(f"content parts must be strings or objects with a 'type', not {bad[0]}")
    return content


def _part_text(part: dict) -> str:
    """A text part's text: a string (left out: empty); anything else (None, a number) is a PromptError
    rather than its repr spoken to the model ("None")."""
    text = part.get("text", "")
    if not isinstance(text, str):
        raise PromptError(f"a text part's 'text' must be a string, not {type(text).__name__}")
    return text


def _system_text(content: Any) -> str:
    """A system message's text: a string, or a list of text parts (joined as a user turn's are).
    The reference's system prompt is text only (spec §6.1), so media there are refused."""
    texts = []
    for part in _content_parts(content):
        if isinstance(part, str):
            texts.append(part)
        elif part.get("type") in TEXT_TYPES:
            texts.append(_part_text(part))
        else:
            raise PromptError(f"a system message holds text only, not '{part.get('type')}'")
    return "".join(texts)


def _part_source(part: dict, medium: str) -> Any:
    """A media part's source: under its type's key, else `medium` ("image"), else `medium`_url, as the
    reference's fetch_* read an element; an ``{"url": ...}`` object (OpenAI's image_url, upstream's
    process_vision_info) stands for its url."""
    kind = part.get("type")
    key = next((k for k in (kind, medium, f"{medium}_url") if k in part), medium)
    value = part.get(key)
    return value["url"] if isinstance(value, dict) and "url" in value else value


def _as_list(value: Any) -> list:
    """A list means several items; a tuple is one item (e.g. `(samples, sample_rate)`)."""
    return list(value) if isinstance(value, list) else [value]


class MingProcessor:
    def __init__(self, tokenizer: MingTokenizer, settings: MediaSettings):
        self.tokenizer = tokenizer
        self.settings = settings

    # ---------------------------------------------------------------- media parts
    def _image(self, source: Any, options: dict) -> ImageInputs:
        if isinstance(source, ImageInputs):
            return source
        return prepare_image(local_source(source, "image"), self.settings.image, **options)

    def _video(self, part: dict, source: Any) -> VideoInputs:
        """A video part; its other keys are the message's video options (`VideoOptions`)."""
        if isinstance(source, VideoInputs):
            return source
        source = local_source(source, "video")
        options = VideoOptions.from_message(part)
        if not self.settings.interleaved_video:  # Preview: its own sampler, one (t, h, w) grid, no timestamps
            is_file = isinstance(source, (bytes, bytearray, memoryview)) or (
                isinstance(source, (str, os.PathLike)) and not Path(source).is_dir())
            clipped = [k for k in PREVIEW_UNSUPPORTED_VIDEO_KEYS if part.get(k) is not None] if is_file else []
            if clipped:  # the Preview's file reader takes only that time range; ours would read the whole clip
                raise MediaError(f"video option(s) {', '.join(clipped)} (a time range of the clip) are not supported "
                                 "for the Preview release; cut the clip before sending it")
            if isinstance(source, WebcamClip):
                source = list(source.sample().frames)
            return prepare_video_preview(source, self.settings.image, options=options)
        if isinstance(source, WebcamClip):
            return source.to_video_inputs(self.settings.image)
        return prepare_video(source, image_config=self.settings.image, options=options)

    def _audio(self, part: dict, source: Any) -> AudioFeatures:
        if isinstance(source, AudioFeatures):  # counted with this checkpoint's projector conv
            return replace(source, projector=self.settings.audio.projector)
        return prepare_audio(local_source(source, "audio"), part.get("sample_rate"), self.settings.audio)

    def _render_part(self, part: dict | str, out: ProcessedPrompt,
                     max_prompt_tokens: int | None = None) -> list[tuple[str, bool]]:
        """One content part -> (text, is_template) pieces; media is processed and recorded, and refused
        (MediaPastContext) as soon as it passes `max_prompt_tokens`."""
        if isinstance(part, str):
            return [(part, False)]
        kind = part.get("type")
        if kind in TEXT_TYPES:
            return [(_part_text(part), False)]
        if kind in IMAGE_TYPES:
            pieces: list[tuple[str, bool]] = []
            sources = _part_source(part, "image")
            # the reference's fetch_image reads a single image's element keys; a list's images get none
            options = {} if isinstance(sources, list) else {k: part[k] for k in FETCH_OPTION_KEYS if k in part}
            for i, src in enumerate(_as_list(sources)):
                check_media_budget(out, max_prompt_tokens)  # (a list's next picture: not read once past it)
                img = self._image(src, options)
                out.images.append(img)
                n = sum(img.num_tokens)
                pieces.append((("\n" if i else "") + image_prompt_text(n), True))
            return pieces
        if kind in VIDEO_TYPES:
            vid = self._video(part, _part_source(part, "video"))
            out.videos.append(vid)
            return [(video_prompt_text(vid.patch_timestamps, vid.grid_thw, self.settings.image.merge_size,
                                       interleaved=self.settings.interleaved_video), True)]
        if kind in AUDIO_TYPES:
            pieces = []
            for i, src in enumerate(_as_list(_part_source(part, "audio"))):
                feats = self._audio(part, src)
                out.audios.append(feats)
                pieces.append((("\n" if i else "") + AUDIO_START + AUDIO_PATCH * feats.n_tokens + AUDIO_END, True))
            return pieces
        raise PromptError(f"unknown content part type '{kind}'")

    # ---------------------------------------------------------------- prompts
    def build(self, messages: list[dict], system_prompt: str | None = None, thinking: bool = False,
              assistant_prefix: str | None = None, check: Callable[[], None] | None = None,
              max_prompt_tokens: int | None = None) -> ProcessedPrompt:
        """Messages [{"role": "user"|"assistant"|"system", "content": str | [parts]}] -> prompt.

        `assistant_prefix` (e.g. "上海\\t" for dialect-forced ASR) is appended after the final
        `<role>ASSISTANT</role>`, tokenised on its own (spec §6.3). `check` is called before each content part
        (decoding and resizing a big picture or a long video takes seconds; it may raise to stop).
        `max_prompt_tokens`: what the model's context leaves for the prompt; media passing it is refused
        (MediaPastContext) before the rest is read."""
        out = ProcessedPrompt(text="", ids=[])
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLE_NAMES:
                raise PromptError(f"bad message {m!r}: needs a role of user, assistant or system")
        system_texts = [_system_text(m.get("content", "")) for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if not turns:
            raise PromptError("no user message")
        if ROLE_NAMES[turns[-1]["role"]] != "HUMAN":
            raise PromptError("the last message must come from the user")
        # a system message replaces the default sentence even when empty, as the reference's sys_prompt_exp=""
        system = system_prompt if system_prompt is not None else (
            "\n".join(system_texts) if system_texts else DEFAULT_SYSTEM_PROMPT)
        pieces: list[tuple[str, bool]] = [(f"{ROLE_START}SYSTEM{ROLE_END_TAG}", True), (system, False),
                                          (THINKING_SUFFIX.format("on" if thinking else "off") + TURN_END, True)]
        for m in turns:
            pieces.append((f"{ROLE_START}{ROLE_NAMES[m['role']]}{ROLE_END_TAG}", True))
            for part in _content_parts(m.get("content")):
                if check is not None:
                    check()
                pieces += self._render_part(part, out, max_prompt_tokens)
                check_media_budget(out, max_prompt_tokens)
            pieces.append((TURN_END, True))
        pieces.append((f"{ROLE_START}ASSISTANT{ROLE_END_TAG}", True))
        if assistant_prefix:
            pieces.append((assistant_prefix, False))
        out.text = "".join(t for t, _ in pieces)
        try:  # a lone UTF-16 surrogate (JSON's "\\ud800", a JS string cut mid-pair) is no character to tokenise
            out.text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(f"the text holds a lone surrogate {out.text[e.start]!r} (half of a UTF-16 pair), "
                              "which is not a character") from None
        out.ids = self.tokenizer.encode_pieces(pieces)
        out.audio_spans = self._audio_spans(out.ids, out.audios)
        return out

    def _audio_spans(self, ids: list[int], audios: list[AudioFeatures]) -> list[tuple[int, int]]:
        start_id = self.tokenizer.token_id(AUDIO_START)
        starts = [i + 1 for i, t in enumerate(ids) if t == start_id]
        if len(starts) != len(audios):
            raise MediaError(f"{len(starts)} <audio> markers for {len(audios)} audio clips")
        return [(s, a.n_tokens) for s, a in zip(starts, audios)]
