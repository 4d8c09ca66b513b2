"""Fitting a checkpoint on this machine: read the local GPUs and host memory, ask the placement
planner (engine.placement.planner) where everything goes, and say whether the expert runtime is needed.

`Engine.load(..., placement="auto")` (the default, and what `launch.py` / `engine.server` do) uses
this on CUDA machines: a model that fits on one GPU loads there as before; a bigger one (the real
Ming-flash-omni is ~200 GB in bf16) is spread over the local GPUs, with the experts that fit nowhere
kept in host memory and computed by the CPU (engine.placement.expert_runtime). On a machine without
a GPU everything runs on the CPU; `fit_on_host` checks with the planner, before anything is read, that
it fits in the memory the host has available now (and picks the load dtype when none was asked for),
so a model too big fails at once with what to try instead of being killed halfway through its load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from engine.models.thinker.config import MingConfig
from engine.placement.expert_runtime import CPU, RuntimeOptions
from engine.placement.host_rates import measure_rates
from engine.placement.planner import (DeviceSpec, GPUSpec, Plan, PlanError, RooflineParams, format_gb, plan_placement,
                                      predict_decode)

PLACEMENTS = ("auto", "single")
CACHE_SHARE_OF_FREE_GPU = 0.25  # of the attention GPU's memory left free by the plan, for hot experts
MAX_CACHED_EXPERTS = 256
# What a CPU load keeps free of MemAvailable: this process's Python/torch heap and what a load holds beyond
# the model it keeps: a block of rows as read (engine.loader.READ_BLOCK_BYTES) and its quantisation
# temporaries, or one expert (under 0.1 GB above the model at the real width: bench/load_peak.py).
LOAD_HOST_RESERVE = "1GiB"
# KV cache a CPU load must leave room for (the cache grows with the conversation): an 8k-token context.
LOAD_KV_TOKENS = 8192
CPU_DTYPES = ("fp32", "bf16")  # a CPU load's dtype when none is asked for: the first that fits
# CPU loads at least this large measure the host's streaming rates (about a second, engine.placement.host_rates)
# to say the decode speed to expect; a small model's load would take longer measuring than loading.
MEASURE_RATES_MIN_BYTES = 2 << 30


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


@dataclass(frozen=True)
class HostFit:
    """What `fit_on_host` decided: the load dtype, the planner's no-GPU plan in it, whether the generators
    (talker, image generator) fit beside the thinker, and a line saying so for logs and the UI."""

    dtype: str
    plan: Plan
    generators: bool
    summary: str


def fit_on_host(config: MingConfig, dtype: str | None, expert_dtype: str = "bf16", linear_dtype: str = "bf16",
                available: int | None = None) -> HostFit:
    """Check, before loading, that a CPU load fits in `available` bytes (default: MemAvailable now),
    keeping LOAD_HOST_RESERVE and room for LOAD_KV_TOKENS of KV cache. `dtype` None: the first of
    CPU_DTYPES that fits (fp32, the CPU default, else bf16). When the thinker fits but the generators do
    not, it is loaded without them (`generators` False, said in `summary`). A load holds no more than the
    reserve beyond the model it keeps (tensors are read a block of rows at a time, int8 linears quantised
    and experts packed as they are read), so what it keeps is what is checked. Raises PlanError saying how
    much the smallest choice needs, what is available and which options would shrink it, when even the
    thinker alone does not fit."""
    available = host_available_bytes() if available is None else int(available)
    candidates = (dtype,) if dtype else CPU_DTYPES

    def plan(dt: str, memory: int, generators: str) -> Plan:
        return plan_placement(config, DeviceSpec((), memory), expert_dtype, kv_tokens=LOAD_KV_TOKENS,
                              host_reserve=LOAD_HOST_RESERVE, generators=generators, linear_dtype=linear_dtype,
                              dtype=dt)

    def fits(dt: str, generators: str) -> Plan | None:
        try:
            return plan(dt, available, generators)
        except PlanError:
            return None

    unbounded = plan(candidates[-1], 1 << 62, "ignore")  # errors other than memory (an unknown dtype) surface here
    for candidate in candidates:
        for generators in ("auto", "ignore"):
            fitted = fits(candidate, generators)
            if fitted is None:
                continue
            return HostFit(candidate, fitted, generators == "auto" or not fitted.sizes.generators,
                           _host_summary(fitted, candidate, available, generators == "auto", linear_dtype))
    need = unbounded.host.memory_bytes - unbounded.host.free_bytes
    need_text = f"{format_gb(need)} (its weights, an {LOAD_KV_TOKENS:,}-token KV cache and {LOAD_HOST_RESERVE} for this process)"
    raise PlanError(
        f"the model does not fit in this machine's memory: loaded on the CPU in {candidates[-1]} with "
        f"{_experts_text(expert_dtype)} and {_linears_text(linear_dtype)} it needs {need_text}, and "
        f"{format_gb(available)} is available now. Try "
        + ", ".join(_shrink_tips(candidates[-1], expert_dtype, linear_dtype) + ["a machine with more memory or a GPU"])
        + " (python -m engine.plan --gpus none shows the sizes).")


def with_measured_speed(fit: HostFit, linear_dtype: str = "bf16") -> HostFit:
    """`fit` with the decode speed to expect added to its summary: the planner's CPU prediction with this
    host's streaming rates measured now (before the load, while the memory is free), for loads of at least
    MEASURE_RATES_MIN_BYTES; `fit` unchanged for smaller ones or without the native kernels."""
    h = fit.plan.host
    if h.memory_bytes - h.free_bytes - h.reserve_bytes < MEASURE_RATES_MIN_BYTES:
        return fit
    rates = measure_rates(fit.plan.expert_dtype, linear_dtype, fit.dtype, available=host_available_bytes())
    if rates is None:
        return fit
    pred = predict_decode(fit.plan, RooflineParams(cpu_expert_gbs=rates.cpu_expert_gbs, cpu_weight_gbs=rates.cpu_weight_gbs))
    return replace(fit, summary=f"{fit.summary}; predicted decode {pred.tokens_per_s:.1f} tokens/s at "
                                f"{pred.params.context_tokens:,} tokens of context ({rates.describe()})")


def _experts_text(expert_dtype: str) -> str:
    return "unquantised experts" if expert_dtype == "bf16" else f"{expert_dtype} experts"


def _linears_text(linear_dtype: str) -> str:
    return "unquantised linears" if linear_dtype == "bf16" else f"{linear_dtype} linears"


def _shrink_tips(dtype: str, expert_dtype: str, linear_dtype: str) -> list[str]:
    """The load options that would make a CPU load smaller than this one."""
    return (([] if expert_dtype == "int4" else ["--expert-dtype int4"])
            + ([] if linear_dtype == "int8" else ["--linear-dtype int8"])
            + ([] if dtype != "fp32" else ["--dtype bf16"]))


def _host_summary(plan: Plan, dtype: str, available: int, with_generators: bool, linear_dtype: str) -> str:
    h = plan.host
    used = h.memory_bytes - h.free_bytes - h.reserve_bytes
    line = (f"everything on cpu ({dtype}, {_experts_text(plan.expert_dtype)}, {_linears_text(linear_dtype)}): "
            f"{format_gb(used)} of the {format_gb(available)} of host memory available at load, with an "
            f"{LOAD_KV_TOKENS:,}-token KV cache")
    if plan.sizes.generators and not with_generators:
        need = sum(m.nbytes for m in plan.sizes.generators)
        line += (f"; speech and image generation NOT loaded: their {format_gb(need)} do not fit beside the thinker "
                 f"(try {', '.join(_shrink_tips(dtype, plan.expert_dtype, linear_dtype) + ['more RAM'])})")
    return line


def runtime_options_for(plan: Plan, calibrate: bool = False) -> RuntimeOptions:
    """Hot-expert cache sized from the memory the plan leaves free on the first attention GPU (only
    when some experts live in host memory); `calibrate` (the engine passes it on CUDA) measures this
    machine's link, host and CPU rates at load, so that the fetch threshold is this machine's and not
    the planner's defaults (a second or two of the load)."""
    has_cpu_experts = any(d == CPU for le in plan.experts for d in le.device)
    if not has_cpu_experts or not plan.gpus:
        return RuntimeOptions()
    free = plan.gpus[plan.layer_home[0]].free_bytes
    capacity = int(CACHE_SHARE_OF_FREE_GPU * free // max(1, plan.sizes.bytes_per_expert))
    return RuntimeOptions(cache_capacity=max(0, min(MAX_CACHED_EXPERTS, capacity)), calibrate=calibrate)


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


__all__ = ["PLACEMENTS", "HostFit", "PlanError", "auto_plan", "fit_on_host", "fits_on_first_gpu", "host_available_bytes",
           "machine_devices", "placement_summary", "runtime_options_for", "with_measured_speed"]
