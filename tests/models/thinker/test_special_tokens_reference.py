"""Special tokens against the spec's §2.10 table written out here: the released tokenizer_config.json of both
releases holds each at its id, the released config.json's token keys name the same ids as the engine reads them
(`<framePatch>` for video slots, the `</image>` pitfall of video_start_token, §1.4), the prompt's end-of-turn
token is the stop id (§6.5), and the tiny demo vocabulary keeps their order and spacing."""

from __future__ import annotations

import json

import pytest

from engine.models.thinker.config import MingConfig
from engine.tiny import REAL_SPECIAL_TOKENS, tiny_id
from tests.paths import real_config

SPEC_IDS = {
    "<|startoftext|>": 156891, "<|endoftext|>": 156892, "<|role_end|>": 156895, "<role>": 157151,
    "</role>": 157152, "<imagePatch>": 157157, "<image>": 157158, "</image>": 157159, "<video>": 157160,
    "</video>": 157161, "<audioPatch>": 157168, "<audio>": 157169, "</audio>": 157170, "<framePatch>": 157175,
    "<gen_imagePatch>": 157162, "<gen_image>": 157163, "</gen_image>": 157164, "<imageHere>": 157165,
    "<end_of_chunk>": 157166, "<end_of_audio>": 157167, "<gen_audioPatch>": 157171, "<gen_audio>": 157172,
    "</gen_audio>": 157173, "<audioHere>": 157174, "<text>": 157176, "<asr>": 157177, "<tts>": 157178,
}
RELEASES = ["ming-flash-omni-2.0", "ming-flash-omni-preview"]


@pytest.mark.parametrize("release", RELEASES)
def test_the_released_tokenizer_holds_every_spec_token_at_its_id(release):
    config = json.loads((real_config(release) / "tokenizer_config.json").read_text(encoding="utf-8"))
    released = {entry["content"]: int(i) for i, entry in config["added_tokens_decoder"].items()}
    assert {name: released.get(name) for name in SPEC_IDS} == SPEC_IDS
    assert config["eos_token"] == "<|role_end|>" == config["pad_token"]


@pytest.mark.filterwarnings("ignore:.*video_start_token")  # the Preview's known pitfall, said at load (§1.4)
@pytest.mark.parametrize("release", RELEASES)
def test_the_released_config_s_token_keys_are_read_as_the_spec_names_them(release):
    llm = MingConfig.from_file(real_config(release)).llm
    assert llm.image_patch_token == SPEC_IDS["<imagePatch>"]
    assert llm.video_patch_token == SPEC_IDS["<framePatch>"]  # video slots are <framePatch>, routed by the image gate
    assert llm.image_start_token == SPEC_IDS["<image>"]
    assert llm.video_start_token == SPEC_IDS["</image>"] and llm.video_start_token_is_image_end
    assert llm.eos_token_ids == (SPEC_IDS["<|role_end|>"],)  # §6.5: generation stops on the end-of-turn token


def test_the_tiny_vocabulary_keeps_the_real_ids_order_and_spacing():
    for name, real_id in SPEC_IDS.items():
        assert REAL_SPECIAL_TOKENS[name] == real_id, name
    ids = sorted(SPEC_IDS.values())
    assert [tiny_id(n) - tiny_id("<|startoftext|>") for n in sorted(SPEC_IDS, key=SPEC_IDS.get)] == \
        [i - ids[0] for i in ids]
