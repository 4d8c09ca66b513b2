"""Parity of the talker and the AudioVAE against the upstream reference (ming_ref case kinds `talker`
and `audio_vae`), run by `python -m engine.parity` (engine.tools.parity dispatches here).

Everything comes from the case folder: configs, weights and tokenizer are loaded by our normal loaders,
prompts are rebuilt by our prompt builder from meta.json's texts, and the reference's random draws
(the CFM noise, the VAE posterior noise) are re-injected as the fixture stores them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.models.talker.cfm import PREVIEW_UNGUIDED_BELOW, SamplingParams, epss_timesteps, time_grid
from engine.models.talker.generate import (MIN_STEPS_BEFORE_STOP, STOP_THRESHOLD, NoiseSource, StoredNoise,
                                           generate_patches, initial_history)
from engine.models.talker.config import TALKER_RELEASES
from engine.models.talker.model import load_talker
from engine.models.talker.prompt import build_preview_prompt, build_prompt
from engine.models.talker.tokenizer import PREVIEW_REQUIRED_TOKENS, REQUIRED_TOKENS, TalkerTokenizer
from engine.models.talker.vae import load_audio_vae
from engine.models.talker.audio import left_pad_to_multiple




def talker_patch_of_case(meta: dict, n_latents: int, chunks: list[int]) -> int:
    """Latent frames per talker patch of an audio_vae case: its streaming chunks are counted in talker
    patches, and the prompt padding span is hop * VAE patch * talker patch (spec §7.4), but the talker's
    patch_size is no VAE setting. meta.json's `sizes.talker_patch_size` when recorded, else what the
    case's latents and chunks imply (the chunks cover the latents); anything else is refused, naming it."""
    recorded = (meta.get("sizes") or {}).get("talker_patch_size")
    total = sum(int(n) for n in chunks)
    if recorded is not None:
        patch = int(recorded)
        if patch <= 0 or (total and total * patch != n_latents):
            raise ValueError(f"sizes.talker_patch_size {recorded} does not fit the case: stream_chunks_patches "
                             f"{chunks} x {recorded} frames != {n_latents} latent frames")
        return patch
    if total <= 0 or n_latents % total:
        raise ValueError(f"cannot tell the talker patch size: meta.json records no sizes.talker_patch_size and "
                         f"stream_chunks_patches {chunks} (sum {total}) does not divide the {n_latents} latent frames")
    return n_latents // total


# The sampler settings a talker case may record, with the upstream call defaults (meta.json's
# `reference` of the public case: cfg=2.0, sigma=0.25, temperature=0; the stop rule's min_new_token(10)).
SAMPLER_DEFAULTS = {"cfg": SamplingParams.cfg, "sigma": SamplingParams.sigma,
                    "temperature": SamplingParams.temperature, "min_new_token": MIN_STEPS_BEFORE_STOP}


def _recorded(meta: dict, case: dict, key: str):
    """A sampler setting as the case records it: the sub-case's key, meta.json's top level or its
    `sampling` object, else `key=value` / `key(value)` in meta.json's `reference` text; None if absent."""
    for where in (case, meta, meta.get("sampling") or {}):
        if where.get(key) is not None:
            return where[key]
    m = re.search(rf"\b{key}\s*(?:=\s*|\(\s*)([-+0-9.eE]+)", str(meta.get("reference", "")))
    return m.group(1) if m else None


def case_release(meta: dict) -> str:
    """The talker release whose upstream tree made a case: meta.json's `release` when it names one, else
    the Preview when `environment.upstream` names the Preview tree (e58533d), else 2.0 (as the
    frontend cases tell their release)."""
    release = str(meta.get("release") or "").lower()
    if release in TALKER_RELEASES:
        return release
    upstream = str((meta.get("environment") or {}).get("upstream", "")).lower()
    return "preview" if "preview" in upstream or "e58533d" in upstream else "2.0"


def sampler_settings(meta: dict, case: dict, cfg_default: float = SAMPLER_DEFAULTS["cfg"]) -> tuple[SamplingParams, int]:
    """(SamplingParams, min_new_token) a talker sub-case was run with (upstream defaults where nothing
    is recorded; the Preview's CFG default is its config's `cfg_strength`, `cfg_default`); a recorded
    value that is not a number fails naming it."""
    got = {}
    for key, default in {**SAMPLER_DEFAULTS, "cfg": cfg_default}.items():
        value = _recorded(meta, case, key)
        try:
            got[key] = type(default)(float(value)) if value is not None else default
        except (TypeError, ValueError) as e:
            raise ValueError(f"talker case setting '{key}' is {value!r}, not a number") from e
    return SamplingParams(got["cfg"], got["sigma"], got["temperature"]), got["min_new_token"]


def instruction_text(value) -> str | None:
    """A case's `instruction` as the prompt piece: a string as given, the caption object serialised as
    upstream does (json.dumps, ensure_ascii=False, default separators; spec §7.10)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    raise ValueError(f"talker case instruction must be a string or a JSON object, got {type(value).__name__}")


def _tol(meta: dict, key: str, default: float) -> float:
    value = meta.get("suggested_tolerances", {}).get(key, default)
    if isinstance(value, str):
        try:
            return float(value.split()[0])
        except ValueError:
            return default
    return float(value)


def _stack(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([x.reshape(x.shape[1:]) if x.shape[0] == 1 else x for x in items])


# Noise drawn from a recorded seed against the reference's draws (CPU randn, fp32): an ulp may differ between the
# AVX2 and AVX-512 builds of torch's vectorised normal; a wrong order or layout of the draws differs by O(1).
SEEDED_NOISE_TOL = 1e-6


def seeded_draws(seed: int, n_steps: int, cfm_steps: int, patch_shape, sde: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The y0 [n, patch, C] and SDE noise [n, cfm_steps, patch, C] a run of `n_steps` draws from NoiseSource(seed)."""
    source, draws = NoiseSource(seed), []
    for step in range(n_steps):
        draws.append(source.draw(step, cfm_steps, *patch_shape, sde=sde))
    return torch.cat([y0 for y0, _ in draws]), torch.stack([s[:, 0] for _, s in draws])


def case_noise(meta: dict, outputs: dict, name: str, cfm_steps: int) -> tuple[NoiseSource | None, int | None]:
    """(noise, step bound) a sub-case's generation runs on: its stored draws re-injected (noise_y0, and
    noise_sde where stored: the Preview draws none), bound to the steps stored; else drawn from the
    recorded noise_seed, bound to the steps its per-step outputs record (else the stop rule's own end);
    (None, None) when it records neither."""
    y0 = outputs.get(f"{name}.noise_y0")
    if y0 is not None:
        sde = outputs.get(f"{name}.noise_sde", y0.new_zeros(y0.shape[0], cfm_steps, *y0.shape[1:]))
        return StoredNoise(y0, sde), y0.shape[0]
    if meta.get("noise_seed") is None:
        return None, None
    per_step = (f"{name}.{k}" for k in ("step_gen_lat", "step_stop_prob", "step_llm_last_hidden", "yield_is_last"))
    return NoiseSource(meta["noise_seed"]), next((outputs[k].shape[0] for k in per_step if k in outputs), None)


def talker_inputs_needed(name: str, case: dict, outputs: dict) -> list[str]:
    """The inputs talker sub-case `name` ran with, as it records them: its speaker vectors when it used a speaker
    embedding (`speaker_embedding` true and not the zero one, or a projected one recorded), its prompt latents
    when it had some (`prompt_latent_frames` > 0, or their embeddings recorded)."""
    needed = []
    if (case.get("speaker_embedding") and not case.get("use_zero_spk_emb")) or f"{name}.spk_emb_proj" in outputs:
        needed.append(f"{name}.spk_emb_192")
    if int(case.get("prompt_latent_frames") or 0) > 0 or f"{name}.prompt_wav_emb" in outputs:
        needed.append(f"{name}.prompt_wav_lat")
    return needed


def run_talker_case(case_dir: Path, comparer_cls, device: str = "cpu") -> list:
    """Each sub-case's prompt, prefill and generation loop; a sub-case without an input it ran with has its rows
    failed, naming the input."""
    from engine.tools.parity import InputNotRecorded, load_inputs

    meta = json.loads((case_dir / "meta.json").read_text())
    inputs = load_inputs(case_dir)
    outputs = load_file(str(case_dir / "outputs.safetensors"))
    cmp = comparer_cls(case_dir.name, {**{f"inputs.{k}": v for k, v in inputs.items() if k.endswith("input_ids")}, **outputs})
    hidden_tol = _tol(meta, "prefill_last_hidden_state / step_llm_last_hidden", 1e-4)
    lat_tol = _tol(meta, "cfm_pred_* / step_gen_lat / latents", 1e-4)
    emb_tol = _tol(meta, "step_next_embeds / prompt_wav_emb / spk_emb_proj", 1e-5)
    stop_tol = _tol(meta, "step_stop_prob", 1e-5)
    # a Preview case (spec §7.11): no chat template, no speaker head, CFG from the config, no SDE draw
    talker = load_talker(case_dir, dtype=torch.float32, device=device, release=case_release(meta))
    cfg = talker.config
    tok = TalkerTokenizer(case_dir / "llm", PREVIEW_REQUIRED_TOKENS if cfg.preview else REQUIRED_TOKENS)
    steps = cfg.steps
    with torch.inference_mode():
        if "t_schedule_raw" in outputs:
            cmp.close("t_schedule_raw", epss_timesteps(steps), 0.0)
        if "t_schedule_sway" in outputs:
            cmp.close("t_schedule_sway", time_grid(steps), 1e-7)
        if "dit_rope_freqs" in outputs:
            cmp.close("dit_rope_freqs", talker.cfm.model.rotary_embed(1 + cfg.history_patch_size + cfg.patch_size)[None], 1e-6)
        if "agg_rope_freqs" in outputs:
            cmp.close("agg_rope_freqs", talker.aggregator.rotary_embed(1 + cfg.patch_size)[None], 1e-6)
        for name, case in meta["cases"].items():
            spk = inputs.get(f"{name}.spk_emb_192")
            lat = inputs.get(f"{name}.prompt_wav_lat")
            if spk is not None and f"{name}.spk_emb_proj" in outputs:
                # spk_head keeps the layout the case lists its vectors in ([n, 192], [n, 1, 192], [1, n, 192])
                cmp.close(f"{name}.spk_emb_proj", talker.speaker_embedding(spk).reshape(*spk.shape[:-1], -1), emb_tol)
            lat_embeds = talker.prompt_latent_embeddings(lat) if lat is not None else None
            if lat_embeds is not None and f"{name}.prompt_wav_emb" in outputs:
                cmp.close(f"{name}.prompt_wav_emb", lat_embeds[None], emb_tol)
            try:  # (the rows of one input alone are compared above; the rest need every input the sub-case ran with)
                inputs.require(*talker_inputs_needed(name, case, outputs))
            except InputNotRecorded as e:
                cmp.input_missing(e, (f"{name}.", f"inputs.{name}."), f"{name}.*")
                continue
            n_patches = 0 if lat is None else lat.shape[1] // cfg.patch_size
            zero_spk = bool(case.get("use_zero_spk_emb")) and spk is None
            n_spk = 1 if zero_spk else (0 if spk is None else talker.speaker_vectors(spk).shape[0])
            if cfg.preview:
                prompt = build_preview_prompt(tok, case["text"], case.get("prompt_text"), n_patches)
            else:
                prompt = build_prompt(tok, case["prompt"], case["text"], n_speakers=n_spk,
                                      prompt_text=case.get("prompt_text"), n_prompt_patches=n_patches,
                                      instruction=instruction_text(case.get("instruction")))
            params, min_steps = sampler_settings(meta, case, cfg.cfg_strength if cfg.preview else SamplingParams.cfg)
            if f"inputs.{name}.input_ids" in cmp.outputs:
                cmp.exact(f"inputs.{name}.input_ids", torch.tensor([prompt.ids]))
            spk_embeds = talker.speaker_embedding(spk) if (spk is not None or zero_spk) else None
            if f"{name}.prompt_his_lat_init" in outputs:
                cmp.close(f"{name}.prompt_his_lat_init", initial_history(cfg, lat, torch.float32, device), 0.0)
            embeds = talker.embed_prompt(prompt.ids, prompt.speaker_slots, spk_embeds, prompt.latent_slots, lat_embeds)
            cmp.close(f"{name}.prefill_inputs_embeds", embeds, emb_tol)
            cmp.close(f"{name}.prefill_last_hidden_state", talker.model(embeds), hidden_tol)
            noise, bound = case_noise(meta, outputs, name, steps)
            if noise is None:
                cmp.not_comparable([k for k in outputs if k.startswith(f"{name}.") and k not in cmp.compared],
                                   f"the case records neither {name}.noise_y0 nor a noise_seed to generate from")
                continue
            trace: dict = {}
            patches = []
            for patch in generate_patches(talker, embeds, lat, params, noise, trace=trace, min_steps=min_steps):
                patches.append(patch)
                if len(patches) == bound:  # no noise is stored (or output recorded) past the reference's last step
                    break
            n = len(patches)
            # cut short where the reference's noise ends: at least one step more than it ran
            cmp.exact(f"{name}.n_steps", torch.tensor(n if patches[-1].is_last else n + 1))
            # upstream flags a yield True only when the stop head ends the run; a run ending at its step or
            # cache bound yields False throughout (our loop still marks its final patch is_last)
            flags = [int(p.is_last and p.step > min_steps and p.stop_prob > STOP_THRESHOLD) for p in patches]
            cmp.exact(f"{name}.stopped", torch.tensor(flags[-1], dtype=torch.uint8))
            cmp.exact(f"{name}.yield_is_last", torch.tensor(flags, dtype=torch.uint8))
            gen = torch.cat([p.latents for p in patches])
            cmp.close(f"{name}.step_gen_lat", gen, lat_tol)
            cmp.close(f"{name}.latents", gen.reshape(1, -1, gen.shape[-1]), lat_tol)
            cmp.close(f"{name}.step_his_lat", torch.cat(trace["his"]), lat_tol)
            h = torch.cat(trace["h"]).reshape(n, -1)
            cmp.close(f"{name}.step_llm_last_hidden", h, hidden_tol)
            cmp.close(f"{name}.step_next_embeds", torch.cat(trace["next"]).reshape(n, -1), emb_tol)
            logits = talker.stop_head(h)
            cmp.close(f"{name}.step_stop_prob", torch.softmax(logits, -1), stop_tol)
            cmp.close(f"{name}.step_stop_logits", logits, hidden_tol)
            cmp.exact(f"{name}.step_cache_position", torch.tensor(trace.get("cache_position", []), dtype=torch.long))
            cfm = trace["cfm"]
            cmp.close(f"{name}.cfm_x", torch.stack([_stack(c["x"]) for c in cfm]), lat_tol)
            cmp.close(f"{name}.cfm_t", torch.stack([torch.stack(c["t"]) for c in cfm]), 1e-7)
            cmp.close(f"{name}.cfm_pred_cond", torch.stack([_stack(c["pred_cond"]) for c in cfm]), lat_tol)
            if all(c.get("pred_uncond") for c in cfm):
                cmp.close(f"{name}.cfm_pred_uncond", torch.stack([_stack(c["pred_uncond"]) for c in cfm]), lat_tol)
            else:  # a Preview cfg below PREVIEW_UNGUIDED_BELOW: upstream runs (and stores) no unconditional branch
                cmp.not_comparable([f"{name}.cfm_pred_uncond"], f"the reference ran an unconditional branch at cfg "
                                   f"{params.cfg}; the Preview's CFM skips it below {PREVIEW_UNGUIDED_BELOW}")
            # the reference's draws, consumed here as inputs: one per step actually run; with the seed recorded
            # (torch.manual_seed right before the call), the ones our NoiseSource draws for it must be the same
            stored_sde = noise.sde[:n] if isinstance(noise, StoredNoise) else None
            y0_drawn, sde_drawn, how = torch.cat(trace["y0"]), stored_sde, "re-injected"
            if "noise_seed" in meta:
                y0_drawn, sde_drawn = seeded_draws(meta["noise_seed"], n, steps, (cfg.patch_size, cfg.latent_dim),
                                                  sde=not cfg.preview)
                how = "drawn from noise_seed"
            # drawn: our CPU generator against the reference's, whose vectorised randn may differ by an ulp on
            # another CPU (AVX2 / AVX-512 builds); a wrong order of draws is off by O(1)
            def check_noise(row: str, got: torch.Tensor) -> None:
                if how == "re-injected":
                    cmp.exact(row, got, note=how)
                else:
                    cmp.close(row, got, SEEDED_NOISE_TOL)
            check_noise(f"{name}.noise_y0", y0_drawn)
            if f"{name}.noise_sde" in outputs:
                check_noise(f"{name}.noise_sde", sde_drawn)
    return cmp.rows + cmp.missing()


STREAM_DIFF_THRESHOLD = 1e-5  # the |stream - one-shot| a case's `stream_minus_oneshot_first_bad` counts from


def first_bad_sample(diff: torch.Tensor, recorded: torch.Tensor | None = None) -> torch.Tensor:
    """`stream_minus_oneshot_first_bad` of |stream - one-shot| `diff` [B, N]: the first sample index over
    STREAM_DIFF_THRESHOLD (-1 if none) of every batch row, [B] when the case records one per row, else the
    earliest over all rows (a scalar)."""
    over = diff > STREAM_DIFF_THRESHOLD
    index = torch.arange(diff.shape[-1], device=diff.device).expand_as(diff)
    per_row = torch.where(over, index, diff.shape[-1]).min(dim=-1).values
    per_row = torch.where(per_row == diff.shape[-1], -1, per_row)
    if recorded is not None and recorded.dim() == 1 and recorded.shape[0] == diff.shape[0]:
        return per_row
    found = per_row[per_row >= 0]
    return found.min() if len(found) else torch.tensor(-1)


def run_audio_vae_case(case_dir: Path, comparer_cls, device: str = "cpu") -> list:
    """The decoder one-shot and streamed (inputs `latents`, `stream_chunks_patches`, without which nothing runs:
    the encoder's padding span is counted in the talker patches they imply) and the encoder path of a prompt
    wav (`prompt_wav`: without it the encoder's rows fail, naming it)."""
    from engine.tools.parity import InputNotRecorded, load_inputs

    meta = json.loads((case_dir / "meta.json").read_text())
    inputs = load_inputs(case_dir)
    outputs = load_file(str(case_dir / "outputs.safetensors"))
    cmp = comparer_cls(case_dir.name, outputs)
    latents, chunks = inputs["latents"].to(device), inputs["stream_chunks_patches"].tolist()
    per_patch = talker_patch_of_case(meta, latents.shape[1], chunks)
    vae = load_audio_vae(case_dir, dtype=torch.float32, device=device)
    with torch.inference_mode():
        _compare_vae_decode(cmp, meta, vae, latents, chunks, per_patch)
        try:
            _compare_vae_encode(cmp, meta, vae, inputs["prompt_wav"].to(device), per_patch)
        except InputNotRecorded as e:
            cmp.input_missing(e, ("encode.",))
    return cmp.rows + cmp.missing()


def _compare_vae_decode(cmp, meta: dict, vae, latents: torch.Tensor, chunks: list[int], per_patch: int) -> None:
    """decode(latents) in one shot and streamed in the case's chunks (talker patches of `per_patch` frames)."""
    outputs = cmp.outputs
    wav_tol = _tol(meta, "oneshot.* / stream.* waveforms", 1e-4)
    hid_tol = _tol(meta, "decoder_hidden / head_out", 1e-4)
    trace: dict = {}
    one = vae.decode(latents, trace)
    cmp.close("oneshot.wav", one[:, None], wav_tol)
    cmp.close("oneshot.upsampled", trace["upsampled"], hid_tol)
    cmp.close("oneshot.decoder_hidden", trace["decoder_hidden"], hid_tol)
    cmp.close("oneshot.head_out", trace["head_out"], hid_tol)

    stream = vae.stream()
    pieces, kv_lens, offset = [], [], 0
    for i, n in enumerate(chunks):
        part = latents[:, offset * per_patch:(offset + n) * per_patch]
        offset += n
        wav = stream.push(part, last=i == len(chunks) - 1)
        pieces.append(wav)
        kv_lens.append(stream.state.cache.length)
        if f"stream.chunk_wav.{i}" in outputs:
            cmp.close(f"stream.chunk_wav.{i}", wav, wav_tol)
        st = stream.state
        if f"stream.chunk_audio_buffer.{i}" in outputs:
            cmp.close(f"stream.chunk_audio_buffer.{i}", st.audio_buffer, wav_tol)
            cmp.close(f"stream.chunk_window_buffer.{i}", st.window_buffer[None], wav_tol)
        if f"stream.chunk_hist_last.{i}" in outputs:
            cmp.close(f"stream.chunk_hist_last.{i}", st.history_last, hid_tol)
    streamed = torch.cat(pieces, dim=1)
    cmp.close("stream.wav_concat", streamed, wav_tol)
    cmp.exact("stream.chunk_kv_len", torch.tensor(kv_lens))
    cmp.exact("stream.chunk_decoder_calls", torch.tensor(stream.state.decoder_calls))
    diff = (streamed - one).abs()
    cmp.close("stream_minus_oneshot_maxabs", diff.max(), wav_tol)
    first_bad = first_bad_sample(diff, outputs.get("stream_minus_oneshot_first_bad"))
    cmp.exact("stream_minus_oneshot_first_bad", first_bad)


def _compare_vae_encode(cmp, meta: dict, vae, wav: torch.Tensor, per_patch: int) -> None:
    """The encoder path of a voice-cloning prompt (register_prompt_wav): left pad to the talker patch's span,
    encode, sample the posterior with the recorded (or seeded) noise."""
    outputs, cfg = cmp.outputs, vae.config
    enc_tol = _tol(meta, "encode.*", 1e-5)
    span = cfg.encoder_samples_per_latent * per_patch
    padded = left_pad_to_multiple(wav, span)
    cmp.close("encode.padded_wav", padded, 0.0)
    etrace: dict = {}
    post = vae.posterior(padded, etrace)
    cmp.close("encode.frames", etrace["frames"], 0.0)
    cmp.close("encode.encoder_hidden", etrace["encoder_hidden"], enc_tol)
    cmp.close("encode.posterior_params", etrace["posterior_params"], enc_tol)
    cmp.close("encode.posterior_mean", post.mean, enc_tol)
    cmp.close("encode.posterior_std", post.std, enc_tol)
    frames = math.ceil(math.ceil(padded.shape[-1] / cfg.enc_input_dim) / cfg.frames_per_latent)
    cmp.exact("encode.frame_num", torch.tensor([float(frames)]))
    noise = outputs.get("encode.posterior_noise")
    if "noise_seed" in meta:  # torch.manual_seed(noise_seed) right before encode_latent: our draw must match
        drawn = post.seeded_noise(meta["noise_seed"])
        cmp.close("encode.posterior_noise", drawn, SEEDED_NOISE_TOL)
        noise = drawn if noise is None else noise.to(wav.device)
    elif noise is None:
        cmp.not_comparable(["encode.latent", "encode.prompt_wav_lat"], "the case records neither "
                           "encode.posterior_noise nor a noise_seed to sample the posterior with")
        return
    else:
        noise = noise.to(wav.device)
        cmp.exact("encode.posterior_noise", noise, note="re-injected")
    latent = post.sample(noise)
    cmp.close("encode.latent", latent, enc_tol)
    cmp.close("encode.prompt_wav_lat", latent.reshape(1, -1, cfg.latent_dim), enc_tol)
