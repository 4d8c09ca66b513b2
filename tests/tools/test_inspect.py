"""engine.tools.inspect on the real configs (meta device, no memory): sizes and totals against the spec and upstream."""

import json

import pytest

from engine.tools.inspect import report
from tests.paths import FIXTURES, real_config


def test_real_2_0_sizes_match_the_spec():
    r = report(real_config("ming-flash-omni-2.0"))
    assert r["llm_total_params"] == 102_954_732_800  # ≈102.9 B (spec §1.3)
    assert r["params_per_expert"] == 3 * 4096 * 1024 and r["bytes_per_expert"] == 24 * 2**20
    assert r["components"]["routed experts"]["params"] == 31 * 256 * 3 * 4096 * 1024
    assert r["moe_layers"] == 31 and r["dtype"] == "bfloat16"


@pytest.mark.parametrize("release, sub", [("ming-flash-omni-2.0", "v2"), ("ming-flash-omni-preview", "preview")])
def test_inspect_totals_equal_upstream_full_names(release, sub):
    """Names and shapes are compared entry by entry by the parity tool's `names` case (tests/tools/test_parity.py)."""
    if not (FIXTURES / "full_names" / "meta.json").is_file():
        pytest.skip("full_names fixture not available")
    meta = json.loads((FIXTURES / "full_names" / "meta.json").read_text())["summary"][sub]
    r = report(real_config(release))
    assert r["total_params"] == meta["total_parameters"] and r["tensors"] == meta["state_dict_entries"]
    assert r["llm_total_params"] == meta["parameters_per_top_level_prefix"]["model"]


@pytest.mark.parametrize("what", ["missing", "not_ming"])
def test_the_command_line_names_a_path_it_cannot_inspect_without_a_traceback(tmp_path, capsys, what):
    from engine.tools.inspect import main

    path = tmp_path / "nope"
    if what == "not_ming":
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err
