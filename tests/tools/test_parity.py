"""Reference parity: every public case (llm, rope_index, mm, prompts, frontends, talker, audio_vae) through `engine.tools.parity`, plus its CLI."""

import subprocess
import sys

import pytest

from engine.tools.parity import format_table, run_case
from tests.paths import REPO, fixture_case


@pytest.mark.parametrize("case", ["llm_b1", "llm_b2", "rope_index", "mm", "prompts",
                                  "frontend_image", "frontend_audio", "frontend_video",
                                  "talker", "audio_vae", "imagegen_cond", "imagegen_dit", "imagegen_byt5"])
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
