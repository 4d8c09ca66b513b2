"""Quoted text -> the text rendered through ByT5 (spec §8.4) and the glyph tokenizer's extra tokens."""

from engine.models.imagegen.config import ByT5Settings
from engine.models.imagegen.glyph import glyph_special_tokens, glyph_text_from_prompt


def test_last_quoted_span_by_pattern_order():
    assert glyph_text_from_prompt('Draw "A" and "B"') == 'Text "B". '
    assert glyph_text_from_prompt("A sign “欢迎” next to ‘Cafe’") == 'Text "欢迎". '  # “…” is the last pattern
    assert glyph_text_from_prompt("no quotes here") == ""


def test_short_single_quotes_count_as_quotes_and_long_ones_do_not():
    assert glyph_text_from_prompt("Write 'OPEN' on the door") == 'Text "OPEN". '
    assert glyph_text_from_prompt("It's a dog's toy") == 'Text "s a dog". '
    long = "'" + "x" * 25 + "'"
    assert glyph_text_from_prompt(f"Write {long}") == ""
    assert glyph_text_from_prompt("Write '七个汉字七个汉字'") == ""  # 8 CJK characters weigh 24 >= 20


def test_a_single_span_after_a_remove_instruction_is_not_rendered():
    assert glyph_text_from_prompt('Remove the text "SALE" from the poster') == ""
    assert glyph_text_from_prompt('Please ERASE "x"') == ""
    assert glyph_text_from_prompt('Remove "A" and write "B"') == 'Text "B". '   # two spans: kept
    assert glyph_text_from_prompt('Write "SALE" then remove the rest') == 'Text "SALE". '


def test_glyph_tokens_follow_the_tables(tmp_path):
    (tmp_path / "c.json").write_text('{"white": 0, "red": 1}')
    (tmp_path / "f.json").write_text('{"en-Mont": 0, "cn-Han": 1, "Roboto": 2, "xx-Other": 3}')
    s = ByT5Settings(folder=tmp_path, ckpt_path="t5", special_token=True, color_special_token=True,
                     font_special_token=True, font_ann_path="f.json", color_ann_path="c.json", multilingual=True,
                     mapper_layers=1, sdxl_channels=8, max_length=8)
    assert glyph_special_tokens(s) == ["<color-0>", "<color-1>", "<en-font-0>", "<cn-font-1>", "<font-2>", "<font-3>"]


def test_only_cjk_unified_ideographs_weigh_three():
    """check_single_quotes counts characters in U+4E00..U+9FFF three times and everything else once; we
    weighed kana, hangul and the extension/compatibility blocks as 3 too, so a short Japanese or Korean
    '…' span (10 characters: weight 10) was judged too long and not rendered."""
    assert glyph_text_from_prompt("Write 'ありがとうございます' here") == 'Text "ありがとうございます". '
    assert glyph_text_from_prompt("Write '안녕하세요반갑습니다' here") == 'Text "안녕하세요반갑습니다". '
    assert glyph_text_from_prompt("Write '㐀㐀㐀㐀㐀㐀㐀' here") == 'Text "㐀㐀㐀㐀㐀㐀㐀". '   # ext. A: weight 7
    assert glyph_text_from_prompt("Write '一二三四五六七' here") == ""                     # 7 ideographs: 21


def test_double_and_curly_quoted_spans_do_not_cross_lines():
    """The reference's patterns r'"(.*?)"', r'‘(.*?)’', r'“(.*?)”' have no DOTALL: a span never runs over a
    newline. Ours did, so a multi-line prompt could render the wrong span (or one the reference never finds)."""
    assert glyph_text_from_prompt('Line one "A\nB" end') == ""
    assert glyph_text_from_prompt('He said "hi\nand "bye"') == 'Text "bye". '
    assert glyph_text_from_prompt("A “two\nlines” sign and “ok”") == 'Text "ok". '
    # a short '…' span over a line break still turns into "…" (pairing is by position), then is not matched
    assert glyph_text_from_prompt("Write 'a\nb' here") == ""


def test_the_preview_processor_has_its_own_limits():
    """processing_bailingmm2.py of the Preview: '…' spans count as quotes below a weight of 60 (2.0: 20), and
    the remove words are remove / delete / clear (2.0: erase instead of clear)."""
    mid = "'" + "x" * 25 + "'"
    assert glyph_text_from_prompt(f"Write {mid}", preview=True) == f'Text "{"x" * 25}". '
    assert glyph_text_from_prompt("Write '" + "x" * 60 + "'", preview=True) == ""
    assert glyph_text_from_prompt("Write '七个汉字七个汉字'", preview=True) == 'Text "七个汉字七个汉字". '  # 24 < 60
    assert glyph_text_from_prompt('Clear "SALE" from the poster', preview=True) == ""
    assert glyph_text_from_prompt('Clear "SALE" from the poster') == 'Text "SALE". '
    assert glyph_text_from_prompt('Please ERASE "x"', preview=True) == 'Text "x". '
