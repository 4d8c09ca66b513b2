"""The talker / AudioVAE parity runners read every setting from the case (held-out cases at other sizes
and settings run with what they record, or fail naming it)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models.talker.parity import first_bad_sample, talker_inputs_needed, talker_patch_of_case
from engine.tools.parity import format_table, run_case
from tests.paths import fixture_case


def test_talker_patch_comes_from_the_case():
    assert talker_patch_of_case({}, 40, [1, 2, 1, 3, 3]) == 4
    assert talker_patch_of_case({}, 40, [2, 4, 2, 6, 6]) == 2
    assert talker_patch_of_case({"sizes": {"talker_patch_size": 2}}, 40, [2, 4, 2, 6, 6]) == 2
    with pytest.raises(ValueError, match="talker_patch_size"):
        talker_patch_of_case({}, 41, [1, 2, 1, 3, 3])
    with pytest.raises(ValueError, match="talker_patch_size 4"):
        talker_patch_of_case({"sizes": {"talker_patch_size": 4}}, 40, [2, 4, 2, 6, 6])


def test_audio_vae_case_streams_in_the_case_talker_patches(tmp_path):
    """The same 40 latent frames streamed in 2-frame talker patches ([2, 4, 2, 6, 6] patches = the public
    case's frame boundaries): every recorded output still holds (the prompt padding span hop*4*2 = 128
    pads 1000 samples to 1024 as 256 does). Run with a fixed 4-frame patch, the chunks read 80 frames."""
    case = tmp_path / "audio_vae"
    shutil.copytree(fixture_case("audio_vae"), case)
    inputs = load_file(str(case / "inputs.safetensors"))
    inputs["stream_chunks_patches"] = inputs["stream_chunks_patches"] * 2
    save_file(inputs, str(case / "inputs.safetensors"))
    meta = json.loads((case / "meta.json").read_text())
    meta["stream_chunks_patches"] = [2 * n for n in meta["stream_chunks_patches"]]
    (case / "meta.json").write_text(json.dumps(meta))
    rows = run_case(case)
    bad = [r for r in rows if not r.ok]
    assert rows and not bad, format_table(bad)
    assert {"stream.wav_concat", "encode.padded_wav", "stream.chunk_kv_len"} <= {r.tensor for r in rows}


def test_the_first_stream_difference_is_looked_for_in_every_batch_row():
    """`stream_minus_oneshot_first_bad` of a batch: a difference only in row 1 is found (the earliest over the rows
    for a scalar record, each row's index for a [B] record); none anywhere is -1."""
    diff = torch.zeros(3, 50)
    diff[1, 30], diff[1, 40], diff[2, 45] = 1e-3, 1e-3, 1e-3
    assert int(first_bad_sample(diff)) == 30
    assert int(first_bad_sample(diff, torch.tensor(-1))) == 30
    assert first_bad_sample(diff, torch.tensor([-1, 30, 45])).tolist() == [-1, 30, 45]
    assert int(first_bad_sample(torch.full((2, 50), 1e-6))) == -1


def test_a_talker_sub_case_needs_the_inputs_it_ran_with():
    """The speaker vectors and prompt latents a sub-case records that it used (meta.json's speaker_embedding /
    prompt_latent_frames, or their projections among its outputs) are inputs it cannot run without; a plain
    TTS sub-case or one with the zero speaker needs neither."""
    clone = {"speaker_embedding": True, "prompt_latent_frames": 24}
    assert talker_inputs_needed("clone", clone, {}) == ["clone.spk_emb_192", "clone.prompt_wav_lat"]
    assert talker_inputs_needed("tts", {"speaker_embedding": False, "prompt_latent_frames": 0}, {}) == []
    assert talker_inputs_needed("z", {"speaker_embedding": True, "use_zero_spk_emb": True}, {}) == []
    assert talker_inputs_needed("s", {}, {"s.spk_emb_proj": 0, "s.prompt_wav_emb": 0}) == ["s.spk_emb_192",
                                                                                        "s.prompt_wav_lat"]


def test_sampler_settings_are_the_ones_the_case_records():
    from engine.models.talker.cfm import SamplingParams
    from engine.models.talker.parity import sampler_settings
    public = {"reference": "generate (stop rule step > min_new_token(10) and p_stop > 0.5); cfg=2.0, sigma=0.25, "
                           "temperature=0 (upstream defaults)"}
    assert sampler_settings(public, {}) == (SamplingParams(2.0, 0.25, 0.0), 10)
    tta = {"reference": "cfg=4.5, sigma=0.3, temperature=2.5; step > min_new_token(6)"}
    assert sampler_settings(tta, {}) == (SamplingParams(4.5, 0.3, 2.5), 6)
    # a sub-case's own keys, then the top level / `sampling`, come before the reference text
    assert sampler_settings({**tta, "sampling": {"sigma": 0.5}}, {"cfg": 3}) == (SamplingParams(3.0, 0.5, 2.5), 6)
    assert sampler_settings({}, {}) == (SamplingParams(), 10)
    with pytest.raises(ValueError, match="'temperature'"):
        sampler_settings({"temperature": "hot"}, {})


def _talker_variant(tmp_path, reference: str):
    case = tmp_path / "talker"
    shutil.copytree(fixture_case("talker"), case)
    meta = json.loads((case / "meta.json").read_text())
    meta["reference"] = reference
    (case / "meta.json").write_text(json.dumps(meta))
    return {r.tensor: r for r in run_case(case)}


def test_talker_case_runs_with_its_recorded_cfg_and_stop_rule(tmp_path):
    """The public case's outputs were made with cfg 2.0 and min_new_token 10; the same case saying it
    ran with cfg 4.5 and min_new_token 20 must be run so (and so differ), not with the defaults."""
    rows = _talker_variant(tmp_path, "omni_audio_generation_func -> generate (stop rule step > min_new_token(20) "
                                     "and p_stop > 0.5); cfg=4.5, sigma=0.25, temperature=0")
    assert not rows["tts.cfm_x"].ok and not rows["tts.step_gen_lat"].ok
    assert not rows["tts.n_steps"].ok  # the public case stops at step 16, which min_new_token 20 does not allow
    assert rows["tts.prefill_last_hidden_state"].ok  # the prompt is untouched


def test_a_recorded_instruction_object_is_the_caption_json():
    """A case may record the instruction as the caption object itself; it is the prompt piece upstream
    serialises (ensure_ascii=False, default separators), not a crash in the tokenizer."""
    from engine.models.talker.parity import instruction_text
    from engine.models.talker.prompt import Instruction
    caption = Instruction(emotion="高兴", speed="快速").caption()
    assert instruction_text(json.loads(caption)) == caption and instruction_text(caption) == caption
    assert instruction_text(None) is None
    with pytest.raises(ValueError, match="instruction"):
        instruction_text(3)


def test_talker_case_with_an_instruction_object_runs(tmp_path):
    case = tmp_path / "talker"
    shutil.copytree(fixture_case("talker"), case)
    meta = json.loads((case / "meta.json").read_text())
    meta["cases"]["tts"]["instruction"] = {"audio_sequence": [{"序号": 1, "说话人": "speaker_1", "情感": "高兴"}]}
    (case / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))
    rows = {r.tensor: r for r in run_case(case)}
    assert not rows["inputs.tts.input_ids"].ok  # the recorded ids have no instruction: a real difference
    assert rows["inputs.clone.input_ids"].ok and rows["clone.step_gen_lat"].ok


def _case_noise(name: str) -> tuple[dict, dict]:
    case = fixture_case(name)
    return json.loads((case / "meta.json").read_text()), load_file(str(case / "outputs.safetensors"))


def test_the_talker_draws_its_noise_as_the_reference_did_for_the_seed():
    """meta.json: torch.manual_seed(noise_seed), then per AR step y0 [1, patch, 64] and the SDE noise
    [steps, 1, patch, 64] (CPU, fp32). NoiseSource(noise_seed) must give those draws in that order, so a
    seeded run reproduces the reference's speech for its seed."""
    from engine.models.talker.parity import SEEDED_NOISE_TOL, seeded_draws
    meta, outputs = _case_noise("talker")
    for name in meta["cases"]:
        y0, sde = outputs[f"{name}.noise_y0"], outputs[f"{name}.noise_sde"]
        drawn_y0, drawn_sde = seeded_draws(meta["noise_seed"], y0.shape[0], sde.shape[1], y0.shape[1:], sde=True)
        torch.testing.assert_close(drawn_y0, y0, atol=SEEDED_NOISE_TOL, rtol=0, msg=name)
        torch.testing.assert_close(drawn_sde, sde, atol=SEEDED_NOISE_TOL, rtol=0, msg=name)


def test_the_vae_posterior_draws_its_noise_as_the_reference_did_for_the_seed():
    """meta.json: torch.manual_seed(noise_seed) right before encode_latent; the Oobleck posterior draws eps
    over its channel-major [1, latent, T'] mean. Ours, time-major, must hold the same eps per (frame, channel)."""
    from engine.models.talker.parity import SEEDED_NOISE_TOL
    from engine.models.talker.vae import Posterior
    meta, outputs = _case_noise("audio_vae")
    stored = outputs["encode.posterior_noise"]
    post = Posterior(mean=torch.zeros(stored.shape), std=torch.ones(stored.shape))
    torch.testing.assert_close(post.seeded_noise(meta["noise_seed"]), stored, atol=SEEDED_NOISE_TOL, rtol=0)


def _trimmed_talker_case(tmp_path, keep_steps: int) -> tuple:
    """The public talker case cut to its `tts` sub-case and the first `keep_steps` AR steps of its per-step
    outputs (the whole-run ones dropped), without its stored noise: a case recording less than the harness
    compares, run in a fraction of the full case's time."""
    case = shutil.copytree(fixture_case("talker"), tmp_path / "talker",
                           ignore=shutil.ignore_patterns("outputs.safetensors", "inputs.safetensors"))
    inputs = load_file(str(fixture_case("talker") / "inputs.safetensors"))
    save_file({k: v for k, v in inputs.items() if k.startswith("tts.")}, str(case / "inputs.safetensors"))
    meta = json.loads((case / "meta.json").read_text())
    meta["cases"] = {"tts": meta["cases"]["tts"]}
    (case / "meta.json").write_text(json.dumps(meta))
    whole_run = {"n_steps", "stopped", "yield_is_last", "latents", "step_cache_position", "noise_y0", "noise_sde"}
    outputs = {}
    for key, value in load_file(str(fixture_case("talker") / "outputs.safetensors")).items():
        sub, _, field = key.partition(".")
        if sub != "tts" or field in whole_run:
            continue
        outputs[key] = value[:keep_steps] if field.startswith(("step_", "cfm_")) else value
    save_file(outputs, str(case / "outputs.safetensors"))
    return case, meta, outputs


def test_a_talker_case_leaving_outputs_out_compares_the_rest(tmp_path, one_thread):
    """A talker case without its stored noise (noise_seed only) and without the whole-run outputs failed with
    KeyError: 'tts.noise_y0'. It now draws the noise from the seed, runs the steps the case records, compares
    every output it holds (within tolerance) and lists the rest as not recorded; without a seed either, the
    generation outputs are 'not comparable' (failed, named), the prefill still compared."""
    from engine.tools.parity import is_not_recorded
    case, meta, outputs = _trimmed_talker_case(tmp_path, keep_steps=2)
    rows = run_case(case)
    bad = [r for r in rows if not r.ok]
    assert not bad, format_table(bad)
    compared = {r.tensor for r in rows if not is_not_recorded(r)}
    assert {"tts.step_gen_lat", "tts.cfm_pred_uncond", "tts.prefill_last_hidden_state"} <= compared
    assert {r.tensor for r in rows if is_not_recorded(r)} >= {"tts.n_steps", "tts.latents", "tts.noise_y0"}

    del meta["noise_seed"]
    (case / "meta.json").write_text(json.dumps(meta))
    rows = {r.tensor: r for r in run_case(case)}
    assert rows["tts.prefill_last_hidden_state"].ok
    assert not rows["tts.step_gen_lat"].ok and "noise_seed" in rows["tts.step_gen_lat"].note
