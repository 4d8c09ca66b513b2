"""Text segmentation (spec §7.9), number readings and input validation."""

import pytest

from engine.models.talker.text import (MAX_TEXT_CHARS, Segmenter, TextError, check_text, chinese_number,
                                       cut_by_semantic_length, english_number, normalize, segment_text,
                                       semantic_length)


def test_segments_close_at_punctuation_after_enough_units():
    segs = [f.source for f in segment_text("今天天气很好，我们一起去公园散步吧。然后去吃饭，好不好？")]
    # the first comma comes after 6 units (< 12): no cut; later segments need >= 8 units
    assert segs == ["今天天气很好，我们一起去公园散步吧。", "然后去吃饭，好不好？"]


def test_period_after_digit_does_not_close():
    seg = Segmenter()
    out = seg.feed("one two three four five six seven eight nine ten eleven 3. and then it ends here.")
    assert out == ["one two three four five six seven eight nine ten eleven 3. and then it ends here."]


def test_newline_closes_and_becomes_punctuation():
    seg = Segmenter()
    assert seg.feed("第一行\n") == ["第一行，"]
    assert seg.feed("second line\n") == ["second line."]


def test_incremental_feeding_matches_whole_text():
    text = "Hello there my friend, how are you doing today? I am fine, thanks for asking. 今天天气很好，我们去公园吧。"
    whole = Segmenter()
    expected = whole.feed(text) + whole.flush()
    inc, got = Segmenter(), []
    for ch in text:
        got += inc.feed(ch)
    assert got + inc.flush() == expected


def test_semantic_cut_keeps_decimals_and_abbreviations():
    text = ("Dr. Smith measured 3.14 metres in the U.S. lab. " * 6).strip()
    parts = cut_by_semantic_length(text, max_len=20)
    assert all(semantic_length(p) <= 20 for p in parts)
    assert "".join(p.replace(" ", "") for p in parts) == text.replace(" ", "")
    assert not any(p.endswith("3.") or p.startswith("14") or p.endswith("Dr.") for p in parts)


def test_number_readings():
    assert english_number(1234567) == "one million two hundred thirty-four thousand five hundred sixty-seven"
    assert normalize("I paid $5.50 for the 21st ticket, 3.5% off.") == \
        "I paid five dollars and fifty cents for the twenty-first ticket, three point five percent off."
    assert chinese_number(10010) == "一万零一十" and chinese_number(15) == "十五"
    assert normalize("，我有3.5个苹果和120%的信心") == "我有三点五个苹果和百分之一百二十的信心"


@pytest.mark.parametrize("text, message", [("", "empty"), ("   \n", "empty"), ("!!! ... ？", "nothing to speak"),
                                           ("😀🎉👍", "nothing to speak"), ("a" * (MAX_TEXT_CHARS + 1), "too long"),
                                           (None, "must be a string")])
def test_bad_text_is_refused(text, message):
    with pytest.raises(TextError, match=message):
        check_text(text)


def test_emoji_are_dropped_from_speech():
    assert [f.text for f in segment_text("Hello 😀 world")] == ["Hello world"]
