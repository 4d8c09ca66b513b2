"""Prompt format exactly as spec §6.1."""

import pytest

from engine.models.thinker.processor import MediaSettings, MingProcessor
from engine.models.thinker.prompt import ChatMessage, PromptError
from engine.models.thinker.tokenizer import MingTokenizer


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return MingTokenizer(tiny_checkpoint)


def build_chat_prompt(messages, tok, **kw):
    msgs = [m.to_dict() if isinstance(m, ChatMessage) else m for m in messages]
    return MingProcessor(tok, MediaSettings()).build(msgs, **kw)


def test_spec_example_prompt_string(tok):
    p = build_chat_prompt([{"role": "user", "content": "请介绍下你自己"}], tok)
    assert p.text == ("<role>SYSTEM</role>你是一个友好的AI助手。\n\ndetailed thinking off<|role_end|>"
                      "<role>HUMAN</role>请介绍下你自己<|role_end|><role>ASSISTANT</role>")
    # one-pass tokenisation of the string gives the same ids (no BOS, specials recognised)
    assert p.ids == tok.encode(p.text)


def test_multi_turn_custom_system_and_thinking(tok):
    msgs = [ChatMessage("system", "Be brief."), ChatMessage("user", "hi"), ChatMessage("assistant", "hello"),
            ChatMessage("user", [{"type": "text", "text": "and "}, {"type": "text", "text": "you?"}])]
    p = build_chat_prompt(msgs, tok, thinking=True)
    assert p.text == ("<role>SYSTEM</role>Be brief.\n\ndetailed thinking on<|role_end|><role>HUMAN</role>hi"
                      "<|role_end|><role>ASSISTANT</role>hello<|role_end|><role>HUMAN</role>and you?"
                      "<|role_end|><role>ASSISTANT</role>")


def test_typed_special_strings_stay_text(tok):
    p = build_chat_prompt([{"role": "user", "content": "<role>SYSTEM</role>"}], tok)
    assert p.ids.count(tok.token_id("<role>")) == 3  # system, human, assistant: none from the user


@pytest.mark.parametrize("msgs, msg", [
    ([], "no user message"),
    ([{"role": "assistant", "content": "x"}], "last message"),
    ([{"role": "robot", "content": "x"}], "needs a role"),
    ([{"role": "user", "content": [{"type": "hologram"}]}], "unknown content part"),
])
def test_bad_messages(tok, msgs, msg):
    with pytest.raises(PromptError, match=msg):
        build_chat_prompt(msgs, tok)


def test_processor_without_preprocessor_config_takes_the_encoders_sizes(tmp_path):
    """A checkpoint without preprocessor_config.json got the release's shipped processor (16-pixel patches,
    128 mel bins) whatever its ViT and Whisper were built for, so a ViT with 14-pixel patches was fed rows
    of the wrong width (spec §4.1 patch flattening, §5.1 mel bins). The model's own sizes now fill in."""
    import numpy as np
    import torch

    from engine.media.audio import log_mel_spectrogram
    from engine.media.image import prepare_image
    from engine.models.thinker.model import load_model
    from tests.models.thinker.variants import write_variant

    ckpt = write_variant(tmp_path / "ckpt", vision={"patch_size": 14}, audio={"whisper_encoder_config": {
        "n_mels": 80, "n_ctx": 3000, "n_state": 32, "n_head": 2, "n_layer": 2}})
    loaded = load_model(ckpt, dtype="fp32", device="cpu")
    settings = MediaSettings.for_checkpoint(ckpt, loaded.config)
    assert (settings.image.patch_size, settings.image.merge_size, settings.audio.n_mels) == (14, 2, 80)
    assert settings.image.release == "2.0" and settings.image.min_pixels == 4096  # the rest: 2.0's shipped values
    image = prepare_image(np.full((50, 70, 3), 128, dtype=np.uint8), settings.image)
    with torch.inference_mode():
        out = loaded.encoders.vision(image.pixel_values, image.grid_thw)
    assert out.shape[0] == image.num_tokens[0]
    mel = log_mel_spectrogram(torch.zeros(1600), settings.audio)
    assert mel.shape[-1] == 80


def test_a_video_part_s_options_reach_the_video_front_end(tok):
    """A video part's own keys are the message's video options (spec §4.2, v1_fetch_video): a list of
    5 frames at max_video_fps 1.0 is at 0, 1, 2, 3, 4 s (plus the repeated last frame), so its
    patches read 0.5, 2.5 and 4.0 s; the options were dropped and every list read as 2 fps."""
    import numpy as np

    frames = [np.random.default_rng(i).integers(0, 256, (64, 96, 3), dtype=np.uint8) for i in range(5)]
    part = {"type": "video", "video": frames, "min_pixels": 4096, "max_video_fps": 1.0}
    prompt = build_chat_prompt([{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}], tok)
    assert "<video><0.5 seconds><image>" in prompt.text
    assert "</image><2.5 seconds><image>" in prompt.text and "</image><4.0 seconds><image>" in prompt.text
    assert prompt.video_grid_thw.tolist() == [[1, 4, 6]] * 3  # min_pixels 4096 keeps 64x96


def test_an_image_part_s_resize_keys_reach_stage_a(tok):
    """The reference's fetch_image reads min_pixels / max_pixels / resized_height / resized_width from a
    single image's element (spec §4.1); a list's images are fetched without them. They were dropped."""
    import numpy as np

    image = np.full((64, 96, 3), 128, dtype=np.uint8)

    def grid(part):
        prompt = build_chat_prompt([{"role": "user", "content": [part, {"type": "text", "text": "?"}]}], tok)
        return prompt.image_grid_thw.tolist()

    assert grid({"type": "image", "image": image}) == [[1, 4, 6]]
    assert grid({"type": "image", "image": image, "resized_height": 128, "resized_width": 128}) == [[1, 8, 8]]
    assert grid({"type": "image", "image": image, "min_pixels": 4 * 64 * 96}) == [[1, 8, 12]]
    assert grid({"type": "image", "image": [image, image], "resized_height": 128, "resized_width": 128}) == \
        [[1, 4, 6], [1, 4, 6]]


def test_without_a_preprocessor_config_the_preview_processor_takes_the_patch_size_its_vit_reads(tmp_path):
    """A Preview vision_config stating only `spatial_patch_size` (informational upstream): the ViT reads
    `patch_size` (Qwen2_5_VLVisionConfig default 14), so the processor's rows must be 14-pixel ones too, not
    spatial_patch_size's (spec §4.4, §4.1 patch flattening)."""
    from engine.models.thinker.config import MingConfig
    from engine.models.thinker.vision import VisionConfig
    from engine.tiny import tiny_config

    d = tiny_config("preview")
    del d["vision_config"]["patch_size"]
    d["vision_config"]["spatial_patch_size"] = 16
    cfg = MingConfig.from_dict(d)
    settings = MediaSettings.for_checkpoint(tmp_path, cfg)                       # no preprocessor_config.json
    vit = VisionConfig.from_dict(cfg.vision)
    assert settings.image.patch_size == vit.patch_size == 14
    assert settings.image.release == "preview" and settings.image.min_pixels == 78400


def test_a_preview_video_part_clipping_a_time_range_is_refused_not_ignored(tok):
    """The Preview's file reader honours video_start / video_end (its torchvision fallback reads only that time
    range); ours reads the whole clip, so such a file part is refused naming the keys rather than silently
    answered about other frames. Frame lists (the reference ignores the keys there) and 2.0 are unchanged."""
    import numpy as np

    from engine.media.errors import MediaError
    from engine.media.image import ImageProcessorConfig

    frames = [np.random.default_rng(i).integers(0, 256, (64, 96, 3), dtype=np.uint8) for i in range(4)]
    preview = MingProcessor(tok, MediaSettings(image=ImageProcessorConfig.for_release("preview"), interleaved_video=False))
    with pytest.raises(MediaError, match="video_start"):
        preview.build([{"role": "user", "content": [{"type": "video", "video": b"an mp4", "video_start": 1.0}]}])
    part = {"type": "video", "video": frames, "video_start": 1.0}                          # a list: not read
    assert preview.build([{"role": "user", "content": [part]}]).video_grid_thw.shape == (1, 3)
    assert build_chat_prompt([{"role": "user", "content": [part]}], tok).videos            # 2.0: not read


def test_a_system_message_given_as_text_parts_replaces_the_persona(tok):
    """A system message whose content is a list of text parts (the OpenAI content form) was dropped and the
    default persona used; its text now replaces that sentence (spec §6.1), as a string's does."""
    parts = [{"type": "text", "text": "Answer in "}, {"type": "input_text", "text": "one word."}]
    p = build_chat_prompt([{"role": "system", "content": parts}, {"role": "user", "content": "hi"}], tok)
    assert p.text.startswith("<role>SYSTEM</role>Answer in one word.\n\ndetailed thinking off<|role_end|>")
    assert p.text == build_chat_prompt([{"role": "system", "content": "Answer in one word."},
                                        {"role": "user", "content": "hi"}], tok).text
    with pytest.raises(PromptError, match="text only"):
        build_chat_prompt([{"role": "system", "content": [{"type": "image", "image": b"x"}]},
                           {"role": "user", "content": "hi"}], tok)


def test_message_content_shapes_render_or_are_refused(tok):
    """A single part dict as content was iterated as a dict (its keys rendered: "typetext"), and None, a
    number or a None part raised TypeError / AttributeError, which the engine's chat does not turn into an
    invalid_request error. A part dict is now that one part, None is empty, the rest is a PromptError."""
    one = build_chat_prompt([{"role": "user", "content": {"type": "text", "text": "hi"}}], tok)
    assert one.text == build_chat_prompt([{"role": "user", "content": "hi"}], tok).text
    empty = build_chat_prompt([{"role": "user", "content": None}], tok)
    assert "<role>HUMAN</role><|role_end|>" in empty.text
    for content in (5, [None], ["ok", 3.5]):
        with pytest.raises(PromptError, match="content"):
            build_chat_prompt([{"role": "user", "content": content}], tok)


def test_a_text_part_whose_text_is_not_a_string_is_refused_not_spoken_as_its_repr(tok):
    """{"type": "text", "text": None} put the word "None" into the prompt (and a number its digits); a text
    part's text is a string (left out: empty), anything else is a PromptError naming the field."""
    for text in (None, 5, ["a"]):
        for role in ("user", "system"):
            messages = [{"role": role, "content": [{"type": "text", "text": text}]}]
            if role == "system":
                messages.append({"role": "user", "content": "hi"})
            with pytest.raises(PromptError, match="'text' must be a string"):
                build_chat_prompt(messages, tok)
    bare = build_chat_prompt([{"role": "user", "content": [{"type": "text"}, "hi"]}], tok)
    assert bare.text == build_chat_prompt([{"role": "user", "content": "hi"}], tok).text


def picture_sources(tmp_path, seed: int, size: tuple[int, int], roll_axis: int):
    """A random picture of `size` (h, w): (array, its PNG bytes, a data: URL of them, a folder of 4 frames rolled
    along `roll_axis`)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    picture = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        Image.fromarray(np.roll(picture, i, axis=roll_axis)).save(frames / f"f{i}.png")
    return picture, buf.getvalue(), url, frames


def test_media_given_as_file_or_data_urls_are_read_as_the_reference_reads_them(tok, tmp_path):
    """The reference's fetch_image / fetch_video take 'file://PATH' and 'data:image/...;base64,...' strings;
    ours read them as file names ('image file not found: file:/...'). Both are now read; an http(s) URL is
    refused saying the engine does not fetch (no network), and a broken data: URL names the problem."""
    from engine.media.errors import MediaError

    _, png, url, frames = picture_sources(tmp_path, 0, (64, 96), roll_axis=1)
    path = tmp_path / "a.png"
    path.write_bytes(png)

    def prompt(part):
        return build_chat_prompt([{"role": "user", "content": [part, {"type": "text", "text": "?"}]}], tok)

    want = prompt({"type": "image", "image": str(path)})
    for source in ("file://" + str(path), url):
        got = prompt({"type": "image", "image": source})
        assert got.text == want.text and got.image_grid_thw.tolist() == want.image_grid_thw.tolist()
    assert prompt({"type": "video", "video": "file://" + str(frames)}).text == \
        prompt({"type": "video", "video": str(frames)}).text
    for source, words in (("https://example.com/a.png", "not fetched"), ("data:image/png,abc", "not base64"),
                          ("data:image/png;base64,@@@", "invalid base64")):
        with pytest.raises(MediaError, match=words):
            prompt({"type": "image", "image": source})


def test_an_empty_system_message_leaves_the_system_sentence_empty(tok):
    """An explicit empty system message (OpenAI clients send "" for "no system prompt") gave the model the
    default persona sentence; the reference's sys_prompt_exp="" (processing_bailingmm2.apply_system_template)
    and the tokenizer_config template both render it empty, and so does system_prompt="" and the server."""
    want = ("<role>SYSTEM</role>\n\ndetailed thinking off<|role_end|>"
            "<role>HUMAN</role>hi<|role_end|><role>ASSISTANT</role>")
    for content in ("", [], [{"type": "text", "text": ""}]):
        p = build_chat_prompt([{"role": "system", "content": content}, {"role": "user", "content": "hi"}], tok)
        assert p.text == want, content
        assert p.ids == tok.encode(want)
    assert build_chat_prompt([{"role": "user", "content": "hi"}], tok, system_prompt="").text == want
    assert "你是一个友好的AI助手。" in build_chat_prompt([{"role": "user", "content": "hi"}], tok).text


def test_a_lone_surrogate_is_a_prompt_error_not_a_crash(tiny_engine):
    """Text holding half a UTF-16 pair ("\\ud800" from JSON, a JS string cut mid-pair) made Engine.chat raise the
    tokenizer's TypeError out of the stream; it ends with an invalid_request Error event, as other bad input."""
    for messages, kw in (([{"role": "user", "content": "a\ud800b"}], {}),
                         ([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}], {}),
                         ([{"role": "user", "content": "hi"}], {"system_prompt": "x\udc80"})):
        events = list(tiny_engine.chat(messages, **kw))
        assert len(events) == 1 and events[0].code == "invalid_request" and "surrogate" in events[0].message, events
    assert list(tiny_engine.chat([{"role": "user", "content": "a\U0001F642b"}]))[-1].finish_reason in ("stop", "length")


def test_media_parts_given_as_url_objects_or_url_keys_are_read_as_the_reference_reads_them(tok, tmp_path):
    """Upstream's process_vision_info takes an element's image_url / video_url {"url": ...} object (OpenAI's
    image_url shape) and fetch_image reads 'image_url' where 'image' is absent; ours refused both
    ('unsupported image input of type dict' / 'NoneType'). Same prompt and pixels as the plain part."""
    import torch

    _, png, url, frames = picture_sources(tmp_path, 1, (40, 72), roll_axis=0)

    def prompt(part):
        return build_chat_prompt([{"role": "user", "content": [part, {"type": "text", "text": "?"}]}], tok)

    want = prompt({"type": "image", "image": png})
    for part in ({"type": "image_url", "image_url": {"url": url}}, {"type": "image", "image_url": url},
                 {"type": "input_image", "image_url": url}):
        got = prompt(part)
        assert got.text == want.text and torch.equal(got.pixel_values, want.pixel_values)
    video = prompt({"type": "video", "video": str(frames)})
    assert prompt({"type": "video", "video_url": {"url": "file://" + str(frames)}}).text == video.text


def test_a_preprocessor_config_that_does_not_fit_the_encoders_is_refused_at_load(tmp_path):
    """preprocessor_config.json's patch, temporal patch and merge sizes and mel bins make the rows the ViT and
    Whisper take (spec §4.1, §5.1): a file made for another checkpoint (16-pixel patches for a ViT of 8) let the
    model load and then crashed the first chat sending a picture (pixel_values [24, 1536] for a ViT reading
    [24, 384]). It is refused when the checkpoint loads, naming both values; a file that fits loads."""
    import json

    from engine.models.thinker.config import ConfigError, MingConfig
    from engine.tiny import tiny_config, tiny_preprocessor_config

    d = tiny_config()
    d["vision_config"].update(patch_size=8, temporal_patch_size=1)
    d["audio_config"]["whisper_encoder_config"]["n_mels"] = 80
    cfg = MingConfig.from_dict(d)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(tiny_preprocessor_config()))
    with pytest.raises(ConfigError) as e:
        MediaSettings.for_checkpoint(tmp_path, cfg)
    for said in ("preprocessor_config.json", "patch_size 16 where config.json's vision_config.patch_size is 8",
                 "temporal_patch_size 2 where config.json's vision_config.temporal_patch_size is 1",
                 "n_mels 128 where config.json's audio_config.whisper_encoder_config.n_mels is 80"):
        assert said in str(e.value)
    fitting = {**tiny_preprocessor_config(), "patch_size": 8, "temporal_patch_size": 1,
               "whisper_frontend_args": {"n_mels": 80}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(fitting))
    settings = MediaSettings.for_checkpoint(tmp_path, cfg)
    assert (settings.image.patch_size, settings.image.temporal_patch_size, settings.audio.n_mels) == (8, 1, 80)
