"""Fitting a checkpoint on this machine: read the local GPUs and host memory, ask the placement
planner (engine.placement.planner) where everything goes, and say whether the expert runtime is needed.

`Engine.load(..., placement="auto")` (the default, and what `launch.py` / `engine.server` do) uses
this on CUDA machines: a model that fits on one GPU loads there as before; a bigger one (the real
Ming-flash-omni is ~200 GB in bf16) is spread over the local GPUs, with the experts that fit nowhere
kept in host memory and computed by the CPU (engine.placement.expert_runtime). On CPU-only machines nothing is
planned: everything runs on the CPU.
"""

from __future__ import annotations

import os

import torch

from engine.models.thinker.config import MingConfig
from engine.placement.expert_runtime import CPU, RuntimeOptions
from engine.placement.planner import DeviceSpec, GPUSpec, Plan, PlanError, plan_placement

PLACEMENTS = ("auto", "single")
CACHE_SHARE_OF_FREE_GPU = 0.25  # of the attention GPU's memory left free by the plan, for hot experts
MAX_CACHED_EXPERTS = 256


def host_available_bytes() -> int:
    """Memory the host can still give us (MemAvailable), or total physical memory where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine_devices() -> DeviceSpec | None:
    """This machine's CUDA GPUs (their free memory now) and host memory; None without CUDA."""
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, _total = torch.cuda.mem_get_info(i)
        gpus.append(GPUSpec(memory_bytes=int(free), name=torch.cuda.get_device_name(i)))
    return DeviceSpec(tuple(gpus), host_available_bytes())


def fits_on_first_gpu(plan: Plan) -> bool:
    """True when the plan keeps every module and expert on GPU 0 (no runtime needed)."""
    return (all(h == 0 for h in plan.layer_home) and plan.head_home == 0 and plan.embeddings == "gpu"
            and plan.encoders in ("gpu", "none") and all(d == 0 for le in plan.experts for d in le.device))


def auto_plan(config: MingConfig, devices: DeviceSpec, expert_dtype: str = "bf16",
              kv_tokens: int | None = None) -> Plan | None:
    """The planner's placement for this machine, or None when the whole model fits on GPU 0.
    Raises PlanError (saying what is missing) when it does not fit on the GPUs and host together."""
    plan = plan_placement(config, devices, expert_dtype, kv_tokens=kv_tokens)
    return None if fits_on_first_gpu(plan) else plan


def runtime_options_for(plan: Plan) -> RuntimeOptions:
    """Hot-expert cache sized from the memory the plan leaves free on the first attention GPU (only
    when some experts live in host memory)."""
    has_cpu_experts = any(d == CPU for le in plan.experts for d in le.device)
    if not has_cpu_experts or not plan.gpus:
        return RuntimeOptions()
    free = plan.gpus[plan.layer_home[0]].free_bytes
    capacity = int(CACHE_SHARE_OF_FREE_GPU * free // max(1, plan.sizes.bytes_per_expert))
    return RuntimeOptions(cache_capacity=max(0, min(MAX_CACHED_EXPERTS, capacity)))


def placement_summary(plan: Plan | None, device: str) -> str:
    """One line for logs and the UI: where the weights went and the predicted decode speed."""
    if plan is None:
        return f"everything on {device}"
    counts: dict[int, int] = {}
    for le in plan.experts:
        for d in le.device:
            counts[d] = counts.get(d, 0) + 1
    total = sum(counts.values())
    parts = [f"GPU {g}: {n:,}" for g, n in sorted(counts.items()) if g != CPU]
    if counts.get(CPU):
        parts.append(f"host memory (CPU compute): {counts[CPU]:,}")
    return (f"{len(plan.gpus)} GPU(s) + host; routed experts ({total:,}, {plan.sizes.bytes_per_expert / 1e6:.0f} MB "
            f"each) on {', '.join(parts)}; predicted decode {plan.prediction.tokens_per_s:.1f} tokens/s")


__all__ = ["PLACEMENTS", "PlanError", "auto_plan", "fits_on_first_gpu", "host_available_bytes", "machine_devices",
           "placement_summary", "runtime_options_for"]
