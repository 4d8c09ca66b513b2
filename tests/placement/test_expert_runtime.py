"""engine.placement.expert_runtime on CPU: several simulated GPU slots plus the host. Outputs equal the
single-device path bit for bit for several placements (one device, 2 GPUs + CPU, cache on/off,
fetches, quantised experts); dispatch statistics show where each block ran; the LFU cache policy and
the fetch threshold; public parity cases still pass when loaded through a real engine.placement.planner Plan."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import engine.tools.parity as parity
from engine import kernels
from engine.kernels import native
from engine.models.thinker.config import MingConfig
from engine.models.thinker.layers import ExpertBank, Numerics
from engine.placement import expert_runtime
from engine.placement.expert_runtime import (CPU, DeviceMap, ExpertPlacement, HotExpertCache, LayerRuntime, MoERuntime,
                                             RuntimeOptions, TransferModel)
from engine.placement.planner import DeviceSpec, GPUSpec, model_sizes, plan_placement
from engine.models.thinker.positions import PositionTokens, rope_index
from engine.kernels.moe import moe_experts_dequant_reference
from engine.placement.quant import bank_scales, quantize_bank_
from engine.models.thinker.model import load_model
from tests.paths import fixture_case

E, H, I = 8, 32, 24


class _Cfg:
    num_experts, hidden_size, moe_intermediate_size = E, H, I


class _Layer(nn.Module):
    def __init__(self, moe: bool):
        super().__init__()
        self.is_moe = moe
        self.mlp = nn.Module()
        if moe:
            self.mlp.experts = ExpertBank(_Cfg)


class _ToyLLM(nn.Module):
    """The attributes MoERuntime uses: model.layers[i].is_moe and .mlp.experts."""

    def __init__(self, seed=0):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Layer(False), _Layer(True), _Layer(True)])
        torch.manual_seed(seed)
        for p in self.parameters():
            p.requires_grad_(False)
            p.normal_(0, 0.2)

    def bank(self, i) -> ExpertBank:
        return self.model.layers[i].mlp.experts


def _inputs(t=40, k=3, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g).to(dtype)
    # skewed routing: expert 2 is hot, expert 7 never chosen
    probs = torch.tensor([1, 1, 8, 1, 2, 1, 3, 0], dtype=torch.float)
    ids = torch.stack([torch.multinomial(probs, k, generator=g) for _ in range(t)])
    return x, ids, torch.rand(t, k, generator=g) * 2.5


def _reference(llm, layer, x, ids, w):
    b = llm.bank(layer)
    return kernels.moe_experts_reference(x, b.gate_proj, b.up_proj, b.down_proj, ids, w)


SPLIT = {1: (0, 1, CPU, 0, CPU, 1, CPU, CPU), 2: (CPU, CPU, 1, 1, 0, 0, CPU, 0)}
PLACEMENTS = {
    "one_gpu": (ExpertPlacement.uniform([1, 2], E, 0), 1, dict(cache_capacity=0)),
    "all_cpu_no_cache": (ExpertPlacement.uniform([1, 2], E, CPU), 1, dict(cache_capacity=0, fetch_threshold=-1)),
    "split_no_cache": (ExpertPlacement(SPLIT, {1: 0, 2: 1}), 2, dict(cache_capacity=0, fetch_threshold=-1)),
    "split_fetch_only": (ExpertPlacement(SPLIT, {1: 0, 2: 1}), 2, dict(cache_capacity=0, fetch_threshold=4)),
    "split_cache": (ExpertPlacement(SPLIT, {1: 0, 2: 1}), 2, dict(cache_capacity=2, fetch_threshold=1000)),
}


@pytest.mark.parametrize("name", list(PLACEMENTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runtime_equals_single_device_path(name, dtype, monkeypatch):
    """Dispatch, staging and combine change nothing: bit for bit the single-device path, with every expert
    on torch's kernels (one token's host experts in one native call: test_one_token_host_experts_...)."""
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    placement, n_gpu, opts = PLACEMENTS[name]
    llm = _ToyLLM().to(dtype)
    steps = [_inputs(seed=s, dtype=dtype) for s in range(3)] + [_inputs(t=1, seed=9, dtype=dtype)]
    expected = {(l, s): _reference(llm, l, *steps[s]) for l in (1, 2) for s in range(len(steps))}
    rt = MoERuntime.attach(llm, placement, RuntimeOptions(device_map=DeviceMap.simulated(n_gpu), **opts))
    assert llm.bank(1).gate_proj.is_meta and llm.bank(1).runtime is rt.layers[1]
    for s in range(len(steps)):
        for l in (1, 2):
            assert torch.equal(llm.bank(l)(*steps[s]), expected[(l, s)]), (name, l, s)
    st = rt.stats
    total = sum(int(ids.numel()) for _, ids, _ in steps) * 2
    assert sum(st.tokens.values()) == total
    if name == "one_gpu":
        assert set(st.tokens) == {"gpu0"} and st.fetches == 0
    if name == "all_cpu_no_cache":
        assert set(st.tokens) == {"cpu"} and st.fetches == 0
    if name == "split_no_cache":
        slot_tokens = {}
        for l in (1, 2):
            for _, ids, _ in steps:
                for e in ids.flatten().tolist():
                    site = DeviceMap.name(SPLIT[l][e])
                    slot_tokens[site] = slot_tokens.get(site, 0) + 1
        assert st.tokens == slot_tokens and st.fetches == 0
    if name == "split_fetch_only":
        assert st.transient_fetches == st.fetches > 0 and st.cache_hits == 0 and st.tokens.get("cpu", 0) > 0
    if name == "split_cache":
        assert st.cache_inserts > 0 and st.cache_hits > 0 and len(rt.cache.resident) <= 2
        assert st.evictions == st.cache_inserts - len(rt.cache.resident)


@pytest.mark.parametrize("name", ["one_gpu", "split_no_cache", "split_cache"])
def test_fused_gpu_experts_match_the_single_device_path(name):
    """On CUDA each GPU's resident experts run as one fused Triton call (here forced, under the
    interpreter, on simulated devices); sites, statistics and results match the per-expert path."""
    placement, n_gpu, opts = PLACEMENTS[name]
    llm = _ToyLLM()
    steps = [_inputs(seed=s) for s in range(3)] + [_inputs(t=1, seed=9)]
    expected = {(l, s): _reference(llm, l, *steps[s]) for l in (1, 2) for s in range(len(steps))}
    per_expert = MoERuntime.attach(_ToyLLM(), placement, RuntimeOptions(device_map=DeviceMap.simulated(n_gpu), **opts))
    rt = MoERuntime.attach(llm, placement, RuntimeOptions(device_map=DeviceMap.simulated(n_gpu),
                                                          fused_gpu_experts="triton", **opts))
    gpu_slots = {s for l in (1, 2) for s in placement.slots[l] if s != CPU}
    assert set(rt.layers[1].fused) | set(rt.layers[2].fused) == gpu_slots
    fused = rt.layers[1].fused[0]
    e0 = int((fused.local_index >= 0).nonzero()[0])
    w = rt.layers[1].experts[e0]  # resident experts are views into the stacks, not second copies
    assert w.gate.untyped_storage().data_ptr() == fused.gate.untyped_storage().data_ptr()
    for s in range(len(steps)):
        for l in (1, 2):
            got, want = llm.bank(l)(*steps[s]), expected[(l, s)]
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (name, l, s, (got - want).abs().max())
            per_expert.layers[l](*steps[s])
    assert rt.stats.tokens == per_expert.stats.tokens
    assert (rt.stats.cache_hits, rt.stats.fetches) == (per_expert.stats.cache_hits, per_expert.stats.fetches)


def test_a_layer_wholly_in_one_fused_slot_is_one_call_and_graph_capturable():
    """On the H200 the runtime's all-GPU layer took 1.14 ms at one token against the bare kernel's 0.23: it
    grouped the routing on the host (reads of the device) before its one fused call. A layer whose experts
    all sit in one fused slot now goes straight to that call; on a single GPU it is sync-free, so a decode
    step of such layers can be a CUDA graph (ExpertBank.sync_free, engine.decode_graphs)."""
    from engine.tools.host_sync import HostSyncCounter

    placement, n_gpu, opts = PLACEMENTS["one_gpu"]
    llm = _ToyLLM()
    x, ids, w = _inputs(t=1, seed=9)
    want = _reference(llm, 1, x, ids, w)
    rt = MoERuntime.attach(llm, placement, RuntimeOptions(device_map=DeviceMap.simulated(n_gpu),
                                                          fused_gpu_experts="triton", **opts))
    assert rt.layers[1].whole_slot == 0 and llm.bank(1).sync_free
    with HostSyncCounter() as c:
        got = llm.bank(1)(x, ids, w)
    assert c.count.total == 0, dict(c.count.syncs)  # (the general path reads the routing: 1)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5) and rt.stats.tokens == {"gpu0": ids.numel()}
    assert llm.bank(1)(x[:0], ids[:0], w[:0]).shape == (0, H)  # (no token: the kernel's empty result)
    split, n_gpu, opts = PLACEMENTS["split_no_cache"]  # host experts, or two GPUs: the general path
    other = _ToyLLM()
    rt = MoERuntime.attach(other, split, RuntimeOptions(device_map=DeviceMap.simulated(n_gpu),
                                                        fused_gpu_experts="triton", **opts))
    assert rt.layers[1].whole_slot is None and not other.bank(1).sync_free


def test_fused_mode_is_validated():
    with pytest.raises(ValueError, match="fused_gpu_experts"):
        RuntimeOptions(fused_gpu_experts="sometimes")


def test_fetch_decision_follows_the_threshold():
    llm = _ToyLLM()
    x, _, w = _inputs(t=6, k=1)
    ids = torch.tensor([[2], [2], [2], [2], [4], [0]])  # expert 2: 4 tokens, 4 and 0: one each
    placement = ExpertPlacement.uniform([1, 2], E, CPU, cache_slot=0)
    ref = _reference(llm, 1, x, ids, w)
    rt = MoERuntime.attach(llm, placement, RuntimeOptions(device_map=DeviceMap.simulated(1), fetch_threshold=3))
    assert torch.equal(llm.bank(1)(x, ids, w), ref)
    assert rt.stats.fetches == 1 and rt.stats.tokens == {"gpu0": 4, "cpu": 2} and rt.stats.blocks["cpu"] == 2
    assert rt.stats.fetched_bytes == rt.layers[1].experts[2].nbytes


def test_quantized_experts_through_the_runtime():
    llm = _ToyLLM()
    for l in (1, 2):
        quantize_bank_(llm.bank(l), "fp8")
    b = llm.bank(1)
    steps = [_inputs(seed=s) for s in range(3)]
    expected = [moe_experts_dequant_reference(x, b.gate_proj, b.up_proj, b.down_proj, bank_scales(b), ids, w)
                for x, ids, w in steps]
    rt = MoERuntime.attach(llm, ExpertPlacement(SPLIT, {1: 0, 2: 1}),
                           RuntimeOptions(device_map=DeviceMap.simulated(2), cache_capacity=3, fetch_threshold=5,
                                          cpu_kernels=False))  # the reference semantics: dequantise per call
    assert llm.bank(1).expert_dtype == "fp8" and rt.layers[1].experts[0].quantized
    for s, (x, ids, w) in enumerate(steps):
        assert torch.equal(llm.bank(1)(x, ids, w), expected[s])
    # a fetch copies the fp8 bytes plus the scales, not a dequantised expert
    assert rt.stats.fetched_bytes == rt.stats.fetches * (3 * H * I + 4 * (2 * I + H))


@pytest.mark.parametrize("name", list(PLACEMENTS))
@pytest.mark.parametrize("tokens", [1, 40])
def test_a_layer_reads_the_device_once(name, tokens, monkeypatch):
    """On the H200 a host-resident layer cost 8 host syncs (a bincount, a nonzero, two reads back, tensors
    built from host numbers for the cache and the native call): each stalls the GPU's queue. The routing
    is read once now, everything else is host arithmetic on that (counted on the CPU as on a GPU)."""
    from engine.tools.host_sync import HostSyncCounter

    monkeypatch.setenv(native.DISABLE_ENV, "0")
    placement, n_gpu, opts = PLACEMENTS[name]
    llm = _ToyLLM()
    MoERuntime.attach(llm, placement, RuntimeOptions(device_map=DeviceMap.simulated(n_gpu), **opts))
    x, ids, w = _inputs(t=tokens, seed=5)
    for _ in range(2):  # (the second call with the cache warm, where there is one)
        with HostSyncCounter() as c:
            llm.bank(1)(x, ids, w)
        assert dict(c.count.syncs) == {"tolist": 1}, name


def test_lfu_cache_with_decay_and_hysteresis():
    c = HotExpertCache(capacity=2, decay=0.5, hysteresis=0.25)
    c.observe(1, {0: 4, 2: 2})
    assert c.admission((1, 0), set()) == (True, None)
    c.insert((1, 0), "w0", None)
    c.insert((1, 2), "w2", None)
    c.observe(1, {1: 3})  # scores: e0 2.0, e1 3.0, e2 1.0
    assert c.score((1, 1)) == 3.0 and c.score((1, 2)) == 1.0 and c.score((1, 3)) == 0.0 and c.score((2, 0)) == 0.0
    assert c.admission((1, 1), set()) == (True, (1, 2))          # replaces the least frequently used
    assert c.admission((1, 1), {(1, 2)}) == (True, (1, 0))       # ... unless it is in use this step
    assert c.admission((1, 1), {(1, 0), (1, 2)}) == (False, None)
    assert c.admission((1, 0), set()) == (False, None)           # already resident
    c.observe(1, {2: 1.6, 3: 2.4})                              # e0 1.0, e2 2.1, e3 2.4
    assert c.admission((1, 3), set()) == (True, (1, 0))
    c.observe(1, {0: 2})                                        # e0 2.5, e2 1.05, e3 1.2: 1.2 < 1.05 * 1.25
    assert c.admission((1, 3), set()) == (False, None)
    assert HotExpertCache(0).admission((1, 0), set()) == (False, None)


def test_fetch_threshold_from_bandwidths():
    tm = TransferModel()
    bf16 = 3 * 4096 * 1024 * 2
    fp8 = 3 * 4096 * 1024 + 4 * (2 * 1024 + 4096)
    assert tm.fetch_threshold(bf16, 4096, 1024, 2) == 10 and tm.fetch_threshold(fp8, 4096, 1024, 2) == 5

    def cpu_time(n, b, tm=tm):  # the costs the threshold compares: the host rate is a one-token call's
        eff = tm.efficiency * 1e9
        return (b / (tm.host_gbs * eff) + (n - 1) * 6 * 4096 * 1024 / (tm.cpu_gflops * eff)
                + 2 * tm.hop_latency_us * 1e-6 + n * 2 * 4096 * 2 / (tm.pcie_gbs * eff))

    def fetch_time(b, tm=tm):
        return b / (tm.pcie_gbs * tm.efficiency * 1e9) + tm.hop_latency_us * 1e-6

    for b in (bf16, fp8):
        n = tm.fetch_threshold(b, 4096, 1024, 2)
        assert cpu_time(n, b) <= fetch_time(b) < cpu_time(n + 1, b)
    assert TransferModel(pcie_gbs=64).fetch_threshold(bf16, 4096, 1024, 2) == 0  # PCIe faster than host RAM
    assert TransferModel(cpu_gflops=100).fetch_threshold(bf16, 4096, 1024, 2) < 10
    # the H200 host's calibration (link 54.2 GB/s, one-token CPU call 63.9 GB/s, 366 GFLOP/s, 24 us hops): a
    # one-token fp8 expert (held as int8) is computed where it is (the CPU's one-token rate counted the first
    # token's arithmetic twice, and the threshold was 0: every expert of every decode step was fetched)
    h200 = TransferModel(pcie_gbs=54.2, host_gbs=63.9, cpu_gflops=366, hop_latency_us=24, efficiency=1.0)
    assert h200.fetch_threshold(fp8, 4096, 1024, 2) == 1
    assert cpu_time(1, fp8, h200) <= fetch_time(fp8, h200) < cpu_time(2, fp8, h200)


def test_host_work_is_split_between_the_cpu_and_the_link_when_both_are_alike():
    fp8 = 3 * 4096 * 1024 + 4 * (2 * 1024 + 4096)
    h200 = TransferModel(pcie_gbs=54.2, host_gbs=63.9, cpu_gflops=366, hop_latency_us=24, efficiency=1.0)
    moved = h200.fetch_to_balance([1] * 8, 0, fp8, 4096, 1024, 2)
    assert len(moved) == 4  # a decode step's eight one-token experts: half copied while the CPU computes half
    link = len(moved) * h200.fetch_seconds(fp8)
    cpu = 24e-6 + (8 - len(moved)) * h200.cpu_seconds(1, fp8, 4096, 1024, 2)
    assert max(link, cpu) < 0.6 * (24e-6 + 8 * h200.cpu_seconds(1, fp8, 4096, 1024, 2))  # (all on the CPU)
    # a link already busy with fetched experts takes fewer; a slow link none; the largest blocks go first
    assert len(h200.fetch_to_balance([1] * 8, 4, fp8, 4096, 1024, 2)) == 2
    assert h200.fetch_to_balance([1] * 8, 0, fp8, 4096, 1024, 2) == moved
    assert TransferModel(pcie_gbs=1).fetch_to_balance([1] * 8, 0, fp8, 4096, 1024, 2) == set()
    assert h200.fetch_to_balance([1, 3, 1], 0, fp8, 4096, 1024, 2) == {1}
    assert h200.fetch_to_balance([], 0, fp8, 4096, 1024, 2) == set()


def test_placement_validation():
    llm = _ToyLLM()
    with pytest.raises(ValueError, match="lists 3 experts"):
        MoERuntime.attach(llm, ExpertPlacement({1: (0, 0, 0), 2: (0,) * E}),
                          RuntimeOptions(device_map=DeviceMap.simulated(1)))
    with pytest.raises(ValueError, match="GPU slot"):
        MoERuntime.attach(_ToyLLM(), ExpertPlacement.uniform([1, 2], E, 2),
                          RuntimeOptions(device_map=DeviceMap.simulated(1)))
    with pytest.raises(ValueError, match="no entry for MoE layer 2"):
        MoERuntime.attach(_ToyLLM(), ExpertPlacement({1: (0,) * E}), RuntimeOptions(device_map=DeviceMap.simulated(1)))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="simulated"):
            DeviceMap.cuda(1)


def _tiny_plan(case_dir):
    """A real planner output for the fixture model: layer 1 split over two GPUs, layer 2 on the CPU."""
    cfg = MingConfig.from_file(case_dir)
    s = model_sizes(cfg)
    non_expert = s.llm_bytes - s.routed_expert_bytes
    devices = DeviceSpec((GPUSpec(non_expert + 10 * s.bytes_per_expert), GPUSpec(8 * s.bytes_per_expert)), 10 ** 9)
    plan = plan_placement(cfg, devices, kv_tokens=0, gpu_reserve=0, host_reserve=0, encoders="cpu")
    used = {d for le in plan.experts for d in le.device}
    assert {0, 1, CPU} <= used
    return plan


@pytest.mark.parametrize("case", ["llm_b1", "mm"])
def test_public_parity_cases_through_a_plan(case, monkeypatch):
    case_dir = fixture_case(case)
    plan = _tiny_plan(case_dir)
    loaded = []

    def load(*a, **k):
        m = load_model(*a, **k, plan=plan, runtime_options=RuntimeOptions(
            device_map=DeviceMap.simulated(2), cache_capacity=3, fetch_threshold=2))
        loaded.append(m)
        return m

    monkeypatch.setattr(parity, "load_model", load)
    rows = parity.run_case(case_dir)
    bad = [r for r in rows if not r.ok]
    assert rows and not bad, parity.format_table(bad)
    assert {"logits", "decode_logits", "router.layer1.topk_ids"} <= {r.tensor for r in rows}
    st = loaded[0].moe_runtime.stats
    assert {"gpu0", "gpu1", "cpu"} <= set(st.tokens) and st.cache_hits > 0 and st.transient_fetches > 0


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_load_model_with_plan_equals_plain_load(tiny_checkpoint, kind):
    cfg = MingConfig.from_file(tiny_checkpoint)
    moe = [i for i in range(cfg.llm.num_hidden_layers) if cfg.llm.is_moe_layer(i)]
    slots = {l: tuple((e % 3) - 1 for e in range(cfg.llm.num_experts)) for l in moe}  # CPU, gpu0, gpu1, ...
    # the runtime computes quantised experts by dequantising them (the reference), as an unpacked load does
    plain = load_model(tiny_checkpoint, dtype="fp32", device="cpu", expert_dtype=kind, pack_cpu_experts=False)
    placed = load_model(tiny_checkpoint, dtype="fp32", device="cpu", expert_dtype=kind,
                        plan=ExpertPlacement(slots, {l: 0 for l in moe}),
                        runtime_options=RuntimeOptions(device_map=DeviceMap.simulated(2), cache_capacity=4))
    assert placed.expert_dtype == kind and placed.llm.model.layers[moe[0]].mlp.experts.expert_dtype == kind
    ids = torch.tensor([[5, 60, 70, 80, 90, 100, 110, 120, 7, 9, 11, 13]])
    num = Numerics()
    with torch.inference_mode():
        pos, _ = rope_index(ids, PositionTokens.from_config(plain.llm.config))
        a = plain.llm(plain.llm.model.embed(ids), pos, num)
        b = placed.llm(placed.llm.model.embed(ids), pos, num)
    # Same kernels on the same (aligned) data: bit-identical on every CPU. Before the runtime copied
    # the experts out of the memory-mapped checkpoint, its weights were only 8-byte aligned and
    # AVX-512 GEMV kernels summed in another order (max |diff| 1.7e-6 on an AMD EPYC).
    assert torch.equal(a, b)
    for layer_rt in placed.moe_runtime.layers.values():
        for w in layer_rt.experts:
            assert all(t.data_ptr() % 64 == 0 for t in w.tensors())
    n_params = functools.reduce(lambda acc, p: acc + p.numel(), placed.llm.parameters(), 0)
    assert n_params == sum(p.numel() for p in plain.llm.parameters())


def test_plan_places_non_expert_modules(tiny_checkpoint):
    """Layers go to their home slot, head to the head slot, embeddings/encoders to the host when the
    plan says so. The host here is the meta device so that the mapping is visible on a CPU machine."""
    from types import SimpleNamespace

    from engine.models.thinker.model import build_encoders, build_llm, place_non_expert_modules

    cfg = MingConfig.from_file(tiny_checkpoint)
    llm, enc = build_llm(cfg, "cpu"), build_encoders(cfg, "cpu")
    n = cfg.llm.num_hidden_layers
    plan = SimpleNamespace(layer_home=tuple(i % 2 for i in range(n)), head_home=1, embeddings="cpu", encoders="cpu")
    place_non_expert_modules(llm, enc, plan, DeviceMap((torch.device("cpu"), torch.device("cpu")), host="meta"))
    assert llm.model.word_embeddings.weight.device.type == "meta"
    assert all(p.device.type == "meta" for m in enc.components().values() for p in m.parameters())
    assert all(layer.device.type == "cpu" for layer in llm.model.layers)
    assert llm.model.layers[1].mlp.experts.gate_proj.device.type == "cpu"  # experts are left to the runtime


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_cpu_workers_and_fetch_window_keep_the_result(workers, monkeypatch):
    """Host-resident experts computed on 0 (inline), 1 or 3 worker threads while the calling thread
    computes the (simulated) GPU's experts, and fetches streamed 1 or 2 ahead: the same bits as the
    single-device path (the combine order does not depend on who computed what; torch's kernels
    everywhere, so that the bits can be compared)."""
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    placement = ExpertPlacement(SPLIT, {1: 0, 2: 1})
    llm = _ToyLLM()
    steps = [_inputs(seed=s) for s in range(3)] + [_inputs(t=1, seed=9)]
    expected = {(l, s): _reference(llm, l, *steps[s]) for l in (1, 2) for s in range(len(steps))}
    rt = MoERuntime.attach(llm, placement, RuntimeOptions(device_map=DeviceMap.simulated(2), cpu_workers=workers,
                                                          fetch_window=1 + workers % 2, fetch_threshold=30))
    buffers = []
    for s in range(len(steps)):
        for l in (1, 2):
            assert torch.equal(llm.bank(l)(*steps[s]), expected[(l, s)]), (workers, l, s)
        buffers.append(rt.layers[1].staging._buffers["inputs"].data_ptr())
    st = rt.stats
    assert st.tokens.get("cpu", 0) > 0 and st.fetches > 0
    # two activation transfers per layer call that has CPU work, however many experts it computes
    assert st.host_transfers == 2 * sum(1 for s in range(len(steps)) for l in (1, 2)
                                        if any(SPLIT[l][e] == CPU for e in steps[s][1].flatten().tolist()))
    assert len(set(buffers[:3])) == 1  # the staging buffer is reused (it grows only for more rows)
    rt.close()


def test_the_host_rate_follows_what_the_layers_cpu_jobs_reach_on_cuda():
    placement = ExpertPlacement(SPLIT, {1: 0, 2: 1})
    llm = _ToyLLM()
    rt = MoERuntime.attach(llm, placement, RuntimeOptions(device_map=DeviceMap.simulated(2), cache_capacity=2))
    lr, start = rt.layers[1], rt.transfer.host_gbs
    before = rt.threshold(lr, 4)
    rt.observe_cpu(10**9, 1.0)  # no CUDA here: the CPU's timings steer nothing
    assert rt.transfer.host_gbs == start
    rt._pin = True  # as on CUDA: a CPU three times slower than the model's host rate, observed five times
    for _ in range(5):
        rt.observe_cpu(int(start * rt.transfer.efficiency * 1e9 / 3), 1.0)
    assert rt.transfer.host_gbs < start / 1.5 and rt.threshold(lr, 4) <= before
    fixed = MoERuntime.attach(_ToyLLM(), placement, RuntimeOptions(device_map=DeviceMap.simulated(2), fetch_threshold=3))
    fixed._pin = True  # a threshold the caller fixed is kept
    fixed.observe_cpu(1, 1.0)
    assert fixed.transfer.host_gbs == start and fixed.threshold(fixed.layers[1], 4) == 3
    rt.close()
    fixed.close()


def test_calibration_measures_this_machine():
    placement = ExpertPlacement(SPLIT, {1: 0, 2: 1})
    llm = _ToyLLM()
    rt = MoERuntime.attach(llm, placement, RuntimeOptions(device_map=DeviceMap.simulated(2), calibrate=True,
                                                          cache_capacity=2))
    t = rt.transfer
    assert t is not rt.options.transfer and t.efficiency == 1.0
    for rate in (t.pcie_gbs, t.host_gbs, t.cpu_gflops, t.hop_latency_us):
        assert math.isfinite(rate) and rate > 0
    lr = rt.layers[1]
    assert rt.threshold(lr, 4) == t.fetch_threshold(lr.experts[0].nbytes, H, I, 4)
    x, ids, w = _inputs()
    assert torch.equal(llm.bank(1)(x, ids, w), _reference(_ToyLLM(), 1, x, ids, w))


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_calibration_times_the_cpu_path_the_runtime_takes(kind, monkeypatch):
    """On the H200 the calibration computed a host expert at 3.7 GB/s where bench/offload_gpu.py measured 61: a
    model without word embeddings (that benchmark's one-layer model) was calibrated with fp32 activations, so
    each call turned the bf16 expert into fp32 first; and quantised host experts were timed dequantising,
    not on the CPU kernels the runtime computes them with. Both skewed the fetch threshold."""
    seen = {}
    real = TransferModel.calibrate.__func__

    def spy(cls, device_map, expert, act_dtype, compute=None):
        seen.update(act_dtype=act_dtype, expert=expert, compute=compute)
        return real(cls, device_map, expert, act_dtype, compute)

    monkeypatch.setattr(TransferModel, "calibrate", classmethod(spy))
    llm = _ToyLLM().to(torch.bfloat16)
    if kind != "bf16":  # (quantised experts say nothing of the activations: the model's other weights do)
        llm.model.norm = nn.Parameter(torch.ones(H, dtype=torch.bfloat16), requires_grad=False)
        for l in (1, 2):
            quantize_bank_(llm.bank(l), kind)
    rt = MoERuntime.attach(llm, ExpertPlacement(SPLIT, {1: 0, 2: 1}),
                           RuntimeOptions(device_map=DeviceMap.simulated(2), calibrate=True))
    assert seen["act_dtype"] == torch.bfloat16  # (bf16: the experts' own dtype, the toy model has nothing else)
    x = torch.randn(3, H).to(torch.bfloat16)
    e = rt.layers[1].slots.index(CPU)
    assert seen["expert"] is rt.layers[1].experts[e]
    if kind == "bf16":
        assert seen["compute"] == seen["expert"].forward
    else:  # the int8 CPU kernel, computing what the dequantising forward computes
        assert seen["compute"] != seen["expert"].forward
        with torch.inference_mode():  # (as the runtime's CPU workers run it)
            torch.testing.assert_close(seen["compute"](x), seen["expert"].forward(x), atol=2e-2, rtol=2e-2)
    assert rt.transfer.host_gbs > 0 and rt.transfer.efficiency == 1.0


def _quantised_toy(kind):
    """The toy model with quantised experts, and a copy of layer 1's (values, scales) for the reference."""
    llm = _ToyLLM()
    for l in (1, 2):
        quantize_bank_(llm.bank(l), kind)
    b1 = llm.bank(1)
    return llm, (b1.gate_proj.clone(), b1.up_proj.clone(), b1.down_proj.clone(), tuple(s.clone() for s in bank_scales(b1)))


@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_fused_gpu_slots_run_quantised_experts_in_the_kernel(kind):
    """Quantised experts resident on a GPU are stacked (values and scales) and dequantised inside the
    fused Triton call (forced, under the interpreter, on simulated devices)."""
    llm, ref_w = _quantised_toy(kind)
    rt = MoERuntime.attach(llm, ExpertPlacement(SPLIT, {1: 0, 2: 1}),
                           RuntimeOptions(device_map=DeviceMap.simulated(2), fused_gpu_experts="triton",
                                          fetch_threshold=-1, cpu_kernels=False))
    fused = rt.layers[1].fused[0]
    assert fused.scales is not None and fused.gate.dtype == ref_w[0].dtype
    x, ids, w = _inputs(t=6)
    want = moe_experts_dequant_reference(x, *ref_w, ids, w)
    got = llm.bank(1)(x, ids, w)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_fetched_quantised_experts_run_the_fused_kernel_on_their_gpu(kind, monkeypatch):
    """A host-resident quantised expert copied to a GPU for a few tokens is computed there by the fused
    kernel over that one expert (no dequantised copies of its matrices); the layer's sum as before."""
    llm, ref_w = _quantised_toy(kind)
    rt = MoERuntime.attach(llm, ExpertPlacement(SPLIT, {1: 0, 2: 1}),
                           RuntimeOptions(device_map=DeviceMap.simulated(2), fused_gpu_experts="triton",
                                          fetch_threshold=0, cache_capacity=0, cpu_kernels=False))
    calls = []
    real = LayerRuntime._quantized_on_gpu
    monkeypatch.setattr(LayerRuntime, "_quantized_on_gpu",
                        staticmethod(lambda block, w: calls.append(block.shape[0]) or real(block, w)))
    monkeypatch.setattr(expert_runtime, "FETCH_STACK_EXPERTS", 0)  # one by one (as more experts than the stack)
    x, ids, w = _inputs(t=3)
    want = moe_experts_dequant_reference(x, *ref_w, ids, w)
    got = llm.bank(1)(x, ids, w)
    host_routed = {e for e in ids.flatten().tolist() if SPLIT[1][e] == CPU}
    assert rt.stats.fetches == len(host_routed) and len(calls) == len(host_routed)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    rt.close()


@pytest.mark.parametrize("kind", ["bf16", "fp8", "int4"])
def test_a_decode_steps_fetched_experts_are_computed_in_one_call_from_the_shared_stack(kind, monkeypatch):
    """A few tokens' transient fetches are copied into the runtime's fetch stack on the cache GPU and computed
    there in one fused call (ids mapped to the stack's rows); both layers share the stack; the sums are the
    reference's."""
    llm = _ToyLLM()
    if kind != "bf16":
        for l in (1, 2):
            quantize_bank_(llm.bank(l), kind)
    refs = {l: (llm.bank(l).gate_proj.clone(), llm.bank(l).up_proj.clone(), llm.bank(l).down_proj.clone(),
                tuple(s.clone() for s in bank_scales(llm.bank(l))) if kind != "bf16" else None) for l in (1, 2)}
    rt = MoERuntime.attach(llm, ExpertPlacement(SPLIT, {1: 0, 2: 0}),
                           RuntimeOptions(device_map=DeviceMap.simulated(2), fused_gpu_experts="triton",
                                          fetch_threshold=0, cache_capacity=0, cpu_kernels=False))
    calls, blocks = [], []
    real_call = expert_runtime.moe_experts_triton_call
    monkeypatch.setattr(expert_runtime, "moe_experts_triton_call",
                        lambda *a: calls.append(a[1].shape[0]) or real_call(*a))
    monkeypatch.setattr(LayerRuntime, "_run_block", lambda *a: blocks.append(a) or None)  # (must not run)
    x, ids, w = _inputs(t=2)
    for l in (1, 2):
        g, u, d, sc = refs[l]
        want = (moe_experts_dequant_reference(x, g, u, d, sc, ids, w) if sc is not None
                else kernels.moe_experts_reference(x, g, u, d, ids, w))
        got = llm.bank(l)(x, ids, w)
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), l
    host = [len({e for e in ids.flatten().tolist() if SPLIT[l][e] == CPU}) for l in (1, 2)]
    assert calls == [n for n in host if n] and not blocks  # one call per layer with fetches, no per-expert block
    assert rt.stats.fetches == sum(host) and len(rt._fetch_stacks) == 1  # one stack for both layers
    rt.close()


class _KernelCfg:  # shapes torch's int8 / int4 CPU kernels take
    num_experts, hidden_size, moe_intermediate_size = 8, 64, 32


@pytest.mark.parametrize("kind", ["fp8", "int8", "int4"])
def test_host_experts_run_the_cpu_kernels(kind, fp32_activations):
    """Host-resident quantised experts run torch's CPU kernels (fp8 re-quantised to int8 for them):
    close to the dequantised reference (fp32 activations: the summation order's difference), and a fetch
    copies what the host holds."""
    torch.manual_seed(0)
    llm = _ToyLLM()
    for l in (1, 2):
        bank = ExpertBank(_KernelCfg).requires_grad_(False)
        for p_ in bank.parameters():
            p_.normal_(0, 0.2)
        llm.model.layers[l].mlp.experts = bank
        quantize_bank_(bank, kind)
    b1 = llm.bank(1)
    ref_w = (b1.gate_proj.clone(), b1.up_proj.clone(), b1.down_proj.clone(), tuple(s.clone() for s in bank_scales(b1)))
    rt = MoERuntime.attach(llm, ExpertPlacement(SPLIT, {1: 0, 2: 1}),
                           RuntimeOptions(device_map=DeviceMap.simulated(2), fetch_threshold=30, cpu_workers=1))
    lr = rt.layers[1]
    host = [e for e, s_ in enumerate(SPLIT[1]) if s_ == CPU]
    assert all(lr.experts[e].kind == ("int8" if kind == "fp8" else kind) for e in host)
    assert all(lr.experts[e].kind == kind for e, s_ in enumerate(SPLIT[1]) if s_ != CPU)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(40)])
    w = torch.rand(40, 3, generator=g) * 2.5
    want = moe_experts_dequant_reference(x, *ref_w, ids, w)
    got = llm.bank(1)(x, ids, w)
    # int8/int4: the kernels' summation order only; fp8: plus the int8 re-quantisation of host experts
    tol = 0.05 if kind == "fp8" else 1e-4
    assert float((got - want).abs().max()) <= tol * float(want.abs().max())
    assert rt.stats.tokens.get("cpu", 0) > 0
    _index, packed = lr._cpu_kernels[torch.float32]
    assert packed.kernel == ("int8" if kind == "fp8" else kind) and packed.dequant_fallbacks == 0
    rt.close()


class _NativeInt4Cfg:
    num_experts, hidden_size, moe_intermediate_size = E, H, 32


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["all_cpu_no_cache", "split_no_cache"])
def test_one_token_host_experts_run_in_one_native_call(name, dtype, kind, monkeypatch):
    """Decode at batch 1: the token's host-resident experts (plain, int8 or int4, read in place) in one native
    call per layer on a CPU worker, its weighted sum combined with the GPU slots' results: the
    reference within the kernels' summation order (fp32 1e-5, bf16 2^-6 of the largest output); several
    tokens keep the per-expert path."""
    if native._compiler() is None or native._disabled():
        pytest.skip(f"the native kernels are not built here ({native._disabled() or 'no C compiler'})")
    placement, n_gpu, opts = PLACEMENTS[name]
    torch.manual_seed(0)
    llm = _ToyLLM().to(dtype)
    for l in (1, 2):
        if kind == "int4":  # an intermediate width whose int4 groups (of I) the native kernels take
            bank = ExpertBank(_NativeInt4Cfg).requires_grad_(False)
            for p_ in bank.parameters():
                p_.normal_(0, 0.2)
            llm.model.layers[l].mlp.experts = bank.to(dtype)
        if kind != "bf16":
            quantize_bank_(llm.bank(l), kind)
    refs = {l: (b.gate_proj.clone(), b.up_proj.clone(), b.down_proj.clone(), bank_scales(b)) for l, b in
            ((l, llm.bank(l)) for l in (1, 2))}
    rt = MoERuntime.attach(llm, placement, RuntimeOptions(device_map=DeviceMap.simulated(n_gpu), cpu_workers=1, **opts))
    calls = []
    monkeypatch.setattr(native, "moe_decode", lambda *a, _real=native.moe_decode: calls.append(a[2]) or _real(*a))
    for t, seed in ((1, 9), (1, 10), (5, 11)):
        x, ids, w = _inputs(t=t, seed=seed, dtype=dtype)
        for l in (1, 2):
            g, u, d, sc = refs[l]
            want = (kernels.moe_experts_reference(x, g, u, d, ids, w) if sc is None else
                    kernels.moe_experts_dequant_reference(x, g, u, d, sc, ids, w))
            got = llm.bank(l)(x, ids, w)
            tol = 1e-5 if dtype == torch.float32 else 2 ** -6
            assert float((got.float() - want.float()).abs().max()) <= tol * float(want.float().abs().max())
    host_per_call = [int(a.numel()) for a in calls]
    assert len(calls) == sum(any(rt.layers[l].slots[e] == CPU for e in _inputs(t=1, seed=s, dtype=dtype)[1][0].tolist())
                             for s in (9, 10) for l in (1, 2))  # once per one-token layer call with host experts
    assert all(n <= 3 for n in host_per_call)
    assert rt.layers[1].host_table(dtype) is not None
    rt.close()


def test_a_tied_head_stays_with_the_final_norm(tmp_path):
    """tie_word_embeddings: lm_head's weight is the embedding table (one Parameter). Moving the table to the
    embeddings' GPU after the head had gone to the head GPU took the head along, away from the final norm
    whose output it reads (on GPUs the move keeps the Parameter shared; here the head slot is the meta device)."""
    from types import SimpleNamespace

    from engine.models.thinker.model import build_encoders, build_llm, place_non_expert_modules
    from tests.models.thinker.variants import write_variant

    cfg = MingConfig.from_file(write_variant(tmp_path / "tied", llm={"tie_word_embeddings": True}))
    llm, enc = build_llm(cfg, "cpu"), build_encoders(cfg, "cpu")
    plan = SimpleNamespace(layer_home=(0,) * cfg.llm.num_hidden_layers, head_home=1, embeddings="gpu", encoders="gpu")
    place_non_expert_modules(llm, enc, plan, DeviceMap((torch.device("cpu"), torch.device("meta"))))
    assert llm.lm_head.weight is llm.model.word_embeddings.weight
    assert llm.lm_head.weight.device == llm.model.norm.weight.device == torch.device("meta")
