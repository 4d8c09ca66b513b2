"""CI smoke run of bench/load_peak.py: a real-config checkpoint at small widths (a large vocabulary, so the
embedding table and lm_head dominate, as at the real width), loaded in fresh processes and measured."""

import json
import subprocess
import sys

from tests.paths import REPO, real_config

SMALL = ["--set", "hidden_size=256", "--set", "num_attention_heads=2", "--set", "num_key_value_heads=1",
         "--set", "head_dim=128", "--set", "intermediate_size=512", "--set", "moe_intermediate_size=128",
         "--set", "vocab_size=65536"]


def test_a_load_holds_little_beyond_the_model_it_keeps(tmp_path):
    out = subprocess.run([sys.executable, "bench/load_peak.py", "--config", str(real_config("ming-flash-omni-2.0")),
                          "--layers", "2", "--experts", "16", "--checkpoint", str(tmp_path / "ckpt"),
                          "--loads", "fp32:bf16:bf16,fp32:int4:int8", "--json", *SMALL],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["load"]: r for r in json.loads(out.stdout)["rows"]}
    plain, small = rows["fp32:bf16:bf16"], rows["fp32:int4:int8"]
    # the model: ~140 MB in fp32, dominated by the 65 536-row embedding table and lm_head
    assert plain["planned_bytes"] > 120e6 and small["planned_bytes"] < 0.6 * plain["planned_bytes"]
    for r in rows.values():
        # what a load keeps is what the planner sizes (the process's own allocations during the load: a few MB)
        assert 0.85 < r["final_bytes"] / r["planned_bytes"] < 1.25, r
        # and the load's peak is not a second copy of anything (before: lm_head read, cast and quantised
        # whole, experts stacked then fused): well under the largest tensor (lm_head, 67 MB in fp32)
        assert r["peak_over_final_bytes"] < 40e6, r


def test_a_config_folder_is_required(tmp_path):
    r = subprocess.run([sys.executable, "bench/load_peak.py", "--config", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no config.json" in r.stderr
