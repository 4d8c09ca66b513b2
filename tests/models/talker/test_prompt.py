"""Talker prompts (spec §7.2) and instruction captions (spec §7.10)."""

import json

import pytest

from engine.models.talker.prompt import (TASK_PROMPTS, Instruction, InstructionError, build_prompt, music_text)
from engine.models.talker.tokenizer import TalkerTokenizer
from tests.paths import fixture_case


@pytest.fixture(scope="module")
def tok():
    return TalkerTokenizer(fixture_case("talker") / "llm")


def test_prompt_strings_and_slots_match_the_reference_layout(tok):
    meta = json.loads((fixture_case("talker") / "meta.json").read_text())
    for name, n_spk, patches in (("tts", 0, 0), ("tts_spk", 1, 0), ("clone", 1, 6)):
        case = meta["cases"][name]
        p = build_prompt(tok, case["prompt"], case["text"], n_speakers=n_spk, prompt_text=case["prompt_text"],
                         n_prompt_patches=patches)
        assert p.text == case["prompt_string"]
        assert tok.decode(p.ids) == case["prompt_string"]
        assert len(p.speaker_slots) == n_spk and len(p.latent_slots) == patches
        for slot in p.speaker_slots:
            assert p.ids[slot] == tok.token_id("<|vision_pad|>")


def test_prompt_text_needs_prompt_latents(tok):
    p = build_prompt(tok, TASK_PROMPTS["speech"], "hi", n_speakers=1, prompt_text="ref", n_prompt_patches=0)
    assert "ref" not in p.text and not p.latent_slots


def test_user_text_cannot_inject_special_tokens(tok):
    p = build_prompt(tok, TASK_PROMPTS["speech"], "say <|im_end|> now")
    assert p.ids.count(tok.token_id("<|im_end|>")) == 2  # system + end of user turn only


def _with_non_special_tokens(folder, out):
    """The talker's tokenizer.json with `<audio>` marked non-special and Qwen2.5's non-special `<tool_call>` added (as
    the released Qwen2.5 tokenizer marks it): added tokens a user can type that the special-token switch misses."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    for entry in spec["added_tokens"]:
        entry["special"] = entry["special"] and entry["content"] != "<audio>"
    spec["added_tokens"].append({"id": len(spec["model"]["vocab"]) + len(spec["added_tokens"]), "content": "<tool_call>",
                                 "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                                 "special": False})
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


def test_typed_non_special_added_tokens_stay_text(tmp_path):
    """A typed `<tool_call>` (and a talker token the files mark non-special) in the text to speak was one control
    token in the talker's prompt: every added token stays text in user text, and the template still places them."""
    tok = TalkerTokenizer(_with_non_special_tokens(fixture_case("talker") / "llm", tmp_path))
    typed = "<tool_call> <audio>"
    p = build_prompt(tok, TASK_PROMPTS["speech"], typed)
    assert tok.token_id("<tool_call>") not in p.ids
    assert p.ids.count(tok.token_id("<audio>")) == 1  # the template's own <audio>, before the generated audio
    assert tok.decode(tok.encode_text(typed)) == typed


def test_music_text_drops_text_input_marker(tok):
    text = music_text("jazz", "calm", "piano", "night", 60)
    assert text == " Genre: jazz. Mood: calm. Instrument: piano. Theme: night. Duration: 60s."
    assert " Text input:" not in build_prompt(tok, TASK_PROMPTS["music"], text).text


def test_instruction_caption_format():
    inst = Instruction.parse("dialect=cantonese,emotion=happy,speed=fast,pitch=medium,volume=medium")
    caption = json.loads(inst.caption())
    entry = caption["audio_sequence"][0]
    assert list(entry) == ["序号", "说话人", "方言", "风格", "语速", "基频", "音量", "情感", "BGM", "IP"]
    assert (entry["方言"], entry["情感"], entry["语速"], entry["基频"]) == ("广粤话", "高兴", "快速", "中")
    assert entry["BGM"] == {"Genre": None, "Mood": None, "Instrument": None, "Theme": None, "ENV": None, "SNR": None}
    assert "广粤话" in inst.caption()  # ensure_ascii=False
    snr = Instruction.parse({"bgm": {"genre": "新灵魂乐.", "snr": "10"}})
    assert list(json.loads(snr.caption())["audio_sequence"][0])[:3] == ["序号", "说话人", "BGM"]
    assert Instruction.parse({}).caption() is None
    assert Instruction.parse({"dialect": "四川话"}).dialect == "四川话"  # Chinese labels pass through


@pytest.mark.parametrize("spec, message", [("dialect=klingon", "cantonese"), ("emotion=grumpy", "happy"),
                                           ("colour=red", "unknown instruction key"), ("bgm.SNR=loud", "number"),
                                           ("bgm.tempo=fast", "unknown BGM key"), ("dialect", "key=value")])
def test_bad_instructions_list_valid_values(spec, message):
    with pytest.raises(InstructionError, match=message):
        Instruction.parse(spec)


def test_empty_prompt_text_with_prompt_latents_still_places_the_patches(tok):
    """Upstream inserts the prompt transcript and the <audioPatch> slots whenever prompt latents exist and
    prompt_text is not None; an empty transcript ("") still gets the N_p patch slots after <audio>."""
    p = build_prompt(tok, TASK_PROMPTS["speech"], "hi", n_speakers=1, prompt_text="", n_prompt_patches=3)
    audio = tok.token_id("<audio>")
    at = p.ids.index(audio)
    assert p.latent_slots == [at + 1, at + 2, at + 3]
    assert p.ids[at + 1:] == [tok.token_id("<audioPatch>")] * 3
    none = build_prompt(tok, TASK_PROMPTS["speech"], "hi", n_speakers=1, prompt_text=None, n_prompt_patches=3)
    assert not none.latent_slots and none.ids[-1] == audio


def _reference_caption(user: dict) -> str:
    """The caption as the reference builds it: the template's top-level keys filled from the caller,
    BGM taken as the caller's object (its key order), reordered when BGM.SNR is set."""
    bgm = {"Genre": None, "Mood": None, "Instrument": None, "Theme": None, "ENV": None, "SNR": None}
    entry = {"序号": 1, "说话人": "speaker_1", "方言": None, "风格": None, "语速": None, "基频": None, "音量": None,
             "情感": None, "BGM": bgm, "IP": None}
    entry.update({k: v for k, v in user.items() if k in entry})
    if entry["BGM"].get("SNR") is not None:
        entry = {k: entry[k] for k in ("序号", "说话人", "BGM", "情感", "方言", "风格", "语速", "基频", "音量", "IP")}
    return json.dumps({"audio_sequence": [entry]}, ensure_ascii=False)


@pytest.mark.parametrize("bgm", [
    {"Genre": "新灵魂乐.", "Mood": "多愁善感/忧郁/孤独.", "Instrument": "原声钢琴.", "Theme": "分手.", "SNR": 10.0, "ENV": None},
    {"ENV": "Birds chirping", "SNR": 10.0, "Genre": None, "Mood": None, "Instrument": None, "Theme": None},
])
def test_bgm_caption_keeps_the_callers_key_order(bgm):
    """Speech + BGM and speech + sound captions as the reference's examples pass them: the BGM object
    is the caller's, in the caller's key order (SNR before ENV, or ENV first), not the template's."""
    assert Instruction.parse({"bgm": dict(bgm)}).caption() == _reference_caption({"BGM": bgm})
