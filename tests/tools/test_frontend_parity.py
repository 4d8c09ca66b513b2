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
