"""OpenAI's own `openai` package against a real server on the tiny engine: every answer it gets parses into
the SDK's typed model *and validates* (`model_validate` of what it read: the SDK itself only constructs its
models, so a field of the wrong shape passes silently until a client's own code trips over it)."""

from __future__ import annotations

import openai
import pytest

from tests.server import b64, tone_pcm16, wav_bytes


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=60) as c:
        yield c


def validated(obj):
    """`obj` (an SDK model) as OpenAI's types require it: validating what the SDK read raises on a wrong shape."""
    return type(obj).model_validate(obj.model_dump())


CLIP = ("clip.wav", wav_bytes(tone_pcm16(0.5), 16000))


@pytest.mark.parametrize("language", [None, "en"])
def test_verbose_json_transcription_is_openais_shape(client, language):
    kwargs = {"language": language} if language else {}
    got = validated(client.audio.transcriptions.create(model="whisper-1", file=CLIP, response_format="verbose_json",
                                                        extra_body={"max_tokens": 8}, **kwargs))
    assert got.duration == pytest.approx(0.5) and isinstance(got.language, str)
    assert got.usage.type == "duration" and got.usage.seconds == pytest.approx(0.5)
    # OpenAI's segments (ours were `windows`, which the SDK does not read): one spanning the clip, as the srt cue
    (segment,) = got.segments
    assert (segment.id, segment.seek, segment.start, segment.end) == (0, 0, 0.0, pytest.approx(0.5))
    assert segment.text == got.text.strip() and segment.tokens and segment.avg_logprob < 0
    assert segment.compression_ratio > 0 and "windows" not in got.model_extra
    plain = validated(client.audio.transcriptions.create(model="whisper-1", file=CLIP, extra_body={"max_tokens": 8}))
    assert plain.usage.type == "tokens" and plain.usage.output_tokens >= 1  # json keeps its token usage


@pytest.mark.parametrize("kwargs", [{}, {"quality": "high", "style": "vivid", "background": "opaque"},
                                    {"size": "auto", "quality": "auto"}])
def test_an_images_answer_validates_whatever_was_asked(client, kwargs):
    got = validated(client.images.generate(model="gpt-image-1", prompt="a red cup", **{"size": "32x32", **kwargs}))
    assert got.data and got.data[0].b64_json and got.output_format == "png"
    assert got.size and "x" in got.size  # the size made, not "auto"


def test_openais_voice_names_speak_in_the_talkers_own_voice(client):
    """The SDK's speech call must name a voice; a drop-in client names one of OpenAI's (alloy ... cedar)."""
    from engine.server.audio_out import read_wav_header

    audio = client.audio.speech.create(model="tts-1", voice="cedar", input="Hi.", response_format="wav")
    assert read_wav_header(audio.content)["data_len"] > 0
    stream = client.chat.completions.create(model="gpt-4o-audio-preview", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, modalities=["text", "audio"], stream=True,
                                            audio={"voice": "alloy", "format": "pcm16"})
    assert any(c.choices and c.choices[0].delta.audio for c in stream)
    with pytest.raises(openai.BadRequestError) as info:  # any other name is still one that must be saved first
        client.audio.speech.create(model="tts-1", voice="nobody", input="Hello.")
    assert info.value.code == "voice_not_found" and info.value.param == "voice"


HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("fmt, magic", [("wav", b"RIFF"), ("flac", b"fLaC"), ("mp3", b"ID3"), ("pcm16", None)])
def test_a_whole_chat_answer_speaks_in_the_audio_format_asked_for(client, fmt, magic):
    """OpenAI's audio-out example: not streamed, audio {voice, format: wav}; message.audio is a ChatCompletionAudio."""
    import base64

    got = validated(client.chat.completions.create(model="gpt-4o-audio-preview", messages=HI, max_tokens=4,
                                                   modalities=["text", "audio"],
                                                   audio={"voice": "alloy", "format": fmt}))
    audio = got.choices[0].message.audio
    data = base64.b64decode(audio.data)
    assert audio.id and audio.expires_at == got.created and len(data) > 1000
    assert data.startswith(magic) if magic else len(data) % 2 == 0 and audio.model_extra["sample_rate"] > 0
    if fmt != "pcm16":
        with pytest.raises(openai.BadRequestError) as info:  # a stream's audio is pcm16, as OpenAI's
            client.chat.completions.create(model="gpt-4o-audio-preview", messages=HI, max_tokens=4, stream=True,
                                           modalities=["text", "audio"], audio={"voice": "alloy", "format": fmt})
        assert info.value.param == "audio.format"


@pytest.mark.parametrize("fmt, head, stamps", [("srt", "1\n", "00:00:00,000 --> 00:00:00,500"),
                                               ("vtt", "WEBVTT\n\n", "00:00:00.000 --> 00:00:00.500")])
def test_subtitle_transcriptions_are_one_cue_spanning_the_clip(client, fmt, head, stamps):
    text = client.audio.transcriptions.create(model="whisper-1", file=CLIP, extra_body={"max_tokens": 8})
    got = client.audio.transcriptions.create(model="whisper-1", file=CLIP, response_format=fmt,
                                             extra_body={"max_tokens": 8})
    assert isinstance(got, str) and got == f"{head}{stamps}\n{text.text.strip()}\n"


def test_every_answer_names_its_request_as_openais_do(client):
    """The SDK reads `x-request-id` as a result's `_request_id` and an error's `request_id` (what a user quotes)."""
    first = client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=1)
    raw = client.models.with_raw_response.list()
    assert first._request_id and raw.request_id and first._request_id != raw.request_id
    assert int(raw.headers["openai-processing-ms"]) >= 0
    for call, error in ((lambda: client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=0),
                         openai.BadRequestError),
                        (lambda: client.embeddings.create(model="gpt-4o", input="hi"), openai.NotFoundError)):
        with pytest.raises(error) as info:
            call()
        assert info.value.request_id and info.value.request_id.startswith("req_")


def test_openais_custom_voice_object_names_a_voice(client):
    """The SDK's `voice` may be {"id": ...} (speech and chat): a voice by name, refused naming voice.id when unknown."""
    audio = client.audio.speech.create(model="tts-1", voice={"id": "alloy"}, input="Hi.", response_format="pcm")
    assert len(audio.content) > 1000
    nobody = {"id": "nobody"}
    for call, param in ((lambda: client.audio.speech.create(model="tts-1", voice=nobody, input="Hi."), "voice.id"),
                        (lambda: client.chat.completions.create(model="gpt-4o-audio-preview", messages=HI, max_tokens=2,
                                                                modalities=["text", "audio"],
                                                                audio={"voice": nobody, "format": "wav"}),
                         "audio.voice.id")):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert (info.value.code, info.value.param) == ("voice_not_found", param)


def test_an_answer_replayed_as_the_sdk_appends_it_is_read_as_what_was_said(client, server, tiny_engine):
    """`messages.append(answer.choices[0].message)`: a spoken answer (its audio object, transcript included) and a
    refusal (no content) are the assistant's words in the next turn, as the same words given as content are."""
    spoken = client.chat.completions.create(model="gpt-4o-audio-preview", messages=HI, max_tokens=3,
                                            modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    said = spoken.choices[0].message.audio.transcript
    assert said
    follow = {"role": "user", "content": "Again?"}

    def reply(message):
        return client.chat.completions.create(model="gpt-4o", messages=[*HI, message, follow], max_tokens=3)

    as_text = reply({"role": "assistant", "content": said}).choices[0].message.content
    assert reply(spoken.choices[0].message).choices[0].message.content == as_text
    assert reply({"role": "assistant", "content": None, "audio": {"id": "a", "transcript": said}}
                 ).choices[0].message.content == as_text
    assert reply({"role": "assistant", "content": None, "refusal": said}).choices[0].message.content == as_text
    with pytest.raises(openai.BadRequestError) as info:  # audio by id alone: this server keeps none
        reply({"role": "assistant", "audio": {"id": spoken.choices[0].message.audio.id}})
    assert info.value.param == "messages[1].audio"


@pytest.mark.parametrize("call", [lambda c: c.embeddings.create(model="gpt-4o", input="hi"),
                                  lambda c: c.responses.create(model="gpt-4o", input="hi"),
                                  lambda c: c.moderations.create(input="hi"), lambda c: c.files.list()])
def test_openais_routes_this_server_lacks_say_what_it_serves(client, call):
    with pytest.raises(openai.NotFoundError) as info:
        call(client)
    assert info.value.code == "not_found" and info.value.type == "not_found_error"
    assert "no such route" in info.value.message and "POST /v1/chat/completions" in info.value.message


def test_the_sdk_does_not_rerun_a_request_the_engine_failed():
    """OpenAI's SDK retries a 500 twice by itself (max_retries=2): each retry would run the whole job again (a
    failing image generation three times over) unless the answer says `x-should-retry: false`."""
    from engine.events import Error

    from tests.server import FakeEngine, fake_server

    engine = FakeEngine(script=[Error("the talker's weights are missing", "talker_error")])
    with fake_server(engine) as srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=30) as sdk:
        with pytest.raises(openai.InternalServerError) as info:
            sdk.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
        assert info.value.code == "engine_error" and len(engine.calls) == 1
        assert info.value.response.headers["x-should-retry"] == "false"


def test_raw_pcm_speech_is_openais_24_khz(client, tiny_engine):
    """`pcm` has no header to state a rate: a reader takes OpenAI's 24 kHz, so that is what it holds (the talker's
    44.1 kHz samples read at 24 kHz would play 1.8 times too long and low); the WAV states the talker's own rate."""
    from engine.server.audio_out import read_wav_header

    kwargs = {"model": "tts-1", "voice": "alloy", "input": "Hello there.", "extra_body": {"seed": 1}}
    wav = client.audio.speech.create(response_format="wav", **kwargs).content
    pcm = client.audio.speech.create(response_format="pcm", **kwargs).content
    head = read_wav_header(wav)
    assert head["sample_rate"] == tiny_engine.talker.sample_rate != 24000
    wav_s, pcm_s = head["data_len"] / 2 / head["sample_rate"], len(pcm) / 2 / 24000
    assert pcm_s == pytest.approx(wav_s, abs=0.01)  # one second stays one second


def test_every_field_the_sdk_can_send_is_known_by_name():
    """Each parameter of the SDK's create calls is honoured, accepted with no effect, or refused naming why: never
    'unknown field' (which says the field does not exist, as for a typo), the answer OpenAI's newer fields got."""
    import inspect

    from engine.server import fields

    sdk = openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")
    for call, table in ((sdk.chat.completions.create, fields.CHAT), (sdk.audio.speech.create, fields.SPEECH),
                        (sdk.audio.transcriptions.create, fields.TRANSCRIPTION),
                        (sdk.audio.translations.create, fields.TRANSLATION),
                        (sdk.images.generate, fields.IMAGE_GENERATIONS), (sdk.images.edit, fields.IMAGE_EDITS)):
        sent = set(inspect.signature(call).parameters) - {"extra_headers", "extra_query", "extra_body", "timeout"}
        assert sent <= set(table.taken) | set(table.ignored) | set(table.refused), (call, sorted(sent))


def test_openais_newer_fields_reach_or_are_refused_by_name(client, server):
    got = client.chat.completions.create(model="gpt-4o", max_tokens=1, prompt_cache_retention="24h",
                                         messages=[{"role": "user", "content": [
                                             {"type": "text", "text": "Hi", "prompt_cache_breakpoint": {}}]}])
    assert got.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=1,
                                       moderation={"model": "omni-moderation-latest"})
    assert (info.value.code, info.value.param) == ("unsupported_parameter", "moderation")
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="gpt-image-1", prompt="a cup", size="32x32", frame_count=4)
    assert (info.value.code, info.value.param) == ("unsupported_parameter", "frame_count")
    plain = client.audio.transcriptions.create(model="whisper-1", file=CLIP, extra_body={"max_tokens": 8})
    hinted = client.audio.transcriptions.create(model="whisper-1", file=CLIP, keywords=["Jingdezhen"],
                                                extra_body={"max_tokens": 8})
    via_hotwords = client.audio.transcriptions.create(model="whisper-1", file=CLIP,
                                                      extra_body={"max_tokens": 8, "hotwords": "Jingdezhen"})
    assert hinted.usage.input_tokens == via_hotwords.usage.input_tokens > plain.usage.input_tokens  # in the prompt


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (the SDK marks its translations call deprecated)
def test_a_translation_answers_in_each_of_openais_formats_and_refuses_what_openai_refuses(client):
    """/v1/audio/translations did not exist (the SDK's call met 404). It answers as OpenAI's: json and verbose_json
    validate as the SDK's Translation / TranslationVerbose (task "translate", English); text and srt are text; the
    audio's `language` and `stream`, which OpenAI's translations do not take, are refused naming the field. (The
    tiny model's words are random: the route is what is checked.) Our `hotwords` go into the prompt (they were
    refused as unknown)."""
    from openai.types.audio import Translation, TranslationVerbose

    short = {"extra_body": {"max_tokens": 4}}
    plain = client.audio.translations.create(model="whisper-1", file=CLIP, temperature=0.0, prompt="A greeting.",
                                             **short)
    assert isinstance(validated(plain), Translation) and isinstance(plain.text, str)
    verbose = validated(client.audio.translations.create(model="whisper-1", file=CLIP, response_format="verbose_json",
                                                         **short))
    assert isinstance(verbose, TranslationVerbose) and verbose.duration == pytest.approx(0.5)
    assert verbose.model_extra["task"] == "translate" and verbose.language == "English"
    assert verbose.segments[0].end == pytest.approx(0.5)
    bare, hinted = (client.audio.translations.create(model="whisper-1", file=CLIP, extra_body={"max_tokens": 4, **more})
                    for more in ({}, {"hotwords": "Jingdezhen"}))  # (ours, as a transcription's: in the prompt)
    assert validated(hinted).usage["input_tokens"] > validated(bare).usage["input_tokens"]  # (not in Translation)
    srt = client.audio.translations.create(model="whisper-1", file=CLIP, response_format="srt", **short)
    assert srt.startswith("1\n00:00:00,000 --> 00:00:00,500\n")
    for field, value, said in (("language", "de", "always into English"), ("stream", True, "whole answer")):
        with pytest.raises(openai.BadRequestError) as info:
            client.audio.translations.create(model="whisper-1", file=CLIP, extra_body={field: value})
        assert (info.value.code, info.value.param) == ("unsupported_parameter", field) and said in info.value.message


def test_every_image_detail_the_sdk_offers_is_accepted(client):
    from tests.server import b64, image_array, png_bytes

    url = "data:image/png;base64," + b64(png_bytes(image_array(28, 28)))
    for detail in ("auto", "low", "high", "original"):  # types/chat/chat_completion_content_part_image_param.py
        part = {"type": "image_url", "image_url": {"url": url, "detail": detail}}
        got = client.chat.completions.create(model="gpt-4o", max_tokens=1,
                                             messages=[{"role": "user", "content": [part]}])
        assert got.choices[0].finish_reason in ("stop", "length")


def test_every_model_name_the_sdk_offers_is_answered_on_its_own_endpoint():
    """A drop-in client names the model its SDK offers for the endpoint (types ChatModel, AudioModel, SpeechModel,
    ImageModel): the served model answers each; a name of another kind, or no OpenAI model, is still refused."""
    from typing import get_args

    from openai.types import AudioModel, ChatModel, ImageModel
    from openai.types.audio import SpeechModel

    from engine.server.fields import is_openai_alias

    def names(alias):
        return {n for n in get_args(alias) if isinstance(n, str)} | {n for a in get_args(alias) for n in names(a)}

    for alias, kind in ((ChatModel, "chat"), (AudioModel, "transcription"), (SpeechModel, "speech"),
                        (ImageModel, "image")):
        assert names(alias) and {n for n in names(alias) if not is_openai_alias(n, kind)} == set(), kind
    assert not any(is_openai_alias(n, "chat") for n in ("whisper-1", "tts-1", "gpt-image-2", "gpt-9", "gpt-5.1-x"))


def test_chat_pcm16_is_openais_24_khz_unless_a_rate_is_asked(client, tiny_engine):
    """Chat's pcm16 (whole or streamed) came at the talker's 44.1 kHz, said only in our `sample_rate` field: an SDK
    user playing it at OpenAI's 24 kHz heard it 1.8 times too long and low. It is 24 kHz now, as realtime's and
    speech's pcm; our extension `audio.sample_rate` asks for another (our clients: the talker's own)."""
    import base64

    ask = dict(model="gpt-4o-audio-preview", messages=HI, max_tokens=4, modalities=["text", "audio"])
    pcm = client.chat.completions.create(audio={"voice": "alloy", "format": "pcm16"}, **ask)
    audio = pcm.choices[0].message.audio
    assert audio.model_extra["sample_rate"] == 24000 and len(base64.b64decode(audio.data)) > 1000
    stream = client.chat.completions.create(audio={"voice": "alloy", "format": "pcm16"}, stream=True, **ask)
    deltas = [c.choices[0].delta.audio for c in stream if c.choices and c.choices[0].delta.audio is not None]
    rates = {(d.model_extra or {}).get("sample_rate") for d in deltas if getattr(d, "data", None)}
    assert rates - {None} == {24000}
    native = client.chat.completions.create(audio={"voice": "alloy", "format": "pcm16",
                                                   "sample_rate": tiny_engine.talker.sample_rate},
                                            **ask).choices[0].message.audio
    assert native.model_extra["sample_rate"] == tiny_engine.talker.sample_rate
    for bad_ask in ({"format": "wav", "sample_rate": 16000}, {"format": "pcm16", "sample_rate": 2654}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(audio={"voice": "alloy", **bad_ask}, **ask)
        assert info.value.param == "audio.sample_rate"


TOP_LOGPROBS = 3


def test_logprobs_parse_into_openais_types_in_a_whole_answer_and_a_stream(client):
    """Each choice's `logprobs.content` (whole) and each chunk's (stream) are OpenAI's ChatCompletionTokenLogprob:
    a greedy reply's tokens are each the best of their top_logprobs, and a stream reports the same tokens as the
    whole answer."""
    kw = dict(model="gpt-4o-mini", messages=HI, max_tokens=8, logprobs=True, top_logprobs=TOP_LOGPROBS)
    whole = validated(client.chat.completions.create(n=2, **kw))
    for choice in whole.choices:
        entries = choice.logprobs.content
        assert entries and all(len(e.top_logprobs) == TOP_LOGPROBS and e.logprob <= 0 for e in entries)
        assert all(e.logprob == e.top_logprobs[0].logprob and e.bytes == e.top_logprobs[0].bytes for e in entries)
        assert all(e.token == bytes(e.bytes).decode("utf-8", errors="replace") for e in entries)
    streamed = [e for chunk in client.chat.completions.create(stream=True, **kw)
                for c in validated(chunk).choices if c.logprobs is not None for e in c.logprobs.content]
    first = whole.choices[0].logprobs.content
    assert [e.bytes for e in streamed] == [e.bytes for e in first]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in first], abs=1e-4)
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=4)
    assert plain.choices[0].logprobs is None  # (not asked for: nothing computed, nothing sent)


@pytest.mark.parametrize("kwargs, code, param", [
    (dict(top_logprobs=2), "invalid_value", "top_logprobs"),  # (as OpenAI: top_logprobs needs logprobs)
    (dict(logprobs=True, top_logprobs=21), "invalid_value", "top_logprobs"),
    (dict(logprobs=True, top_logprobs=-1), "invalid_value", "top_logprobs"),
    (dict(logprobs=True, modalities=["text", "audio"]), "unsupported_parameter", "logprobs"),
])
def test_logprobs_asked_wrongly_are_refused_naming_the_field(client, kwargs, code, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2, **kwargs)
    assert (info.value.code, info.value.param) == (code, param)


def test_tokens_a_stop_string_cut_are_not_in_the_logprobs(client):
    kw = dict(model="gpt-4o-mini", messages=HI, max_tokens=24)
    text = client.chat.completions.create(**kw).choices[0].message.content
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2]
                and text[i:i + 2] not in text[:i])
    got = validated(client.chat.completions.create(stop=stop, logprobs=True, **kw))
    entries = got.choices[0].logprobs.content
    reported = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace")
    assert got.choices[0].message.content == text[:text.index(stop)] and text[:text.index(stop)].startswith(reported)
    assert len(entries) < got.usage.completion_tokens  # (the stop string's tokens were drawn, not reported)


def usage_details_in_openais_types(usage) -> tuple:
    """A chat usage's figures, checked against OpenAI's CompletionUsage: every field one the SDK knows (none left
    over in `model_extra`), the totals adding up, nothing cached or predicted, no reasoning counted."""
    assert not usage.model_extra and not usage.prompt_tokens_details.model_extra
    assert not usage.completion_tokens_details.model_extra
    prompt, completion = usage.prompt_tokens_details, usage.completion_tokens_details
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens == prompt.text_tokens + prompt.audio_tokens + prompt.image_tokens
    assert usage.completion_tokens == completion.text_tokens + completion.audio_tokens
    assert (prompt.cached_tokens, completion.reasoning_tokens, completion.accepted_prediction_tokens,
            completion.rejected_prediction_tokens) == (0, 0, 0, 0)
    return prompt.audio_tokens, completion.text_tokens, completion.audio_tokens


def test_a_spoken_chat_answers_usage_counts_the_prompts_audio_and_the_talkers_patches(client):
    """A heard question answered in speech: the prompt's audio tokens and the reply's audio tokens (the talker's
    latent patches, counted in completion_tokens as OpenAI's are), whole and in a stream's include_usage chunk."""
    clip = {"type": "input_audio", "input_audio": {"data": b64(wav_bytes(tone_pcm16(0.5))), "format": "wav"}}
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What do you hear?"}, clip]}]
    spoken = {"model": "gpt-4o-audio-preview", "messages": msgs, "max_tokens": 4, "seed": 3,
              "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"}}
    whole = validated(client.chat.completions.create(**spoken))
    audio_in, text_out, audio_out = usage_details_in_openais_types(whole.usage)
    assert audio_in > 0 and text_out >= 1 and audio_out > 0
    chunks = list(client.chat.completions.create(**spoken, stream=True, stream_options={"include_usage": True}))
    streamed = usage_details_in_openais_types(validated(chunks[-1]).usage)
    assert streamed == (audio_in, text_out, audio_out)  # (one seed: the same reply, spoken the same)


def test_n_choices_usage_counts_the_prompt_once_and_every_choices_tokens(client):
    one = validated(client.chat.completions.create(model="default", messages=HI, max_tokens=4, seed=5))
    two = validated(client.chat.completions.create(model="default", messages=HI, max_tokens=4, seed=5, n=2))
    assert usage_details_in_openais_types(one.usage)[2] == 0  # a text answer has no audio tokens
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.completion_tokens_details.text_tokens == two.usage.completion_tokens > one.usage.completion_tokens
    usage_details_in_openais_types(two.usage)


def test_transcription_logprobs_come_as_openais_when_included(client, server):
    """`include=["logprobs"]` (gpt-4o-transcribe's): the transcript's tokens with their log probabilities, in the json
    body and in each streamed event (the done event all of them); it was refused as unsupported. The tokens are the
    transcript's own (not the model's language tag), so their bytes spell the transcript."""
    ask = {"model": "gpt-4o-transcribe", "file": CLIP, "include": ["logprobs"], "temperature": 0,
           "extra_body": {"max_tokens": 8}}
    got = validated(client.audio.transcriptions.create(**ask))
    assert got.logprobs and all(lp.logprob <= 0 for lp in got.logprobs)
    tokenizer = server.ctx.engine.tokenizer  # (a special token the random model draws is reported, by its name,
    special = {tokenizer.piece_bytes(i) for i in tokenizer.special_ids}  # though the text skips it)
    spelled = b"".join(token for token in (bytes(int(b) for b in lp.bytes) for lp in got.logprobs)
                       if token not in special)
    assert spelled.decode("utf-8", errors="replace").strip() == got.text
    events = [validated(e) for e in client.audio.transcriptions.create(stream=True, **ask)]
    done, deltas = events[-1], [e for e in events if e.type == "transcript.text.delta"]
    assert done.type == "transcript.text.done" and done.text == got.text
    assert [lp.token for e in deltas for lp in e.logprobs] == [lp.token for lp in done.logprobs]
    assert [lp.token for lp in done.logprobs] == [lp.token for lp in got.logprobs]
    assert [lp.logprob for lp in done.logprobs] == pytest.approx([lp.logprob for lp in got.logprobs], abs=1e-4)
    assert client.audio.transcriptions.create(**{k: v for k, v in ask.items() if k != "include"}).logprobs is None


MIB = 1024 * 1024


@pytest.mark.parametrize("load, status, code", [
    (lambda s: setattr(s, "other_media", lambda: 3 * MIB), 503, "server_media_limit"),  # a session took the room
    (lambda s: setattr(s, "max_queue", 0), 429, "queue_full")], ids=["media", "line"])  # requests filled the line
def test_a_chats_later_choices_are_not_refused_for_load_let_in_with_the_first(load, status, code):
    """`n` choices are made one after another, each put in line when the one before ends. A later choice was checked
    against the server's load as a new request: when the load grew between two choices (another request or a realtime
    session's media coming in at that moment, which a test cannot time: the scheduler's figures stand in), the whole
    request failed after the first choice had been made, and that work was lost. OpenAI answers all of a request's
    choices or none, refusing for load before any work: the request is now let in (or refused) with its first choice,
    and its later choices continue it."""
    import threading

    import numpy as np

    from engine.events import Done, TextDelta
    from tests.server import FakeEngine, fake_server, png_bytes, wait_for

    picture = "data:image/png;base64," + b64(png_bytes(np.zeros((1000, 1000, 3), np.uint8)))  # 2.9 MiB decoded
    ask = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": picture}}]}]}
    engine = FakeEngine([TextDelta("a"), TextDelta("b"), Done("ab", "stop")], step_s=0.3)
    with fake_server(engine, max_total_media_bytes=5 * MIB) as srv, \
            openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60) as sdk:
        answers = []
        asking = threading.Thread(target=lambda: answers.append(sdk.chat.completions.create(n=2, **ask)))
        asking.start()
        wait_for(lambda: engine.calls)  # the first choice is being made: now the load grows
        load(srv.app.state.ctx.scheduler)
        asking.join(60)
        assert [c.message.content for c in answers[0].choices] == ["ab", "ab"] and len(engine.calls) == 2
        with pytest.raises(openai.APIStatusError) as info:  # a new request is refused for that load, before any work
            sdk.chat.completions.create(**ask)
        assert (info.value.status_code, info.value.code) == (status, code) and len(engine.calls) == 2


@pytest.mark.parametrize("kwargs, code, param, said", [
    ({"response_format": {"type": "json_object"}}, "unsupported_parameter", "response_format", "json_object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}},
     "unsupported_parameter", "response_format", "json_schema"),
    ({"extra_body": {"response_format": {"type": "yaml"}}}, "invalid_value", "response_format.type", "yaml"),
    ({"extra_body": {"metadata": {"run": 7}}}, "invalid_type", "metadata.run", "string"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "invalid_value", "metadata", "at most 16"),
    ({"extra_body": {"user": 42}}, "invalid_type", "user", "string"),
    ({"extra_body": {"parallel_tool_calls": "no"}}, "invalid_type", "parallel_tool_calls", "true or false"),
    ({"extra_body": {"stop": 3}}, "invalid_type", "stop", "a string or a list"),  # (was invalid_value)
    ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_value", "stop", "at most 4"),
    ({"extra_body": {"prompt_cache_retention": "forever"}}, "invalid_value", "prompt_cache_retention", "'24h'"),
    ({"extra_body": {"prompt_cache_retention": 24}}, "invalid_type", "prompt_cache_retention", "'in_memory'"),
    ({"extra_body": {"prompt_cache_options": {"ttl": "1h"}}}, "invalid_value", "prompt_cache_options.ttl", "'30m'"),
    ({"extra_body": {"prompt_cache_options": {"size": 1}}}, "unknown_parameter", "prompt_cache_options.size", "size"),
])
def test_chat_fields_refused_by_name_as_openai_refuses_them(client, kwargs, code, param, said):
    """JSON mode and structured outputs are refused naming what was asked for (they were refused as "only text is
    supported", and a `type` OpenAI does not have the same way); the fields accepted with no effect (metadata, user,
    parallel_tool_calls ...) took any value, where OpenAI's 400 names one of the wrong type or size."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=1, **kwargs)
    assert (info.value.code, info.value.param) == (code, param) and said in info.value.message
    assert info.value.body["type"] == "invalid_request_error"


def test_chat_fields_openai_takes_are_answered(client):
    got = validated(client.chat.completions.create(
        model="gpt-4o", messages=HI, max_completion_tokens=2, stop=["a", "b", "c", "d"], user="u-1", store=False,
        metadata={"run": "7"}, service_tier="auto", parallel_tool_calls=False, safety_identifier="s-1",
        prompt_cache_key="k", response_format={"type": "text"}, prompt_cache_retention="24h",
        extra_body={"prompt_cache_options": {"mode": "explicit", "ttl": "30m"}}))
    assert got.choices[0].finish_reason in ("stop", "length") and got.usage.completion_tokens <= 2
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2, stop="zz", stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 2  # the usage chunk comes last
    for kwargs, param in (({"store": True}, "store"),
                          ({"service_tier": "flex"}, "service_tier"),
                          ({"prediction": {"type": "content", "content": "Hello"}}, "prediction")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=1, **kwargs)
        assert info.value.param == param


def test_a_long_prompts_progress_comments_leave_the_sdks_stream_as_openais(client, server, tiny_engine):
    """A prompt of more than one prefill chunk gets `: progress` comment lines before its first token (our extension):
    the SDK reads past them, every chunk validates and the usage chunk comes last."""
    import httpx

    unit = "the quick brown fox jumps over the lazy dog. "
    body = {"model": "gpt-4o", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": unit * (600 // len(tiny_engine.tokenizer.encode_plain(unit)) + 1)}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as raw:
        assert any(line.startswith(': progress {"stage":"prefill"') for line in raw.iter_lines())
    chunks = [validated(c) for c in client.chat.completions.create(**body)]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 512
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
