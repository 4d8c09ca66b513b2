"""bench/gpu_session.py, the one-call GPU lease script, checked without a GPU (--cpu-smoke): steps run in the
order asked, a GPU-only step says it was skipped, a step past its cap is stopped and the next still runs."""

import json
import subprocess
import sys

import pytest

from tests.paths import REPO

torch = pytest.importorskip("torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answers of a machine without CUDA")
def test_steps_run_in_order_under_their_caps(tmp_path):
    out = subprocess.run([sys.executable, "bench/gpu_session.py", "--cpu-smoke", "--out", str(tmp_path), "--budget", "120",
                          "--only", "gpu_check,env,moe_layer", "--cap", "moe_layer=0.3"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["step"] for r in results] == ["gpu_check", "env", "moe_layer"]
    status = {r["step"]: r["status"] for r in results}
    assert status["gpu_check"] == "skipped (no CUDA GPU)" and status["env"] == "ok"
    assert status["moe_layer"].startswith("stopped at its cap")  # (importing torch alone takes longer than 0.3 s)
    assert out.returncode == 1  # a stopped step is not a pass
    summary = out.stdout[out.stdout.index("# gpu_session summary"):]
    assert "## moe_layer: stopped at its cap" in summary and "no CUDA GPU" in summary
    assert (tmp_path / "steps.log").read_text().count("=====") == 3


def test_an_unknown_step_or_cap_is_refused(tmp_path):
    for flags in (["--only", "env,warp_drive"], ["--cap", "env=fast"]):
        out = subprocess.run([sys.executable, "bench/gpu_session.py", "--cpu-smoke", "--out", str(tmp_path), *flags],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "error:" in out.stderr, out.stderr


def test_the_offload_summary_is_a_line_per_configuration():
    """(The second H200 call's summary printed the offload JSON cut at 2500 characters: half its rows were lost.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_session", REPO / "bench" / "gpu_session.py")
    gpu_session = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_session)
    rows = [{"config": f"offload {i}", "tokens": 16, "ms": 26.0, "vs_all_gpu": 0.05, "predicted_ms": 24.0,
             "measured_vs_predicted": 1.08} for i in range(40)]
    data = {"h2d_pinned_bytes_per_s": 55e9, "h2d_pageable_bytes_per_s": 7e9, "cpu_expert_bytes_per_s": 61e9,
            "cpu_expert_pinned_bytes_per_s": 3.7e9, "cpu_expert_flops": 6.1e11, "rows": rows}
    lines = gpu_session.summarize({"step": "offload", "status": "ok", "wall_s": 52.9, "json": data})
    assert len(lines) == 2 + 40 and "pinned memory 3.7" in lines[1] and lines[-1].endswith("m/p 1.08")
