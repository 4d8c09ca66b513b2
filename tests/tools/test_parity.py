"""Reference parity: every public case (llm, rope_index, mm, prompts, frontends, talker, audio_vae, imagegen,
full_names) through `engine.tools.parity`, plus its CLI."""

import json
import shutil
import subprocess
import sys

import pytest

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
