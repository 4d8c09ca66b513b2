"""The speech/sound/music pipeline: the talker, its AudioVAE, tokenizer and CAM++ composed into
`TalkerPipeline.synthesize(request)`, a stream of waveform chunks (spec §7).

Tasks (spec §7.9, §7.10):
  tts      speech; a library voice, a reference clip (+ transcript), or none; optional instruction
           (dialect, emotion, speed, pitch, volume, IP, free-text style with the zero speaker vector,
           BGM / ambience keys). Text is segmented and each fragment streamed, except for style and
           BGM instructions, which are synthesised in one call.
  sound    sound effects from a description (cfg 4.5, sigma 0.3, temperature 2.5), one call.
  music    music from Genre / Mood / Instrument / Theme / Duration, one call.
  podcast  multi-speaker dialogue lines " speaker_i:..." with one reference clip per speaker, one call.

Streaming: every latent patch goes through the streaming VAE decoder and the silence holder, so the
first chunk leaves after the first patches; the first fragment of segmented text stops taking chunks
once its audio reaches the characters-per-second bound of spec §7.5 (upstream streams, and so bounds,
only that one; later fragments run until the stop head ends them).

The Preview talker (spec §7.11, `release="preview"`) speaks text only (task "tts", no instruction): its
prompt is tokens(transcript) + tokens(text) + `<|endoftext|>` then the prompt-latent embeddings, with no
speaker vector (no CAM++); reference clips are encoded at the VAE rate (16 kHz) unpadded, the latents cut
to whole patches; CFG comes from its config and its sampler has no noise term. Its chunks leave as decoded
(upstream has no silence holder and no characters-per-second cut-off there).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.errors import MingError
from engine.media.audio import load_audio
from engine.media.errors import MediaError
from engine.models.talker.audio import SilenceHolder, check_reference, clipping_warning, left_pad_to_multiple
from engine.models.talker.campplus import CAMPPlus
from engine.models.talker.campplus import SAMPLE_RATE as SPEAKER_RATE
from engine.models.talker.cfm import SamplingParams
from engine.models.talker.config import MAX_CACHE_LEN
from engine.models.talker.generate import NoiseSource, generate_patches
from engine.models.talker.model import BailingTalker2, load_talker
from engine.models.talker.prompt import (TASK_PROMPTS, Instruction, InstructionError, build_preview_prompt,
                                         build_prompt, is_music_text, music_text)
from engine.models.talker.text import (CLOSERS, PREVIEW_CLOSERS, Fragment, TextError, check_text, clean_text,
                                       iter_fragments)
from engine.models.talker.tokenizer import PREVIEW_REQUIRED_TOKENS, REQUIRED_TOKENS, TalkerTokenizer
from engine.models.talker.vae import AudioVAE, load_audio_vae

TASKS = ("tts", "sound", "music", "podcast")
TASK_SAMPLING = {"tts": SamplingParams(2.0, 0.25, 0.0), "podcast": SamplingParams(2.0, 0.25, 0.0),
                 "music": SamplingParams(2.0, 0.25, 0.0), "sound": SamplingParams(4.5, 0.3, 2.5)}
# the characters-per-second bound on streamed fragments (spec §7.5): stop once d * 16000 / 5818 >= chars and d > 2 s
CHARS_RATE_NUM, CHARS_RATE_DEN, CHARS_MIN_SECONDS = 16000, 5818, 2.0
MUSIC_SLACK_S = 5.0        # music stops at the requested duration plus this
CAP_FADE_S = 0.01          # audio cut at max_seconds ends with a linear fade this long (no click)
MIN_STEPS_ROOM = 16        # a prompt must leave room for this many patches in the 2048-position cache
PROMPT_CACHE_SIZE = 8


class TalkerError(MingError, RuntimeError):
    code = "talker_error"


@dataclass
class Conditioning:
    """What a voice contributes: CAM++ vectors [n, 192] (None = no speaker slot), prompt latents
    [1, N_f, 64] at the VAE rate (None = none), their transcript, and whether the zero vector is used."""

    speaker: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    ref_text: str | None = None
    zero_speaker: bool = False
    warnings: list[str] = field(default_factory=list)  # what to tell of the clips it was cloned from (clipping)

    @property
    def n_speakers(self) -> int:
        return 1 if self.zero_speaker else (0 if self.speaker is None else int(self.speaker.shape[0]))


@dataclass
class SpeechRequest:
    text: str = ""
    task: str = "tts"
    conditioning: Conditioning = field(default_factory=Conditioning)
    instruct: Instruction | None = None
    cfg: float | None = None
    sigma: float | None = None
    temperature: float | None = None
    seed: int | None = None
    max_seconds: float | None = None  # at most this much audio comes out (the last samples faded out)
    music: dict | None = None  # genre, mood, instrument, theme, duration (music task, instead of text)


@dataclass
class WaveChunk:
    samples: np.ndarray  # float32 mono at the VAE rate
    text: str            # the span this chunk starts speaking ("" when it continues)
    fragment: int


@dataclass
class SynthesisReport:
    fragments: list[str] = field(default_factory=list)
    patches: int = 0
    cancelled: bool = False
    capped: list[int] = field(default_factory=list)


class TalkerPipeline:
    def __init__(self, folder: Path, talker: BailingTalker2, vae: AudioVAE, tokenizer: TalkerTokenizer,
                 speaker_encoder: CAMPPlus | None = None):
        self.folder = Path(folder)
        self.talker, self.vae, self.tokenizer = talker, vae, tokenizer
        self._speaker_encoder = speaker_encoder
        self._speaker_cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # clip hash -> CAM++ vector
        self.runner = None  # CUDA graph runner (engine.models.talker.graphs), set on CUDA
        self.lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             cuda_graphs: bool = True, release: str = "2.0") -> "TalkerPipeline":
        """Load `<ckpt>/talker` of the checkpoint's `release` ("2.0" or "preview"): talker weights, `vae/`,
        `llm/` tokenizer; CAM++ (2.0 only) loads on first use."""
        folder = Path(folder)
        if not folder.is_dir():
            raise TalkerError(f"{folder}: no talker folder in this checkpoint")
        talker = load_talker(folder, dtype=dtype, device=device, release=release)
        vae = load_audio_vae(folder / "vae", dtype=dtype, device=device)
        width = talker.config.latent_dim
        if (vae.config.latent_dim, vae.config.dec_latent_dim) != (width, width):
            raise TalkerError(f"{folder / 'vae' / 'config.json'}: latent_dim {vae.config.latent_dim} (encoder) / "
                              f"{vae.config.dec_latent_dim} (decoder) do not match the talker's {width}-d latents")
        tok = TalkerTokenizer(folder / "llm", PREVIEW_REQUIRED_TOKENS if talker.config.preview else REQUIRED_TOKENS)
        pipe = cls(folder, talker, vae, tok)
        if cuda_graphs and torch.device(device).type == "cuda":
            from engine.models.talker.graphs import GraphRunner  # noqa: PLC0415
            pipe.runner = GraphRunner(talker)
        return pipe

    @property
    def sample_rate(self) -> int:
        return self.vae.sample_rate

    @property
    def preview(self) -> bool:
        """The Preview talker (spec §7.11)."""
        return self.talker.config.preview

    @property
    def segment_closers(self) -> frozenset[str]:
        """The characters that close a text segment: the Preview's driver closes at ！？。!? only (no comma)."""
        return PREVIEW_CLOSERS if self.preview else CLOSERS

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this talker does: the Preview's prompt has no task prompt, so it speaks text only."""
        return TASKS[:1] if self.preview else TASKS

    @property
    def takes_instructions(self) -> bool:
        """Instruction captions (spec §7.10): the Preview's prompt has no place for them (§7.11)."""
        return not self.preview

    @property
    def seconds_per_patch(self) -> float:
        return self.talker.config.patch_size * self.vae.config.samples_per_latent / self.sample_rate

    @property
    def speaker_encoder(self) -> CAMPPlus:
        if self._speaker_encoder is None:
            self._speaker_encoder = CAMPPlus(self.folder / "campplus.onnx")
        return self._speaker_encoder

    def fingerprint(self) -> str:
        """Identifies the talker + VAE a saved voice belongs to (its latents and vector are model-specific)."""
        h = hashlib.sha256()
        for name in ("config.json", "vae/config.json"):
            p = self.folder / name
            h.update(p.read_bytes() if p.is_file() else b"")
        head = self.talker.spk_head
        h.update(str(head.weight.shape if head is not None else "preview: no speaker head").encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ voices from audio
    def _load_clip(self, clip, rate: int | None, target: int | None) -> torch.Tensor:
        """A reference clip, its channels mixed down: upstream reads channel 0 (spec §7.3), and a stereo clip whose
        voice is on its right channel only was refused as silent (a clip with the same voice on both is unchanged)."""
        return load_audio(clip, rate, target_rate=target, max_seconds=600.0, mix_channels=True)

    def clone_conditioning(self, clips: list, rates: list[int | None] | None = None, ref_text: str | None = None,
                           seed: int | None = None) -> Conditioning:
        """Reference clip(s) -> CAM++ vectors (one per clip, at 16 kHz) and prompt latents (the clips at
        the VAE rate, concatenated, left-padded to whole patches, sampled from the VAE posterior)."""
        if not clips:
            raise MediaError("no reference clip given")
        rates = rates or [None] * len(clips)
        with self.lock:  # the speaker cache and the models are shared between requests
            return self._clone(clips, rates, ref_text, seed)

    def _clone(self, clips: list, rates: list, ref_text: str | None, seed: int | None) -> Conditioning:
        spks, waves, warnings = [], [], []
        for i, (clip, rate) in enumerate(zip(clips, rates)):
            what = "reference clip" if len(clips) == 1 else f"reference clip {i + 1}"
            try:
                wave16 = self._load_clip(clip, rate, SPEAKER_RATE)
            except MediaError as e:
                raise MediaError(f"{what}: {e}") from None
            check_reference(wave16, SPEAKER_RATE, what)
            wave = self._load_clip(clip, rate, self.sample_rate)
            if (warning := clipping_warning(self._load_clip(clip, rate, None), what)) is not None:  # (its own samples:
                warnings.append(warning)  # a resampled plateau is no longer at full scale)
            if not self.preview:  # the Preview takes no speaker vector (spec §7.11)
                key = hashlib.sha1(wave.numpy().tobytes()).hexdigest()
                spks.append(self._speaker_vector(wave16, key))
            waves.append(wave)
        latents = self.prompt_latents(torch.cat(waves), seed)
        if ref_text is not None:
            ref_text = check_text(ref_text, "reference transcript")
        return Conditioning(speaker=torch.cat(spks) if spks else None, latents=latents, ref_text=ref_text,
                            warnings=warnings)

    def _speaker_vector(self, wave16: torch.Tensor, key: str) -> torch.Tensor:
        if key in self._speaker_cache:
            self._speaker_cache.move_to_end(key)
            return self._speaker_cache[key]
        spk = self.speaker_encoder.embed(wave16)
        self._speaker_cache[key] = spk
        while len(self._speaker_cache) > PROMPT_CACHE_SIZE:
            self._speaker_cache.popitem(last=False)
        return spk

    def prompt_latents(self, wave: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Spec §7.4: a random sample of the posterior (mean + std * eps), eps from `seed`; the wave is
        left-padded to whole talker patches. The Preview (§7.11) encodes the wave as it is and drops the
        trailing latents that do not fill a patch."""
        cfg, patch = self.vae.config, self.talker.config.patch_size
        wave = wave.reshape(1, -1)
        if not self.preview:
            wave = left_pad_to_multiple(wave, cfg.encoder_samples_per_latent * patch)
        wave = wave.to(self.vae.decoder.fc1.weight.device, self.vae.decoder.fc1.weight.dtype)
        with torch.inference_mode():
            post = self.vae.posterior(wave)
        latents = post.sample(post.seeded_noise(0 if seed is None else seed)).reshape(1, -1, cfg.latent_dim).float().cpu()
        return latents[:, :latents.shape[1] // patch * patch] if self.preview else latents

    # ------------------------------------------------------------------ planning
    def _sampling(self, req: SpeechRequest) -> SamplingParams:
        base = TASK_SAMPLING[req.task]
        if self.preview:  # CFG from the config, no SDE term (spec §7.11)
            if req.temperature:
                raise InstructionError("the Preview talker's sampler has no noise term: temperature must be 0")
            base = SamplingParams(self.talker.config.cfg_strength, base.sigma, 0.0)
        try:
            return SamplingParams(base.cfg if req.cfg is None else float(req.cfg),
                                  base.sigma if req.sigma is None else float(req.sigma),
                                  base.temperature if req.temperature is None else float(req.temperature))
        except (TypeError, ValueError) as e:
            raise InstructionError(str(e)) from None

    def _check_preview(self, req: SpeechRequest) -> None:
        if req.task not in self.tasks or (req.instruct is not None and not self.takes_instructions):
            raise InstructionError("the Ming-flash-omni Preview talker speaks text only (task 'tts', a voice or "
                                   "reference clip allowed): sound, music, podcast and instructions need the 2.0 model")

    def plan(self, req: SpeechRequest) -> tuple[str, Iterable[Fragment], bool]:
        """(task prompt, fragments, segmented?) for a request; raises clear errors for bad input."""
        if req.task not in TASKS:
            raise InstructionError(f"unknown task {req.task!r}; valid tasks: {', '.join(TASKS)}")
        self._check_preview(req)
        if req.max_seconds is not None and not (isinstance(req.max_seconds, (int, float)) and
                                                 math.isfinite(req.max_seconds) and req.max_seconds > 0):
            raise InstructionError(f"max_seconds must be a positive number, got {req.max_seconds!r}")
        if req.task in ("sound", "music") and (req.instruct is not None or req.conditioning.n_speakers
                                                or req.conditioning.latents is not None):
            raise InstructionError(f"{req.task} takes a description only: no voice, reference clip or instruction")
        inst = req.instruct
        if req.task == "music":
            if req.music is not None:
                m = req.music
                text = music_text(m.get("genre", ""), m.get("mood", ""), m.get("instrument", ""), m.get("theme", ""),
                                  m.get("duration", 30))
            else:
                text = check_text(req.text, "music description")
                if not is_music_text(text):
                    raise InstructionError("music needs Genre, Mood, Instrument, Theme and Duration (pass them as "
                                           "`music={...}` or write ' Genre: ... Mood: ... Instrument: ... Theme: ... "
                                           "Duration: 30s.')")
            return TASK_PROMPTS["music"], [Fragment(text, text)], False
        text = check_text(req.text, "sound description" if req.task == "sound" else "text")
        if req.task == "sound":
            return TASK_PROMPTS["sound"], [Fragment(text.strip(), text.strip())], False
        if req.task == "podcast":
            if req.conditioning.n_speakers < 1:
                raise InstructionError("podcast needs one reference clip (or saved voice) per speaker")
            return TASK_PROMPTS["speech"], [Fragment(text, text)], False
        one_call = inst is not None and (inst.style is not None or bool(inst.bgm))
        if one_call:
            return TASK_PROMPTS["speech"], [Fragment(clean_text(text).strip(), text)], False
        frags = iter_fragments(text, self.segment_closers)  # (made as they are spoken: the first is not kept waiting)
        first = next(frags, None)
        if first is None:
            raise TextError("text has nothing to speak after normalisation")
        return TASK_PROMPTS["speech"], itertools.chain([first], frags), True

    # ------------------------------------------------------------------ synthesis
    def effective_conditioning(self, req: SpeechRequest) -> Conditioning:
        """The voice a request speaks with. Free-text style (voice design) and, when no voice or
        reference clip is given, a character voice (IP) run with the zero speaker vector in one speaker
        slot, as the reference runs them (use_zero_spk_emb, spec §7.3, §7.10)."""
        cond, inst = req.conditioning, req.instruct
        if inst is not None and inst.uses_zero_speaker and cond.speaker is not None:
            raise InstructionError("a style (voice design) instruction makes a new voice: do not also give a voice "
                                   "or a reference clip")
        if inst is not None and (inst.uses_zero_speaker or
                                 (inst.ip is not None and cond.speaker is None and cond.latents is None)):
            return Conditioning(zero_speaker=True)
        return cond

    def _prompt_too_long(self, length: int, text: str, caption: str | None, ref_text: str | None,
                         n_patches: int) -> TextError:
        """The refusal of a prompt over the talker's room, naming what takes most of it (it said "with the reference;
        shorten the text or the reference clip" of a voice design of 2 000 characters, with no reference at all)."""
        shares = {"the text": len(self.tokenizer.encode_text(text)),
                  "the instruction (voice design, character voice or background)": len(
                      self.tokenizer.encode_text(caption)) if caption else 0,
                  "the reference clip and its transcript": n_patches + (
                      len(self.tokenizer.encode_text(ref_text)) if ref_text else 0)}
        biggest = max(shares, key=shares.get)
        said = ", ".join(f"{name} {n}" for name, n in shares.items() if n)
        return TextError(f"the prompt is too long for the talker: {length} tokens ({said}), at most "
                         f"{MAX_CACHE_LEN - MIN_STEPS_ROOM}: shorten {biggest}")

    def _fitting_prompt(self, task_prompt: str, text: str, cond: Conditioning, caption: str | None, cloning: bool,
                        n_patches: int):
        """The talker prompt of one fragment, or the refusal of one over the talker's room (_prompt_too_long)."""
        ref_text = cond.ref_text if cloning else None
        if self.preview:
            prompt = build_preview_prompt(self.tokenizer, text, cond.ref_text, n_patches)
        else:
            prompt = build_prompt(self.tokenizer, task_prompt, text, n_speakers=cond.n_speakers, prompt_text=ref_text,
                                  n_prompt_patches=n_patches, instruction=caption)
        length = max(len(prompt.ids), max(prompt.latent_slots, default=-1) + 1)
        if length > MAX_CACHE_LEN - MIN_STEPS_ROOM:
            raise self._prompt_too_long(length, text, caption, ref_text, n_patches)
        return prompt

    def check_request(self, req: SpeechRequest) -> None:
        """What `synthesize` would refuse that does not need the reference clip's transcript (task, instruction,
        sampling, text; a text spoken in one call whose prompt is over the talker's room with no reference at all),
        raised before our ASR transcribes a clip: a refusal then comes before the request's first event (a 4xx over
        HTTP), not after seconds of transcribing, inside a started stream."""
        task_prompt, frags, segmented = self.plan(req)
        self._sampling(req)
        cond = self.effective_conditioning(req)
        if not segmented:  # (a segmented text's fragments are bounded by the segmenter)
            caption = req.instruct.caption() if req.instruct is not None else None
            self._fitting_prompt(task_prompt, next(iter(frags)).text, cond, caption, cloning=False, n_patches=0)

    def synthesize(self, req: SpeechRequest, cancel: threading.Event | None = None,
                   report: SynthesisReport | None = None, fragments: list[Fragment] | None = None) -> Iterator[WaveChunk]:
        """Stream waveform chunks for a request (or for given `fragments`, speak-while-thinking)."""
        report = report if report is not None else SynthesisReport()
        self._check_preview(req)
        task_prompt, frags, segmented = self.plan(req) if fragments is None else (TASK_PROMPTS["speech"], fragments, True)
        params = self._sampling(req)
        cond = self.effective_conditioning(req)
        caption = req.instruct.caption() if req.instruct is not None else None
        talker = self.talker
        noise = NoiseSource(req.seed, talker.device, talker.dtype)
        with torch.inference_mode():
            spk = None if cond.speaker is None else talker.speaker_embedding(cond.speaker)
            if cond.zero_speaker:
                spk = talker.speaker_embedding(None)
            lat_embeds = None
            # the Preview appends the prompt latents whenever there are some (its transcript may be empty)
            cloning = cond.latents is not None and (bool(cond.ref_text) or self.preview)
            if cloning:
                lat_embeds = talker.prompt_latent_embeddings(cond.latents)
        max_seconds = req.max_seconds
        if req.task == "music":
            duration = (req.music or {}).get("duration") or _duration_of(frags[0].text)
            if duration:
                cap = float(duration) + MUSIC_SLACK_S
                max_seconds = cap if max_seconds is None else min(max_seconds, cap)
        total_audio = 0.0
        cap = None if max_seconds is None else int(round(max_seconds * self.sample_rate))
        emitted = 0  # samples yielded so far: never more than cap
        for index, frag in enumerate(frags):
            report.fragments.append(frag.text)
            streamed_first = len(report.fragments) == 1
            n_patches = 0 if lat_embeds is None else lat_embeds.shape[0]
            prompt = self._fitting_prompt(task_prompt, frag.text, cond, caption, cloning, n_patches)
            with torch.inference_mode():
                embeds = talker.embed_prompt(prompt.ids, prompt.speaker_slots, spk, prompt.latent_slots, lat_embeds)
            stream = self.vae.stream()
            holder = None if self.preview else SilenceHolder(self.sample_rate)
            frag_audio, first = 0.0, True
            patches = generate_patches(talker, embeds, cond.latents, params, noise, cancel, runner=self.runner)
            try:
                for patch in patches:
                    report.patches += 1
                    # upstream streams only the request's first fragment, and only it has the cut-off
                    capped = segmented and streamed_first and not self.preview and \
                        frag_audio * CHARS_RATE_NUM / CHARS_RATE_DEN >= len(frag.text) and frag_audio > CHARS_MIN_SECONDS
                    over = max_seconds is not None and total_audio + frag_audio >= max_seconds
                    last = patch.is_last or capped or over
                    if capped or over:
                        report.capped.append(index)
                    with torch.inference_mode():
                        wav = stream.push(patch.latents.to(self.vae.decoder.fc1.weight.dtype), last=last)
                    out = wav[0].float().cpu().numpy()
                    out = out if holder is None else holder.push(out, last=last)
                    frag_audio += wav.shape[1] / self.sample_rate
                    if cap is not None and emitted + out.size >= cap:
                        # the decoder's last chunk (and held silence) run past the cap: cut it there
                        out, last = _faded(out[:cap - emitted], int(CAP_FADE_S * self.sample_rate)), True
                        if index not in report.capped:
                            report.capped.append(index)
                    if out.size:
                        emitted += out.size
                        yield WaveChunk(out, frag.source if first else "", index)
                        first = False
                    if last:
                        break
            finally:
                patches.close()
            total_audio += frag_audio
            if cancel is not None and cancel.is_set():
                report.cancelled = True
                return
            if cap is not None and (total_audio >= max_seconds or emitted >= cap):
                return


def _faded(samples: np.ndarray, n: int) -> np.ndarray:
    """``samples`` with their last ``n`` samples faded linearly to silence (a copy)."""
    out = np.array(samples, dtype=np.float32)
    n = min(n, out.size)
    if n:
        out[-n:] *= np.linspace(1.0, 0.0, n + 1, dtype=np.float32)[1:]
    return out


def _duration_of(text: str) -> float | None:
    m = re.search(r"Duration:\s*(\d+(?:\.\d+)?)", text)
    return float(m.group(1)) if m else None

