"""CI smoke run of bench/real_shape.py: the real-shape benchmark's code paths at tiny widths."""

import json
import subprocess
import sys

import pytest

from tests.paths import REPO, real_config

TINY = ["--set", "hidden_size=64", "--set", "num_attention_heads=2", "--set", "num_key_value_heads=1",
        "--set", "head_dim=32", "--set", "intermediate_size=64", "--set", "moe_intermediate_size=32",
        "--set", "vocab_size=512"]


def test_real_shape_benchmark_runs_every_placement_at_tiny_limits():
    config = real_config("ming-flash-omni-2.0")
    out = subprocess.run([sys.executable, "bench/real_shape.py", "--config", str(config), "--device", "cpu",
                          "--layers", "2,3", "--experts", "8", "--prompt-tokens", "8", "--decode-steps", "2",
                          "--placements", "resident,offload,cpu_only", "--in-process", "--threads", "1", "--json", *TINY],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    rows = {(r["placement"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(p, b) for p in ("resident", "offload", "cpu_only") for b in (1, 8)}
    assert result["full_layers"] == 32 and result["memory_bytes_per_s"] > 0
    for r in rows.values():
        assert r["bytes_per_step_full"] > 0 and r["host_syncs_per_step"] >= 0 and r["ops_per_moe_layer"] > 0
    off = rows[("offload", 1)]
    assert 0 < off["experts_on_gpu"] < 1 and off["planner_decode_tokens_per_s"] > 0 and off["simulated_gpu"]
    for r in (off, rows[("resident", 1)]):  # a layer's cost at these widths is near the noise of a shared
        if "unresolved" in r:                # machine: fitted, or said to be unresolved, never a negative time
            assert "decode" in r["unresolved"] or "prefill" in r["unresolved"]
        else:
            assert r["decode_ms_per_moe_layer"] > 0 and r["decode_tokens_per_s_full"] > 0
    if "unresolved" not in off and "unresolved" not in rows[("resident", 1)]:  # combined with the resident rows
        assert off["host_layer_ms"] > 0 and off["decode_ms_full"] > 0
    # the CPU keeps its fastest MoE path for one token: the native kernel takes the expert ids as a tensor
    # (no host read); torch's path, where it is not built, reads them (one sync per MoE layer)
    from engine.kernels import native
    syncs = rows[("resident", 1)]["host_syncs_per_moe_layer"]
    assert syncs == 0 if native.available() else syncs >= 1
    # the no-GPU plan: int8 linears, int4 experts, beside the planner's prediction at the measured bandwidth
    cpu_only = rows[("cpu_only", 1)]
    # (the measured step, not the 32-layer extrapolation: at these widths the 2 -> 3 layer slope is noise)
    assert cpu_only["int8_linears"] > 0 and cpu_only["decode_ms_at_3_layers"] > 0
    assert cpu_only["planner_decode_tokens_per_s"] > 0 and "--gpus none" in cpu_only["planner_note"]
    if native.available():  # and with the CPU kernels' rates measured in the run (engine.plan --host-gbs measure)
        assert cpu_only["planner_measured_decode_tokens_per_s"] > 0 and "measure" in cpu_only["planner_measured_note"]


def test_repeated_measurements_keep_the_fastest_time_of_each():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import real_shape
    finally:
        sys.path.remove(str(REPO / "bench"))
    first = {1: {"prefill_s": 2.0, "decode_step_s": 0.5, "context": 86}}
    second = {1: {"prefill_s": 3.0, "decode_step_s": 0.25, "context": 99}}
    assert real_shape.fastest(first, second) == {1: {"prefill_s": 2.0, "decode_step_s": 0.25, "context": 86}}
    r = subprocess.run([sys.executable, "bench/real_shape.py", "--repeats", "0"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--repeats must be at least 1" in r.stderr



def _real_shape_module():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import real_shape
    finally:
        sys.path.remove(str(REPO / "bench"))
    return real_shape


def test_a_failed_placement_is_listed_and_the_others_still_reported(monkeypatch, capsys):
    """On the H200 the fp8 placement's measuring process failed and the run ended with no row at all, the
    resident one's too. A failed placement is now listed under `failed` (exit 1) and the others are reported."""
    real_shape = _real_shape_module()

    def measured(spec):
        if spec["placement"] == "fp8":
            raise real_shape.MeasurementFailed("the measurement of fp8 at 2 layers failed:\nKeyError: device")
        step = 1e-3 * spec["layers"]
        return {}, {1: {"prefill_s": 10 * step, "decode_step_s": step, "host_syncs_per_step": 0.0,
                        "dispatched_ops_per_step": 100.0 * spec["layers"], "context": 40, "bytes_per_step": 1e6,
                        "graphs": False}}

    monkeypatch.setattr(real_shape, "model_in_subprocess", measured)
    monkeypatch.setattr(real_shape, "memory_bandwidth", lambda device: 1e10)
    rc = real_shape.main(["--config", str(real_config("ming-flash-omni-2.0")), "--device", "cpu", "--batches", "1",
                          "--placements", "resident,fp8", "--layers", "2,3", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and [r["placement"] for r in out["rows"]] == ["resident"]
    assert [f["placement"] for f in out["failed"]] == ["fp8"] and "KeyError" in out["failed"][0]["error"]


def test_a_larger_layer_count_not_slower_is_measured_again_then_said_unresolved(monkeypatch, capsys):
    """CI once printed a host layer of -1.6 ms and -40.8 tok/s: the 3-layer step of the tiny offload model had
    timed faster than the 2-layer one (a loaded machine). Such a fit is measured again (--retries) and, if
    still flat, the row says so with no per-layer figure, and no offload combination is made from it."""
    real_shape = _real_shape_module()
    calls = []

    def measured(spec):  # resident: 3 layers faster than 2 in the first round only; offload: always
        calls.append((spec["placement"], spec["layers"]))
        flat = spec["placement"] == "offload" or len(calls) <= 2
        step = 1e-3 * (10 - spec["layers"] if flat else spec["layers"])  # flat rounds are the slower ones
        notes = {"layer_gpu_share": [0.5] * 31} if spec["placement"] == "offload" else {}
        return notes, {1: {"prefill_s": 10 * step, "decode_step_s": step, "host_syncs_per_step": 0.0,
                           "dispatched_ops_per_step": 100.0, "context": 40, "bytes_per_step": 1e6,
                           "graphs": False}}

    monkeypatch.setattr(real_shape, "model_in_subprocess", measured)
    monkeypatch.setattr(real_shape, "memory_bandwidth", lambda device: 1e10)
    rc = real_shape.main(["--config", str(real_config("ming-flash-omni-2.0")), "--device", "cpu", "--batches", "1",
                          "--placements", "resident,offload", "--layers", "2,3", "--retries", "2", "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    resident, offload = out["rows"]
    # resident: one round, one retry, then resolved; offload: one round and both retries
    assert calls.count(("resident", 3)) == 2 and calls.count(("offload", 3)) == 3 and rc == 0
    assert "unresolved" not in resident and resident["decode_ms_per_moe_layer"] == pytest.approx(1.0)
    assert "decode and prefill" in offload["unresolved"] and "3 rounds" in offload["unresolved"]
    assert offload["host_layer_ms"] is None and offload.get("decode_tokens_per_s_full") is None
    assert "measuring again (2 of 2)" in captured.err
    rc = real_shape.main(["--config", str(real_config("ming-flash-omni-2.0")), "--device", "cpu", "--batches", "1",
                          "--placements", "offload", "--layers", "2,3", "--retries", "0"])
    table = capsys.readouterr().out
    assert "UNRESOLVED offload batch 1: decode and prefill" in table and table.splitlines()[2].split()[3:5] == ["-", "-"]


def test_offload_rows_measured_alone_take_an_earlier_runs_resident_rows(tmp_path):
    real_shape = _real_shape_module()
    earlier = tmp_path / "earlier.json"
    earlier.write_text("not json")
    with pytest.raises(SystemExit, match="not the --json output"):  # refused before anything is measured
        real_shape.base_rows([str(earlier)], 8)
    earlier.write_text(json.dumps({"prompt_tokens": 8, "rows": [
        {"placement": "resident", "batch": 1, "decode_ms_per_moe_layer": 0.2, "prefill_ms_per_moe_layer": 1.0}]}))
    # a run at another prompt length is not combined: its prefill's per-layer cost is another's
    assert real_shape.base_rows([str(earlier)], 2048) == []
    rows = [{"placement": "offload", "batch": 1, "decode_ms_per_moe_layer": 5.0, "prefill_ms_per_moe_layer": 50.0,
             "_fixed_decode_ms": 1.0, "_fixed_prefill_ms": 2.0, "_prompt": 8, "layer_gpu_share": [1.0, 0.0]}]
    real_shape.combine_offload_rows(rows, real_shape.base_rows([str(earlier)], 8))
    # one layer on the GPU at the resident cost, one on the host at the offload row's own
    assert rows[0]["decode_ms_full"] == pytest.approx(1.0 + 0.2 + 5.0) and rows[0]["host_layer_ms"] == 5.0
