"""One lease of a GPU machine: every GPU check and benchmark of the engine in one call, each step under
its own time cap, the whole under a budget, a compact summary printed last.

    python bench/gpu_session.py [--out DIR] [--budget SECONDS] [--config DIR] [--only STEP,...] [--cpu-smoke]

Steps, most important first (a step that overruns its cap is stopped and the next one runs):

* ``env``: GPU, driver, torch and Triton versions.
* ``gpu_check``: bench/gpu_check.py, the CUDA paths against references (kernels vs fp64, the tiny
  engine on CUDA vs CPU, the expert runtime, CUDA-graph replays vs eager steps, host syncs per step).
* ``gpu_tests``: the test files with CUDA-only tests (GPU_TESTS), Triton compiled, not interpreted.
* ``real_shape``: bench/real_shape.py at the real 2.0 widths (``--config``), placements resident, fp8 and
  int4, batch 1 and 8, prompt 512.
* ``moe_layer``: bench/moe_layer_gpu.py, the fused MoE kernel at the real expert shape vs HBM bandwidth.
* ``offload``: bench/offload_gpu.py, one real-shape MoE layer with half its experts in host memory
  (CPU-computed), fp8 / int4 banks, the calibrated transfer model's prediction vs the measurement.
* ``real_shape_offload``: bench/real_shape.py, the planner's 1 x 80 GB plan (``--offload-placements``,
  default fp8 and offload_fp8) at batch 1 and a 2 048-token prompt, each offload row combined with the
  resident / fp8 row measured beside it (or of ``real_shape`` / ``--earlier-rows`` at the same prompt),
  all eagerly: an offload model's decode steps cannot be CUDA graphs, its GPU-resident layers included.

Everything a step prints goes to ``DIR/steps.log``; the steps' JSON results to ``DIR/results.json``.
``--cpu-smoke`` runs the same steps at toy sizes on a machine without a GPU (the GPU-only ones say so and
are recorded as skipped): a check of this script, not of the GPU paths.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
NO_GPU_EXIT = 2  # what the GPU-only benchmarks exit with where there is no CUDA GPU
GPU_ONLY = ("gpu_check", "moe_layer", "offload")

# (name, share of the budget it may take at most)
CAPS = {"env": 0.03, "gpu_check": 0.28, "gpu_tests": 0.12, "real_shape": 0.38, "moe_layer": 0.1, "offload": 0.15,
        "real_shape_offload": 0.2}
# the tests that run only where CUDA is (CUDA graphs of the thinker and the talker, seeded noise on the
# device, the image DiT's autocast): the rest of the suite is the CPU's and runs in CI
GPU_TESTS = ["tests/test_decode_graphs.py", "tests/models/talker/test_graphs.py", "tests/models/talker/test_noise.py",
             "tests/models/imagegen/test_sd3.py", "tests/placement/test_expert_runtime_cuda.py",
             "tests/kernels/test_decode_attention.py"]


def steps(args, work: Path) -> list[tuple[str, list[str]]]:
    py = sys.executable
    shape = [py, str(BENCH / "real_shape.py"), "--config", args.config, "--json"]
    base = str(work / "real_shape.json")
    if args.cpu_smoke:  # toy widths on the CPU: the mechanics of each step, in seconds
        shape += ["--device", "cpu", "--experts", "8", "--prompt-tokens", "8", "--decode-steps", "2", "--threads", "1",
                  "--set", "hidden_size=64", "--set", "num_attention_heads=2", "--set", "num_key_value_heads=1",
                  "--set", "head_dim=32", "--set", "intermediate_size=64", "--set", "moe_intermediate_size=32",
                  "--set", "vocab_size=512"]
    env_probe = ("import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__,"
                 " 'triton', triton.__version__, 'cuda', torch.version.cuda);"
                 " print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU',"
                 " torch.cuda.get_device_capability() if torch.cuda.is_available() else '')")
    return [
        ("env", ["bash", "-c", f"nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem "
                               f"--format=csv 2>&1 | head -3; nproc; free -g | head -2; {py} -c \"{env_probe}\""]),
        ("gpu_check", [py, str(BENCH / "gpu_check.py"), "--json"] + (["--only", args.gpu_check] if args.gpu_check else [])),
        ("gpu_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--disable-warnings", *GPU_TESTS]),
        ("real_shape", shape + ["--placements", args.placements, "--batches", "1,8"]),
        ("moe_layer", [py, str(BENCH / "moe_layer_gpu.py"), "--tokens", "1,8,64,512,4096", "--quant", "bf16,fp8,int4",
                       "--json"] + (["--tune", "--tune-tokens", args.tune_tokens] if args.tune_tokens else [])),
        ("offload", [py, str(BENCH / "offload_gpu.py"), "--tokens", "1,16,128", "--quant", "fp8,int4",
                     "--calls", str(args.offload_calls), "--json"]),
        ("real_shape_offload", shape + ["--placements", args.offload_placements, "--batches", "1", "--layers", "2,4",
                                        "--prompt-tokens", "16" if args.cpu_smoke else str(args.offload_prompt),
                                        "--no-graphs",  # (its GPU layers run eagerly in the offload model too)
                                        *[a for f in args.earlier_rows for a in ("--base-rows", f)], "--base-rows", base]),
    ]


def run_step(name: str, argv: list[str], cap: float, log, work: Path) -> dict:
    """Run one step (its own process group, so a stop takes its children too) with stdout kept for
    the results and everything also written to the log."""
    log.write(f"\n===== {name}: {' '.join(argv)} (cap {cap:.0f} s)\n")
    log.flush()
    out_path = work / f"{name}.stdout"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0"}  # compiled kernels (conftest sets 1 by default)
    t0 = time.monotonic()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=log, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
            no_gpu = rc == NO_GPU_EXIT and name in GPU_ONLY
            status = "ok" if rc == 0 else ("skipped (no CUDA GPU)" if no_gpu else f"failed (exit {rc})")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, f"stopped at its cap ({cap:.0f} s)"
    wall = time.monotonic() - t0
    text = out_path.read_text(errors="replace")
    log.write(f"----- {name} stdout:\n{text}\n----- {name}: {status}, {wall:.1f} s\n")
    log.flush()
    result = {"step": name, "status": status, "rc": rc, "wall_s": round(wall, 1)}
    last = text.strip().splitlines()[-1] if text.strip() else ""
    try:
        result["json"] = json.loads(last)
    except ValueError:
        result["stdout"] = text[-4000:]
    print(f"[{name}: {status}, {wall:.1f} s]", flush=True)
    return result


# ------------------------------------------------------------------------------------------------ summary

def fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def summarize(result: dict) -> list[str]:
    name, data = result["step"], result.get("json")
    lines = [f"## {name}: {result['status']} in {result['wall_s']} s"]
    if data is None:
        lines += [f"  {line}"[:300] for line in result.get("stdout", "").strip().splitlines()[-12:]]
        return lines
    if name == "gpu_check":
        rows = data.get("results", [])
        bad = [r for r in rows if not r["ok"]]
        lines.append(f"  {data.get('env')}: {len(rows) - len(bad)} ok, {len(bad)} failed")
        for r in bad:
            figs = {k: fmt(v) for k, v in r.items() if k not in ("group", "check", "ok")}
            lines.append(f"  FAIL {r['check']} {figs}"[:400])
        for r in rows:
            if r["group"] in ("engine", "graphs", "runtime") and r["ok"]:
                keep = {k: fmt(v) for k, v in r.items() if k not in ("group", "check", "ok", "syncs", "tokens")}
                lines.append(f"  ok {r['check']} {keep}"[:400])
        worst = {}
        for r in rows:
            if r["group"] == "kernels" and "rel_err_vs_fp64" in r:
                kind = r["check"].split()[0] + " " + r["check"].split()[-1]
                worst[kind] = max(worst.get(kind, 0.0), r["rel_err_vs_fp64"])
        if worst:
            lines.append("  kernels, worst rel. error vs fp64: " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))
    elif name.startswith("real_shape"):
        lines.append(f"  {data['device']} {data['dtype']}, layers {data['layers']} -> {data['full_layers']}, "
                     f"{data['experts']} experts, prompt {data['prompt_tokens']}, copy {data['memory_bytes_per_s'] / 1e9:.0f} GB/s")
        lines.append("  placement    batch graphs ms/layer tok/s  prefill_tok/s bw_frac syncs/step kern/layer busy planner")
        for r in data["rows"]:
            lines.append(f"  {r['placement']:<12} {r['batch']:>5} {str(r['graphs']):>6} {fmt(r.get('decode_ms_per_moe_layer'), '.3f'):>8} "
                         f"{fmt(r.get('decode_tokens_per_s_full'), '.2f'):>6} {fmt(r.get('prefill_tokens_per_s_full'), '.0f'):>13} "
                         f"{fmt(r.get('bandwidth_fraction'), '.2f'):>7} {fmt(r.get('host_syncs_per_step'), '.1f'):>10} "
                         f"{fmt(r.get('kernels_per_moe_layer'), '.0f'):>10} {fmt(r.get('gpu_busy_of_step'), '.2f'):>4} "
                         f"{fmt(r.get('planner_decode_tokens_per_s'), '.1f')}")
        for r in data["rows"]:
            if r.get("top_kernels"):
                lines.append(f"  {r['placement']} b{r['batch']}: kernels {fmt(r.get('gpu_kernel_ms_per_step'), '.3f')} ms of a "
                             f"{fmt(r.get('decode_ms_at_' + str(data['layers'][1]) + '_layers'), '.3f')} ms step "
                             f"(busy {fmt(r.get('gpu_busy_of_step'), '.2f')}, active {fmt(r.get('gpu_active_fraction_of_span'), '.2f')} "
                             f"of the kernels' span); top: " + "; ".join(
                                 f"{k['name'][:40]} x{k['per_step']:.0f} {k['us_per_step']:.0f}us" for k in r["top_kernels"][:4]))
            if r.get("transfer_model"):
                lines.append(f"  {r['placement']} b{r['batch']}: host layer {fmt(r.get('host_layer_ms'), '.3f')} ms decode, "
                             f"{fmt(r.get('host_layer_prefill_ms'), '.1f')} ms prefill; fetch threshold "
                             f"{r.get('fetch_threshold_tokens')} tokens; {r['transfer_model']}")
            if r.get("graphs_failure"):
                lines.append(f"  graphs refused ({r['placement']}, batch {r['batch']}): {r['graphs_failure'][:300]}")
            if r.get("unresolved"):
                lines.append(f"  unresolved ({r['placement']}, batch {r['batch']}): {r['unresolved'][:300]}")
        for f in data.get("failed", []):
            lines.append(f"  FAILED {f['placement']}: " + " | ".join(f["error"].strip().splitlines()[-3:])[:600])
    elif name == "moe_layer":
        lines.append(f"  HBM {data['hbm_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {data['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
        for r in data["rows"]:
            lines.append(f"  {r.get('storage', 'bf16'):<4} T={r['tokens']:<5} graph {r['triton_ms']:.3f} ms eager {r['triton_eager_ms']:.3f} ms "
                         f"roofline {r['roofline_fraction']:.2f} mma {r['mma_fraction']:.2f} vs_torch {fmt(r.get('vs_torch'), '.2f')}"
                         + (f" tuned {r['tuned_ms']:.3f} ms {r['tuned_config']}" if "tuned_ms" in r else ""))
    elif name == "offload":
        lines.append(f"  link pinned {data['h2d_pinned_bytes_per_s'] / 1e9:.1f} GB/s, pageable "
                     f"{data['h2d_pageable_bytes_per_s'] / 1e9:.1f}; CPU expert T=1 {data['cpu_expert_bytes_per_s'] / 1e9:.1f} GB/s"
                     + (f" (pinned memory {data['cpu_expert_pinned_bytes_per_s'] / 1e9:.1f})"
                        if "cpu_expert_pinned_bytes_per_s" in data else "")
                     + f", T=16 {data['cpu_expert_flops'] / 1e9:.0f} GFLOP/s")
        for r in data["rows"]:
            check = f" predicted {r['predicted_ms']:.3f} m/p {r['measured_vs_predicted']:.2f}" if "predicted_ms" in r else ""
            lines.append(f"  {r['config'][:58]:<58} T={r['tokens']:<4} {r['ms']:8.3f} ms vs_all_gpu {r['vs_all_gpu']:.2f}{check}")
    else:
        lines.append("  " + json.dumps(data, default=str)[:2500])
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu_session_out"))
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    ap.add_argument("--config", default=str(REPO.parent / "shared" / "fixtures" / "real_configs" / "ming-flash-omni-2.0"),
                    help="the real 2.0 config folder (copy it beside the repo on the GPU machine)")
    ap.add_argument("--only", default=None, help="comma-separated step names, run in that order (default: all)")
    ap.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS",
                    help="a step's time cap in seconds (default: its share of --budget, CAPS)")
    ap.add_argument("--tune-tokens", default=None,
                    help="moe_layer_gpu.py --tune at these token counts (a sweep: minutes per storage)")
    ap.add_argument("--offload-calls", type=int, default=20, help="offload_gpu.py's --calls")
    ap.add_argument("--gpu-check", default=None, help="gpu_check.py's --only (default: every group)")
    ap.add_argument("--placements", default="resident,fp8,int4", help="real_shape's placements")
    ap.add_argument("--offload-placements", default="fp8,offload_fp8",
                    help="real_shape_offload's placements (an offload row is combined with the resident / fp8 row "
                         "of the same prompt length, measured in this step or given by --earlier-rows)")
    ap.add_argument("--offload-prompt", type=int, default=2048,
                    help="real_shape_offload's prompt tokens (the issue's prefill goal is for a 2 048-token prompt)")
    ap.add_argument("--earlier-rows", action="append", default=[], metavar="FILE",
                    help="an earlier real_shape --json output whose resident / fp8 rows the offload rows may use")
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes, no GPU needed: a check of this script")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_session_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    plan = steps(args, work)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {n for n, _ in plan}
        if unknown:
            ap.error(f"unknown steps {sorted(unknown)}; choose from {[n for n, _ in plan]}")
        order = args.only.split(",")
        plan = sorted([(n, a) for n, a in plan if n in wanted], key=lambda step: order.index(step[0]))
    caps = {name: share * args.budget for name, share in CAPS.items()}
    for item in args.cap:
        name, _, seconds = item.partition("=")
        if name not in caps or not seconds.replace(".", "", 1).isdigit():
            ap.error(f"--cap takes STEP=SECONDS with a step of {sorted(caps)}, got {item!r}")
        caps[name] = float(seconds)
    deadline = time.monotonic() + args.budget
    results = []
    with open(out / "steps.log", "w") as log:
        for name, step_argv in plan:
            left = deadline - time.monotonic()
            if left < 5:
                results.append({"step": name, "status": "not run (budget spent)", "rc": None, "wall_s": 0})
                continue
            if name == "real_shape_offload" and not (work / "real_shape.json").exists():
                step_argv = step_argv[:-2]  # no rows of real_shape's: its own base placement or the earlier rows
            r = run_step(name, step_argv, min(left, caps[name]), log, work)
            if name == "real_shape" and "json" in r:
                (work / "real_shape.json").write_text(json.dumps(r["json"]))
            results.append(r)
            (out / "results.json").write_text(json.dumps(results, default=str, indent=1))
    print("\n# gpu_session summary")
    for r in results:
        print("\n".join(summarize(r)))
    return 0 if all(r["status"] in ("ok", "skipped (no CUDA GPU)") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
