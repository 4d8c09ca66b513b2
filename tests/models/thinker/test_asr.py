"""The ASR prompts our processor builds equal the reference's (prompts fixture), and output parsing."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from engine.models.thinker.asr import TranscriptStream, asr_messages, dialect_prefix, iso_language, parse_transcript
from engine.models.thinker.processor import MediaSettings, MingProcessor
from engine.models.thinker.tokenizer import MingTokenizer
from tests.paths import fixture_case

HOTWORDS = ["Gansu Province", "Uyghur", "Xinjiang", "clay sealing method", "Umsh stew", "copper cauldrons"]


@pytest.mark.parametrize("case, context, hotwords, dialect", [
    ("plain_asr", None, None, None),
    ("asr_context_hotwords", "This is an audio about Culinary Traditions.", HOTWORDS, None),
    ("dialect_asr_shanghai", None, None, "上海"),
    ("lang_forced_asr_chinese", None, None, "Chinese"),
])
def test_asr_prompts_equal_the_reference(case, context, hotwords, dialect):
    prompts = fixture_case("prompts")
    meta = json.loads((prompts / "meta.json").read_text())
    sub = next(c for c in meta["cases"] if c["name"] == case)
    wave = load_file(str(fixture_case("frontend_audio") / "inputs.safetensors"))["wave_main"]
    processor = MingProcessor(MingTokenizer(prompts), MediaSettings())
    prompt = processor.build(asr_messages(wave, context, hotwords, 16000), assistant_prefix=dialect_prefix(dialect))
    assert prompt.text == sub["expanded_text"]
    expected_ids = load_file(str(prompts / "outputs.safetensors"))[f"{case}.input_ids"][0].tolist()
    assert prompt.ids == expected_ids


def test_output_parsing_and_streaming():
    assert parse_transcript("English\thello\tworld ").text == "hello\tworld"
    assert parse_transcript("no tab here").language is None
    assert parse_transcript("你好", forced_language="上海").language == "上海"
    s = TranscriptStream()
    assert [s.feed(x) for x in ["Eng", "lish\the", "llo"]] == ["", "he", "llo"]
    with pytest.raises(ValueError):
        dialect_prefix("bad\ttag")


def test_a_transcript_without_a_language_tag_is_streamed_at_the_end(tiny_engine, monkeypatch):
    """The stream holds text back until the model's `Language<TAB>` tag; an output without a tab was never
    streamed (no delta at all) while the final result held it all as the transcript (parse_transcript), so a
    streaming client saw an empty transcript. The held text now comes out before Done."""
    from engine.events import Done, TextDelta

    s = TranscriptStream()
    assert [s.feed(x) for x in ["hel", "lo there"]] == ["", ""] and s.flush() == "hello there"
    s = TranscriptStream()
    assert s.feed("English\thi") == "hi" and s.flush() == ""

    def chat(*args, **kwargs):
        yield TextDelta("hello ")
        yield TextDelta("there")
        yield Done(text="hello there", finish_reason="length")

    monkeypatch.setattr(tiny_engine, "chat", chat)
    events = list(tiny_engine.transcribe(np.zeros(1600, dtype=np.float32), sample_rate=16000))
    deltas = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert deltas == "hello there" == events[-1].result["text"] and events[-1].result["language"] is None


def test_the_streamed_transcript_is_the_final_transcript_whitespace_and_all():
    """The deltas joined gave ' hello world \\n' where the result (parse_transcript) said 'hello world' (a
    byte-level BPE word token carries its leading space, and the model's output may end in a newline): a
    streaming client's transcript and transcript.text.done disagreed. Over random outputs cut at random
    points, with and without a tag, forced or not, the stream now equals the parsed transcript exactly."""
    import random

    rng = random.Random(5)
    pieces = ["English", "\t", " ", "  ", "\n", "hello", " world", "你好", "。", "\u3000", "x\ty", ""]
    for _ in range(400):
        output = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 9)))
        forced = rng.choice([None, "Chinese"])
        cuts = sorted(rng.sample(range(len(output) + 1), min(len(output) + 1, rng.randrange(0, 5))))
        chunks = [output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)])]
        s = TranscriptStream(forced)
        streamed = "".join(s.feed(c) for c in chunks) + s.flush()
        assert streamed == parse_transcript(output, forced).text, (output, chunks, forced)


def test_the_engine_streams_the_transcript_it_returns(tiny_engine):
    from engine.events import Done, TextDelta
    from engine.sampling import GenerationParams

    audio = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    for dialect in (None, "Chinese"):
        events = list(tiny_engine.transcribe(audio, sample_rate=16000, dialect=dialect,
                                             params=GenerationParams(max_new_tokens=8)))
        assert isinstance(events[-1], Done)
        streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
        assert streamed and streamed == events[-1].result["text"], (streamed, events[-1].result)


def test_a_transcription_with_its_default_limit_ends_at_the_context(tiny_engine):
    """A clip whose prompt leaves 4 tokens of the context: the transcription's default limit (512, which no
    request named) was refused with context_length_exceeded; it now transcribes up to the context's end,
    in the engine and through POST /v1/audio/transcriptions (no max_tokens), which still refuses a named limit."""
    import io
    import wave

    import httpx

    from engine.events import Done
    from engine.models.thinker.asr import asr_messages
    from tests.server import running_server
    from tests.test_generate import short_context_engine

    audio = (np.random.default_rng(1).standard_normal(16000) * 0.1).astype(np.float32)
    prompt = tiny_engine.processor.build(asr_messages(audio, sample_rate=16000)).ids
    short = short_context_engine(tiny_engine, len(prompt) + 4)
    done = list(short.transcribe(audio, sample_rate=16000))[-1]
    assert isinstance(done, Done) and done.finish_reason == "length" and len(done.token_ids) == 4, done
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((audio * 32767).astype(np.int16).tobytes())
    with running_server(short) as srv:
        def post(**data):
            return httpx.post(srv.url + "/v1/audio/transcriptions", timeout=60, data={"model": "whisper-1", **data},
                              files={"file": ("a.wav", buf.getvalue(), "audio/wav")})
        r = post()
        assert r.status_code == 200, r.text
        r = post(max_tokens="50")
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_transcript_deltas_report_the_transcripts_tokens_only():
    """With logprobs asked for, a transcript delta carries the entries of the tokens that made its text: the language
    tag's and its tab's are not the transcript's (nor whitespace the transcript drops), so they are not reported."""
    from engine.events import TextDelta, TokenLogprob
    from engine.models.thinker.asr import TranscriptDeltas

    def token(text: str) -> TokenLogprob:
        return TokenLogprob(text, list(text.encode()), -0.5)

    def run(pieces, forced=None):
        deltas = TranscriptDeltas(TranscriptStream(forced), logprobs=True)
        out = [deltas.feed(TextDelta(p, [token(p)])) for p in pieces] + [deltas.flush()]
        return [(d.text, [t.token for t in d.logprobs]) for d in out if d is not None]

    assert run(["English", "\t", " he", "llo", " ", "world", " "]) == [
        ("he", [" he"]), ("llo", ["llo"]), (" world", [" ", "world"])]
    assert run(["Eng", "lish\tHi", "!"]) == [("Hi", ["lish\tHi"]), ("!", ["!"])]
    assert run(["no", " tab", " "]) == [("no tab", ["no", " tab"])]  # all of it is the transcript
    assert run([" hi"], forced="上海") == [("hi", [" hi"])]
    plain = TranscriptDeltas(TranscriptStream())
    assert plain.feed(TextDelta("x")) is None and plain.flush() == TextDelta("x", None)


@pytest.mark.parametrize("code, tag", [("en", "English"), ("zh-CN", "Chinese"), ("pt_BR", "Portuguese"),
                                       ("zh-Hant-TW", "Chinese"), ("es-419", "Spanish"), ("zh-yue", "Cantonese"),
                                       ("yue-HK", "Cantonese"), ("Chinese", None), ("上海", None), ("EN", "English"),
                                       ("EN-US", "English"), ("en-us", "English"), ("ZH-yue", "Cantonese")])
def test_a_language_code_with_a_script_region_or_dialect_is_mapped_to_the_models_tag(code, tag):
    """'zh-yue' (Cantonese, as BCP 47 writes it with an extended language subtag) was forced as Chinese: the dialect
    dropped; 'zh-Hant-TW' was forced as the tag 'zh-Hant-TW', one the model never writes. A tag that is not a code
    ("Chinese", "上海") is the model's own and passes as given. A code in capitals ("EN", as typed) was forced as the
    tag 'EN', one the model never writes; BCP 47 codes are case-insensitive."""
    assert iso_language(code) == tag


def test_a_dialect_code_the_model_has_no_tag_for_is_refused_not_forced_as_chinese():
    with pytest.raises(KeyError):
        iso_language("zh-wuu")  # (Wu Chinese: the model's tags for it are not published; '上海' is one, given as is)


def test_a_translation_asks_the_model_for_english_and_reads_its_output_as_a_transcript(tiny_engine, monkeypatch):
    """/v1/audio/translations runs the ASR path with the one translation instruction in place of the ASR one (context
    after it, as ASR's); its result's language is English whatever tag the model wrote, and a forced dialect (the
    spoken language) is refused rather than forced into a translation."""
    from engine.events import Done, Error, TextDelta
    from engine.models.thinker.asr import ASR_INSTRUCTION, TRANSLATION_INSTRUCTION

    asked = []

    def chat(messages, *args, **kwargs):
        asked.append((messages[0]["content"][0]["text"], kwargs.get("assistant_prefix")))
        yield TextDelta("Chinese\tgood ")
        yield TextDelta("morning")
        yield Done(text="Chinese\tgood morning", finish_reason="stop")

    monkeypatch.setattr(tiny_engine, "chat", chat)
    clip = np.zeros(1600, dtype=np.float32)
    events = list(tiny_engine.transcribe(clip, context="A greeting.", sample_rate=16000, task="translate"))
    assert asked == [(TRANSLATION_INSTRUCTION + "A greeting.", None)] and ASR_INSTRUCTION not in asked[0][0]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "good morning"
    assert events[-1].result == {"language": "English", "text": "good morning"}
    refused = list(tiny_engine.transcribe(clip, dialect="上海", sample_rate=16000, task="translate"))
    assert isinstance(refused[-1], Error) and refused[-1].code == "invalid_request" and len(asked) == 1
    unknown = list(tiny_engine.transcribe(clip, sample_rate=16000, task="summarise"))
    assert isinstance(unknown[-1], Error) and "translate" in unknown[-1].message
