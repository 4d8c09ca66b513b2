"""Reference parity: every public case (llm, rope_index, mm, prompts, frontends, talker, audio_vae, imagegen,
full_names) through `engine.tools.parity`, plus its CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.tools.parity import format_table, run_case
from tests.paths import REPO, fixture_case


@pytest.mark.parametrize("case", ["llm_b1", "llm_b2", "rope_index", "mm", "prompts",
                                  "frontend_image", "frontend_audio", "frontend_video",
                                  "talker", "audio_vae", "imagegen_cond", "imagegen_dit", "imagegen_byt5",
                                  "full_names"])
def test_public_case_is_within_tolerance(case):
    rows = run_case(fixture_case(case))
    bad = [r for r in rows if not r.ok]
    assert rows and not bad, format_table(bad)
    compared = {r.tensor for r in rows}
    if case.startswith("llm") or case == "mm":
        assert {"logits", "generated_ids", "decode_logits", "router.layer1.topk_ids"} <= compared
    if case == "mm":
        assert {"processor.input_ids", "processor.pixel_values", "vision_embeds", "audio_embeds"} <= compared
    if case == "talker":
        assert {"clone.step_gen_lat", "clone.prompt_wav_emb", "tts.n_steps", "tts_spk.spk_emb_proj"} <= compared
    if case == "audio_vae":
        assert {"oneshot.wav", "stream.wav_concat", "stream.chunk_decoder_calls", "encode.latent"} <= compared
    if case == "imagegen_cond":
        assert {"t2i.condition_embeds", "edit.condition_embeds", "edit.position_ids"} <= compared
    if case == "imagegen_dit":
        assert {f"{r}.{t}" for r in ("t2i", "edit", "t2i_dynamic") for t in ("step_dit_out", "image_uint8")} <= compared
    if case == "imagegen_byt5":
        assert {"t2i.byt5_mapper_out", "t2i_long.condition_embeds"} <= compared
    if case == "full_names":
        assert {r.case for r in rows} == {"full_names/v2", "full_names/preview"} and "shapes" in compared


def test_a_names_case_names_what_differs(tmp_path):
    """A checkpoint name our model does not have, and one shape off, fail the names case and are named."""
    src = fixture_case("full_names")
    case = tmp_path / "full_names"
    shutil.copytree(src / "v2", case / "v2")
    meta = json.loads((src / "meta.json").read_text())
    meta["subfolders"] = {"v2": meta["subfolders"]["v2"]}
    (case / "meta.json").write_text(json.dumps(meta))
    lines = (case / "v2" / "names.txt").read_text().splitlines()
    name, shape, dtype = lines[0].split("\t")
    lines[0] = "\t".join([name + "_renamed", shape, dtype])
    name1, shape1, dtype1 = lines[1].split("\t")
    lines[1] = "\t".join([name1, json.dumps([d + 1 for d in json.loads(shape1)]), dtype1])
    (case / "v2" / "names.txt").write_text("\n".join(lines) + "\n")
    rows = {r.tensor.split(" ")[0]: r for r in run_case(case)}
    assert not rows["names"].ok and name + "_renamed" in rows["names"].note and name in rows["names"].note
    assert not rows["shapes"].ok and name1 in rows["shapes"].note


def test_an_llm_case_holding_a_subset_of_the_outputs_compares_what_it_holds(tmp_path):
    """An llm case records some outputs and not others (here no inputs_embeds, last_hidden_state, router
    weights or decode routes): the harness compares what the case holds; it failed the whole case on the first
    output it expected (KeyError: 'inputs_embeds'). A case holding none of them is not ok, not silently empty."""
    src = fixture_case("llm_b1")
    case = shutil.copytree(src, tmp_path / "llm_b1", ignore=shutil.ignore_patterns("outputs.safetensors"))
    outputs = load_file(str(src / "outputs.safetensors"))
    dropped = {"inputs_embeds", "last_hidden_state", "router.layer1.topk_weights"}
    dropped |= {n for n in outputs if n.startswith("decode_router.")}
    save_file({k: v for k, v in outputs.items() if k not in dropped}, str(case / "outputs.safetensors"))
    rows = run_case(case)
    assert rows and all(r.ok for r in rows), format_table([r for r in rows if not r.ok])
    compared = {r.tensor for r in rows}
    assert {"logits", "generated_ids", "decode_logits", "router.layer1.topk_ids"} <= compared
    assert not compared & dropped
    save_file({"unrelated": torch.zeros(1)}, str(case / "outputs.safetensors"))
    assert not any(r.ok for r in run_case(case))


def test_cli_exit_status(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "engine.parity", str(fixture_case("rope_index"))], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "max abs diff" in ok.stdout
    unsupported = tmp_path / "weird"
    unsupported.mkdir()
    (unsupported / "meta.json").write_text('{"kind": "hologram", "case": "weird"}')
    bad = subprocess.run([sys.executable, "-m", "engine.parity", str(unsupported)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "not supported yet" in bad.stdout


@pytest.mark.parametrize("device", ["cudaX", "quantum"])
def test_a_device_that_cannot_be_used_is_one_error_before_any_case(capsys, device):
    """--device cudaX filled the table with the same torch error once per case."""
    from engine.tools.parity import main

    assert main([str(fixture_case("rope_index")), "--device", device]) == 2
    out = capsys.readouterr()
    assert f"invalid --device '{device}'" in out.err and out.out == ""


def test_mm_case_processes_media_with_the_recorded_processor_settings(tmp_path):
    """An mm case records the reference processor's settings (meta.json processor_settings); a held-out case
    with other bounds or patch sizes must be processed with them, not with the release's shipped file.
    Here min_pixels is raised in the record only: our pixel values then change and must be reported."""
    case = tmp_path / "mm"
    shutil.copytree(fixture_case("mm"), case)
    meta_path = case / "meta.json"
    meta_path.chmod(0o644)
    meta = json.loads(meta_path.read_text())
    meta["processor_settings"]["min_pixels"] = 4 * meta["processor_settings"]["min_pixels"]
    meta_path.write_text(json.dumps(meta))
    rows = {r.tensor: r for r in run_case(case)}
    assert not rows["processor.image_grid_thw"].ok and not rows["processor.input_ids"].ok


def _mm_case_with_video(tmp_path, frame_by_frame: bool):
    """The mm case with the frontend_video clip added to its message: the frames as raw inputs, the
    clip's message options, and the reference processor's own video outputs of that clip (frontend_video's
    pixel_values_videos and video_grid_thw) where an mm case keeps processor outputs (inputs.safetensors)."""
    from safetensors.torch import load_file, save_file

    case = tmp_path / "mm"
    shutil.copytree(fixture_case("mm"), case)
    for f in case.iterdir():
        f.chmod(0o644)
    clip = fixture_case("frontend_video")
    clip_in, clip_out = load_file(str(clip / "inputs.safetensors")), load_file(str(clip / "outputs.safetensors"))
    frames = [clip_in[f"frame{j}"] for j in range(len(clip_in))]
    inputs = load_file(str(case / "inputs.safetensors"))
    if frame_by_frame:
        inputs.update({f"raw.video0.frame{j}": f for j, f in enumerate(frames)})
    else:
        inputs["raw.video0"] = torch.stack(frames)
    inputs["pixel_values_videos"] = clip_out["pixel_values_videos"]
    inputs["video_grid_thw"] = clip_out["video_grid_thw"]
    save_file(inputs, str(case / "inputs.safetensors"))
    meta = json.loads((case / "meta.json").read_text())
    meta["prompt_text_before_expansion"] = meta["prompt_text_before_expansion"].replace("<AUDIO>Describe",
                                                                                        "<AUDIO><VIDEO>Describe")
    meta["message_video_options"] = json.loads((clip / "config.json").read_text())["message_video_options"]
    (case / "meta.json").write_text(json.dumps(meta))
    return case


@pytest.mark.parametrize("frame_by_frame", [False, True])
def test_mm_case_runs_its_video_through_the_engine(tmp_path, frame_by_frame):
    """A held-out mm case may carry a video (the reference processor's videos path): the harness gave the
    processor no videos, so its <VIDEO> placeholder could not be filled. The clip now goes through our
    processor and encoders; its processor outputs match the reference's (the prompt, and with it the
    stored LLM outputs, changed, so only the video rows are expected to agree)."""
    rows = {r.tensor: r for r in run_case(_mm_case_with_video(tmp_path, frame_by_frame))}
    for name in ("processor.pixel_values_videos", "processor.video_grid_thw"):
        assert rows[name].ok, format_table([rows[name]])
    assert not rows["processor.input_ids"].ok  # the stored ids are those of the prompt without the video


def test_mm_case_reads_twelve_video_frames_in_the_order_the_reference_read_them(tmp_path):
    """The reference read an mm video's frames back from files (sorted(os.listdir)); named frame{j}.png,
    12 frames are read frame0, frame1, frame10, frame11, frame2, ... The harness fed them in time order,
    so every patch after frame 1 disagreed; the order whose patches the reference's pixel_values_videos
    holds is kept. (The reference rows are the frontend_video processing of the frames in that order.)"""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from engine.media.image import ImageProcessorConfig
    from engine.media.video import VideoOptions, prepare_video

    case = _mm_case_with_video(tmp_path, frame_by_frame=True)
    inputs = load_file(str(case / "inputs.safetensors"))
    rng = np.random.default_rng(5)
    for j in range(6, 12):
        inputs[f"raw.video0.frame{j}"] = torch.from_numpy(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    frames = [inputs[f"raw.video0.frame{j}"].numpy() for j in range(12)]
    read = [frames[j] for j in sorted(range(12), key=lambda j: f"frame{j}.png")]
    options = json.loads((case / "meta.json").read_text())["message_video_options"]
    video = prepare_video(read, ImageProcessorConfig(), options=VideoOptions.from_message(options))
    inputs["pixel_values_videos"], inputs["video_grid_thw"] = video.pixel_values, video.grid_thw
    save_file(inputs, str(case / "inputs.safetensors"))
    rows = {r.tensor: r for r in run_case(case)}
    for name in ("processor.pixel_values_videos", "processor.video_grid_thw"):
        assert rows[name].ok, format_table([rows[name]])


def test_mm_case_names_what_it_cannot_place_and_checks_stage_a(tmp_path):
    """Raw inputs the harness has no use for were skipped silently, and the reference's Stage A image
    (raw.image0_resized_by_fetch_image) was never compared: both are rows now."""
    from safetensors.torch import load_file, save_file

    case = tmp_path / "mm"
    shutil.copytree(fixture_case("mm"), case)
    (case / "inputs.safetensors").chmod(0o644)
    inputs = load_file(str(case / "inputs.safetensors"))
    inputs["raw.depth0"] = torch.zeros(4, 4)
    inputs["raw.image0_resized_by_fetch_image"][0, 0, 0] ^= 1
    save_file(inputs, str(case / "inputs.safetensors"))
    rows = {r.tensor: r for r in run_case(case)}
    assert not rows["raw.depth0"].ok and "cannot place" in rows["raw.depth0"].note
    assert not rows["raw.image0_resized_by_fetch_image"].ok
    assert rows["raw.image0_resized_by_fetch_image"].max_abs_diff == 1
    assert rows["processor.pixel_values"].ok


def test_case_media_keeps_numbered_order_and_names_the_unplaceable():
    from engine.tools.parity import case_media

    frame = torch.zeros(2, 2, 3, dtype=torch.uint8)
    inputs = {"raw.image10": frame + 10, "raw.image2": frame + 2, "raw.audio11": torch.ones(3),
              "raw.audio9": torch.zeros(3), "raw.video0_frame10": frame + 10, "raw.video0_frame9": frame + 9,
              "raw.video1": torch.zeros(4, 4), "raw.mystery": frame, "pixel_values": torch.zeros(1)}
    media = case_media(inputs)
    assert [int(i[0, 0, 0]) for i in media.images] == [2, 10]
    assert [float(a[0]) for a in media.audios] == [0.0, 1.0]
    assert [[int(f[0, 0, 0]) for f in v] for v in media.videos] == [[9, 10]]
    assert media.unknown == ["raw.mystery", "raw.video1 (shape [4, 4], expected [T, H, W, 3])"]


def _prompts_set(tmp_path, audio_case: str = "frontend_audio", image_case: str = "frontend_image"):
    """The prompts case with its media cases under other folder names (the image case holding only the
    image the prompts use); returns (prompts folder, its meta.json, the audio folder)."""
    src = fixture_case("prompts")
    case = tmp_path / "prompts"
    shutil.copytree(src, case)
    audio = tmp_path / audio_case
    shutil.copytree(fixture_case("frontend_audio"), audio)
    meta = json.loads((case / "meta.json").read_text())
    images = load_file(str(fixture_case("frontend_image") / "inputs.safetensors"))
    (tmp_path / image_case).mkdir()
    save_file({meta["image_used"]: images[meta["image_used"]]}, str(tmp_path / image_case / "inputs.safetensors"))
    meta["audio_used"] = meta["audio_used"].replace("frontend_audio", audio_case)
    (case / "meta.json").write_text(json.dumps(meta))
    return case, meta, audio


def test_prompts_case_reads_its_media_from_the_cases_it_names(tmp_path):
    """A held-out set whose media cases are named 'frontend_audio_s7' / 'image_s7' (meta audio_used
    '... frontend_audio_s7 wave_main', image_used a bare input name) crashed with FileNotFoundError."""
    case, _, _ = _prompts_set(tmp_path, "frontend_audio_s7", "image_s7")
    rows = run_case(case)
    assert rows and all(r.ok for r in rows), format_table([r for r in rows if not r.ok])


def test_prompts_case_uses_the_recorded_sampling_rate(tmp_path):
    """The audio case records its rate (config.json sampling_rate): the same clip at 8 kHz is resampled to
    the front end's 16 kHz, so the prompts keep the reference's audio token counts (read as 16 kHz it has
    half the mel frames)."""
    case, _, audio = _prompts_set(tmp_path)
    config = json.loads((audio / "config.json").read_text())
    inputs = load_file(str(audio / "inputs.safetensors"))
    step = 2
    save_file({k: v[::step].contiguous() for k, v in inputs.items()}, str(audio / "inputs.safetensors"))
    config["sampling_rate"] //= step
    (audio / "config.json").write_text(json.dumps(config))
    rows = run_case(case)
    assert rows and all(r.ok for r in rows), format_table([r for r in rows if not r.ok])


def test_prompts_case_places_any_number_of_media(tmp_path):
    """A sub-case with nine <AUDIO> placeholders (the harness used to supply at most eight): expected
    string and ids are the reference's plain_asr ones with its audio block repeated nine times."""
    case, meta, _ = _prompts_set(tmp_path)
    n = 9
    plain = next(c for c in meta["cases"] if c["name"] == "plain_asr")
    outputs = load_file(str(case / "outputs.safetensors"))
    ids = outputs["plain_asr.input_ids"][0]
    start, length = outputs["plain_asr.audio_placeholder_loc_lens"][0, 0].tolist()
    block = slice(start - 1, start + length + 1)  # <audio> <audioPatch>*length </audio>
    text = plain["expanded_text"]
    a, b = text.index("<audio>"), text.index("</audio>") + len("</audio>")
    many = {**plain, "name": "nine_audios", "prompt_text": plain["prompt_text"].replace("<AUDIO>", "<AUDIO>" * n),
            "expanded_text": text[:a] + text[a:b] * n + text[b:]}
    meta["cases"] = [many]
    (case / "meta.json").write_text(json.dumps(meta))
    save_file({"nine_audios.input_ids": torch.cat([ids[:block.start], ids[block].repeat(n), ids[block.stop:]])[None]},
              str(case / "outputs.safetensors"))
    rows = run_case(case)
    assert rows and all(r.ok for r in rows), format_table([r for r in rows if not r.ok])


def test_prompts_case_names_media_it_cannot_place(tmp_path):
    """A medium no sibling case holds, or audio with no recorded rate, is a 'not ok' row naming it; the
    other sub-cases still run."""
    case, meta, audio = _prompts_set(tmp_path)
    meta["image_used"] = "img_nowhere"
    (case / "meta.json").write_text(json.dumps(meta))
    rows = run_case(case)
    bad = [r for r in rows if not r.ok]
    assert any(r.tensor == "image_chat.media" and "img_nowhere" in r.note for r in bad)
    assert any(r.tensor == "plain_asr.input_ids" and r.ok for r in rows)
    config = json.loads((audio / "config.json").read_text())
    del config["sampling_rate"]
    (audio / "config.json").write_text(json.dumps(config))
    rows = run_case(case)
    assert any(r.tensor == "plain_asr.media" and not r.ok and "sampling rate" in r.note for r in rows)


def test_rope_index_sub_cases_omitting_the_flag_or_merge_size_take_the_reference_s_values(tmp_path):
    """A rope_index sub-case that does not record use_interleaved_frame_timestamp (a Preview-tree function has
    no such parameter; the 2.0 function defaults it to True) or spatial_merge_size (the model hard-sets 2,
    spec §1.4 item 7) crashed the harness with KeyError; both take the reference's values."""
    dst = tmp_path / "rope_index"
    shutil.copytree(fixture_case("rope_index"), dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    meta = json.loads((dst / "meta.json").read_text())
    for sub in meta["cases"]:
        if sub["name"] in ("text_only", "one_image"):
            del sub["use_interleaved_frame_timestamp"]
            del sub["config"]["spatial_merge_size"]
    (dst / "meta.json").write_text(json.dumps(meta))
    rows = run_case(dst)
    bad = [r for r in rows if not r.ok]
    assert rows and not bad, format_table(bad)
    assert {"one_image.position_ids", "text_only.rope_deltas"} <= {r.tensor for r in rows}


def test_a_preview_prompts_case_is_built_with_the_preview_processor(tmp_path):
    """A prompts case made by the Preview tree (meta.json environment.upstream) was built with 2.0's processor
    settings (factor 32, interleaved video timestamps); it gets the Preview's: factor 28 (patch 14, Stage A
    bounds 4..1024·28²), 1-D `<video><framePatch>…</video>` layout (spec §4.1, §6.2)."""
    from engine.tools.parity import _processor_for

    dst = tmp_path / "prompts"
    shutil.copytree(fixture_case("prompts"), dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    _, v2 = _processor_for(dst)
    assert v2.settings.image.factor == 32 and v2.settings.interleaved_video
    meta = json.loads((dst / "meta.json").read_text())
    meta["environment"]["upstream"] = "inclusionAI/Ming (Ming-flash-omni-Preview release tree, commit f54289d6)"
    (dst / "meta.json").write_text(json.dumps(meta))
    _, pv = _processor_for(dst)
    assert (pv.settings.image.release, pv.settings.image.factor, pv.settings.image.patch_size) == ("preview", 28, 14)
    assert pv.settings.image.min_pixels == 78400 and not pv.settings.interleaved_video


@pytest.mark.parametrize("record", ["meaning", "key"])
def test_mm_case_resamples_a_clip_recorded_at_another_rate(tmp_path, record):
    """An mm case whose second clip is recorded at 32 kHz (its tensor record says so: a sample_rate key
    or '32 kHz' in its meaning): the reference processor resamples it to 16 kHz (spec §5.1), so its mel
    frames, audio spans and prompt ids stay those of the 16 kHz clip. The harness fed every raw clip as
    16 kHz audio: twice the frames and a longer prompt."""
    from engine.media.audio import resample

    case = tmp_path / "mm"
    shutil.copytree(fixture_case("mm"), case)
    for f in case.iterdir():
        f.chmod(0o644)
    inputs = load_file(str(case / "inputs.safetensors"))
    inputs["raw.audio1"] = resample(inputs["raw.audio1"], 16000, 32000).contiguous()
    save_file(inputs, str(case / "inputs.safetensors"))
    meta = json.loads((case / "meta.json").read_text())
    spec = next(t for t in meta["tensors"] if t["name"] == "raw.audio1")
    spec["shape"] = list(inputs["raw.audio1"].shape)
    if record == "meaning":
        spec["meaning"] = spec["meaning"].replace("16 kHz", "32 kHz")
    else:
        spec["sample_rate"] = 32000
    (case / "meta.json").write_text(json.dumps(meta))
    rows = {r.tensor: r for r in run_case(case)}
    for name in ("processor.audio_feats_lengths", "processor.audio_placeholder_loc_lens", "processor.input_ids",
                 "audio_embeds_lengths"):
        assert rows[name].ok, format_table([rows[name]])


def test_prompts_case_checks_its_audio_expansion_count_table(tmp_path):
    """meta.json's expansion_counts lists <audioPatch> counts by mel frames (spec §5.4); the table was never
    compared. Each audio entry is a row now: a wrong count (250 frames -> 64) fails, 30 s (3000 frames ->
    750) and 300 s (30000 -> 7500) pass."""
    case, meta, _ = _prompts_set(tmp_path)
    table = meta["expansion_counts"]
    entry = next(e for e in table if e.get("mel_frames") == 250)
    entry["n_audioPatch"] = 64
    table += [{"mel_frames": 3000, "n_audioPatch": 750}, {"mel_frames": 30000, "n_audioPatch": 7500}]
    (case / "meta.json").write_text(json.dumps(meta))
    rows = {r.tensor: r for r in run_case(case) if r.tensor.startswith("expansion_counts") and "mel_frames" in r.tensor}
    audio_entries = [e for e in table if "mel_frames" in e]
    assert len(rows) == len(audio_entries)
    bad = [name for name, r in rows.items() if not r.ok]
    assert bad == [f"expansion_counts[{table.index(entry)}].n_audioPatch (mel_frames 250)"]


def test_prompts_case_checks_its_image_expansion_count_table(tmp_path):
    """expansion_counts also lists <imagePatch> counts and expanded strings by image grid (spec §6.2:
    `<image>` + t*h*w/4 `<imagePatch>` + `</image>` + newline); those entries were skipped, so a held-out
    table at other sizes was never compared. A wrong count or string fails, an odd-width grid passes."""
    case, meta, _ = _prompts_set(tmp_path)
    table = meta["expansion_counts"]
    images = [e for e in table if "image_grid_thw" in e]
    images[0]["n_imagePatch"] += 1
    images[1]["expanded"] = images[1]["expanded"].replace("</image>\n", "</image>")
    table.append({"image_grid_thw": [1, 6, 22], "n_imagePatch": 33,
                  "expanded": "<image>" + "<imagePatch>" * 33 + "</image>\n"})
    (case / "meta.json").write_text(json.dumps(meta))
    rows = {r.tensor: r for r in run_case(case) if r.tensor.startswith("expansion_counts") and "grid" in r.tensor}
    counted = [e for e in table if "image_grid_thw" in e]
    assert sum(".n_imagePatch" in name for name in rows) == len(counted)
    bad = sorted(name for name, r in rows.items() if not r.ok)
    assert bad == sorted([f"expansion_counts[{table.index(images[0])}].n_imagePatch (grid {images[0]['image_grid_thw']})",
                          f"expansion_counts[{table.index(images[1])}].expanded (grid {images[1]['image_grid_thw']})"])
    assert rows[f"expansion_counts[{len(table) - 1}].expanded (grid [1, 6, 22])"].ok


def test_prompts_case_checks_video_and_audio_expansions_and_names_entries_it_cannot_compare(tmp_path):
    """expansion_counts entries other than image and audio counts were skipped without a row: a video entry
    (<framePatch> count, and its interleaved 2.0 string with `<{ts:.1f} seconds>` per temporal patch) was
    never compared, nor an audio entry's expanded string (no trailing newline, spec §6.2), and an entry of
    an unknown kind vanished. Expected strings are written from the spec here."""
    case, meta, _ = _prompts_set(tmp_path)
    table = meta["expansion_counts"]
    frames = "<framePatch>" * 6
    video = {"video_grid_thw": [2, 4, 6], "n_framePatch": 12, "timestamps": [0.25, 1.25],
             "expanded": f"<video><0.2 seconds><image>{frames}</image><1.2 seconds><image>{frames}</image></video>"}
    audio_ok = {"mel_frames": 250, "n_audioPatch": 63, "expanded": "<audio>" + "<audioPatch>" * 63 + "</audio>"}
    audio_bad = {"mel_frames": 83, "n_audioPatch": 21, "expanded": "<audio>" + "<audioPatch>" * 21 + "</audio>\n"}
    table += [video, audio_ok, audio_bad, {"n_gen_imagePatch": 4}]
    (case / "meta.json").write_text(json.dumps(meta))
    rows = {r.tensor: r for r in run_case(case) if r.tensor.startswith("expansion_counts")}
    at = {id(e): i for i, e in enumerate(table)}
    assert rows[f"expansion_counts[{at[id(video)]}].n_framePatch (video grid [[2, 4, 6]])"].ok
    assert rows[f"expansion_counts[{at[id(video)]}].expanded (video grid [[2, 4, 6]])"].ok
    assert rows[f"expansion_counts[{at[id(audio_ok)]}].expanded (mel_frames 250)"].ok
    assert not rows[f"expansion_counts[{at[id(audio_bad)]}].expanded (mel_frames 83)"].ok
    unknown = rows[f"expansion_counts[{len(table) - 1}]"]
    assert not unknown.ok and "n_gen_imagePatch" in unknown.note


def _drop_outputs(src, dst, keep) -> None:
    """A copy of case `src` at `dst` whose outputs.safetensors holds only the names `keep` accepts."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("outputs.safetensors"))
    outputs = load_file(str(src / "outputs.safetensors"))
    save_file({k: v for k, v in outputs.items() if keep(k)} or {"unrelated": torch.zeros(1)}, str(dst / "outputs.safetensors"))


@pytest.mark.parametrize("kind, dropped", [("rope_index", "one_image.rope_deltas"),
                                           ("frontend_audio", "two_clips.audio_feats")])
def test_a_case_leaving_out_an_output_reports_it_not_recorded(tmp_path, kind, dropped):
    """An output the harness compares but the case left out failed the whole case with a KeyError; it is a
    'not recorded' row, the rest compared and ok. A case holding none of the outputs is not ok, naming that
    nothing was comparable."""
    from engine.tools.parity import is_not_recorded
    case = tmp_path / kind
    _drop_outputs(fixture_case(kind), case, lambda name: name != dropped)
    rows = run_case(case)
    absent = [r for r in rows if is_not_recorded(r)]
    assert [r.tensor for r in absent] == [dropped] and all(r.ok for r in rows), format_table(rows)
    nothing = tmp_path / "nothing"
    _drop_outputs(fixture_case(kind), nothing, lambda name: False)
    failed = [r for r in run_case(nothing) if not r.ok]
    assert any("nothing comparable" in r.note for r in failed), format_table(failed)


def test_the_summary_counts_outputs_not_recorded_apart(tmp_path, capsys):
    from engine.tools.parity import main
    case = tmp_path / "rope_index"
    _drop_outputs(fixture_case("rope_index"), case, lambda name: name != "one_image.rope_deltas")
    assert main([str(case)]) == 0
    out = capsys.readouterr().out
    assert "23 ok, 0 not ok, 1 case(s), 1 output(s) not recorded" in out
    row = next(line for line in out.splitlines() if "one_image.rope_deltas" in line)
    assert row.split()[-3:] == ["-", "(not", "recorded)"]  # neither ok nor FAIL


def test_a_sampled_case_is_not_decoded_greedily_in_silence(tmp_path):
    """A case whose generate sampled (do_sample=true in a generation record or the quoted call) was decoded
    greedily and passed or failed by chance: its decode outputs are 'not comparable: sampled' (not ok, named), the
    prefill still compared. A temperature / top_p without do_sample is HF's greedy default (generate ignores them)."""
    from engine.tools.parity import case_sampling
    assert case_sampling({}) is None and case_sampling({"generation": {"do_sample": "false", "temperature": 0.7}}) is None
    assert case_sampling({"generation": {"temperature": 1.0, "top_p": 1.0}}) is None
    assert case_sampling({"generation_config": {"do_sample": True}}) == "do_sample=true"
    assert case_sampling({"hf_generate_crosscheck": {"note": "m.generate(**x, do_sample=True, top_p=0.8)"}}) == "do_sample=true"
    assert case_sampling({"generate_kwargs": {"temperature": 0.7, "top_p": 0.9}}) is None  # greedy in HF's generate
    case = shutil.copytree(fixture_case("llm_b1"), tmp_path / "llm_b1")
    meta = json.loads((case / "meta.json").read_text())
    (case / "meta.json").write_text(json.dumps({**meta, "generation": {**meta.get("generation", {}), "do_sample": True}}))
    rows = {r.tensor: r for r in run_case(case)}
    assert rows["logits"].ok and rows["router.layer1.topk_ids"].ok
    for name in ("generated_ids", "decode_logits"):
        assert not rows[name].ok and "sampled (do_sample=true)" in rows[name].note


def test_a_prompts_sub_case_without_its_expanded_text_compares_its_ids(tmp_path):
    """A prompts sub-case recording its input_ids but no expanded_text failed the whole case (KeyError:
    'expanded_text'); the string is 'not recorded', the ids still compared."""
    from engine.tools.parity import is_not_recorded
    case = shutil.copytree(fixture_case("prompts"), tmp_path / "prompts")
    meta = json.loads((case / "meta.json").read_text())
    sub = next(c for c in meta["cases"] if c["name"] == "text_cot_system")
    meta["cases"], meta["expansion_counts"] = [{k: v for k, v in sub.items() if k != "expanded_text"}], []
    (case / "meta.json").write_text(json.dumps(meta))
    rows = {r.tensor: r for r in run_case(case) if r.tensor.startswith("text_cot_system.")}
    assert rows["text_cot_system.input_ids"].ok and not is_not_recorded(rows["text_cot_system.input_ids"])
    assert is_not_recorded(rows["text_cot_system.expanded_text"])


def _drop_inputs(src, dst, dropped: set[str]):
    """A copy of case `src` at `dst` whose inputs.safetensors lacks the names `dropped` (meta.json still lists them)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("inputs.safetensors"))
    inputs = load_file(str(src / "inputs.safetensors"))
    save_file({k: v for k, v in inputs.items() if k not in dropped}, str(dst / "inputs.safetensors"))
    return dst


def test_rope_index_sub_cases_without_an_input_fail_naming_it(tmp_path):
    """A case leaving out an input failed as a whole (KeyError / TypeError): the sub-cases that need it (their
    ids, an attention mask they list as present, the grid of the image patches their ids hold) fail, naming
    the input on each row; the others are still compared."""
    left_out = {"text_only": "input_ids", "text_only_leftpad_b2": "attention_mask", "one_image": "image_grid_thw"}
    case = _drop_inputs(fixture_case("rope_index"), tmp_path / "rope_index", {f"{s}.{i}" for s, i in left_out.items()})
    rows = run_case(case)
    failed = {r.tensor: r.note for r in rows if not r.ok}
    assert failed == {f"{sub}.{out}": f"input not recorded: {sub}.{name}"
                      for sub, name in left_out.items() for out in ("position_ids", "rope_deltas")}, format_table(rows)
    assert sum(r.ok for r in rows) == 18


@pytest.mark.parametrize("kind, dropped, uses", [
    ("frontend_audio", "wave_second", ("two_clips.",)),
    ("frontend_image", "img_123x77", ("img_123x77.", "two_images.")),
    ("frontend_video", "frame3", ("",)),
])
def test_front_end_rows_needing_a_left_out_input_fail_naming_it(tmp_path, kind, dropped, uses):
    case = _drop_inputs(fixture_case(kind), tmp_path / kind, {dropped})
    rows = run_case(case)
    failed = [r for r in rows if not r.ok]
    assert {r.tensor for r in failed} == {r.tensor for r in rows if r.tensor.startswith(uses)}, format_table(rows)
    assert failed and all(f"input not recorded: {dropped}" in r.note for r in failed), format_table(failed)


@pytest.mark.parametrize("dropped", ["query_embeds_image", "query_embeds_audio_lengths"])
def test_an_llm_case_without_an_input_its_ids_need_is_one_row_naming_it(tmp_path, dropped):
    """llm_b2's ids hold image patches and audio spans: without their embeddings (or part of the audio set)
    nothing can be computed; one failed row names the input (before the model is loaded)."""
    case = _drop_inputs(fixture_case("llm_b2"), tmp_path / "llm_b2", {dropped})
    rows = run_case(case)
    assert len(rows) == 1 and not rows[0].ok, format_table(rows)
    assert rows[0].note == f"input not recorded: {dropped} (nothing computable without it)"


def test_an_audio_vae_case_without_its_latents_is_one_row_naming_them(tmp_path):
    """The decoder and the prompt encoder's padding span both come from the latents: nothing is computable, one
    failed row names them (a KeyError ended the case)."""
    case = _drop_inputs(fixture_case("audio_vae"), tmp_path / "audio_vae", {"latents"})
    rows = run_case(case)
    assert len(rows) == 1 and not rows[0].ok, format_table(rows)
    assert rows[0].note == "input not recorded: latents (nothing computable without it)"


def test_an_mm_case_without_a_medium_its_prompt_places_is_one_row_naming_it(tmp_path):
    """mm's prompt places an image: without raw.image0 its prompt cannot be built (a ValueError ended the case);
    one failed row names the input, before the model is loaded."""
    case = _drop_inputs(fixture_case("mm"), tmp_path / "mm", {"raw.image0"})
    rows = run_case(case)
    assert len(rows) == 1 and not rows[0].ok, format_table(rows)
    assert rows[0].note.startswith("input not recorded: raw.image<i> (the prompt places 1 image(s), the case "
                                   "records 0)")
