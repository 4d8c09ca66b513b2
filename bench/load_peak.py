"""Host memory of a CPU load at the real width: its peak while loading against what it keeps, and against the
planner's sizes (what `Engine.load` checks before reading anything: engine.placement.auto.fit_on_host).

    python bench/load_peak.py [--config DIR] [--layers 2] [--experts 32] [--loads fp32:int4:int8,bf16:int4:int8,...]
                              [--checkpoint DIR] [--set KEY=VALUE ...] [--json]

Method
------
* A checkpoint in the upstream format is written once (``--checkpoint``, default a temporary folder removed
  afterwards): the real config (``--config``, default the 2.0 config in ``../shared/fixtures/real_configs``)
  with ``--layers`` layers (layer 0 dense, the rest MoE), ``--experts`` experts per layer and no encoders, every
  tensor random bf16 under its real name and shape: the embedding table and lm_head at the real vocabulary
  (157 184 x 4 096, 1.3 GB each), real attention, dense MLP and expert widths.
* Each load (``DTYPE:EXPERTS:LINEARS``, e.g. ``bf16:int4:int8`` is the README's no-GPU plan in bf16) runs in a
  fresh Python process (`engine.models.thinker.model.load_model` on the CPU, as `Engine.load` calls it); this
  process reads that process's anonymous resident memory (RssAnon: what the kernel cannot drop, unlike
  the checkpoint's memory-mapped pages) every millisecond: before the load, its peak during the load and
  after it.
* Printed per load: the peak and the final size above the process's size before the load, the peak above
  the final size (what a load needs beyond what it keeps, which `fit_on_host` covers with its
  LOAD_HOST_RESERVE), and the planner's size for the same model (`plan_placement` with no KV cache and no
  reserve) and its ratio to the final size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("MING_SHARED_DIR", REPO.parent / "shared"))
DEFAULT_CONFIG = SHARED / "fixtures" / "real_configs" / "ming-flash-omni-2.0"
DEFAULT_LOADS = "fp32:bf16:bf16,fp32:int4:int8,bf16:int4:int8"
SHARD_BYTES = 2 << 30  # checkpoint shard size, as the releases shard theirs (a few GB each)
POLL_S = 0.001
INIT_STD = 0.02


def rss_anon(pid: int) -> int:
    """Anonymous resident bytes of process `pid` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_checkpoint(config_dir: Path, out: Path, layers: int, experts: int, overrides: dict) -> dict:
    """The real config with `layers` layers and `experts` experts, no encoders, random bf16 tensors under their
    real names, sharded with an index. Returns the config written."""
    import torch
    from safetensors.torch import save_file

    from engine.loader import INDEX_FILE, checkpoint_entries
    from engine.models.thinker.config import MingConfig
    from engine.models.thinker.model import build_llm

    config = json.loads((Path(config_dir) / "config.json").read_text())
    config.pop("vision_config", None)
    config.pop("audio_config", None)
    llm = config["llm_config"]
    groups = int(llm.get("n_group") or 1)
    if experts % groups:
        raise SystemExit(f"load_peak: --experts must be a multiple of the config's {groups} expert groups")
    llm.update(num_hidden_layers=layers, num_experts=experts, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    cfg = MingConfig.from_file(out)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, shards = {}, {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out / name))
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for name, shape in checkpoint_entries(build_llm(cfg), cfg.llm_weight_prefix):
        t = torch.empty(shape, dtype=torch.bfloat16)
        if name.endswith(("norm.weight", "layernorm.weight")):
            t.fill_(1.0)
        elif name.endswith("expert_bias"):
            t = torch.zeros(shape, dtype=torch.float32)
        else:
            t.normal_(0.0, INIT_STD, generator=gen)
        shard[name] = t
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return config


def child(checkpoint: str, dtype: str, experts: str, linears: str) -> None:
    """Run in the measured process: signal readiness, load when told, report."""
    import torch  # noqa: F401  (imported before the baseline is read)
    import torch._dynamo  # noqa: F401  (so is the compiler: any model build imports it, through torch._refs' init
    # of the meta-device modules, ~75 MB of code and tables that are not the model's weights)

    from engine.models.thinker.model import load_model
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    model = load_model(checkpoint, dtype=dtype, device="cpu", expert_dtype=experts, linear_dtype=linears)
    seconds = time.perf_counter() - t0
    print(json.dumps({"load_s": seconds, "loaded": type(model.llm.lm_head).__name__}), flush=True)
    sys.stdin.readline()  # stay alive (and loaded) until the final size is read


def measure(checkpoint: Path, load: str) -> dict:
    dtype, experts, linears = load.split(":")
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(checkpoint), dtype, experts, linears],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"load_peak: the {load} load did not start")
        time.sleep(0.2)
        before = rss_anon(proc.pid)
        peak = before
        proc.stdin.write("go\n")
        proc.stdin.flush()
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        while reader.is_alive():
            peak = max(peak, rss_anon(proc.pid))
            time.sleep(POLL_S)
        if not lines or not lines[0].strip():
            raise SystemExit(f"load_peak: the {load} load failed (exit {proc.wait(timeout=60)})")
        final = rss_anon(proc.pid)
        report = json.loads(lines[0])
    finally:
        if proc.poll() is None:
            proc.stdin.write("done\n")
            proc.stdin.flush()
            proc.wait(timeout=60)
    return {"load": load, "dtype": dtype, "expert_dtype": experts, "linear_dtype": linears,
            "load_s": report["load_s"], "before_bytes": before, "peak_bytes": peak - before,
            "final_bytes": final - before, "peak_over_final_bytes": peak - final}


def planned_bytes(checkpoint: Path, load: str) -> int:
    """The planner's host memory for the model alone (no KV cache, no reserve, no generators)."""
    from engine.models.thinker.config import MingConfig
    from engine.placement.planner import DeviceSpec, plan_placement
    dtype, experts, linears = load.split(":")
    plan = plan_placement(MingConfig.from_file(checkpoint), DeviceSpec((), 1 << 62), experts, kv_tokens=0,
                          host_reserve=0, generators="ignore", linear_dtype=linears, dtype=dtype)
    return plan.host.memory_bytes - plan.host.free_bytes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(*argv[1:5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="folder with the real model's config.json")
    ap.add_argument("--layers", type=int, default=2, help="layers of the checkpoint (layer 0 dense)")
    ap.add_argument("--experts", type=int, default=32, help="experts per MoE layer")
    ap.add_argument("--loads", default=DEFAULT_LOADS, help="comma-separated DTYPE:EXPERT_DTYPE:LINEAR_DTYPE")
    ap.add_argument("--checkpoint", help="write (or reuse) the checkpoint here instead of a temporary folder")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an LLM config key")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not (Path(args.config) / "config.json").is_file():
        print(f"load_peak: no config.json in {args.config} (pass --config)", file=sys.stderr)
        return 2
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    tmp = None
    checkpoint = Path(args.checkpoint) if args.checkpoint else Path(tmp := tempfile.mkdtemp(prefix="load_peak_"))
    try:
        t0 = time.perf_counter()
        if not (checkpoint / "config.json").is_file():
            write_checkpoint(Path(args.config), checkpoint, args.layers, args.experts, overrides)
        written = time.perf_counter() - t0
        rows = []
        for load in args.loads.split(","):
            row = measure(checkpoint, load)
            row["planned_bytes"] = planned_bytes(checkpoint, load)
            rows.append(row)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    on_disk = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) if checkpoint.exists() else None
    result = {"layers": args.layers, "experts": args.experts, "checkpoint_write_s": written, "rows": rows,
              "checkpoint_bytes": on_disk}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    gb = 1e9
    print(f"checkpoint: {args.layers} layers, {args.experts} experts per MoE layer, real widths "
          f"(written in {written:.0f} s)")
    print(f"{'load (dtype:experts:linears)':30s} {'load s':>7s} {'peak GB':>8s} {'final GB':>9s} "
          f"{'peak-final':>11s} {'planner GB':>11s} {'final/planner':>14s}")
    for r in rows:
        print(f"{r['load']:30s} {r['load_s']:7.1f} {r['peak_bytes'] / gb:8.2f} {r['final_bytes'] / gb:9.2f} "
              f"{r['peak_over_final_bytes'] / gb:11.2f} {r['planned_bytes'] / gb:11.2f} "
              f"{r['final_bytes'] / r['planned_bytes']:14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
