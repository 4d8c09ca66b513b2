"""bench/quantize_cpu.py runs (a small matrix, CI smoke): both formats from both weight dtypes, positive rates, and
the native quantisers' values within one step of the torch definitions' (almost all equal) and scales within 1e-6."""

import json
import subprocess
import sys

import pytest

from engine.kernels import native
from tests.paths import REPO


def test_quantize_bench_reports_every_format():
    if not native.available():
        pytest.skip(f"native kernels not built here: {native.status()}")
    r = subprocess.run([sys.executable, "bench/quantize_cpu.py", "--rows", "256", "--cols", "640", "--repeats", "1",
                        "--threads", "1", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["int4_group"] == 128 and out["cols"] == 640
    assert sorted((row["format"], row["weights"]) for row in out["results"]) == [
        ("int4", "bf16"), ("int4", "fp32"), ("int8", "bf16"), ("int8", "fp32")]
    for row in out["results"]:
        assert row["torch_m_per_s"] > 0 and row["native_m_per_s"] > 0
        assert row["max_step_diff"] <= 1 and row["values_differing"] < 1e-3 and row["scale_max_rel_diff"] <= 1e-6
