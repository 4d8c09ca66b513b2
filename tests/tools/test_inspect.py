"""engine.tools.inspect on the real configs (meta device, no memory) and our names against upstream's."""

import json

import pytest

from engine.models.thinker.config import MingConfig
from engine.tools.inspect import report
from engine.loader import checkpoint_entries
from engine.models.thinker.model import build_thinker
from tests.paths import FIXTURES, real_config


def test_real_2_0_sizes_match_the_spec():
    r = report(real_config("ming-flash-omni-2.0"))
    assert r["llm_total_params"] == 102_954_732_800  # ≈102.9 B (spec §1.3)
    assert r["params_per_expert"] == 3 * 4096 * 1024 and r["bytes_per_expert"] == 24 * 2**20
    assert r["components"]["routed experts"]["params"] == 31 * 256 * 3 * 4096 * 1024
    assert r["moe_layers"] == 31 and r["dtype"] == "bfloat16"


@pytest.mark.parametrize("release, sub", [("ming-flash-omni-2.0", "v2"), ("ming-flash-omni-preview", "preview")])
def test_thinker_names_and_shapes_equal_upstream_full_names(release, sub):
    names_file = FIXTURES / "full_names" / sub / "names.txt"
    if not names_file.is_file():
        pytest.skip("full_names fixture not available")
    upstream = {}
    for line in names_file.read_text().splitlines():
        name, shape, _ = line.split("\t")
        upstream[name] = tuple(json.loads(shape))
    cfg = MingConfig.from_file(real_config(release))
    ours = {}
    for prefix, module in build_thinker(cfg, "meta").items():
        ours.update(checkpoint_entries(module, prefix=prefix))
    assert ours == upstream
    meta = json.loads((FIXTURES / "full_names" / "meta.json").read_text())["summary"][sub]
    r = report(real_config(release))
    assert r["total_params"] == meta["total_parameters"] and r["tensors"] == meta["state_dict_entries"]
    assert r["llm_total_params"] == meta["parameters_per_top_level_prefix"]["model"]
