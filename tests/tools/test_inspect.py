"""engine.tools.inspect on the real configs (meta device, no memory): sizes and totals against the spec and upstream."""

import json
import math

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


@pytest.fixture(scope="module")
def poisoned_checkpoint(tmp_path_factory):
    """The tiny checkpoint with one NaN and two -inf in a thinker weight and one +inf in a talker weight."""
    import torch
    from safetensors.torch import load_file, save_file

    from engine.tiny import write_tiny_checkpoint

    root = write_tiny_checkpoint(tmp_path_factory.mktemp("poisoned") / "ckpt")
    for shard, poison in ((next(root.glob("*.safetensors")), [math.nan, -math.inf, -math.inf]),
                          (next((root / "talker").rglob("*.safetensors")), [math.inf])):
        tensors = load_file(shard)
        name = next(n for n, t in sorted(tensors.items()) if t.is_floating_point() and t.numel() >= len(poison))
        flat = tensors[name].flatten().clone()
        flat[:len(poison)] = torch.tensor(poison, dtype=flat.dtype)
        tensors[name] = flat.reshape(tensors[name].shape)
        save_file(tensors, shard)
    return root


def test_check_finite_names_each_weight_that_holds_nan_or_inf(poisoned_checkpoint, capsys):
    """A checkpoint whose weights hold NaN / inf loaded and answered garbage without a word; `--check-finite` reads
    every floating-point weight (thinker and talker folders) and names each such tensor with its counts, exit 1."""
    from engine.tools.inspect import main

    assert main([str(poisoned_checkpoint), "--check-finite"]) == 1
    captured = capsys.readouterr()
    named = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(named) == 2, captured.err
    assert "holds 1 NaN and 2 ±inf values" in named[0] and "holds 0 NaN and 1 ±inf values" in named[1]
    assert "talker" in named[1] and "2 hold NaN or ±inf" in captured.out
    assert main([str(poisoned_checkpoint), "--check-finite", "--json"]) == 1
    found = json.loads(capsys.readouterr().out)["check_finite"]["non_finite"]
    assert [(t["nan"], t["inf"]) for t in found] == [(1, 2), (0, 1)]


def test_check_finite_passes_a_clean_checkpoint(tiny_checkpoint, capsys):
    from engine.tools.inspect import main

    assert main([str(tiny_checkpoint), "--check-finite"]) == 0
    out = capsys.readouterr().out
    assert "floating-point tensors checked: all values finite" in out
