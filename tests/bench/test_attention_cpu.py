"""bench/attention_cpu.py runs (a small shape, CI smoke): the native decode attention and torch's ops agree (fp32
within 1e-5 of the largest value) at contexts of several key blocks, and every figure is reported."""

import json
import subprocess
import sys

import pytest

from engine.kernels import native
from tests.paths import REPO


def test_attention_bench_reports_each_context():
    if not native.available():
        pytest.skip(f"native kernels not built here: {native.status()}")
    r = subprocess.run([sys.executable, "bench/attention_cpu.py", "--contexts", "40,300", "--hidden", "256", "--heads",
                        "10", "--kv-heads", "2", "--head-dim", "48", "--rotary", "16", "--layers", "1", "--repeats", "1",
                        "--threads", "1", "--dtype", "fp32", "--linears", "plain", "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["heads"] == 10 and out["kv_heads"] == 2 and out["read_gb_s"] > 0
    assert [row["context"] for row in out["rows"]] == [40, 300]
    for row in out["rows"]:
        assert row["native_ms"] > 0 and row["torch_ms"] > 0 and row["mb_per_layer"] > 0
        assert row["max_rel_diff"] <= 1e-5
