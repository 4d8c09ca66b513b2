"""The engine API that servers and UIs call: load a checkpoint (or the tiny demo default) and turn
requests into event streams.

  * `chat(messages, params)`: messages with text, image, video and audio parts;
  * `transcribe(audio, context=None, hotwords=None, dialect=None)`: ASR tasks;
each yields TextDelta events then one Done (with figures) or one Error. One request runs on the
model at a time; others wait their turn (the server adds queue positions, limits and sessions).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.models.thinker.asr_windows import Windowing, transcribe_windows
from engine.models.thinker.asr import (SPEECH_TEXT_INSTRUCTIONS, TRANSLATION_LANGUAGE, TranscriptDeltas,
                                       TranscriptStream, asr_messages, dialect_prefix, parse_transcript)
from engine.errors import MingError
from engine.events import (MEDIA_STAGE, TRANSCRIBING_REFERENCE, TRANSCRIBING_STAGE, AudioChunk, Done, Error, Event,
                           GenerationStats, Progress, TextDelta)
from engine.generate import Cancelled, context_error, default_prefill_chunk, generate, stop_if_set
from engine.models.thinker.llm import AudioSpan, MultimodalInputError, MultimodalInputs
from engine.media.errors import MediaError
from engine.models.thinker.processor import MediaPastContext, MediaSettings, MingProcessor, ProcessedPrompt
from engine.models.thinker.projectors import encode_audio_wrapped, encode_images
from engine.models.thinker.prompt import ChatMessage, PromptError
from engine.sampling import GenerationParams
from engine.models.thinker.config import MingConfig
from engine.loader import resolve_checkpoint
from engine.placement.expert_runtime import RuntimeOptions
from engine.placement.auto import (PLACEMENTS, auto_plan, fit_on_host, machine_devices, placement_summary,
                                   runtime_options_for, with_measured_speed)
from engine.placement.planner import Plan
from engine.models.thinker.model import LoadedModel, count_parameters, load_model, parse_dtype
from engine.tiny import ensure_tiny_checkpoint, is_demo_checkpoint
from engine.models.thinker.tokenizer import MingTokenizer

# Below this many bytes of weights a CPU forward is dominated by per-op overhead, where extra
# OpenMP threads only add synchronisation (measured on the tiny model: 1 thread ~9x faster than 2
# on a busy 2-core machine); bigger models keep torch's default thread count.
SMALL_MODEL_BYTES = 64 * 2**20

REF_TRANSCRIPT_MAX_TOKENS = 256  # ASR of a voice-cloning reference clip (see Engine._asr_text)
# The command launch.py prints to load the real model, on a line of its own so that it copies as it is (it had
# "(or a local checkpoint directory)" after it); the same as the studio banner's (app/ui/banner.py).
REAL_MODEL_COMMAND = "python launch.py --model inclusionAI/Ming-flash-omni-2.0"


def device_problem(name: str | None) -> str | None:
    """What is wrong with the --device a user asked for (None: it can be used, or none was asked for), said
    before the model loads: a torch RuntimeError or an AssertionError from a torch built without CUDA otherwise."""
    if name is None:
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        return f"invalid --device '{name}': {e}"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name}: CUDA is not available on this machine (use --device cpu)"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present"
    elif dev.type not in ("cpu", "mps", "xpu"):
        return f"--device {name}: unsupported device type '{dev.type}'"
    return None


@dataclass
class EngineInfo:
    name: str
    path: str
    is_demo: bool
    release: str
    parameters: int
    dtype: str
    device: str
    load_seconds: float
    components: list[str]
    placement: str = ""


def model_bytes(model: LoadedModel) -> int:
    mods = [model.llm, *model.encoders.components().values()]
    return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())


class Engine:
    def __init__(self, model: LoadedModel, tokenizer: MingTokenizer, is_demo: bool, media: MediaSettings | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.is_demo = is_demo
        self.processor = MingProcessor(tokenizer, media or MediaSettings.for_checkpoint(model.path, model.config))
        self._lock = threading.Lock()
        self.placement = f"everything on {model.device}"

    @classmethod
    def load(cls, path_or_id: str | Path | None = None, dtype: str | None = None, device: str | None = None,
             progress=None, cpu_threads: int | None = None, expert_dtype: str = "bf16",
             placement: str | Plan = "auto", runtime_options: RuntimeOptions | None = None, log=None,
             linear_dtype: str = "bf16") -> "Engine":
        """`path_or_id` None loads (and on first use generates) the tiny random demo checkpoint.
        dtype defaults to bf16 on GPU and on CPU to fp32 where the model fits in memory in it, else bf16.
        `cpu_threads` sets torch's thread count; by default a small model on CPU runs on one thread (see
        SMALL_MODEL_BYTES). `expert_dtype` "fp8" | "fp8-block" | "int8" | "int4" quantises the routed experts
        while loading (engine.placement.quant); `linear_dtype` "int8" (CPU only) the LLM's other linears.
        `placement`: "auto" (on CUDA, a model that does not fit on one GPU is spread over this
        machine's GPUs and host memory by the planner; on a CPU, the planner checks first that it fits in
        the memory available now and leaves out the generators when only the thinker does:
        engine.placement.auto), "single" (everything on `device`, unchecked), or an
        engine.placement.planner.Plan to follow (with `runtime_options`). `log`: called with one line saying
        where the weights went. Raises engine.placement.planner.PlanError (a ValueError) when it cannot fit."""
        dev = torch.device(device) if device else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        plan = host_fit = None
        if not isinstance(placement, Plan) and placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS} or a Plan, got {placement!r}")
        path = resolve_checkpoint(ensure_tiny_checkpoint() if path_or_id is None else path_or_id)
        # the small files first (config, tokenizer, processor settings): a broken one is said before minutes of weights
        config = MingConfig.from_file(path)
        tokenizer = MingTokenizer(path)
        media = MediaSettings.for_checkpoint(path, config)
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        if placement == "auto" and dev.type == "cpu":
            host_fit = fit_on_host(config, dtype, expert_dtype, linear_dtype)
            host_fit = with_measured_speed(host_fit, linear_dtype)  # a large model: the speed to expect here
            dtype = host_fit.dtype
        dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
        if isinstance(placement, Plan):
            plan = placement
        elif placement == "auto" and dev.type == "cuda" and parse_dtype(dtype).itemsize == 2:
            # (the planner sizes 16-bit weights; an fp32 load on a GPU keeps the "single" placement)
            devices = machine_devices()
            if devices is not None:
                plan = auto_plan(config, devices, expert_dtype)
        if plan is not None and runtime_options is None:
            runtime_options = runtime_options_for(plan, calibrate=dev.type == "cuda")
        model = load_model(path, dtype=dtype, device=dev, progress=progress, expert_dtype=expert_dtype,
                           plan=plan, runtime_options=runtime_options, linear_dtype=linear_dtype)
        if not cpu_threads and dev.type == "cpu" and model_bytes(model) < SMALL_MODEL_BYTES:
            torch.set_num_threads(1)
        engine = cls(model, tokenizer, is_demo=is_demo_checkpoint(model.path), media=media)
        engine.placement = host_fit.summary if host_fit is not None else placement_summary(plan, str(dev))
        if host_fit is None or host_fit.generators:
            engine._attach_image_generator(dev, dtype, plan)
            engine._load_talker(model.path, dtype, dev)  # speech out (see the talker block below)
        else:
            engine.image_generator_error = "not loaded: it does not fit in host memory beside the thinker"
            engine.talker_error = "the talker was not loaded: it does not fit in host memory beside the thinker"
        if log is not None:  # (with a generator that could not be loaded, and why)
            log(f"placement: {engine.placement}")
        return engine

    def info(self) -> EngineInfo:
        m = self.model
        enc = m.encoders.components()
        return EngineInfo(name=m.path.name, path=str(m.path), is_demo=self.is_demo, release=m.config.release,
                          parameters=count_parameters(m.llm) + sum(count_parameters(x) for x in enc.values()),
                          dtype=str(m.numerics.dtype).replace("torch.", ""), device=str(m.device),
                          load_seconds=m.load_seconds, components=["llm"] + [p.rstrip(".") for p in enc],
                          placement=self.placement)

    # ------------------------------------------------------------------ media
    def encode_media(self, prompt: ProcessedPrompt, cancel: threading.Event | None = None) -> MultimodalInputs:
        """Run the encoders on the prompt's media: embeddings ready for the placeholder slots. `cancel`
        is checked between the encoders' blocks (and the ViT's attention calls): `Cancelled` when set."""
        enc, dtype = self.model.encoders, self.model.numerics.dtype
        check = None if cancel is None else partial(stop_if_set, cancel)
        mm = MultimodalInputs()
        with torch.inference_mode():
            for kind, pixels, grid in (("image", prompt.pixel_values, prompt.image_grid_thw),
                                       ("video", prompt.pixel_values_videos, prompt.video_grid_thw)):
                if pixels is None:
                    continue
                if enc.vision is None or enc.linear_proj is None:
                    raise MediaError(f"this checkpoint has no vision encoder, so it cannot take {kind} input")
                dev = next(enc.vision.parameters()).device
                emb = encode_images(enc.vision, enc.linear_proj, pixels.to(dev, dtype), grid.to(dev), check)
                setattr(mm, f"{kind}_embeds", emb)
            packed = prompt.packed_audio()
            if packed is not None:
                if enc.audio is None or enc.linear_proj_audio is None:
                    raise MediaError("this checkpoint has no audio encoder, so it cannot take audio input")
                feats, lengths = packed
                dev = next(enc.audio.parameters()).device
                embeds, emb_lengths, _ = encode_audio_wrapped(enc.audio, enc.linear_proj_audio,
                                                              feats.to(dev, dtype), lengths.to(dev), check=check)
                spans, offset = [], 0
                for (start, n), n_emb in zip(prompt.audio_spans, emb_lengths[0].tolist()):
                    # the encoder's rows of this clip; the processor's count gives the slots (spec §5.4)
                    spans.append(AudioSpan(start, embeds[0, offset: offset + int(n_emb)], n))
                    offset += int(n_emb)
                mm.audio_spans = [spans]
        return mm

    # ------------------------------------------------------------------ requests
    def generate_ids(self, prompt_ids: list[int], params: GenerationParams, cancel: threading.Event | None = None,
                     prompt: ProcessedPrompt | None = None, t_start: float | None = None) -> Iterator[Event]:
        # a prompt that cannot fit is refused before its media is encoded (minutes of ViT / Whisper work on
        # a CPU, holding the engine from every other request, for a refusal known from the token count)
        too_long = context_error(len(prompt_ids), params or GenerationParams(),
                                 self.model.config.llm.max_position_embeddings)
        if too_long is not None:
            yield too_long
            return
        t_wait = time.perf_counter()
        with self._lock:
            waited = time.perf_counter() - t_wait
            t_start = time.perf_counter() if t_start is None else t_start + waited
            t_enc = time.perf_counter()
            if prompt is not None and long_media(prompt, self.model.device):
                yield media_progress(prompt)
            try:
                mm = self.encode_media(prompt, cancel) if prompt is not None else None
            except (MediaError, MultimodalInputError) as e:
                yield Error(str(e), code="invalid_media")
                return
            except Cancelled:  # while the media was encoded: a cancelled response with no tokens
                encode_s = time.perf_counter() - t_enc
                stats = GenerationStats(prompt_tokens=len(prompt_ids), queue_wait_s=waited, media_encode_s=encode_s,
                                        total_s=time.perf_counter() - t_start)
                yield Done(text="", finish_reason="cancelled", stats=count_media_tokens(stats, prompt))
                return
            encode_s = time.perf_counter() - t_enc
            grids = (prompt.image_grid_thw, prompt.video_grid_thw) if prompt is not None else (None, None)
            for ev in generate(self.model, self.tokenizer, prompt_ids, params, cancel, mm=mm,
                               image_grid_thw=grids[0], video_grid_thw=grids[1], t_start=t_start):
                if isinstance(ev, Done):
                    ev.stats.queue_wait_s = waited
                    ev.stats.media_encode_s = encode_s
                    count_media_tokens(ev.stats, prompt)
                yield ev

    def chat(self, messages: list[ChatMessage | dict], params: GenerationParams | None = None,
             cancel: threading.Event | None = None, system_prompt: str | None = None,
             thinking: bool = False, assistant_prefix: str | None = None,
             modalities: tuple[str, ...] | list[str] = ("text",), voice: str | None = None) -> Iterator[Event]:
        """Stream the assistant's reply to a conversation: TextDelta events, then Done (or Error).

        `modalities` with "audio" answers in speech too: the thinker's text feeds the talker segment by
        segment while it is still generating (speak while thinking), so TextDelta and AudioChunk events
        interleave and Done carries both figures (time to first token, time to first audio, audio RTF);
        `voice` names a saved voice (None: the talker's default). Without "text" only the audio (with its
        transcript spans) is yielded. Chat never draws images: "image" is refused with
        modality_not_supported (images come from `imagine`, the server's /v1/images endpoints)."""
        t_start = time.perf_counter()
        wanted = list(modalities)
        refused = self._refused_modality(wanted)
        if refused is not None:
            yield refused
            return
        if "audio" in wanted:
            cancel = cancel if cancel is not None else threading.Event()
            thinker = self._chat_text(messages, params, cancel, system_prompt, thinking, assistant_prefix, t_start)
            # (the request's seed draws the talker's noise too: a seeded spoken reply is the same each time)
            seed = params.seed if params is not None else None
            spoken = self.speak_while_thinking(thinker, voice=voice, seed=seed, cancel=cancel)
            yield from _speech_reply(spoken, cancel, keep_text="text" in wanted)
            return
        yield from self._chat_text(messages, params, cancel, system_prompt, thinking, assistant_prefix, t_start)

    def _refused_modality(self, modalities: list[str]) -> Error | None:
        unknown = [m for m in modalities if m not in ("text", "audio", "image")]
        if not modalities or unknown:
            return Error(f"unknown output modalities {unknown or modalities!r}; use 'text' and/or 'audio'",
                         code="invalid_request")
        if "image" in modalities:
            return Error("chat does not draw images: generate or edit them with the image endpoints "
                         "(POST /v1/images/generations, /v1/images/edits; Engine.imagine)",
                         code="modality_not_supported")
        if "audio" in modalities and self.talker is None:
            return Error(f"audio output is not available: {self.talker_error or 'no talker is loaded'}",
                         code="modality_not_supported")
        return None

    def _chat_text(self, messages, params, cancel, system_prompt, thinking, assistant_prefix,
                   t_start: float) -> Iterator[Event]:
        params = params or GenerationParams(fit_context=True)
        context = self.model.config.llm.max_position_embeddings
        try:
            # (before any media is read: the room the reply needs bounds what the media may take)
            params.validate(vocab_size=min(self.model.config.llm.vocab_size, self.tokenizer.vocab_size))
            msgs = [m.to_dict() if isinstance(m, ChatMessage) else m for m in messages]
            prompt = self.processor.build(msgs, system_prompt=system_prompt, thinking=thinking,
                                          assistant_prefix=assistant_prefix,
                                          check=None if cancel is None else partial(stop_if_set, cancel),
                                          max_prompt_tokens=context - params.room_needed)
        except MediaPastContext as e:
            yield Error(f"{e} (the model's context: {context:,} tokens, {params.room_needed:,} of them kept for the "
                        "reply)", code=e.code)
            return
        except (PromptError, MediaError, ValueError) as e:
            yield Error(str(e), code="invalid_request")
            return
        except Cancelled:  # while its pictures, videos or clips were read: a cancelled reply with no tokens
            yield Done(text="", finish_reason="cancelled", stats=GenerationStats(total_s=time.perf_counter() - t_start))
            return
        media = prompt if (prompt.images or prompt.videos or prompt.audios) else None
        yield from self.generate_ids(prompt.ids, params, cancel, prompt=media, t_start=t_start)

    asr_windowing = Windowing()  # how a long recording is cut for ASR

    def transcribe(self, audio: Any, context: str | None = None, hotwords: list[str] | None = None,
                   dialect: str | None = None, params: GenerationParams | None = None,
                   cancel: threading.Event | None = None, sample_rate: int | None = None,
                   task: str = "transcribe") -> Iterator[Event]:
        """ASR: streams the transcript (without the language tag; with its tokens' log probabilities when
        `params.logprobs`) and ends with Done whose `result` holds {"language", "text"}. A recording (samples with
        their `sample_rate`) longer than one window is transcribed a window at a time (asr_windows: Progress per
        window, and the result's `segments`). `task` "translate": the same with the instruction to translate the
        speech into English (asr.TRANSLATION_INSTRUCTION); the result's language is then English, and a `dialect`
        (the spoken language, forced) is refused."""
        if isinstance(audio, np.ndarray) and sample_rate and len(audio) > self.asr_windowing.window_s * sample_rate:
            yield from transcribe_windows(partial(self._transcribe_clip, context=context, hotwords=hotwords,
                                                  dialect=dialect, params=params, cancel=cancel,
                                                  sample_rate=sample_rate, task=task),
                                          audio, sample_rate, self.asr_windowing)
            return
        yield from self._transcribe_clip(audio, context, hotwords, dialect, params, cancel, sample_rate, task)

    def _transcribe_clip(self, audio: Any, context: str | None = None, hotwords: list[str] | None = None,
                         dialect: str | None = None, params: GenerationParams | None = None,
                         cancel: threading.Event | None = None, sample_rate: int | None = None,
                         task: str = "transcribe") -> Iterator[Event]:
        """One clip's ASR (or translation), as the model takes it (spec §6.3)."""
        if task not in SPEECH_TEXT_INSTRUCTIONS:
            yield Error(f"task must be one of {', '.join(SPEECH_TEXT_INSTRUCTIONS)}, got {task!r}", "invalid_request")
            return
        if task == "translate" and dialect:
            yield Error("a translation's language is English; a dialect forces the language of a transcript",
                        code="invalid_request")
            return
        try:
            prefix = dialect_prefix(dialect)
        except ValueError as e:
            yield Error(str(e), code="invalid_request")
            return
        messages = asr_messages(audio, context, hotwords, sample_rate, task)
        forced = prefix[:-1] if prefix else None
        params = params or GenerationParams(max_new_tokens=512, fit_context=True)
        deltas = TranscriptDeltas(TranscriptStream(forced), logprobs=params.logprobs)
        for ev in self.chat(messages, params, cancel, assistant_prefix=prefix):
            if isinstance(ev, TextDelta):
                out = deltas.feed(ev)
                if out is not None:
                    yield out
            elif isinstance(ev, Done):
                held = deltas.flush()  # an output without a language tag: all of it is the transcript
                if held is not None:
                    yield held
                t = parse_transcript(ev.text, forced)
                language = TRANSLATION_LANGUAGE if task == "translate" else t.language
                ev.result = {"language": language, "text": t.text}
                yield ev
            else:
                yield ev

    # ================================================================== speech, sound and music out
    # The talker block (engine.models.talker): loaded from <ckpt>/talker when present. Additive: the
    # thinker API above does not depend on it. The talker has its own lock, so the thinker can keep
    # generating while the talker speaks (speak-while-thinking).
    talker = None
    talker_error: str | None = None

    @property
    def has_talker(self) -> bool:
        return self.talker is not None

    def _load_talker(self, root: Path, dtype: str, device: torch.device) -> None:
        """Load <root>/talker when present; one that cannot be loaded (a partial download, a broken file) leaves
        the rest serving, with `talker_error` and the placement line saying why."""
        from engine.models.talker.pipeline import TalkerPipeline  # noqa: PLC0415
        from engine.models.talker.voices import VoiceLibrary  # noqa: PLC0415
        folder = Path(root) / "talker"
        self.talker, self.talker_error = None, None
        if not folder.is_dir():
            self.talker_error = f"this checkpoint has no talker/ folder ({folder}), so it cannot speak"
            return
        try:  # the thinker's release says which talker the folder holds (spec §7.11 for the Preview's)
            self.talker = TalkerPipeline.load(folder, dtype=parse_dtype(dtype), device=device,
                                              release=self.model.config.release)
        except MingError as e:
            self.talker_error = f"the talker could not be loaded: {e}"
            self.placement += f"; talker not loaded ({e})"
            return
        self.voices = VoiceLibrary(model=self.talker.fingerprint())

    def _talker_unavailable(self) -> Error:
        return Error(self.talker_error or "no talker is loaded", code="talker_unavailable")

    def _asr_text(self, clip, sample_rate: int | None, cancel: threading.Event | None = None) -> str:
        """Transcribe a reference clip with the thinker's ASR (for cloning without a transcript); `cancel` stops it."""
        text = ""
        # A reference clip is at most 30 s (engine.models.talker.audio): ~150 characters of speech at most,
        # so REF_TRANSCRIPT_MAX_TOKENS bounds a runaway transcript (and the talker prompt it goes into).
        for ev in self.transcribe(clip, sample_rate=sample_rate, cancel=cancel,
                                  params=GenerationParams(max_new_tokens=REF_TRANSCRIPT_MAX_TOKENS)):
            if isinstance(ev, Error):
                raise MediaError(f"could not transcribe the reference clip: {ev.message}")
            if isinstance(ev, Done):
                text = (ev.result or {}).get("text", "") or ""
        return text.strip()

    def _asr_texts(self, clips: list, sample_rate: int | None, cancel: threading.Event | None = None) -> list[str]:
        """The transcript of each reference clip; a clip given for two speakers (the same file, bytes or samples)
        is transcribed once (it was run through the thinker's ASR once per speaker)."""
        from engine.models.talker.audio import clip_key  # noqa: PLC0415
        heard: dict[str, str] = {}
        for clip in clips:
            if clip_key(clip) not in heard and not (cancel is not None and cancel.is_set()):
                heard[clip_key(clip)] = self._asr_text(clip, sample_rate, cancel)
        return [heard.get(clip_key(clip), "") for clip in clips]

    def _conditioning(self, voice, ref_audio, ref_text, sample_rate, seed):
        """The voice of a request: a saved voice's, a reference clip's (checked and encoded; a missing transcript is
        filled in afterwards by `_fill_transcript`), or none."""
        from engine.models.talker.pipeline import Conditioning  # noqa: PLC0415
        from engine.models.talker.prompt import podcast_text  # noqa: PLC0415
        if voice is not None and ref_audio is not None:
            raise MediaError("give either a saved voice or a reference clip, not both")
        if voice is not None:
            names = [voice] if isinstance(voice, str) else list(voice)
            conds = [self.voices.load(n) for n in names]
            if len(conds) == 1:
                return conds[0]
            if any(c.speaker is None for c in conds):
                raise MediaError("several voices make a podcast, which the Preview talker does not do: give one voice")
            return Conditioning(speaker=torch.cat([c.speaker for c in conds]),
                                latents=torch.cat([c.latents for c in conds], dim=1),
                                ref_text=podcast_text([c.ref_text or "" for c in conds]))
        if ref_audio is None:
            return Conditioning()
        clips = list(ref_audio) if isinstance(ref_audio, list) else [ref_audio]
        if ref_text is not None and not ref_text.strip():  # a transcript box left blank: none given, ASR fills it in
            ref_text = None
        return self.talker.clone_conditioning(clips, [sample_rate] * len(clips), ref_text, seed)  # checks the clips

    def _fill_transcript(self, cond, ref_audio, sample_rate, notes: dict,
                         cancel: threading.Event | None = None) -> None:
        """A reference clip's transcript, when none was given, from our ASR (`notes["ref_text_from_asr"]`)."""
        from engine.models.talker.prompt import podcast_text  # noqa: PLC0415
        texts = self._asr_texts(list(ref_audio) if isinstance(ref_audio, list) else [ref_audio], sample_rate, cancel)
        asr = texts[0] if len(texts) == 1 else podcast_text(texts)
        notes["ref_text_from_asr"] = asr
        cond.ref_text = asr or None

    def speak(self, text: str = "", voice: str | list[str] | None = None, ref_audio=None, ref_text: str | None = None,
              instruct=None, task: str = "tts", cfg: float | None = None, sigma: float | None = None,
              temperature: float | None = None, seed: int | None = None, max_seconds: float | None = None,
              music: dict | None = None, sample_rate: int | None = None,
              cancel: threading.Event | None = None) -> Iterator[Event]:
        """Speech, sound effects or music: AudioChunk events (PCM16 mono at the talker's true rate, each
        with the text span it starts speaking), then one Done (time to first audio, audio seconds, real-time
        factor; `result` says the rate, the fragments spoken and `ref_text_from_asr` when our ASR filled in
        the transcript of a reference clip), or one Error.

        task: "tts" (voice = a saved voice name, or ref_audio [+ ref_text] to clone, or neither; instruct =
        dict or "key=value,..." of dialect, emotion, speed, pitch, volume, ip, style, bgm.*), "sound",
        "music" (music={genre, mood, instrument, theme, duration} or a text with those keys), "podcast"
        (text of " speaker_i:..." lines, one voice / clip per speaker). `sample_rate` goes with raw arrays."""
        from engine.models.talker.pipeline import SpeechRequest  # noqa: PLC0415
        from engine.models.talker.prompt import Instruction  # noqa: PLC0415
        from engine.models.talker.speech import audio_stats, speak_events  # noqa: PLC0415
        if self.talker is None:
            yield self._talker_unavailable()
            return
        t_start = time.perf_counter()
        notes: dict = {}
        try:  # every check that needs no transcript, before our ASR makes one (a refusal is then the first event)
            inst = Instruction.parse(instruct)  # (before the clip is encoded)
            cond = self._conditioning(voice, ref_audio, ref_text, sample_rate, seed)
            req = SpeechRequest(text=text, task=task, conditioning=cond, instruct=inst, cfg=cfg, sigma=sigma,
                                temperature=temperature, seed=seed, max_seconds=max_seconds, music=music)
            self.talker.check_request(req)
            if cond.warnings:  # (a clipped clip is still cloned: said in the result, not refused)
                notes["reference_warning"] = "; ".join(cond.warnings)
            if ref_audio is not None and cond.ref_text is None:
                # (what the request waits for, often longer than the speech's first sound; a server's stream starts
                # here, so a client can stop it meanwhile)
                yield Progress(TRANSCRIBING_STAGE, 0, len(ref_audio) if isinstance(ref_audio, list) else 1,
                               message=TRANSCRIBING_REFERENCE)
                self._fill_transcript(cond, ref_audio, sample_rate, notes, cancel)
        except MingError as e:
            yield Error(str(e), code=e.code)
            return
        if cancel is not None and cancel.is_set():  # stopped while the reference clip was transcribed: no sound
            yield Done(text="", finish_reason="cancelled", stats=audio_stats(t_start, None, 0.0), result=notes)
            return
        if voice is not None:
            notes["voice"] = voice
        yield from speak_events(self.talker, req, cancel, t_start, notes)

    def speak_while_thinking(self, thinker_events, voice: str | None = None, instruct=None, seed: int | None = None,
                             cancel: threading.Event | None = None) -> Iterator[Event]:
        """Interleave a thinker event stream (e.g. `chat(...)`, given the same `cancel`) with the speech of
        its text, segment by segment; see engine.models.talker.speech.speak_while_thinking."""
        from engine.models.talker.pipeline import SpeechRequest  # noqa: PLC0415
        from engine.models.talker.prompt import Instruction  # noqa: PLC0415
        from engine.models.talker.speech import speak_while_thinking  # noqa: PLC0415
        if self.talker is None:
            yield self._talker_unavailable()
            return
        try:
            req = SpeechRequest(conditioning=self._conditioning(voice, None, None, None, seed),
                                instruct=Instruction.parse(instruct), seed=seed)
        except MingError as e:
            yield Error(str(e), code=e.code)
            return
        yield from speak_while_thinking(self.talker, thinker_events, req, cancel)

    def save_voice(self, name: str, ref_audio, ref_text: str | None = None, sample_rate: int | None = None,
                   seed: int | None = None, replace: bool = False, cancel: threading.Event | None = None):
        """Clone a voice from a reference clip and keep it under `name` (VoiceInfo). A missing transcript
        is filled in by our ASR (VoiceInfo.ref_text shows it); `cancel` set meanwhile stops it and nothing is saved
        (None). A voice already saved under `name` is replaced only with `replace` (else VoiceExists, before any
        work). Raises MingError on bad input."""
        from engine.models.talker.voices import check_name  # noqa: PLC0415
        if self.talker is None:
            raise MediaError(self.talker_error or "no talker is loaded")
        check_name(name)
        if not replace:
            self.voices.check_free(name)
        cond = self._conditioning(None, ref_audio, ref_text, sample_rate, seed)
        if cond.ref_text is None:
            self._fill_transcript(cond, ref_audio, sample_rate, {}, cancel)
        if cancel is not None and cancel.is_set():  # stopped while the clip was transcribed: no voice half made
            return None
        seconds = cond.latents.shape[1] * self.talker.vae.config.encoder_samples_per_latent / self.talker.sample_rate
        return self.voices.save(name, cond, seconds, overwrite=replace)

    def list_voices(self) -> list:
        return self.voices.list() if self.talker is not None else []

    def delete_voice(self, name: str) -> None:
        if self.talker is None:
            raise MediaError(self.talker_error or "no talker is loaded")
        self.voices.delete(name)

    # ------------------------------------------------------------------ images out (issue 11)
    # Image generation, editing and generative segmentation: engine.imagine streams the events, the
    # components live in engine.models.imagegen. Loaded by `load` when the checkpoint has the image
    # generator's sub-folders; where its weights rest follows the placement plan (or, without one, the
    # GPU memory left after the thinker) and is appended to the placement line.
    image_generator = None          # engine.models.imagegen.pipeline.ImageGenerator
    image_generator_error = ""      # why a checkpoint's image generator was not loaded

    @property
    def has_image_generator(self) -> bool:
        return self.image_generator is not None

    def _attach_image_generator(self, device: torch.device, dtype: str, plan: Plan | None) -> None:
        """Load the image generator when the checkpoint has its sub-folders. One that cannot be loaded (a
        partial download: some folders or files missing, a broken config or weights) leaves the thinker
        serving, as a talker that cannot be loaded does: `image_generator_error` and the placement line
        (which `load` logs) say why."""
        from engine.models.imagegen.config import REQUIRED_FOLDERS, has_image_generator, missing_folders
        from engine.models.imagegen.pipeline import ImageGenerator
        from engine.placement.planner import GENERATOR_WORKSPACE, generator_sizes

        root = self.model.path
        if not has_image_generator(root):
            missing = missing_folders(root)
            if len(missing) < len(REQUIRED_FOLDERS):  # some of its folders only: an incomplete download
                self._image_generator_unavailable(f"missing its folder(s) {', '.join(missing)} in {root}")
            else:
                self.image_generator_error = f"this checkpoint has no image generator folders ({', '.join(missing)})"
            return
        home = compute = device
        if device.type == "cuda":
            placed = {m.name: m.device for m in (plan.generators if plan is not None else ())}
            where = placed.get("image_generator")
            if where is None:  # no plan: whatever GPU memory the thinker left
                need = sum(m.nbytes for m in generator_sizes(root) if m.name == "image_generator")
                need = need * parse_dtype(dtype).itemsize // 2 + GENERATOR_WORKSPACE
                where = str(device) if torch.cuda.mem_get_info(device)[0] >= need else f"cpu>{device}"
            home = torch.device(where.split(">")[0])
            compute = torch.device(where.split(">")[-1])
        try:
            self.image_generator = ImageGenerator.load(root, parse_dtype(dtype), device=compute, home=home)
        except MingError as e:  # unsupported kind, or missing / broken files: the rest keeps working
            self._image_generator_unavailable(str(e))
            return
        self.placement += f"; {self.image_generator.describe()}"

    def _image_generator_unavailable(self, why: str) -> None:
        self.image_generator = None
        self.image_generator_error = f"the image generator could not be loaded: {why}"
        self.placement += f"; image generator not loaded ({why})"

    def imagine(self, prompt: str, images: list | None = None, task: str = "generate", size=None, aspect=None,
                steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                preview_every: int = 0, cancel: threading.Event | None = None, **options) -> Iterator[Event]:
        """Generate (`task="generate"`), edit (`"edit"`: `images`, the first is the reference) or segment
        (`"segment"`: `prompt` is the target) an image: Progress, ImagePreview every `preview_every` steps,
        ImageDone, then one Done (or Error). `options`: mask_color, preset ("replace_background" |
        "remove_object"), negative_prompt (the Preview: what the picture should not show, its negative CFG branch's
        condition; a 2.0 model refuses one: its pipeline guides against zeros whatever the negative prompt),
        system_prompt.
        See engine.imagine for sizes, limits and defaults."""
        from engine.imagine import ImagineRequest

        try:
            request = ImagineRequest(prompt=prompt, images=list(images or []), task=task, size=size, aspect=aspect,
                                     steps=steps, guidance=guidance, seed=seed, preview_every=preview_every, **options)
        except TypeError as e:
            yield Error(f"bad image request option: {e}", code="invalid_request")
            return
        yield from self.imagine_request(request, cancel)

    def imagine_request(self, request, cancel: threading.Event | None = None) -> Iterator[Event]:
        from engine.imagine import imagine

        yield from imagine(self, request, cancel)


def no_audio_after_cancel(events: Iterator[Event], cancel: threading.Event | None) -> Iterator[Event]:
    """The events, less any audio chunk that comes once `cancel` is set: the talker stops within one
    patch, and a chunk it made just before the cancel is dropped rather than sent after it."""
    if cancel is None:
        yield from events
        return
    peek = getattr(cancel, "peek", cancel.is_set)  # the server's flag counts is_set() calls as decode steps
    for ev in events:
        if not (isinstance(ev, AudioChunk) and peek()):
            yield ev


def long_media(prompt: ProcessedPrompt, device: torch.device) -> bool:
    """Media whose encoding is worth a word before it starts (a long video's frames through the ViT take a while on a
    CPU): more tokens than one prefill chunk, the same bar as the prefill's own reports (engine.generate)."""
    return prompt.image_tokens + prompt.audio_tokens > default_prefill_chunk(device)


def media_progress(prompt: ProcessedPrompt) -> Progress:
    """What the encoders are about to read (MEDIA_STAGE): the prompt's pictures, videos and clips, counted."""
    counts = {"picture": len(prompt.images), "video": len(prompt.videos), "audio clip": len(prompt.audios)}
    said = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items() if n)
    return Progress(MEDIA_STAGE, 0, sum(counts.values()), message=said)


def count_media_tokens(stats: GenerationStats, prompt: ProcessedPrompt | None) -> GenerationStats:
    """`stats` with the prompt's image and audio tokens counted (of its prompt_tokens; none without media)."""
    if prompt is not None:
        stats.prompt_image_tokens, stats.prompt_audio_tokens = prompt.image_tokens, prompt.audio_tokens
    return stats


def _speech_reply(events: Iterator[Event], cancel: threading.Event, keep_text: bool) -> Iterator[Event]:
    """A spoken chat reply as the caller sees it: no audio after a cancel, and text deltas only when
    text was asked for."""
    for ev in no_audio_after_cancel(events, cancel):
        if keep_text or not isinstance(ev, TextDelta):
            yield ev
