"""The chat prompt against the spec's §6.1 / §6.2 / §5.4 written out plainly here (sharing no code with the
engine): the system part with its thinking suffix, each turn's parts concatenated without separators, every
placeholder's expansion (an image's trailing newline, a list's newline joins, the 2.0 video's timestamped
frames and the Preview's single run, audio with no newline), the final assistant prefix, the ids of the whole
string tokenised in one pass, and each clip's audio span. Every mix of parts: text, several images, an image
list, video, audio lists, a system prompt, several turns with assistant replies, a forced-language prefix."""

from __future__ import annotations

import re

import numpy as np
import pytest

from engine.media.image import ImageProcessorConfig
from engine.models.thinker.processor import MediaSettings, MingProcessor
from tests.tiny_tokenizer import tiny_tokenizer

DEFAULT_SYSTEM = "你是一个友好的AI助手。"
SPECIALS = ("<|role_end|>", "<role>", "</role>", "<imagePatch>", "<image>", "</image>", "<video>", "</video>",
            "<framePatch>", "<audioPatch>", "<audio>", "</audio>")
HOP = 160


# --------------------------------------------------------------------------- the spec's rendering


def image_text(tokens: int) -> str:
    return "<image>" + "<imagePatch>" * tokens + "</image>\n"


def audio_text(tokens: int) -> str:
    return "<audio>" + "<audioPatch>" * tokens + "</audio>"


def video_text_2_0(pair_stamps: list[float], tokens_per_pair: int) -> str:
    return "<video>" + "".join(f"<{ts:.1f} seconds><image>" + "<framePatch>" * tokens_per_pair + "</image>"
                               for ts in pair_stamps) + "</video>"


def video_text_preview(tokens: int) -> str:
    return "<video>" + "<framePatch>" * tokens + "</video>\n"


def audio_tokens(n_samples: int) -> int:
    t2 = (n_samples // HOP - 1) // 2 + 1
    return (t2 - 1) // 2 + 1


def chat(turns: list[tuple[str, str]], system: str = DEFAULT_SYSTEM, thinking: str = "off", prefix: str = "") -> str:
    """turns: (HUMAN | ASSISTANT, rendered content)."""
    body = "".join(f"<role>{role}</role>{content}<|role_end|>" for role, content in turns)
    return (f"<role>SYSTEM</role>{system}\n\ndetailed thinking {thinking}<|role_end|>" + body
            + "<role>ASSISTANT</role>" + prefix)


def one_pass_ids(text: str, tok) -> list[int]:
    """Specials by their ids, every other run by its bytes (the tiny tokenizer is byte-level with no merges)."""
    ids: list[int] = []
    pattern = "(" + "|".join(re.escape(s) for s in SPECIALS) + ")"
    for k, piece in enumerate(re.split(pattern, text)):
        ids += [tok.token_id(piece)] if k % 2 else list(piece.encode("utf-8"))
    return ids


def spec_audio_spans(ids: list[int], tok, clip_tokens: list[int]) -> list[tuple[int, int]]:
    starts = [i + 1 for i, t in enumerate(ids) if t == tok.token_id("<audio>")]
    return list(zip(starts, clip_tokens))


# --------------------------------------------------------------------------- media


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _clip(n: int, seed: int) -> tuple[np.ndarray, int]:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32), 16000


# 2.0 pictures already multiples of 32 within the pixel bounds: both resize stages keep them (§4.1)
IMG_A, IMG_B, IMG_C = _picture(64, 64, 1), _picture(64, 96, 2), _picture(96, 64, 3)
TOKENS_A, TOKENS_B, TOKENS_C = 4, 6, 6
CLIP_1, CLIP_2 = _clip(1600, 4), _clip(4001, 5)
# four frames taken at 2 fps (the frame-list default): pairs at 0.25 s and 1.25 s, printed "0.2" and "1.2"
FRAMES = [_picture(32, 48, 10 + i) for i in range(4)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def v2(tok):
    return MingProcessor(tok, MediaSettings())


@pytest.fixture(scope="module")
def preview(tok):
    return MingProcessor(tok, MediaSettings(image=ImageProcessorConfig.for_release("preview"), interleaved_video=False))


def _check(out, expected_text: str, tok, clip_tokens: list[int] = ()) -> None:
    assert out.text == expected_text
    assert out.ids == one_pass_ids(expected_text, tok)
    assert out.audio_spans == spec_audio_spans(out.ids, tok, list(clip_tokens))
    for start, count in out.audio_spans:
        assert set(out.ids[start:start + count]) == {tok.token_id("<audioPatch>")}


def _user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def test_text_only_with_the_default_system_sentence(v2, tok):
    out = v2.build([_user(_text("Describe a lighthouse."))])
    _check(out, chat([("HUMAN", "Describe a lighthouse.")]), tok)


def test_custom_system_prompt_keeps_the_thinking_suffix_and_thinking_on(v2, tok):
    out = v2.build([_user(_text("hi"))], system_prompt="Answer briefly.", thinking=True)
    _check(out, chat([("HUMAN", "hi")], system="Answer briefly.", thinking="on"), tok)
    out = v2.build([{"role": "system", "content": "Be terse."}, _user(_text("hi"))])
    _check(out, chat([("HUMAN", "hi")], system="Be terse."), tok)


def test_two_image_parts_and_text_around_them(v2, tok):
    out = v2.build([_user(_text("Compare "), {"type": "image", "image": IMG_A}, {"type": "image", "image": IMG_B},
                          _text("please."))])
    _check(out, chat([("HUMAN", "Compare " + image_text(TOKENS_A) + image_text(TOKENS_B) + "please.")]), tok)
    assert "</image>\n<image>" in out.text
    assert [g.tolist() for g in out.image_grid_thw] == [[1, 4, 4], [1, 4, 6]]


def test_one_image_part_holding_a_list_joins_its_images_by_a_newline(v2, tok):
    out = v2.build([_user({"type": "image", "image": [IMG_A, IMG_C, IMG_B]}, _text("Which differs?"))])
    images = "\n".join(image_text(n) for n in (TOKENS_A, TOKENS_C, TOKENS_B))
    _check(out, chat([("HUMAN", images + "Which differs?")]), tok)
    assert out.text.count("</image>\n\n<image>") == 2


def test_text_image_audio_and_video_in_one_turn(v2, tok):
    out = v2.build([_user(_text("Look: "), {"type": "image", "image": IMG_B}, _text("listen: "),
                          {"type": "audio", "audio": CLIP_1}, {"type": "video", "video": FRAMES}, _text("Summarise."))])
    (video,) = out.videos
    per_pair = int(video.grid_thw[0, 1] * video.grid_thw[0, 2]) // 4
    content = ("Look: " + image_text(TOKENS_B) + "listen: " + audio_text(audio_tokens(1600))
               + video_text_2_0([0.25, 1.25], per_pair) + "Summarise.")
    _check(out, chat([("HUMAN", content)]), tok, [audio_tokens(1600)])
    assert "<0.2 seconds>" in out.text and "<1.2 seconds>" in out.text  # .1f rounds ties to even
    assert video.grid_thw.tolist() == [[1, video.grid_thw[0, 1], video.grid_thw[0, 2]]] * 2


def test_several_turns_with_assistant_replies_and_an_audio_list(v2, tok):
    msgs = [_user({"type": "image", "image": IMG_C}, _text("What is this?")),
            {"role": "assistant", "content": "A square."},
            _user(_text("And these?"), {"type": "audio", "audio": [CLIP_1, CLIP_2]}),
            {"role": "assistant", "content": [_text("Two "), _text("clips.")]},
            _user(_text("Thanks."))]
    out = v2.build(msgs)
    clips = [audio_tokens(1600), audio_tokens(4001)]
    _check(out, chat([("HUMAN", image_text(TOKENS_C) + "What is this?"), ("ASSISTANT", "A square."),
                      ("HUMAN", "And these?" + "\n".join(audio_text(n) for n in clips)),
                      ("ASSISTANT", "Two clips."), ("HUMAN", "Thanks.")]), tok, clips)


def test_asr_text_then_audio_with_a_forced_language_prefix(v2, tok):
    ask = "Please recognize the language of this speech and transcribe it. Format: oral."
    out = v2.build([_user(_text(ask), {"type": "audio", "audio": CLIP_2})], assistant_prefix="上海\t")
    _check(out, chat([("HUMAN", ask + audio_text(audio_tokens(4001)))], prefix="上海\t"), tok,
           [audio_tokens(4001)])


def test_preview_images_and_video_take_the_preview_expansions(preview, tok):
    picture = _picture(56, 56, 7)  # Stage A keeps 56x56 (factor 28); Stage B's 78400 floor: 280x280, 100 tokens
    out = preview.build([_user({"type": "image", "image": picture}, {"type": "video", "video": FRAMES},
                               _text("Same scene?"))])
    (video,) = out.videos
    t, h, w = video.grid_thw[0].tolist()
    assert video.grid_thw.shape == (1, 3) and t == 2
    _check(out, chat([("HUMAN", image_text(100) + video_text_preview(t * h * w // 4) + "Same scene?")]), tok)
    assert out.image_grid_thw.tolist() == [[1, 20, 20]]
