"""Fitting a checkpoint on this machine (engine.placement.auto) and Engine.load's placement option."""

from __future__ import annotations

import pytest
import torch

from engine.models.thinker.config import MingConfig
from engine.events import Done
from engine.placement.expert_runtime import CPU, DeviceMap, RuntimeOptions
from engine.placement import auto
from engine.placement.auto import (LOAD_HOST_RESERVE, LOAD_KV_TOKENS, auto_plan, fit_on_host, fits_on_first_gpu,
                                   host_available_bytes, machine_devices, placement_summary, runtime_options_for)
from engine.placement.planner import DeviceSpec, GPUSpec, PlanError, model_sizes, plan_placement
from engine.runtime import Engine
from engine.sampling import GenerationParams
from tests.paths import real_config


@pytest.fixture(scope="module")
def real_2_0():
    return MingConfig.from_file(real_config("ming-flash-omni-2.0"))


def test_the_real_model_on_one_80gb_gpu_needs_the_host(real_2_0):
    plan = auto_plan(real_2_0, DeviceSpec.parse("80GB", "256GB"))
    assert plan is not None and not fits_on_first_gpu(plan)
    where = {d for le in plan.experts for d in le.device}
    assert where == {0, CPU}
    line = placement_summary(plan, "cuda:0")
    assert "host memory (CPU compute)" in line and "predicted decode" in line


def test_a_model_that_fits_on_gpu0_is_not_planned(real_2_0, tiny_checkpoint):
    assert auto_plan(MingConfig.from_file(tiny_checkpoint), DeviceSpec.parse("80GB", "64GB")) is None
    assert placement_summary(None, "cuda:0") == "everything on cuda:0"


def test_too_little_memory_is_a_clear_error(real_2_0):
    with pytest.raises(PlanError):
        auto_plan(real_2_0, DeviceSpec.parse("8GB", "16GB"))


def test_hot_cache_only_when_experts_live_in_host_memory(tiny_checkpoint):
    cfg = MingConfig.from_file(tiny_checkpoint)
    s = model_sizes(cfg)
    non_expert = s.llm_bytes - s.routed_expert_bytes
    split = plan_placement(cfg, DeviceSpec((GPUSpec(non_expert + 10 * s.bytes_per_expert),), 10**9), kv_tokens=0,
                           gpu_reserve=0, host_reserve=0, encoders="cpu")
    assert any(d == CPU for le in split.experts for d in le.device)
    free = split.gpus[split.layer_home[0]].free_bytes
    assert runtime_options_for(split).cache_capacity == min(256, int(0.25 * free // s.bytes_per_expert))
    roomy = plan_placement(cfg, DeviceSpec.parse("1x80GB,1x80GB", "64GB"))
    assert runtime_options_for(roomy).cache_capacity == 0
    # the engine calibrates the fetch threshold on CUDA: only where experts live in host memory
    assert runtime_options_for(split, calibrate=True).calibrate and not runtime_options_for(split).calibrate
    assert not runtime_options_for(roomy, calibrate=True).calibrate


def test_machine_without_cuda(tiny_checkpoint):
    assert host_available_bytes() > 0
    if not torch.cuda.is_available():
        assert machine_devices() is None
    engine = Engine.load(tiny_checkpoint, dtype="fp32", device="cpu")  # placement="auto": nothing to plan
    assert engine.info().placement.startswith("everything on cpu") and engine.model.moe_runtime is None
    with pytest.raises(ValueError, match="placement"):
        Engine.load(tiny_checkpoint, device="cpu", placement="everywhere")


def test_engine_follows_a_plan_and_generates_the_same_reply(tiny_checkpoint):
    """A planner output with experts on two GPUs and the host (GPUs simulated by CPU devices here):
    Engine.load runs it through the expert runtime and the greedy reply is the plain engine's."""
    cfg = MingConfig.from_file(tiny_checkpoint)
    s = model_sizes(cfg)
    non_expert = s.llm_bytes - s.routed_expert_bytes
    devices = DeviceSpec((GPUSpec(non_expert + 10 * s.bytes_per_expert), GPUSpec(8 * s.bytes_per_expert)), 10**9)
    plan = plan_placement(cfg, devices, kv_tokens=0, gpu_reserve=0, host_reserve=0, encoders="cpu")
    assert {0, 1, CPU} <= {d for le in plan.experts for d in le.device}
    lines = []
    placed = Engine.load(tiny_checkpoint, dtype="fp32", device="cpu", placement=plan, log=lines.append,
                         runtime_options=RuntimeOptions(device_map=DeviceMap.simulated(2), fetch_threshold=-1))
    plain = Engine.load(tiny_checkpoint, dtype="fp32", device="cpu", placement="single")
    assert placed.model.moe_runtime is not None and lines and "GPU 1" in lines[0]
    msgs = [{"role": "user", "content": "Where do the experts live?"}]
    params = GenerationParams(max_new_tokens=16)
    a = [e for e in placed.chat(msgs, params) if isinstance(e, Done)][0]
    b = [e for e in plain.chat(msgs, params) if isinstance(e, Done)][0]
    assert a.token_ids == b.token_ids and a.stats.new_tokens == 16
    assert {"gpu0", "gpu1", "cpu"} <= set(placed.model.moe_runtime.stats.tokens)


def test_a_cpu_load_is_checked_against_the_memory_available(real_2_0):
    """No GPU: the planner decides before anything is read whether the model fits in the memory the host
    has now, and in which dtype (fp32, the CPU default, else bf16)."""
    roomy = fit_on_host(real_2_0, None, "int4", "int8", available=128 * 10**9)
    assert roomy.dtype == "fp32" and roomy.summary.startswith("everything on cpu (fp32, int4 experts, int8 linears)")
    plain = fit_on_host(real_2_0, None, "int4", "bf16", available=128 * 10**9)  # linears as loaded (fp32 here)
    assert plain.summary.startswith("everything on cpu (fp32, int4 experts, unquantised linears)")
    small = fit_on_host(real_2_0, None, "int4", "int8", available=64 * 10**9)
    assert small.dtype == "bf16" and small.plan.cpu_experts == 31 * 256  # fp32 does not fit in 64 GB, bf16 does
    with pytest.raises(PlanError, match="--dtype bf16"):
        fit_on_host(real_2_0, "fp32", "int4", "int8", available=64 * 10**9)  # asked for explicitly: refused
    with pytest.raises(PlanError) as e:
        fit_on_host(real_2_0, None, "bf16", "bf16", available=64 * 10**9)
    text = str(e.value)
    assert "64.00 GB is available" in text and "--expert-dtype int4" in text and "--linear-dtype int8" in text
    assert "--dtype" not in text  # bf16 was already tried
    with pytest.raises(PlanError) as e:
        fit_on_host(real_2_0, None, "int4", "int8", available=32 * 10**9)
    assert "--expert-dtype" not in str(e.value) and "more memory" in str(e.value)
    # int8 linears are quantised as they are read: the load needs no more than what it keeps (with the reserve)
    final = small.plan.host.memory_bytes - small.plan.host.free_bytes
    assert fit_on_host(real_2_0, "bf16", "int4", "int8", available=final).dtype == "bf16"
    with pytest.raises(PlanError, match="needs 61.09 GB"):
        fit_on_host(real_2_0, "bf16", "int4", "int8", available=final - 10**8)


def _thinker_need(cfg: MingConfig, dtype: str) -> int:
    plan = plan_placement(cfg, DeviceSpec((), 1 << 62), kv_tokens=LOAD_KV_TOKENS, host_reserve=LOAD_HOST_RESERVE,
                          generators="ignore", dtype=dtype)
    return plan.host.memory_bytes - plan.host.free_bytes


def test_engine_load_on_a_cpu_without_room_for_the_generators(tiny_checkpoint, monkeypatch):
    cfg = MingConfig.from_file(tiny_checkpoint)
    monkeypatch.setattr(auto, "host_available_bytes", lambda: _thinker_need(cfg, "fp32") + 1)
    lines = []
    engine = Engine.load(tiny_checkpoint, device="cpu", log=lines.append)
    assert engine.info().dtype == "float32" and not engine.has_talker and not engine.has_image_generator
    assert "NOT loaded" in engine.info().placement and "NOT loaded" in lines[0]
    assert "does not fit in host memory" in engine.talker_error
    msgs = [{"role": "user", "content": "Still there?"}]
    assert isinstance(list(engine.chat(msgs, GenerationParams(max_new_tokens=2)))[-1], Done)


def test_engine_load_on_a_cpu_picks_bf16_when_fp32_does_not_fit(tiny_checkpoint, monkeypatch):
    cfg = MingConfig.from_file(tiny_checkpoint)
    assert _thinker_need(cfg, "bf16") < _thinker_need(cfg, "fp32")
    monkeypatch.setattr(auto, "host_available_bytes", lambda: _thinker_need(cfg, "fp32") - 1)
    assert Engine.load(tiny_checkpoint, device="cpu").info().dtype == "bfloat16"


def test_engine_load_on_a_cpu_that_cannot_hold_it_fails_before_reading(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(auto, "host_available_bytes", lambda: 10**6)
    read = []
    with monkeypatch.context() as m:
        m.setattr("engine.runtime.load_model", lambda *a, **k: read.append(a))
        with pytest.raises(PlanError, match="does not fit in this machine's memory"):
            Engine.load(tiny_checkpoint, device="cpu", expert_dtype="int4", linear_dtype="int8")
    assert not read
    # placement="single" is not checked (the caller knows better)
    assert Engine.load(tiny_checkpoint, device="cpu", placement="single").info().placement.startswith("everything on cpu;")


def test_int4_experts_and_int8_linears_from_engine_load(tiny_checkpoint):
    engine = Engine.load(tiny_checkpoint, device="cpu", expert_dtype="int4", linear_dtype="int8")
    assert "int4 experts, int8 linears" in engine.info().placement
    msgs = [{"role": "user", "content": "A CPU-only Ming?"}]
    events = list(engine.chat(msgs, GenerationParams(max_new_tokens=3)))
    assert isinstance(events[-1], Done)


def test_a_large_cpu_load_says_the_speed_to_expect_here(tiny_checkpoint, monkeypatch):
    from engine.kernels import native
    from engine.placement import host_rates
    if not native.available():
        pytest.skip("the native CPU kernels are not built here (then no rates are measured)")
    monkeypatch.setattr(auto, "MEASURE_RATES_MIN_BYTES", 0)  # the tiny model stands in for a large one
    monkeypatch.setattr(host_rates, "matrix_bytes_for", lambda available=None: 4 << 20)
    placement = Engine.load(tiny_checkpoint, device="cpu", expert_dtype="int4", linear_dtype="int8").info().placement
    assert "predicted decode" in placement and "measured on this host: int4 experts stream at" in placement
    monkeypatch.setattr(auto, "MEASURE_RATES_MIN_BYTES", 1 << 40)  # a small model measures nothing
    assert "predicted decode" not in Engine.load(tiny_checkpoint, device="cpu").info().placement
