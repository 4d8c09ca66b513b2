"""Parity of the image, audio and video front ends with the reference fixture cases."""

from __future__ import annotations

import json

import pytest

from engine.tools.frontend_parity import FRONTEND_CASES, format_rows, run_frontend_case
from tests.paths import fixture_case


@pytest.mark.parametrize("case", FRONTEND_CASES)
def test_frontend_case_matches_reference(case):
    case_dir = fixture_case(case)
    if not case_dir.is_dir():
        pytest.skip(f"{case_dir} missing")
    rows = run_frontend_case(case_dir)
    meta = json.loads((case_dir / "meta.json").read_text())
    stored = {t["name"] for t in meta["tensors"] if t["file"] == "outputs.safetensors"}
    compared = {r.tensor for r in rows}
    assert stored <= compared, f"not compared: {sorted(stored - compared)}"
    failed = [r for r in rows if not r.ok]
    assert not failed, "\n" + format_rows(failed)


def test_parity_reports_a_wrong_output_as_failure(tmp_path):
    """The harness must fail rows when the reference data disagrees with us."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    src = fixture_case("frontend_image")
    dst = tmp_path / "frontend_image"
    shutil.copytree(src, dst)
    outputs = load_file(str(src / "outputs.safetensors"))
    outputs["img_123x77.direct.pixel_values"] = outputs["img_123x77.direct.pixel_values"] + np.float32(1e-3)
    outputs["img_123x77.direct.image_grid_thw"] = outputs["img_123x77.direct.image_grid_thw"] * 2
    (dst / "outputs.safetensors").chmod(0o644)
    save_file(outputs, str(dst / "outputs.safetensors"))
    rows = {r.tensor: r for r in run_frontend_case(dst)}
    assert not rows["img_123x77.direct.pixel_values"].ok
    assert rows["img_123x77.direct.pixel_values"].max_abs_diff == pytest.approx(1e-3, rel=1e-2)
    assert not rows["img_123x77.direct.image_grid_thw"].ok
    assert rows["img_640x480.direct.pixel_values"].ok


def test_image_case_runs_the_processor_of_the_release_that_made_it(tmp_path):
    """Every ming_ref case was produced by the 2.0 processor (meta.json environment.upstream). A 2.0 case
    with 14-pixel patches was taken for a Preview one (the release was guessed from the patch size): the
    Preview smart resize refused the 20x30 image that the 2.0 code upscales (spec §4.1)."""
    import shutil

    from engine.tools.frontend_parity import reference_release

    src = fixture_case("frontend_image")
    assert reference_release(json.loads((src / "meta.json").read_text())) == "2.0"
    dst = tmp_path / "frontend_image"
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").chmod(0o644)
    (dst / "config.json").write_text(json.dumps({**config, "patch_size": 14}))
    errors = [r for r in run_frontend_case(dst) if "Error" in r.note]
    assert not errors, "\n" + format_rows(errors)


def _upstream_smart_resize(h: int, w: int, lo: int, hi: int, stage_a: bool, factor: int = 32) -> tuple[int, int]:
    """Upstream's two smart resizes (spec §4.1): bailingmm_utils.fetch_image's clamps the ROUNDED sides
    to the factor, image_processing_bailingmm2's clamps the FLOORED ones."""
    import math

    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if stage_a:
        hb, wb = max(factor, hb), max(factor, wb)
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
        if not stage_a:
            hb, wb = max(factor, hb), max(factor, wb)
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


@pytest.mark.parametrize("tokens_of", ["chat", "direct"])
def test_image_case_reads_chat_calls_bounds_and_token_counts_of_any_call(tmp_path, tokens_of):
    """A thin 1000x10 image: the chat path's Stage A clamps its rounded height to 32 (992 wide, 31 tokens)
    where the processor alone gives 32x640 (20 tokens). The harness counted a bare llm_tokens from the
    direct grid only (and from the first image only), ran a multi-image '.chat.' call directly and refused
    a chat call with message bounds (chat_maxpix<N>). Expected grids re-derive upstream's rules here."""
    import numpy as np
    from safetensors.numpy import save_file

    case = tmp_path / "frontend_image"
    case.mkdir()
    config = json.loads((fixture_case("frontend_image") / "config.json").read_text())
    (case / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(3)
    inputs = {"img_1000x10": rng.integers(0, 256, (10, 1000, 3), dtype=np.uint8),
              "img_123x77": rng.integers(0, 256, (77, 123, 3), dtype=np.uint8)}
    save_file(inputs, str(case / "inputs.safetensors"))
    lo, hi = config["min_pixels"], config["max_pixels"]

    def grid(name, chat, fetch_bounds=(4 * 32 * 32, 16384 * 32 * 32)):
        h, w = inputs[name].shape[:2]
        if chat:
            h, w = _upstream_smart_resize(h, w, *fetch_bounds, stage_a=True)
        h, w = _upstream_smart_resize(h, w, lo, hi, stage_a=False)
        return [1, h // 16, w // 16]

    direct, chat = grid("img_1000x10", False), grid("img_1000x10", True)
    assert direct[1] * direct[2] // 4 == 20 and chat[1] * chat[2] // 4 == 31
    counted = chat if tokens_of == "chat" else direct
    outputs = {
        "img_1000x10.direct.image_grid_thw": np.array([direct], dtype=np.int64),
        "img_1000x10.chat.image_grid_thw": np.array([chat], dtype=np.int64),
        "img_1000x10.llm_tokens": np.array([counted[1] * counted[2] // 4], dtype=np.int64),
        "two_images.chat.image_grid_thw": np.array([grid("img_123x77", True), chat], dtype=np.int64),
        "two_images.llm_tokens": np.array([g[1] * g[2] // 4 for g in (grid("img_123x77", False), direct)],
                                          dtype=np.int64),
        "two_images.image_grid_thw": np.array([grid("img_123x77", False), direct], dtype=np.int64),
        "img_123x77.chat_maxpix4096.image_grid_thw": np.array([grid("img_123x77", True, (4096, 4096))],
                                                              dtype=np.int64),
    }
    assert outputs["img_123x77.chat_maxpix4096.image_grid_thw"].tolist() == [[1, 4, 6]]  # 32x64, then up to 64x96
    save_file(outputs, str(case / "outputs.safetensors"))
    meaning = {"two_images.chat.image_grid_thw": "one chat-path call with [img_123x77, img_1000x10]",
               "two_images.image_grid_thw": "one processor call with [img_123x77, img_1000x10]"}
    tensors = [{"file": "outputs.safetensors", "name": n, "shape": list(v.shape), "dtype": "int64",
                "meaning": meaning.get(n, "")} for n, v in outputs.items()]
    (case / "meta.json").write_text(json.dumps({
        "case": "frontend_image", "kind": "frontend", "tensors": tensors,
        "environment": {"upstream": "inclusionAI/Ming (Ming-flash-omni 2.0 release tree)"}}))
    rows = {r.tensor: r for r in run_frontend_case(case)}
    assert set(rows) == set(outputs)
    failed = [r for r in rows.values() if not r.ok]
    assert not failed, "\n" + format_rows(failed)


def _video_case_copy(tmp_path, options: dict, n_frames: int, read_order=None, **config_keys):
    """frontend_video with other message options and frame count; its outputs are rebuilt from the
    spec's rules (§4.2, §6.2), not by our code: every frame kept (the last one repeated when odd),
    frame i at i / max_video_fps, patches labelled with their pair's mean as .1f, grid split to t = 1.
    pixel_values_videos is dropped (no spec-only way to rebuild it). More than 6 frames are synthetic;
    ``read_order``: the input indices in the order the reference read their files (default: time order)."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    src = fixture_case("frontend_video")
    dst = tmp_path / "frontend_video"
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    inputs = load_file(str(src / "inputs.safetensors"))
    rng = np.random.default_rng(7)
    frames = [inputs[f"frame{i}"] if f"frame{i}" in inputs else rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
              for i in range(n_frames)]
    save_file({f"frame{i}": f for i, f in enumerate(frames)}, str(dst / "inputs.safetensors"))
    if read_order is not None:
        frames = [frames[i] for i in read_order]
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **config_keys, "message_video_options": options}))

    fps = options.get("max_video_fps", 2.0)
    stamps = [i / fps for i in range(n_frames)]
    if n_frames % 2:
        frames, stamps = frames + frames[-1:], stamps + stamps[-1:]
    h, w = frames[0].shape[:2]  # 64x96 at min_pixels 4096: smart resize keeps it
    groups = len(frames) // 2
    patch = config_keys.get("patch_size", 16)
    tokens = (h // patch) * (w // patch) // 4
    video_text = "<video>" + "".join(f"<{(stamps[2 * g] + stamps[2 * g + 1]) / 2:.1f} seconds><image>"
                                     + "<framePatch>" * tokens + "</image>" for g in range(groups)) + "</video>"
    meta = json.loads((src / "meta.json").read_text())
    meta["expanded_prompt"] = meta["prompt_text_before_expansion"].replace("<VIDEO>", video_text)
    outputs = {
        "fetch_video.frames": np.stack(frames).transpose(0, 3, 1, 2).copy(),
        "fetch_video.resmp_ts": np.array(stamps, dtype=np.float64),
        "video_grid_thw": np.array([[1, h // patch, w // patch]] * groups, dtype=np.int64),
    }
    save_file(outputs, str(dst / "outputs.safetensors"))
    meta["tensors"] = [t for t in meta["tensors"] if t["file"] == "outputs.safetensors" and t["name"] in outputs]
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("fps, n_frames", [(1.0, 5), (4.0, 5), (1.0, 4)])
def test_video_case_honours_the_recorded_max_video_fps_and_frame_count(tmp_path, fps, n_frames):
    """A held-out frontend_video case with another max_video_fps or an odd frame count: only the resize
    keys and max_frames were read, so frames were placed 0.5 s apart whatever the case said."""
    case = _video_case_copy(tmp_path, {"min_pixels": 4096, "max_video_fps": fps}, n_frames)
    rows = {r.tensor: r for r in run_frontend_case(case)}
    assert set(rows) == {"expanded_prompt (text)", "fetch_video.frames", "fetch_video.resmp_ts", "video_grid_thw"}
    failed = [r for r in rows.values() if not r.ok]
    assert not failed, "\n" + format_rows(failed)


@pytest.mark.parametrize("names, read_order", [
    (None, sorted(range(12), key=lambda i: f"frame{i}.png")),     # written as frame{i}.png: frame10, frame11, frame2
    (None, list(range(12))),                                      # written zero-padded: time order
    ("f_{:02d}.png", list(range(12))),                            # the file names recorded in the meaning
])
def test_video_case_with_eleven_frames_or_more_reads_them_in_the_reference_order(tmp_path, names, read_order):
    """From 11 frames on, the order the reference read its frame files in (sorted(os.listdir)) depends on
    how it named them, which the case may not record: the harness wrote frame{i}.png, so a case whose
    frames were read in time order failed on every frame. A recorded name decides; else the reference's
    own stored frames do."""
    case = _video_case_copy(tmp_path, {"min_pixels": 4096}, 12, read_order=read_order)
    if names:
        meta = json.loads((case / "meta.json").read_text())
        meta["tensors"] += [{"file": "inputs.safetensors", "name": f"frame{i}", "shape": [64, 96, 3], "dtype": "uint8",
                             "meaning": f"[64, 96, 3] uint8 synthetic frame {i} (written as {names.format(i)})"}
                            for i in range(12)]
        (case / "meta.json").write_text(json.dumps(meta))
    rows = {r.tensor: r for r in run_frontend_case(case)}
    assert "fetch_video.frames" in rows
    failed = [r for r in rows.values() if not r.ok]
    assert not failed, "\n" + format_rows(failed)


def test_video_case_keeps_every_frame_under_max_frames(tmp_path):
    """max_frames sets only the frame count of the pixel budget: the reference keeps all 6 frames."""
    case = _video_case_copy(tmp_path, {"min_pixels": 4096, "max_frames": 4}, 6)
    failed = [r for r in run_frontend_case(case) if not r.ok]
    assert not failed, "\n" + format_rows(failed)


@pytest.mark.parametrize("options, config_keys, named", [
    ({"min_pixels": 4096, "playback_speed": 2.0}, {}, "playback_speed"),
])
def test_video_case_refuses_what_it_cannot_reproduce(tmp_path, options, config_keys, named):
    """An option or setting we do not implement fails every row and is named, never dropped."""
    case = _video_case_copy(tmp_path, options, 6, **config_keys)
    rows = run_frontend_case(case)
    assert rows and all(not r.ok and named in r.note for r in rows), "\n" + format_rows(rows)


def test_video_case_uses_the_recorded_processor_settings(tmp_path):
    """The video case ran a fixed 2.0 image processor: a case recording 8-pixel patches (config.json keys, as
    frontend_image records them) has grids of 8x12 patches and 24 <framePatch> per temporal patch."""
    case = _video_case_copy(tmp_path, {"min_pixels": 4096}, 6, patch_size=8)
    rows = {r.tensor: r for r in run_frontend_case(case)}
    failed = [r for r in rows.values() if not r.ok]
    assert not failed, "\n" + format_rows(failed)
    assert {"video_grid_thw", "expanded_prompt (text)"} <= set(rows)


def test_a_preview_video_case_runs_the_preview_processor(tmp_path):
    """A case made by the Preview's processor (use_interleaved_frame_timestamp false) was refused; it runs the
    Preview path (spec §4.2 Preview, §6.2): factor 28, bilinear float frames, one grid row, no timestamps."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file, save_file

    case = _video_case_copy(tmp_path, {"min_pixels": 4096}, 6, use_interleaved_frame_timestamp=False, patch_size=14)
    inputs = load_file(str(case / "inputs.safetensors"))
    frames = np.stack([inputs[f"frame{i}"] for i in range(6)])                  # 64x96 -> 56x84 (factor 28)
    resized = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(56, 84),
                                              mode="bilinear", align_corners=False, antialias=True)
    save_file({"fetch_video.frames": resized.numpy().copy(),
               "video_grid_thw": np.array([[3, 4, 6]], dtype=np.int64)}, str(case / "outputs.safetensors"))
    meta = json.loads((case / "meta.json").read_text())
    meta["expanded_prompt"] = meta["prompt_text_before_expansion"].replace(
        "<VIDEO>", "<video>" + "<framePatch>" * 18 + "</video>\n")
    meta["tensors"] = [{"file": "outputs.safetensors", "name": n, "dtype": d, "shape": []}
                       for n, d in (("fetch_video.frames", "float32"), ("video_grid_thw", "int64"))]
    (case / "meta.json").write_text(json.dumps(meta))
    rows = {r.tensor: r for r in run_frontend_case(case)}
    assert set(rows) == {"expanded_prompt (text)", "fetch_video.frames", "video_grid_thw"}
    failed = [r for r in rows.values() if not r.ok]
    assert not failed, "\n" + format_rows(failed)


@pytest.mark.parametrize("config_rate, record, call", [
    (48000, {"meaning": "[120000] float32 waveform"}, ""),
    (None, {"meaning": "[120000] float32 48 kHz mono waveform (2.5 s)"}, ""),
    (16000, {"meaning": "[120000] float32 waveform", "sample_rate": 48000}, ""),
    # the shipped preprocessor config's sampling_rate is the processor's own 16 kHz: the input's words win
    (16000, {"meaning": "[120000] float32 48 kHz mono waveform (2.5 s)"}, ""),
    # the rate is written only in the call that made the output (as the fixtures write it)
    (16000, {"meaning": "[120000] float32 synthetic waveform"},
     "BailingMM2AudioProcessor([(wave_main,48000)], use_whisper_encoder=True): "),
])
def test_an_audio_case_recorded_at_48k_is_resampled_to_the_16k_front_end(tmp_path, config_rate, record, call):
    """A frontend_audio case whose waveform is recorded at 48 kHz (the config's `sampling_rate`, the input's
    own record: its meaning or a sample_rate key, or the processor call an output's meaning writes): the
    reference processor resamples it to its fixed 16 kHz (spec §5.1), so 2.5 s make 250 mel frames and 63
    tokens. The harness took the config's rate as the front end's own (750 frames), read no per-input rate,
    then let the config's 16 kHz (the processor's, as the shipped file has it) override the input's own
    rate and never read the rate of the call."""
    import numpy as np
    from safetensors.numpy import save_file

    case = tmp_path / "frontend_audio"
    case.mkdir()
    config = {"whisper_frontend_args": {"n_mels": 128}, "use_whisper_encoder": True}
    if config_rate is not None:
        config["sampling_rate"] = config_rate
    (case / "config.json").write_text(json.dumps(config))
    t = np.arange(120000) / 48000
    save_file({"wave_main": (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)}, str(case / "inputs.safetensors"))
    save_file({"main.audio_feats_lengths": np.array([[250]], dtype=np.int64),
               "main.encoder_feats_lengths": np.array([[63]], dtype=np.int64)}, str(case / "outputs.safetensors"))
    tensors = [{"file": "inputs.safetensors", "name": "wave_main", "shape": [120000], "dtype": "float32", **record}]
    tensors += [{"file": "outputs.safetensors", "name": n, "shape": [1, 1], "dtype": "int64", "meaning": m}
                for n, m in (("main.audio_feats_lengths", call + "[1, 1] mel frames"),
                             ("main.encoder_feats_lengths", "[1, 1] LLM audio tokens"))]
    (case / "meta.json").write_text(json.dumps({"case": "frontend_audio", "kind": "frontend", "tensors": tensors}))
    rows = run_frontend_case(case)
    assert [r.tensor for r in rows] == ["main.audio_feats_lengths", "main.encoder_feats_lengths"]
    assert all(r.ok for r in rows), "\n" + format_rows(rows)
