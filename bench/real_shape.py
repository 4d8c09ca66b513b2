"""The engine at the real Ming-flash-omni 2.0 shape: decode and prefill per placement, extrapolated to 32 layers.

    python bench/real_shape.py [--config DIR] [--layers 2,6] [--batches 1,8] [--prompt-tokens 512]
                               [--decode-steps 32] [--placements resident,fp8,int8,int4,cpu_only,offload,offload_fp8]
                               [--experts N] [--set KEY=VALUE ...] [--device cuda|cpu] [--repeats N] [--json]

No checkpoint is read: the LLM is built from the real config (``--config``, default the 2.0 config in
``../shared/fixtures/real_configs``) with fewer layers and random weights made on the device.

Method
------
* For each placement and each of two layer counts (``--layers``; layer 0 is the dense layer, the rest
  MoE), a fresh model; for each batch size (``--batches``) a random text prompt of ``--prompt-tokens``
  per row is prefilled (engine.generate.prefill, chunked as the engine does) and ``--decode-steps``
  greedy decode steps run as the engine runs them (engine.generate.DecodeStep: CUDA graphs where the
  model allows, the sampled ids read back a step late). Times are after a warm-up.
* Per-layer cost: the time of a step at the two layer counts gives the cost of one MoE layer (slope)
  and of everything else (intercept); the full model's step = intercept + 31 MoE layers. A larger layer
  count that did not time slower (the machine's noise above a layer's cost) is measured again
  (``--retries``); one still flat gives no per-layer figure, its row says ``unresolved``.
* Bytes per decode step: every non-expert weight, the routed experts a step touches (expected number of
  distinct experts for B tokens choosing top-k of E uniformly, which is what random weights route
  like), one embedding row per token and the KV cache read; against the memory bandwidth measured in
  the same run (a large device copy, read + write, and on the CPU also a read of it, the better; the
  better of a measurement before and one after the measurements).
* Host syncs per step (engine.tools.host_sync, the token read excluded) and, on CUDA, kernels per step
  and the share of the step the GPU is busy: the kernels' time in profiled steps (torch.profiler) over
  the step timed without the profiler (``gpu_busy_of_step``; the profiled steps' own wall,
  ``gpu_busy_fraction``, holds the profiler's cost: 0.13 where the kernels fill 0.93 of an H200 step),
  and the top kernels; on the CPU the dispatched ops per step.
* Placements: ``resident`` (every expert in the model dtype on the device), ``fp8`` / ``int8`` / ``int4``
  (the experts quantised, engine.placement.quant), ``cpu_only`` (the no-GPU plan: int4 experts and int8
  linears, on the CPU; beside it the planner's prediction for that plan with the bandwidth measured in the
  run as the host's peak and the run's context), ``offload`` / ``offload_fp8`` (the planner's plan for one
  80 GB GPU + 256 GB host: each MoE layer's experts split between the GPU and host memory as the plan
  splits the real layer, cold experts computed by the CPU through engine.placement.expert_runtime, or
  fetched to the GPU where more tokens route to one than the threshold derived from the transfer model,
  calibrated at load on CUDA as the engine does; no hot cache; on a machine without CUDA the GPU slot is
  simulated on the CPU, so only the code path is measured).
* ``--experts N`` keeps N of the 256 experts per layer (groups shrink, top-k stays): per-token work
  and bytes of a decode step are those of the real layer, memory is not (the CPU default is 32);
  ``--set KEY=VALUE`` overrides any other LLM config key (the CI smoke test shrinks the widths).
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.decode_graphs import DecodeGraphs, graph_blockers  # noqa: E402
from engine.generate import DecodeStep, TokenReader, prefill  # noqa: E402
from engine.models.thinker.config import LLMConfig, MingConfig  # noqa: E402
from engine.models.thinker.layers import Numerics  # noqa: E402
from engine.models.thinker.llm import BailingMoeV2ForCausalLM  # noqa: E402
from engine.models.thinker.model import int8_linears, pack_for_cpu  # noqa: E402
from engine.placement import quant  # noqa: E402
from engine.placement.expert_runtime import CPU, DeviceMap, ExpertPlacement, MoERuntime, RuntimeOptions  # noqa: E402
from engine.placement.host_rates import measure_rates  # noqa: E402
from engine.placement.planner import DeviceSpec, RooflineParams, plan_placement  # noqa: E402
from engine.sampling import GenerationParams, Sampler  # noqa: E402
from engine.tools.host_sync import HostSyncCounter  # noqa: E402

SHARED = Path(os.environ.get("MING_SHARED_DIR", REPO.parent / "shared"))
DEFAULT_CONFIG = SHARED / "fixtures" / "real_configs" / "ming-flash-omni-2.0"
PLACEMENTS = ("resident", "fp8", "int8", "int4", "cpu_only", "offload", "offload_fp8")
# the no-GPU plan (README): int4 experts, int8 linears, everything in 64 GB of host memory
CPU_ONLY_PLAN = dict(gpus="none", cpu_mem="64GB", expert_dtype="int4", linear_dtype="int8", host_reserve="3GB",
                     kv_tokens=8192)
CPU_ONLY_MEMORY = {"bf16": "64GB", "fp32": "128GB"}  # an fp32 load of that plan needs ~68 GB (engine.plan --dtype fp32)
QUANT_WIDTH = {"fp8": 1.0, "int8": 1.0, "int4": 0.5}  # bytes per expert weight (scales not counted: <= 1/32 more)
INIT_BLOCK = 1 << 24  # elements initialised at a time
OFFLOAD_DEVICES = ("80GB", "256GB")  # the planner's one-GPU case: 1 x 80 GB + 256 GB host memory


# ------------------------------------------------------------------------------------------------ model

def parse_overrides(items: list[str]) -> dict:
    """--set KEY=VALUE items -> {key: Python literal (or the string)}."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key or not value or key not in LLMConfig.__dataclass_fields__:
            raise SystemExit(f"--set takes KEY=VALUE with an LLM config key, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def bench_config(real: LLMConfig, layers: int, experts: int | None, overrides: dict) -> LLMConfig:
    """The real LLM config with `layers` layers, `experts` experts per layer (groups scaled) and overrides."""
    cfg = replace(real, num_hidden_layers=layers, **overrides)
    if experts and experts != cfg.num_experts:
        groups = cfg.n_group
        while experts % groups or experts // groups < 2:  # a group needs its top-2
            groups //= 2
        cfg = replace(cfg, num_experts=experts, n_group=groups, topk_group=max(1, min(cfg.topk_group, groups)))
    cfg.validate("bench config")
    return cfg


def random_llm(cfg: LLMConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> BailingMoeV2ForCausalLM:
    """The LLM with random weights made on `device` (norms ~1, expert bias U(-0.15, 0.15) in fp32,
    projections N(0, 1/fan_in))."""
    with torch.device("meta"):
        llm = BailingMoeV2ForCausalLM(cfg).to(dtype)
    llm = llm.to_empty(device=device).requires_grad_(False)  # as loaded models are (no autograd records)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if name.endswith("expert_bias"):
                p.data = torch.empty(p.shape, dtype=torch.float32, device=device).uniform_(-0.15, 0.15, generator=gen)
            else:  # in blocks: a bf16 normal_ draws through an fp32 copy of what it fills
                mean, std = (1.0, 0.1) if "norm" in name else (0.0, p.shape[-1] ** -0.5)
                for block in p.data.view(-1).split(INIT_BLOCK):
                    block.normal_(mean, std, generator=gen)
    return llm.eval()


def moe_banks(llm) -> dict[int, torch.nn.Module]:
    return {i: layer.mlp.experts for i, layer in enumerate(llm.model.layers) if layer.is_moe}


def offload_plan(real: MingConfig, expert_dtype: str):
    """The planner's plan for the real model on 1 x 80 GB + 256 GB host, and the share of each real MoE
    layer's experts it keeps on the GPU (in layer order)."""
    plan = plan_placement(real, DeviceSpec.parse(OFFLOAD_DEVICES[0], OFFLOAD_DEVICES[1]), expert_dtype)
    return plan, [sum(s != CPU for s in le.device) / len(le.device) for le in plan.experts]


def apply_placement(llm, placement: str, real: MingConfig, cfg: LLMConfig, device: torch.device) -> dict:
    """Quantise / offload the experts as `placement` says; returns notes for the table."""
    notes: dict = {}
    expert_dtype = {"fp8": "fp8", "int8": "int8", "int4": "int4", "cpu_only": CPU_ONLY_PLAN["expert_dtype"],
                    "offload_fp8": "fp8"}.get(placement, "bf16")
    if placement == "cpu_only":
        if device.type != "cpu":
            raise SystemExit("the cpu_only placement is the no-GPU plan: run it with --device cpu")
        notes["int8_linears"] = int8_linears(llm)
    if expert_dtype != "bf16":
        for bank in moe_banks(llm).values():
            quant.quantize_bank_(bank, expert_dtype)
    if placement.startswith("offload"):
        # The plan keeps whole layers on the GPU or in host memory (uniform popularity), so the bench
        # measures host-resident layers (every expert computed by the CPU through the runtime) and the
        # full model combines them with the GPU-resident layers of the matching resident placement.
        plan, gpu_share = offload_plan(real, expert_dtype)
        dmap = DeviceMap.cuda(1) if device.type == "cuda" else DeviceMap.simulated(1)
        slots = {i: (CPU,) * cfg.num_experts for i in moe_banks(llm)}
        # As the engine runs the plan (engine.placement.auto.runtime_options_for: on CUDA the transfer model
        # calibrated at load, each expert fetched to the GPU when more tokens than the derived threshold
        # route to it, so a long prefill streams experts), less the hot cache: a 2- to 6-layer model's
        # experts would all fit in it, the real model's do not.
        rt = MoERuntime.attach(llm, ExpertPlacement(slots, {i: 0 for i in slots}),
                               RuntimeOptions(device_map=dmap, cache_capacity=0, calibrate=device.type == "cuda"))
        layer = next(iter(rt.layers.values()))
        t = rt.transfer
        notes.update(experts_on_gpu=sum(gpu_share) / len(gpu_share), layer_gpu_share=gpu_share,
                     planner_decode_tokens_per_s=plan.prediction.tokens_per_s,
                     fetch_threshold_tokens=rt.threshold(layer, MoERuntime._activation_dtype(llm, rt).itemsize),
                     transfer_model=(f"{'calibrated' if device.type == 'cuda' else 'defaults'}: link {t.pcie_gbs:.1f} GB/s, "
                                     f"host {t.host_gbs:.1f} GB/s, CPU {t.cpu_gflops:.0f} GFLOP/s, hop {t.hop_latency_us:.0f} us"),
                     planner_prefill_note="no hot cache; an expert with more tokens than the threshold is fetched",
                     simulated_gpu=device.type != "cuda")
    elif device.type == "cpu":  # as the engine's CPU load lays the weights out (engine.models.thinker.model)
        if expert_dtype != "bf16":  # int8 (fp8 re-quantised to int8): the native decode pass, torch's GEMMs
            for bank in moe_banks(llm).values():
                bank.pack_for_cpu(next(llm.parameters()).dtype)
        notes["cpu_packed"] = pack_for_cpu(llm)
    return notes


# ------------------------------------------------------------------------------------------------ figures

def memory_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large copy on `device` (read + write), best of several; on the CPU the best of that and of
    reads of the same buffer (an fp32 sum, a GEMV), as bench/moe_layer_cpu.py measures: a decode step only
    reads, and a CPU's copy also pays for its writes' cache-line fills (the copy alone gave a bandwidth
    fraction of 1.20, int4 experts at batch 1)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 28)  # elements (bf16): 2 GiB / 512 MiB, above the caches
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)

    def best_time(fn) -> float:
        best = float("inf")
        for _ in range(5 if device.type == "cuda" else 3):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t)
        return best

    nbytes = src.numel() * src.element_size()
    rate = 2 * nbytes / best_time(lambda: dst.copy_(src))
    if device.type == "cpu":  # (the bf16 buffer's bytes read as fp32: torch's bf16 sum is not a streaming read)
        words = src.view(torch.float32)
        matrix, vector = words.view(-1, 4096), torch.ones(4096)
        rate = max(rate, nbytes / best_time(lambda: words.sum()), nbytes / best_time(lambda: torch.mv(matrix, vector)))
    del src, dst
    release_memory(device)
    return rate


def release_memory(device: torch.device) -> None:
    """Give a dropped model's memory back (the next one is as large): caching allocator on CUDA, the C
    heap on the host (glibc keeps freed medium-sized blocks otherwise)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_bytes(llm, cfg: LLMConfig, batch: int, context: int) -> float:
    """Expected bytes a decode step reads (see module doc)."""
    total = 0.0
    for name, p in llm.named_parameters():
        if p.is_meta or ".experts." in name or name.startswith("model.word_embeddings"):
            continue
        total += p.numel() * p.element_size()
    for mod in llm.modules():  # oneDNN-packed and int8 projections hold their weight outside the parameters
        packed = getattr(mod, "packed", None)
        if isinstance(packed, torch.Tensor):
            total += packed.numel() * packed.element_size()
        elif isinstance(getattr(packed, "q", None), torch.Tensor):  # int8 (--linear-dtype int8): bytes + scales
            total += sum(t.numel() * t.element_size() for t in (packed.q, packed.scale))
    emb = llm.model.word_embeddings.weight
    total += batch * emb.shape[1] * emb.element_size()
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    distinct = e * (1 - (1 - k / e) ** batch)
    for bank in moe_banks(llm).values():
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        width = QUANT_WIDTH.get(bank.expert_dtype, torch.finfo(torch.bfloat16).bits // 8)
        if bank.packed is None and bank.runtime is None and not bank.gate_proj.is_meta:
            width = bank.gate_proj.element_size()
        total += distinct * per_expert * width
    kv_width = torch.tensor([], dtype=next(llm.parameters()).dtype).element_size()
    total += cfg.num_hidden_layers * batch * context * 2 * cfg.num_key_value_heads * cfg.head_dim * kv_width
    return int(total)


def profile_steps(run_step, device: torch.device, n: int) -> dict:
    """Host syncs / dispatched ops per step; on CUDA kernels per step and the GPU's busy share."""
    out = {}
    with HostSyncCounter() as c:
        for _ in range(n):
            run_step()
    out["host_syncs_per_step"] = c.count.total / n
    out["dispatched_ops_per_step"] = c.count.ops / n
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        sync(device)
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                run_step()
            sync(device)
        wall = time.perf_counter() - t
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["kernels_per_step"] = sum(e.count for e in kernels if not e.key.startswith(("Memcpy", "Memset"))) / n
        busy = sum(e.self_device_time_total for e in kernels) * 1e-6  # us -> s
        out["gpu_busy_fraction"] = busy / wall if wall > 0 else 0.0
        out["gpu_kernel_ms_per_step"] = 1e3 * busy / n
        out["profiled_step_ms"] = 1e3 * wall / n  # the profiler's own cost included: busy is a lower bound
        # where the GPU's time goes: the kernels taking most of it, and the time the GPU runs anything
        # (the union of the kernels' intervals) against the time from the first kernel's start to the last's end
        out["top_kernels"] = [{"name": e.key[:80], "per_step": e.count / n, "us_per_step": e.self_device_time_total / n}
                              for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]]
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
        if spans:
            covered, end = 0.0, spans[0][0]
            for a, b in spans:
                covered += max(0.0, b - max(a, end))
                end = max(end, b)
            out["gpu_active_fraction_of_span"] = covered / (end - spans[0][0]) if end > spans[0][0] else 0.0
    return out


def measure(llm, cfg: LLMConfig, numerics: Numerics, device: torch.device, batch: int, prompt: int, steps: int,
            use_graphs: bool) -> dict:
    capacity = prompt + 3 * steps + 16
    graphs = DecodeGraphs(llm, numerics, max_tokens=capacity) if use_graphs and not graph_blockers(llm) else None
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, min(cfg.vocab_size, cfg.image_patch_token), (batch, prompt), generator=gen).to(device)
    positions = torch.arange(prompt, device=device).view(1, 1, -1).expand(3, batch, -1)
    cache = graphs.acquire(batch) if graphs is not None else llm.new_cache(batch, numerics, device, capacity=capacity)
    result = {"batch": batch, "graphs": graphs is not None}
    with torch.inference_mode():
        embeds = llm.model.embed(ids)
        times = []
        for _ in range(3):  # a warm-up, then the best of two
            cache.reset()
            cache.rope_deltas = torch.zeros(batch, 1, dtype=torch.long, device=device)
            sync(device)
            t = time.perf_counter()
            pre = prefill(llm, numerics, cache, embeds, positions)
            sync(device)
            times.append(time.perf_counter() - t)
        result["prefill_s"] = min(times[1:])
        head = llm.model.norm.weight.device
        sampler = Sampler(GenerationParams(), cfg.vocab_size, batch, head)
        step = DecodeStep(llm, numerics, cache, graphs)
        reader = TokenReader(head, batch)
        step.feed(sampler(pre.logits))

        def run_step():
            ids_n = sampler(step.step())
            step.feed(ids_n)
            return ids_n

        for _ in range(2):  # warm-up (graph captures)
            reader.wait(reader.push(run_step()))
        best = float("inf")
        for _ in range(2):  # the best of two timed runs of `steps` steps
            sync(device)
            t = time.perf_counter()
            pending = reader.push(run_step())
            for _ in range(steps - 1):  # the engine's loop: queue the next step, then read the previous ids
                nxt = reader.push(run_step())
                reader.wait(pending)
                pending = nxt
            reader.wait(pending)
            best = min(best, (time.perf_counter() - t) / steps)
        result["decode_step_s"] = best
        result.update(profile_steps(run_step, device, min(4, max(1, steps // 4))))
        if "gpu_kernel_ms_per_step" in result:  # the kernels' time against the step timed without the profiler
            result["gpu_busy_of_step"] = result["gpu_kernel_ms_per_step"] / (1e3 * best)
        result["context"] = cache.length
    if graphs is not None and graphs.failure:  # a refused capture: the steps ran eagerly (engine.decode_graphs)
        result.update(graphs=False, graphs_failure=graphs.failure[:500])
    if graphs is None:
        cache.free()
    return result


# ------------------------------------------------------------------------------------------------ main

def measure_model(spec: dict) -> tuple[dict, dict[int, dict]]:
    """Build one model (placement, layer count) and measure it at every batch size: (notes, {batch: figures})."""
    device, dtype = torch.device(spec["device"]), {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    real = MingConfig.from_file(Path(spec["config"]))
    cfg = bench_config(real.llm, spec["layers"], spec["experts"], spec["overrides"])
    llm = random_llm(cfg, device, dtype)
    notes = apply_placement(llm, spec["placement"], real, cfg, device)
    numerics = Numerics.reference(dtype)
    meas = {}
    for b in spec["batches"]:
        meas[b] = measure(llm, cfg, numerics, device, b, spec["prompt"], spec["steps"], spec["graphs"])
        meas[b]["bytes_per_step"] = step_bytes(llm, cfg, b, meas[b]["context"])
    del llm
    release_memory(device)
    notes["peak_host_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return notes, meas


class MeasurementFailed(RuntimeError):
    """A placement's measuring process failed (its stderr's end in the message)."""


def model_in_subprocess(spec: dict) -> tuple[dict, dict[int, dict]]:
    """measure_model in a fresh process, so that each model's memory goes back to the system when it ends."""
    out = subprocess.run([sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--worker",
                          json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise MeasurementFailed(f"the measurement of {spec['placement']} at {spec['layers']} layers failed:\n"
                                f"{out.stderr[-3000:]}")
    notes, meas = json.loads(out.stdout.strip().splitlines()[-1])
    return notes, {int(b): m for b, m in meas.items()}


TIMED = ("prefill_s", "decode_step_s")


def fastest(first: dict[int, dict], second: dict[int, dict]) -> dict[int, dict]:
    """Per batch, the first measurement with each of its times (TIMED) the smaller of the two's."""
    return {b: {**m, **{key: min(m[key], second[b][key]) for key in TIMED}} for b, m in first.items()}


def fit(a: dict, b: dict, key: str, n_moe: tuple[int, int], full_moe: int) -> tuple[float, float]:
    """(per MoE layer, full model) for a figure measured at two MoE-layer counts."""
    slope = (b[key] - a[key]) / (n_moe[1] - n_moe[0])
    return slope, a[key] + (full_moe - n_moe[0]) * slope


FITTED = {"decode_step_s": "decode", "prefill_s": "prefill"}  # the timed figures a per-layer cost is fitted to


def flat_figures(fewer: dict, more: dict) -> list[str]:
    """The timed figures of one batch not larger at the larger layer count: the machine's noise exceeded a
    layer's cost, and a slope fitted through them would be zero or negative (a negative time per layer)."""
    return [name for key, name in FITTED.items() if more[key] <= fewer[key]]


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    real = MingConfig.from_file(Path(args.config))
    cpu = device.type == "cpu"
    layers = [int(x) for x in (args.layers or ("2,4" if cpu else "2,6")).split(",")]
    if len(layers) != 2 or layers[0] >= layers[1] or layers[0] < 2:
        raise SystemExit("--layers takes two increasing layer counts of at least 2 (layer 0 is dense)")
    experts = args.experts if args.experts is not None else (32 if cpu else None)
    prompt = args.prompt_tokens or (32 if cpu else 512)
    steps = args.decode_steps or (8 if cpu else 32)
    batches = [int(x) for x in args.batches.split(",")]
    overrides = parse_overrides(args.set)
    full_layers = real.llm.num_hidden_layers
    earlier = base_rows(args.base_rows, prompt)  # read first: a bad file is said before the measurements, not after
    bandwidth = memory_bandwidth(device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "dtype": args.dtype, "layers": layers, "full_layers": full_layers, "experts": experts or real.llm.num_experts,
           "prompt_tokens": prompt, "decode_steps": steps, "memory_bytes_per_s": bandwidth,
           "torch_threads": torch.get_num_threads(), "rows": []}
    host_rates = []  # the CPU kernels' streaming rates, measured around each cpu_only placement
    placements = args.placements.split(",")
    unknown = [p for p in placements if p not in PLACEMENTS]
    if unknown:  # said before anything is measured
        raise SystemExit(f"unknown placement {unknown[0]!r}; choose from {PLACEMENTS}")
    out["failed"] = []  # placements whose measurement failed: the others are still measured and reported
    for placement in placements:
        if placement == "cpu_only":
            host_rates.append(measure_rates(CPU_ONLY_PLAN["expert_dtype"], CPU_ONLY_PLAN["linear_dtype"], args.dtype))
        per_count = {}

        def measure_round() -> None:  # the two layer counts alternate, so that a slow spell of a shared
            for n in layers:          # machine does not fall on one of them only; the fastest of each counts
                cfg = bench_config(real.llm, n, experts, overrides)
                spec = {"config": args.config, "layers": n, "experts": experts, "overrides": overrides,
                        "placement": placement, "device": str(device), "dtype": args.dtype, "batches": batches,
                        "prompt": prompt, "steps": steps, "graphs": not args.no_graphs}
                notes, meas = model_in_subprocess(spec) if args.isolate else measure_model(spec)
                print(json.dumps({"placement": placement, "layers": n, **{str(b): m for b, m in meas.items()}}),
                      file=sys.stderr, flush=True)
                if n in per_count:
                    meas = fastest(per_count[n][2], meas)
                per_count[n] = (cfg, notes, meas)

        try:
            for _ in range(args.repeats):
                measure_round()
            for retry in range(args.retries):  # a layer count not slower than the smaller one: noise won
                fewer, more = per_count[layers[0]][2], per_count[layers[1]][2]
                flat = [f"{name} at batch {b}" for b in batches for name in flat_figures(fewer[b], more[b])]
                if not flat:
                    break
                print(f"real_shape: {placement}: {', '.join(flat)}: {layers[1]} layers not slower than "
                      f"{layers[0]}; measuring again ({retry + 1} of {args.retries})", file=sys.stderr, flush=True)
                measure_round()
        except MeasurementFailed as e:
            print(str(e), file=sys.stderr, flush=True)
            out["failed"].append({"placement": placement, "error": str(e)[-1500:]})
            continue
        per_count = [per_count[n] for n in layers]
        if placement == "cpu_only":
            host_rates.append(measure_rates(CPU_ONLY_PLAN["expert_dtype"], CPU_ONLY_PLAN["linear_dtype"], args.dtype))
        (cfg_a, notes, meas_a), (cfg_b, _, meas_b) = per_count
        n_moe = (cfg_a.num_moe_layers, cfg_b.num_moe_layers)
        full_moe = max(0, full_layers - cfg_a.first_k_dense_replace)
        for b in batches:
            a, c = meas_a[b], meas_b[b]
            layer_s, step_s = fit(a, c, "decode_step_s", n_moe, full_moe)
            layer_pf, prefill_s = fit(a, c, "prefill_s", n_moe, full_moe)
            _, full_bytes = fit(a, c, "bytes_per_step", n_moe, full_moe)
            decode_ok, prefill_ok = layer_s > 0, layer_pf > 0  # else noise won over a layer's cost: no figure
            row = {"placement": placement, "batch": b, "graphs": c["graphs"],
                   "decode_ms_per_moe_layer": 1e3 * layer_s if decode_ok else None,
                   "decode_ms_full": 1e3 * step_s if decode_ok else None,
                   "decode_tokens_per_s_full": b / step_s if decode_ok else None,
                   "prefill_tokens_per_s_full": b * prompt / prefill_s if prefill_ok else None,
                   "prefill_ms_per_moe_layer": 1e3 * layer_pf if prefill_ok else None,
                   f"decode_ms_at_{layers[1]}_layers": 1e3 * c["decode_step_s"],
                   "bytes_per_step_full": full_bytes,
                   "bandwidth_fraction": full_bytes / step_s / bandwidth if decode_ok else None,
                   "_fixed_decode_ms": 1e3 * (a["decode_step_s"] - n_moe[0] * layer_s) if decode_ok else None,
                   "_fixed_prefill_ms": 1e3 * (a["prefill_s"] - n_moe[0] * layer_pf) if prefill_ok else None,
                   "_prompt": prompt,
                   "host_syncs_per_step": c["host_syncs_per_step"], "context": c["context"],
                   "host_syncs_per_moe_layer": (c["host_syncs_per_step"] - a["host_syncs_per_step"]) / (n_moe[1] - n_moe[0]),
                   "ops_per_moe_layer": (c["dispatched_ops_per_step"] - a["dispatched_ops_per_step"]) / (n_moe[1] - n_moe[0]),
                   **notes}
            flat = flat_figures(a, c)
            if flat:
                row["unresolved"] = (f"{' and '.join(flat)}: the step at {layers[1]} "
                                     f"layers was not slower than at {layers[0]} after {args.repeats + args.retries} "
                                     f"rounds (this machine's noise exceeds a layer's cost): no per-layer figure; "
                                     f"measure with more --decode-steps or --repeats, on a quieter machine")
            failure = c.get("graphs_failure") or a.get("graphs_failure")
            if failure:
                row["graphs_failure"] = failure
            if "kernels_per_step" in c:
                row["kernels_per_moe_layer"] = (c["kernels_per_step"] - a["kernels_per_step"]) / (n_moe[1] - n_moe[0])
                row["kernels_per_step"] = c["kernels_per_step"]
                for key in ("gpu_busy_fraction", "gpu_busy_of_step", "gpu_kernel_ms_per_step", "profiled_step_ms",
                            "top_kernels", "gpu_active_fraction_of_span"):
                    if key in c:
                        row[key] = c[key]
            out["rows"].append(row)
    # the bandwidth again after the measurements (a shared machine's moves): the better of the two
    start = bandwidth
    bandwidth = max(start, memory_bandwidth(device))
    out["memory_bytes_per_s"] = bandwidth
    for row in out["rows"]:
        if row["bandwidth_fraction"] is not None:
            row["bandwidth_fraction"] *= start / bandwidth
    combine_offload_rows(out["rows"], earlier)
    measured = [r for r in host_rates if r is not None]
    rates = (sum(r.cpu_expert_gbs for r in measured) / len(measured),
             sum(r.cpu_weight_gbs for r in measured) / len(measured)) if measured else None
    for row in out["rows"]:
        if row["placement"] == "cpu_only":
            row.update(cpu_only_prediction(real, bandwidth, row["context"], args.dtype, rates))
    return out


def cpu_only_prediction(real: MingConfig, bandwidth: float, context: int, dtype: str = "bf16",
                        rates: tuple[float, float] | None = None) -> dict:
    """The planner's decode predictions for the no-GPU plan (CPU_ONLY_PLAN) at the measured context, to
    set beside the measurement: with this run's copy bandwidth as the host's peak (the planner's default
    efficiency applies to it, as to a datasheet figure), and with `rates` (GB/s of the CPU kernels
    streaming int4 experts and int8 weights, measured just before and after the placement, averaged; what
    ``engine.plan --host-gbs measure`` measures)."""
    p = CPU_ONLY_PLAN

    def predict(roofline: RooflineParams) -> float:
        plan = plan_placement(real, DeviceSpec.parse(p["gpus"], CPU_ONLY_MEMORY[dtype]), p["expert_dtype"],
                              kv_tokens=p["kv_tokens"], host_reserve=p["host_reserve"], linear_dtype=p["linear_dtype"],
                              roofline=roofline, dtype=dtype)
        return plan.prediction.tokens_per_s

    flags = f"--gpus none --cpu-mem {CPU_ONLY_MEMORY[dtype]} --expert-dtype int4 --linear-dtype int8 --dtype {dtype} --context {context}"
    out = {"planner_decode_tokens_per_s": predict(RooflineParams(host_gbs=bandwidth / 1e9, context_tokens=context)),
           "planner_note": f"engine.plan {flags} --host-gbs {bandwidth / 1e9:.1f}"}
    if rates is not None:
        out["planner_measured_decode_tokens_per_s"] = predict(RooflineParams(
            context_tokens=context, cpu_expert_gbs=rates[0], cpu_weight_gbs=rates[1]))
        out["planner_measured_note"] = (f"engine.plan {flags} --host-gbs measure (this run: int4 experts "
                                        f"{rates[0]:.1f} GB/s, int8 weights {rates[1]:.1f} GB/s)")
    return out


BASE_OF = {"offload": "resident", "offload_fp8": "fp8"}  # the GPU-resident placement an offload row mixes with


def base_rows(paths: list[str], prompt: int) -> list[dict]:
    """The resident / fp8 rows of earlier runs' --json output (--base-rows), for offload rows measured alone;
    only a run at the same prompt length (a prefill's per-layer cost depends on it)."""
    out = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            rows, their_prompt = data["rows"], data["prompt_tokens"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--base-rows {path}: not the --json output of real_shape.py ({type(e).__name__}: {e})")
        if their_prompt != prompt:
            print(f"real_shape: --base-rows {path} measured a {their_prompt}-token prompt, this run {prompt}: "
                  f"its rows are not combined with this run's", file=sys.stderr, flush=True)
            continue
        out += [r for r in rows if r.get("placement") in BASE_OF.values() and "decode_ms_per_moe_layer" in r]
    return out


def combine_offload_rows(rows: list[dict], earlier: list[dict] = ()) -> None:
    """Offload rows measured host-resident MoE layers; with the resident placement of the same expert
    dtype in the run (or in `earlier`, an earlier run's rows at the same prompt), the full model is the
    plan's mix: fixed part + per real MoE layer share_gpu * resident layer + (1 - share_gpu) * host layer
    (decode and prefill)."""
    base_of = BASE_OF
    by_key = {(r["placement"], r["batch"]): r for r in earlier}
    by_key.update({(r["placement"], r["batch"]): r for r in rows})
    for r in rows:
        if r["placement"] not in base_of:
            continue
        base = by_key.get((base_of[r["placement"]], r["batch"]))
        r["host_layer_ms"] = r.pop("decode_ms_per_moe_layer")
        r["host_layer_prefill_ms"] = r.pop("prefill_ms_per_moe_layer")
        for key in ("decode_tokens_per_s_full", "prefill_tokens_per_s_full", "decode_ms_full", "bandwidth_fraction"):
            r.pop(key, None)
        if base is None:
            continue
        share = r["layer_gpu_share"]
        r["gpu_layers_from"] = f"{base['placement']} rows, {'CUDA graph replays' if base.get('graphs') else 'eager steps'}"
        if base.get("graphs") and not r.get("graphs"):  # an offload model's steps cannot be graphs: its GPU layers neither
            r["gpu_layers_from"] += " (optimistic: this model's steps run eagerly; measure both with --no-graphs)"
        mix = lambda gpu, host: sum(f * gpu + (1 - f) * host for f in share)  # noqa: E731
        parts = (r["_fixed_decode_ms"], base["decode_ms_per_moe_layer"], r["host_layer_ms"])
        if None not in parts:  # a figure left unresolved (noise) on either side gives no combination
            fixed, gpu_layer, host_layer = parts
            r["decode_ms_per_moe_layer"] = mix(gpu_layer, host_layer) / len(share)
            r["decode_ms_full"] = fixed + mix(gpu_layer, host_layer)
            r["decode_tokens_per_s_full"] = r["batch"] / (r["decode_ms_full"] * 1e-3)
        parts = (r["_fixed_prefill_ms"], base.get("prefill_ms_per_moe_layer"), r["host_layer_prefill_ms"])
        if None not in parts:
            fixed, gpu_layer, host_layer = parts
            r["prefill_tokens_per_s_full"] = r["batch"] * r["_prompt"] / ((fixed + mix(gpu_layer, host_layer)) * 1e-3)
    for r in rows:
        for key in [k for k in r if k.startswith("_")]:
            del r[key]
        if r["placement"] in base_of:
            r.pop("layer_gpu_share", None)


TABLE = (("placement", "placement", "{}"), ("batch", "batch", "{}"), ("graphs", "graphs", "{}"),
         ("ms/layer", "decode_ms_per_moe_layer", "{:.2f}"), ("host ms/layer", "host_layer_ms", "{:.2f}"), ("tok/s@full", "decode_tokens_per_s_full", "{:.2f}"),
         ("prefill tok/s@full", "prefill_tokens_per_s_full", "{:.1f}"), ("bw frac", "bandwidth_fraction", "{:.2f}"),
         ("syncs/step", "host_syncs_per_step", "{:.1f}"), ("syncs/layer", "host_syncs_per_moe_layer", "{:.1f}"),
         ("ops/layer", "ops_per_moe_layer", "{:.0f}"), ("kernels/layer", "kernels_per_moe_layer", "{:.0f}"),
         ("GPU busy", "gpu_busy_of_step", "{:.2f}"), ("planner tok/s", "planner_decode_tokens_per_s", "{:.1f}"),
         ("planner@measured tok/s", "planner_measured_decode_tokens_per_s", "{:.1f}"))


def print_table(out: dict) -> None:
    print(f"{out['device']} {out['dtype']}, layers {out['layers']} -> {out['full_layers']}, "
          f"{out['experts']} experts/layer, prompt {out['prompt_tokens']}, {out['decode_steps']} decode steps, "
          f"memory {out['memory_bytes_per_s'] / 1e9:.1f} GB/s (copy), {out['torch_threads']} threads")
    rows = [[head] + [("-" if r.get(key) is None else fmt.format(r[key])) for r in out["rows"]]
            for head, key, fmt in TABLE]
    widths = [max(len(c) for c in col) for col in rows]
    for i in range(len(out["rows"]) + 1):
        print("  ".join(col[i].rjust(w) if j else col[i].ljust(w) for j, (col, w) in enumerate(zip(rows, widths))))
    print("ms/layer: decode ms per MoE layer (fitted; offload: the plan's mix of resident and host layers, "
          "host ms/layer: a layer whose experts are all computed by the CPU); tok/s@full, prefill tok/s@full: extrapolated to the full "
          "model; bw frac: bytes read per decode step / measured copy bandwidth; syncs/step: host syncs of a "
          "decode step (the token read excluded); per layer: per MoE layer; GPU busy: the kernels' time over the step "
          "timed without the profiler; planner tok/s: the planner's prediction for the real model on 1x80 GB + host (offload "
          "rows) or without a GPU at this run's bandwidth and context (cpu_only); planner@measured: the same with "
          "the CPU kernels' streaming rates measured around the cpu_only rows (engine.plan --host-gbs measure)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="checkpoint folder or config.json of the real model")
    ap.add_argument("--layers", default=None, help="two layer counts to fit over (default 2,6 on CUDA, 2,4 on CPU)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="per row (default 512 on CUDA, 32 on CPU)")
    ap.add_argument("--decode-steps", type=int, default=None, help="timed steps (default 32 on CUDA, 8 on CPU)")
    ap.add_argument("--placements", default=",".join(PLACEMENTS))
    ap.add_argument("--experts", type=int, default=None, help="experts per layer (default: all on CUDA, 32 on CPU)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an LLM config key")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-graphs", action="store_true", help="run every decode step eagerly")
    ap.add_argument("--in-process", dest="isolate", action="store_false",
                    help="measure every model in this process (default: one fresh process per model)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure each layer count this many times, alternating; the fastest counts (a shared "
                         "machine's slow spells otherwise bend the per-layer fit)")
    ap.add_argument("--retries", type=int, default=2,
                    help="rounds added while a step at the larger layer count is not slower than at the smaller "
                         "(noise larger than a layer's cost); a figure still unresolved is reported as such")
    ap.add_argument("--base-rows", action="append", default=[], metavar="FILE",
                    help="an earlier run's --json output: its resident / fp8 rows complete the offload rows here "
                         "(repeatable; a later file's row of the same placement and batch wins)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.retries < 0:
        ap.error("--retries must be 0 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure_model(json.loads(args.worker))))
        return 0
    if not Path(args.config).exists():
        print(f"real_shape: no config at {args.config} (pass --config)", file=sys.stderr)
        return 2
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
        for r in out["rows"]:
            if "unresolved" in r:
                print(f"UNRESOLVED {r['placement']} batch {r['batch']}: {r['unresolved']}")
        for f in out["failed"]:
            print(f"FAILED {f['placement']}: {f['error'].strip().splitlines()[-1]}")
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
