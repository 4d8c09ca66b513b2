"""bench/int8_activations.py runs (a small shape, CI smoke): for int4 and int8 experts (where the CPU has AVX2) the
kernel with fp32 activations has the format's own error, int8 activations stay within a few per cent of
it, and both timings are reported."""

import json
import subprocess
import sys

import pytest

from engine.kernels import native
from tests.paths import REPO


def test_int8_activations_bench_reports_error_and_time():
    if not native.available():
        pytest.skip(f"native kernels not built here: {native.status()}")
    r = subprocess.run([sys.executable, "bench/int8_activations.py", "--hidden", "256", "--inter", "128", "--experts", "4",
                        "--top-k", "2", "--tokens", "2", "--prefill-rows", "8", "--repeats", "1", "--threads", "1",
                        "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    if r.returncode == 2:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    # int8 weights where the kernels take them with int8 activations (VNNI), else named as left out
    assert set(out["formats"]) == set(native.int8_kernel_kinds()) and "int4" in out["formats"]
    assert set(out["formats"]) | set(out["not_taken"]) == {"int4", "int8"}
    for fmt in out["formats"].values():
        assert len(fmt["tokens"]) == 2
        for row in fmt["tokens"]:
            assert abs(row["float"] - row["format"]) <= 1e-5  # fp32 activations: the format's error, nothing added
            assert 0 < row["int8_vs_float"] <= 0.05 and abs(row["int8"] - row["format"]) <= 0.05
        assert all(fmt["ms"][mode][k] > 0 for mode in ("float", "int8") for k in ("decode", "prefill"))
