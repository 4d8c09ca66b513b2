"""Text segmentation (spec §7.9), number readings and input validation."""

import pytest

from engine.models.talker.text import (MAX_SEMANTIC_LEN, MAX_TEXT_CHARS, PREVIEW_CLOSERS, Segmenter, TextError,
                                       check_text, chinese_number, cut_by_semantic_length, english_number, normalize, segment_text,
                                       semantic_length)


def test_segments_close_at_punctuation_after_enough_units():
    segs = [f.source for f in segment_text("今天天气很好，我们一起去公园散步吧。然后去吃饭，好不好？")]
    # the first comma comes after 6 units (< 12): no cut; later segments need >= 8 units
    assert segs == ["今天天气很好，我们一起去公园散步吧。", "然后去吃饭，好不好？"]


def test_period_after_digit_does_not_close():
    seg = Segmenter()
    out = seg.feed("one two three four five six seven eight nine ten eleven 3. and then it ends here.")
    assert out == ["one two three four five six seven eight nine ten eleven 3. and then it ends here."]


def test_newline_becomes_punctuation_and_closes_only_at_the_counts():
    """A newline is replaced (，after CJK, . after an English letter) and closes the segment only once
    the unit counts are met, like a closing mark: a short line runs on into the next."""
    seg = Segmenter()
    assert seg.feed("第一行\n") == []
    assert seg.feed("第二行的内容比较长一些。") == ["第一行，第二行的内容比较长一些。"]
    seg = Segmenter()
    assert seg.feed("a line\n") == []
    assert seg.flush() == ["a line."]
    seg = Segmenter()
    assert seg.feed("这是第一行的内容比较长\n") == ["这是第一行的内容比较长，"]  # 12 units: the newline closes


def test_units_are_characters_spaces_included():
    """Upstream iterates a plain string character by character, so the counts are characters (spaces
    too), not words: the '?' after 34 characters closes although it is only the 9th word or mark."""
    frags = segment_text("Hi there, how are you doing today? I am fine.")
    assert [f.text for f in frags] == ["Hi there, how are you doing today?", "I am fine."]
    # a trailing remainder is spoken only if it holds a letter, a CJK character or a digit 1-9
    seg = Segmenter()
    assert seg.feed("今天天气很好，我们一起去公园散步吧。0") == ["今天天气很好，我们一起去公园散步吧。"]
    assert seg.flush() == []


def test_incremental_feeding_matches_whole_text():
    text = "Hello there my friend, how are you doing today? I am fine, thanks for asking. 今天天气很好，我们去公园吧。"
    whole = Segmenter()
    expected = whole.feed(text) + whole.flush()
    inc, got = Segmenter(), []
    for ch in text:
        got += inc.feed(ch)
    assert got + inc.flush() == expected


def test_semantic_cut_keeps_decimals_and_abbreviations():
    """A text over max_len has its ASCII punctuation turned into CJK punctuation and is cut at the
    sentence enders; decimal points and dots between capitals are protected."""
    text = ("Dr. Smith measured 3.14 metres in the U.S. lab. " * 6).strip()
    parts = cut_by_semantic_length(text, max_len=20)
    assert all(semantic_length(p) <= 20 for p in parts)
    joined = "".join(p.replace(" ", "") for p in parts)
    assert joined == text.replace(" ", "").replace("3.14", "#").replace("U.S.", "U#S。").replace(".", "。") \
        .replace("#S", ".S").replace("#", "3.14")
    assert all("3.14" in p for p in parts if "measured" in p)


def test_semantic_cut_short_text_stays_as_written():
    assert cut_by_semantic_length("Hello, world. Fine!\nYes.") == ["Hello, world. Fine! Yes."]
    assert cut_by_semantic_length("...!!!") == []


def test_semantic_cut_merges_short_clauses_and_packs_long_ones():
    # 好的 (2 < 5) joins the next clause only if the pair fits: not with 60 characters (62 > 50); the
    # 60-character clause is packed 50 + 10, and 谢谢 (< 5) after a sentence end starts anew
    parts = cut_by_semantic_length("好的，" + "我" * 60 + "。谢谢。")
    assert parts == ["好的，", "我" * 50, "我" * 10 + "。", "谢谢。"]
    assert cut_by_semantic_length("好的，谢谢你，" + "我" * 60 + "。")[0] == "好的，谢谢你，"
    # a protected decimal counts as one word: 44 + 1 + 5 words is 50 (kept as written), with 3.14 it is
    # 51, so the text is cut at its sentence end
    assert cut_by_semantic_length("w " * 44 + "3 14. " + "v " * 5 + "end.") == ["w " * 44 + "3 14. " + "v " * 5 + "end."]
    assert cut_by_semantic_length("w " * 44 + "3.14. " + "v " * 5 + "end.") == ["w " * 43 + "w 3.14。", "v " * 5 + "end。"]


def test_number_readings():
    assert english_number(1234567) == "one million two hundred thirty-four thousand five hundred sixty-seven"
    assert normalize("I paid $5.50 for the 21st ticket, 3.5% off.") == \
        "I paid five dollars and fifty cents for the twenty-first ticket, three point five percent off."
    assert chinese_number(10010) == "一万零一十" and chinese_number(15) == "十五"
    assert normalize("，我有3.5个苹果和120%的信心") == "我有三点五个苹果和百分之一百二十的信心"


@pytest.mark.parametrize("text, message", [("", "empty"), ("   \n", "empty"), ("!!! ... ？", "nothing to speak"),
                                           ("😀🎉👍", "nothing to speak"), ("a" * (MAX_TEXT_CHARS + 1), "too long"),
                                           ("https://example.com/a?b=1", "nothing to speak"),
                                           ("`x = 1` **", "nothing to speak"),
                                           (None, "must be a string")])
def test_bad_text_is_refused(text, message):
    with pytest.raises(TextError, match=message):
        check_text(text)


def test_emoji_are_dropped_from_speech():
    assert [f.text for f in segment_text("Hello 😀 world")] == ["Hello world"]


def test_a_dropped_newline_still_counts_as_a_unit():
    """In text without CJK a newline after anything but a letter is dropped, yet upstream still counts it
    (it appends an empty unit): eleven digits and a newline make the twelve units that close a segment."""
    seg = Segmenter()
    assert seg.feed("12345678901\nabc") == ["12345678901"]
    assert seg.flush() == ["abc"]


@pytest.mark.parametrize("text, spoken", [
    ("The file is 5MB and took 10ms.", "The file is five megabytes and took ten milliseconds."),
    ("It weighs 5 kg at 25°C, 2.5 GHz.", "It weighs five kilograms at twenty-five degrees celsius, two point five gigahertz."),
    ("Wait 10 s, then 30℃.", "Wait ten seconds, then thirty degrees celsius."),
    ("take 1 a day", "take one a day"),
    ("It costs £5 or £1.01.", "It costs five pounds or one pound and one penny."),
    ("Use 3/4 cup, 1/2 spoon, 2/3 left.", "Use three quarters cup, one half spoon, two thirds left."),
    ("It was -5 degrees, pages 5-10, growth -25.5%.",
     "It was minus five degrees, pages five to ten, growth minus twenty-five point five percent."),
    ("GPT-4 and v2.1 in A4.", "GPT four and version two point one in A four."),
])
def test_english_numbers_with_units_money_fractions_signs_and_versions(text, spoken):
    """Upstream's normalize_numbers (front/number_en.py, spec §7.9 step 4) reads units after a number,
    pounds, fractions, signed percentages and letter-number names; none may be left as glued digits
    ('fiveMB', 'three/four', '£five', 'vtwo') or dropped (the degree sign)."""
    assert normalize(text) == spoken


@pytest.mark.parametrize("text, spoken", [
    ("Due 2024-05-03.", "Due May third, twenty twenty-four."),
    ("Born 12/25/1999 or 25/12/1905.", "Born December twenty-fifth, nineteen ninety-nine or December twenty-fifth, "
                                        "nineteen oh five."),
    ("Meet at 10:30, 9:05pm or 12:00.", "Meet at ten thirty, nine oh five PM or twelve o'clock."),
    ("In 2005 and 2010-01-01.", "In two thousand five and January first, twenty ten."),
    ("Not dates: 2024-13-40, 13/13/2020, v1.2:30, 16:9.",
     "Not dates: two thousand twenty-four-thirteen-forty, thirteen/thirteen/two thousand twenty, v one point two:thirty, "
     "sixteen to nine."),
])
def test_english_dates_and_clock_times_are_read_as_said(text, spoken):
    """'2024-05-03 at 10:30' was read 'two thousand twenty-four-five-three at ten:thirty' (a minus sign and a
    colon between numbers): a date is read month, ordinal day, year as said; a clock time as hours and minutes."""
    assert normalize(text) == spoken


def test_chinese_degrees_are_read():
    assert normalize("今天30℃") == "今天三十摄氏度"


@pytest.mark.parametrize("text, spoken", [
    ("**Bold** see https://example.com/x?a=1 for `code`, ![img](a.png) ### done.", "Bold see for , done."),
    ("The formula $x^2$ is simple, it cost $5.", "The formula is simple, it cost five dollars."),
    ("```python\nprint(1)\n``` Done.", "Done."),
    ("这是***重点***，见 www.example.cn 。", "这是重点，见。"),
    ("今天 天气 很好", "今天天气很好"),
    ("我有 iPhone 15 和 Mac", "我有 iPhone 十五和 Mac"),
    # SSML / HTML tags were read out ('speak Hello break time one seconds'); their text is kept, 3 < 5 too
    ('<speak>Hello <break time="1s"/> world, <emphasis level="strong">now</emphasis>.</speak>', "Hello world, now."),
    ("a <b>bold</b> move, 3 < 5 and 7 > 2", "a bold move, three < five and seven > two"),
])
def test_markup_links_and_code_are_not_read(text, spoken):
    """Upstream's text normaliser (talker_tn TalkerPreProcessor, spec §7.9 step 4) strips what a reply's
    markdown carries (emphasis, headings, rules, images, code, LaTeX, links) and the spaces between two
    non-letters before the talker reads a fragment; English money is read before the LaTeX rule."""
    assert normalize(text) == spoken


@pytest.mark.parametrize("text, spoken", [
    ("今天是2024年5月1日，明天是5月2号。", "今天是二零二四年五月一日，明天是五月二号。"),
    ("我在2008年去过北京，3年后回来", "我在二零零八年去过北京，三年后回来"),
    ("会议在2024-05-01举行", "会议在二零二四年五月一号举行"),
    ("下午2:05出发，10:30:05到", "下午两点零五分出发，十点三十分零五秒到"),
    ("10:30-11:00开会，0:00结束", "十点三十分至十一点整开会，零点整结束"),
    ("9:30pm见", "下午九点三十分见"),
    ("AM9:30开始", "AM九点三十分开始"),
    ("升级到v2.1.3了，版本号是1.2.3", "升级到v二点一点三了，版本号是一点二点三"),
])
def test_chinese_dates_times_and_versions(text, spoken):
    """Upstream's Chinese normaliser (talker_tn/re_utils re_date / re_time / re_version, spec §7.9 step 4)
    reads a year digit by digit, dates and clock times in words (两点, 整, 零五分, 至 for a range) and
    a v/版本 dotted number as a version, not as cardinals ('二千零二十四年', '十:三十')."""
    assert normalize(text) == spoken


@pytest.mark.parametrize("text, spoken", [
    ("客服电话是400-123-4567", "客服电话是四零零幺二三四五六七"),
    ("请拨打010-12345678或0571-1234567", "请拨打零幺零幺二三四五六七八或零五七幺幺二三四五六七"),
    ("我的手机号是：13812345678，尾号1234", "我的手机号是：幺三八幺二三四五六七八，尾号幺二三四"),
    ("我有110个，收听FM101.7", "我有一百一十个，收听FM一百零一点七"),
])
def test_chinese_phone_and_serial_numbers_are_dictated(text, spoken):
    """Upstream's Chinese normaliser reads a dashed phone number (re_phone_dash) and the digits after a serial
    label such as 电话 / 手机号 / 尾号 (re_serial, talker_re.json serial_before) one by one with 幺 for 1,
    where a cardinal reading ('四百-一百二十三-四千五百六十七') is wrong; other numbers stay cardinals."""
    assert normalize(text) == spoken


@pytest.mark.parametrize("text, spoken", [
    ("重5kg，长3-5m，气温-5℃", "重五千克，长三至五米，气温负五摄氏度"),
    ("手机电池5000mAh，跑了10km，用时50min", "手机电池五千毫安时，跑了十千米，用时五十分钟"),
    ("价格是$5或¥100，合100USD", "价格是五美元或一百元，合一百美元"),
    ("这里是5A级景区，5G网络", "这里是五A级景区，五G网络"),
    ("5v5对战，电压5v", "五v五对战，电压五伏特"),
    ("增长3-5%，或3%-5%，下跌-2.5%", "增长百分之三至五，或百分之三至百分之五，下跌负百分之二点五"),
])
def test_chinese_measures_and_money(text, spoken):
    """Upstream's Chinese normaliser reads a unit after a number (re_measure REMeasureAfter) and a currency
    before or after it (re_money) in Chinese, a range with 至 and a leading minus as 负 (merge_punc_measure),
    where the unit was left in Latin letters ('五kg', '$五')."""
    assert normalize(text) == spoken


@pytest.mark.parametrize("text, spoken", [
    ("In the 1990s and the '80s, music changed.", "In the nineteen nineties and the eighties, music changed."),
    ("in their 30s, the 1900s, the 2000s", "in their thirties, the nineteen hundreds, the two thousands"),
    ("100s of people and 1000s of cars", "hundreds of people and thousands of cars"),
    ("timeout 30s, it took 5 s", "timeout thirty seconds, it took five seconds"),
])
def test_decades_are_not_seconds(text, spoken):
    """With units read, an 's' on a number is seconds ('30s'), but a year or a decade with an 's' ('the
    1990s', 'the '80s', 'in their 30s') and '100s of' are plurals, not 'one thousand nine hundred ninety
    seconds' (upstream's _unit_re reads them as seconds; a deliberate deviation)."""
    assert normalize(text) == spoken


def test_hostile_text_is_read_quickly_and_without_int_overflow():
    """A 10,000-character request is read in about linear time: a digit run past Python's int() limit (4300
    digits) after '$', before 'th' or in Chinese is read digit by digit instead of raising ValueError, and
    an unclosed markdown image run ('![a](' x 2000) does not backtrack for minutes."""
    import threading

    assert normalize("$" + "1" * 5000).endswith("one dollars")
    assert normalize("1" * 5000 + "th").startswith("one one one")
    assert normalize("版本" + "1" * 5000 + ".2.3").startswith("版本一一一")
    done = threading.Event()
    threading.Thread(target=lambda: (normalize("![a](" * 2000), done.set()), daemon=True).start()
    assert done.wait(20), "an unclosed markdown image run took more than 20 s to read"


def test_numbers_inside_words_are_read_apart():
    """A number touching letters is read as a word of its own ('4K' -> 'four K'), not glued into one
    unreadable token ('fourK', 'threeD', 'HtwoO')."""
    assert normalize("4K video in 3D, H2O and 3.5x faster") == "four K video in three D, H two O and three point five x faster"


def test_chinese_circled_and_roman_numerals_are_read():
    """Upstream's Chinese normaliser maps circled and Roman numerals to their cardinals before its other rules
    (talker_re.json char_map0: ① 一, ⑫ 十二, ❶ 一, ⓪ 零, Ⅻ 十二); ❶ is no emoji to drop, and ² stays a unit mark."""
    assert normalize("步骤①打开，步骤⑫关闭，第Ⅻ章，❶号，⓪点，面积5m²") == "步骤一打开，步骤十二关闭，第十二章，一号，零点，面积五平方米"


def test_chinese_two_before_thousands_and_hundreds_is_liang():
    """Upstream's Chinese cardinal (talker_tn re_digit.py REDigit d4_to_chi, d2c_liang) says 两 for a 2 before
    千 or 百 ('两千元', '一千两百人'), where '二千' is not said; 二 stays elsewhere (二十二, 二万)."""
    assert normalize("价格2000元，重200kg，共1200人，22人，12000") == "价格两千元，重两百千克，共一千两百人，二十二人，一万两千"


@pytest.mark.parametrize("text, spoken", [
    ("Up at 12:30:45, mix it 3:2 on a 16:9 screen.",
     "Up at twelve thirty and forty-five seconds, mix it three to two on a sixteen to nine screen."),
    ("Call 555-123-4567, (555) 123-4567 or +1 415 555 0100.",
     "Call five five five, one two three, four five six seven, five five five, one two three, four five six seven or "
     "plus one, four one five, five five five, zero one zero zero."),
    ("Call 1-800-555-0100.", "Call one, eight zero zero, five five five, zero one zero zero."),
    ("It is 5 km at 30 mph, 20 °C, 50% and $3.50, €4, ¥100.",
     "It is five kilometers at thirty miles per hour, twenty degrees celsius, fifty percent and three dollars and "
     "fifty cents, four euros, one hundred yen."),
    ("Tom &amp; Jerry &lt;3 it&#39;s R&D, this&nothing.", "Tom and Jerry <three it's R and D, this and nothing."),
    ("See https://x.org/?a=1&amp;b=2 &amp; www.y.org/?c=3&d=4 now.", "See and now."),
    ("In 1999 we had 1999 apples, since 2024 in 1500 ms.",
     "In nineteen ninety-nine we had one thousand nine hundred ninety-nine apples, since twenty twenty-four in one "
     "thousand five hundred milliseconds."),
    ("Read pages 3-5, 10–12 and 5-10 kg, from 1990-1995, in 2020-21; 5 - 3 is 2, -2.5 is the 21st.",
     "Read pages three to five, ten to twelve and five to ten kilograms, from nineteen ninety to nineteen ninety-five, "
     "in twenty twenty to twenty-one; five - three is two, minus two point five is the twenty-first."),
])
def test_english_text_is_read_as_a_speaker_says_it(text, spoken):
    """Read as written, a clock time with seconds was 'twelve:thirty:forty-five', a ratio 'three:two', a phone number
    'five hundred fifty-five-one hundred twenty-three-...', euros and yen '€four', '¥one hundred', an HTML entity
    '&#thirty-nine;', a year 'one thousand nine hundred ninety-nine', a range 'three-five'. Each is said as a speaker
    says it; a subtraction with spaces and a number after 'in' with a unit stay numbers."""
    assert normalize(text) == spoken


@pytest.mark.parametrize("text, spoken", [
    ("比例是3:2，比分3：2，现在是12:30:45", "比例是三比二，比分三比二，现在是十二点三十分四十五秒"),
    ("打给13812345678吧", "打给幺三八幺二三四五六七八吧"),
    ("第3-5页，3~5个，2023-2024赛季", "第三至五页，三至五个，二零二三至二零二四赛季"),
    ("温度-5度，零下-3.5", "温度负五度，零下负三点五"),
    ("汤姆&amp;杰瑞&#39;s，价格€4和¥100", "汤姆和杰瑞's，价格四欧元和一百元"),
    ("见https://x.org/?a=1&b=2。", "见。"),
])
def test_chinese_text_is_read_as_a_speaker_says_it(text, spoken):
    """In Chinese a ratio or score was read as a clock time (3:2 -> 三点零二分), a mobile number without a label as a
    cardinal (一百三十八亿...), a range and a minus sign were left as '-' and '~' between readings (三-五, -五), years
    in a range as cardinals, and an HTML entity as '&amp;'."""
    assert normalize(text) == spoken


RUN_ON_WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into the green hills".split()


@pytest.mark.parametrize("text", [
    " ".join(RUN_ON_WORDS[i % len(RUN_ON_WORDS)] for i in range(400))[:2000],  # a run-on paragraph, no punctuation
    "我们今天去公园散步看到很多美丽的花朵和绿色的树木天气非常好" * 70,  # Chinese without 。
])
def test_a_text_without_punctuation_is_segmented_as_it_is_read(text):
    """A segment closes once it holds MAX_SEMANTIC_LEN words / CJK characters, between two of them, so the first
    sound (and speak-while-thinking's, as the reply streams) does not wait for the whole text to be segmented."""
    seg, segments, closed_at = Segmenter(), [], None
    for i, ch in enumerate(text):
        segments += seg.feed(ch)
        closed_at = i if segments and closed_at is None else closed_at
    segments += seg.flush()
    assert closed_at is not None and closed_at < 400, "the first segment waited for the whole text"
    assert "".join(segments) == text  # nothing lost, nothing added
    assert all(semantic_length(s) == MAX_SEMANTIC_LEN for s in segments[:-1]) and len(segments) >= 8
    assert all(not s[-1].isalpha() or not s.split()[-1].isascii() for s in segments[:-1])  # never inside a word
    whole = Segmenter()
    assert whole.feed(text) + whole.flush() == segments


def test_a_long_segment_closed_by_length_ends_at_its_last_clause_mark():
    """The Preview's commas close no segment: a long run of clauses is cut after the last comma that fits."""
    seg = Segmenter(PREVIEW_CLOSERS)
    clause = "我们今天去公园散步，看到很多美丽的花朵和绿色的树木"  # 24 characters; the 51st starts the third clause
    out = seg.feed(clause * 3) + seg.flush()
    assert out == [clause + clause[:10], clause[10:] + clause]
    seg = Segmenter()  # a mark that would leave a clause of a word or two is no place to end: 'Hi,' alone
    out = seg.feed("Hi, " + "word " * 60) + seg.flush()
    assert [semantic_length(s) for s in out] == [MAX_SEMANTIC_LEN, 11] and out[0].startswith("Hi, word")


@pytest.mark.parametrize("text, spoken", [
    ("Open 00:00 to 24:00, back at 00:30.", "Open midnight to midnight, back at twelve thirty AM."),
    ("Lunch 12:00 to 13:00, the train at 23:00:30.",
     "Lunch twelve o'clock to thirteen hundred, the train at twenty-three hundred and thirty seconds."),
    ("Dial 911, call 999, a 911 call, not 100 people.",
     "Dial nine one one, call nine nine nine, a nine one one call, not one hundred people."),
    ("Call 555-1234, not pages 300-1200.", "Call five five five, one two three four, not pages three hundred to one "
                                           "thousand two hundred."),
    ("Read pages 385-1024.", "Read pages three hundred eighty-five to one thousand twenty-four."),
    ("Install v2.0 or v1.10.3.", "Install version two point zero or version one point ten point three."),
    ("About 1e6 rows, 2.5e-3 apart.",
     "About ten to the power of six rows, two point five times ten to the power of minus three apart."),
    ("The 1990s, the 3rd, 10%, $5.99, €3, +1 (555) 123-4567.",
     "The nineteen nineties, the third, ten percent, five dollars and ninety-nine cents, three euros, plus one, five "
     "five five, one two three, four five six seven."),
])
def test_english_times_and_numbers_are_read_as_a_speaker_would(text, spoken):
    """'24:00' was read 'twenty-four to zero', '00:30' 'zero thirty', '13:00' "thirteen o'clock", 'Dial 911' 'nine
    hundred eleven', '555-1234' a range, 'v2.0' 'v two point zero' and '1e6' 'one e six'; each is now said as a speaker
    says it."""
    assert normalize(text) == spoken


@pytest.mark.parametrize("text, spoken", [
    ("请拨打110，或拨打911，电话555-1234", "请拨打幺幺零，或拨打九幺幺，电话五五五幺二三四"),
    ("号码是555-1234，见第385-1024页", "号码是五五五幺二三四，见第三百八十五至一千零二十四页"),
    ("1990s的音乐，他得了3rd", "一九九零年代的音乐，他得了第三"),
    ("共1e6条，误差2.5e-3", "共十的六次方条，误差二点五乘十的负三次方"),
    ("2024年12月3日12:30，增长3.5%，营业至24:00", "二零二四年十二月三日十二点三十分，增长百分之三点五，营业至二十四点整"),
])
def test_chinese_times_and_numbers_are_read_as_a_speaker_would(text, spoken):
    """In Chinese '拨打911' was read 九百一十一, '电话555-1234' 五五五负一千两百三十四, '1990s' 一千九百九十秒 (seconds),
    '3rd' 三rd and '1e6' 一e六; a number dialled is dictated with 幺, a decade is 年代, an ordinal 第 and a power 次方."""
    assert normalize(text) == spoken
