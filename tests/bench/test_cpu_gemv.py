"""bench/cpu_gemv.py runs (small buffers, CI smoke) and reports every shape and dtype with positive rates."""

import json
import subprocess
import sys

from tests.paths import REPO


def test_cpu_gemv_bench_reports_every_shape():
    r = subprocess.run([sys.executable, "bench/cpu_gemv.py", "--mib", "16", "--threads", "1", "--reps", "1", "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["read_gbs"] > 0 and len(out["streamed"]) == 6 and len(out["per_call"]) == 10
    assert all(row["plain_gbs"] > 0 for row in out["streamed"].values())
    assert len(out["int8"]) == 6  # int8 weights with row scales: torch's kernel and the native one
    assert all(rate > 0 for row in out["int8"].values() for key, rate in row.items() if key.endswith("_gbs"))
    # int8 prefill blocks at the real expert shapes, both kernels
    assert len(out["int8_blocks"]) == 8
    assert all(rate > 0 for row in out["int8_blocks"].values() for key, rate in row.items() if key.endswith("_gbs"))
    # int4 weights with group scales at the real expert shapes: a decode row and prefill blocks, both kernels
    assert len(out["int4"]) == 12
    assert all(rate > 0 for row in out["int4"].values() for key, rate in row.items() if key.endswith("_gbs"))
    # few-row blocks of plain weights: torch's GEMM and the native kernel, and the engine's pick (fp32: the native
    # kernel up to MAX_ROWS; bf16: one row always native, more rows torch's where its GEMMs use AMX tiles)
    assert len(out["few_rows"]) == 36
    assert all(rate > 0 for row in out["few_rows"].values() for key, rate in row.items() if key.endswith("_gbs"))
    takes = {name: row["engine_takes"] for name, row in out["few_rows"].items() if "engine_takes" in row}
    assert all(who == "native" for name, who in takes.items() if name.startswith("fp32") or " x1:" in name)
