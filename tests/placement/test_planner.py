"""Placement planner (engine/plan.py): sizes, placement rules, roofline prediction and the CLI.

Most tests use a config assembled from the spec's hyper-parameters (§2.1, §4.3, §5.2), so they run
without /work/shared; tests against the real configs and the reference name list skip when the
shared folder (resolved as <repo>/../shared) is absent.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest

from engine.models.thinker.config import MingConfig
from engine.placement import planner
from engine.placement.planner import (
    CPU, DEFAULT_GPU_LAYER_US, DeviceSpec, PlanError, RooflineParams, expert_bytes, main, model_sizes,
    normalize_expert_stats,
    parse_size, plan_placement, predict_decode, render,
)
from tests.paths import REPO, SHARED

REAL = {"v2": SHARED / "fixtures/real_configs/ming-flash-omni-2.0",
        "preview": SHARED / "fixtures/real_configs/ming-flash-omni-preview"}
FULL_NAMES = SHARED / "fixtures/ming_ref/full_names"
needs_shared = pytest.mark.skipif(not (REAL["v2"] / "config.json").is_file() or not FULL_NAMES.is_dir(),
                                  reason="needs /work/shared (real configs and reference name lists)")

# Reference parameter counts of the full-size 2.0 thinker (spec §1.3; full_names meta.json).
LLM_PARAMS = 102_954_732_800
ROUTED_EXPERT_PARAMS = 99_857_989_632
PARAMS_PER_EXPERT = 12_582_912
TOTAL_PARAMS_V2 = 104_232_246_768
N_EXPERTS = 31 * 256


def spec_config_dict() -> dict:
    """A 2.0-shaped composite config.json built from the spec's tables."""
    llm = {
        "model_type": "bailing_moe_v2", "vocab_size": 157184, "hidden_size": 4096, "intermediate_size": 9216,
        "moe_intermediate_size": 1024, "num_hidden_layers": 32, "first_k_dense_replace": 1,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "partial_rotary_factor": 0.5,
        "rope_theta": 2400000, "rope_scaling": {"type": "video_rope"}, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768, "hidden_act": "silu", "num_experts": 256, "num_experts_per_tok": 8,
        "num_shared_experts": 1, "n_group": 8, "topk_group": 4, "router_type": "MultiRouter",
        "use_bias": False, "use_qkv_bias": False, "tie_word_embeddings": False, "eos_token_id": 156895,
        "pad_token_id": 156892, "image_patch_token": 157157, "video_patch_token": 157175,
        "image_start_token": 157158, "video_start_token": 157160, "use_interleaved_frame_timestamp": True,
    }
    vision = {"model_type": "qwen3_moe_vit", "depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
              "num_heads": 16, "out_hidden_size": 4096, "patch_size": 16, "temporal_patch_size": 2,
              "spatial_merge_size": 2, "in_channels": 3, "num_position_embeddings": 2304,
              "deepstack_visual_indexes": [8, 16, 24]}
    audio = {"ds_kernel_size": 3, "ds_stride": 2, "norm_query_embeds": True,
             "whisper_encoder_config": {"n_ctx": 15000, "n_head": 20, "n_layer": 32, "n_mels": 128, "n_state": 1280}}
    return {"model_type": "bailingmm_moe_v2_lite", "llm_config": llm, "vision_config": vision,
            "audio_config": audio, "mlp_depth": 2, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def cfg() -> MingConfig:
    return MingConfig.from_dict(spec_config_dict(), source="spec-2.0")


def plan(cfg, gpus, cpu="256GB", **kw):
    return plan_placement(cfg, DeviceSpec.parse(gpus, cpu), **kw)


# ---------------------------------------------------------------------------------------------
# Sizes and devices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("80GB", 80 * 10**9), ("24GiB", 24 * 2**30), ("256GB", 256 * 10**9), ("1.5TB", 15 * 10**11),
    ("512MiB", 512 * 2**20), (" 80 gb ", 80 * 10**9), ("4096", 4096), ("2KB", 2000), ("0.5GiB", 2**29),
    (123, 123),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["80G", "abc", "-1GB", "", "GB", "80 PB", "1e3GB"])
def test_parse_size_rejects(text):
    with pytest.raises(PlanError):
        parse_size(text)


def test_device_spec_parse():
    d = DeviceSpec.parse("80GB,80GB", "256GB")
    assert [g.memory_bytes for g in d.gpus] == [80 * 10**9] * 2 and d.host_memory_bytes == 256 * 10**9
    d = DeviceSpec.parse("8x24GB", "64GiB")
    assert len(d.gpus) == 8 and [g.name for g in d.gpus] == [f"cuda:{i}" for i in range(8)]
    d = DeviceSpec.parse("24GB@1008,48GB", "0")
    assert d.gpus[0].hbm_gbs == 1008 and d.gpus[1].hbm_gbs is None and d.gpus[1].memory_bytes == 48 * 10**9
    for bad in ("", "0GB", "80GB@0", "x"):
        with pytest.raises(PlanError):
            DeviceSpec.parse(bad, "256GB")


@pytest.mark.parametrize("gpus, cpu, match", [
    ("80GB@.", "256GB", "GPU bandwidth"), ("80GB@1.2.3", "256GB", "GPU bandwidth"),
    ("100000x80GB", "256GB", "at most 64 GPUs"), ("60x80GB,5x24GB", "256GB", "at most 64 GPUs"),
    ("80GB", "9" * 400 + "TB", "too large"), ("9" * 400 + "GB", "256GB", "too large"),
    # a misspelt unit: 80XB is not 80 GPUs of 'B' (that read said "at most 64 GPUs")
    ("80XB", "256GB", "unknown size unit 'XB' in '80XB'"), ("2x80XB", "256GB", "unknown size unit 'XB'"),
])
def test_device_spec_refuses_sizes_counts_and_bandwidths_it_cannot_plan(gpus, cpu, match):
    """A bandwidth that is not a number ('@.': a ValueError traceback before), a size past float's range (an
    OverflowError traceback) and a GPU count no machine has (10^20 GPUs: a list of them built until memory ran out;
    100,000: a plan that never ends) are refused as PlanError, the value quoted short."""
    with pytest.raises(PlanError, match=match) as err:
        DeviceSpec.parse(gpus, cpu)
    assert len(str(err.value)) < 200
    assert len(DeviceSpec.parse("64x24GB", "0").gpus) == 64  # as many as one machine may have


@pytest.mark.parametrize("flag, value", [("--hbm-gbs", "nan"), ("--pcie-gbs", "inf"), ("--host-gbs", "nan"),
                                         ("--host-gbs", "inf"), ("--hop-latency-us", "nan"), ("--hop-latency-us", "inf")])
def test_cli_refuses_rates_that_are_not_finite(config_dir, capsys, flag, value):
    """NaN or infinite rates passed the '> 0' checks and predicted 'inf tokens/s'; they exit 2 naming the flag."""
    assert main(["--config", str(config_dir), "--gpus", "80GB", "--cpu-mem", "256GB", flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "finite" in err


def test_llm_and_encoder_counts_from_spec_shapes(cfg):
    s = model_sizes(cfg)
    assert s.llm_params == LLM_PARAMS
    assert s.routed_expert_params == ROUTED_EXPERT_PARAMS and s.params_per_expert == PARAMS_PER_EXPERT
    enc = {m.name: m.params for m in s.modules if m.kind == "encoder"}
    assert enc == {"vision": 576_388_336, "linear_proj": 33_562_624, "audio": 635_048_960,
                   "linear_proj_audio": 32_514_048}
    assert s.total_params == TOTAL_PARAMS_V2 and s.exact
    # bf16 everywhere except the 3 routers' expert_bias (fp32) in 31 MoE layers.
    assert s.llm_bytes == 2 * LLM_PARAMS + 2 * (31 * 3 * 256)
    # The audio positional table is a persistent buffer: resident, not a parameter.
    audio = next(m for m in s.modules if m.name == "audio")
    assert audio.nbytes == 2 * (635_048_960 + 15000 * 1280)
    assert s.kv_bytes_per_token == 32 * 2 * 4 * 128 * 2 == 65536


@pytest.mark.parametrize("key", ["moe_intermediate_size", "hidden_size"])
def test_int4_experts_of_an_odd_width_are_refused_before_the_load(key):
    """int4 packs two input columns per byte: an odd hidden or expert width cannot be stored. The planner
    sized it anyway (a group of one column) and a CPU load, which asks the planner first, then failed at its
    first MoE layer ('int4 needs an even number of input columns, got 45'); the plan now refuses it, naming
    the key and the dtype to use, as the command line and Engine.load report it. Other formats still plan."""
    from engine.placement.auto import fit_on_host

    d = spec_config_dict()
    d["llm_config"] = {**d["llm_config"], key: d["llm_config"][key] + 1}
    odd = MingConfig.from_dict(d, source="odd")
    with pytest.raises(PlanError, match=f"{key} .*must be even.*int8"):
        expert_bytes(odd.llm, "int4")
    with pytest.raises(PlanError, match=f"{key} .*must be even"):
        fit_on_host(odd, "bf16", "int4", available=10**15)
    assert fit_on_host(odd, "bf16", "int8", available=10**15).dtype == "bf16"


def test_expert_bytes_per_dtype(cfg):
    assert expert_bytes(cfg.llm, "bf16") == 3 * 4096 * 1024 * 2 == 25_165_824
    scales = (2 * 1024 + 4096) * 4  # one fp32 scale per output channel of gate, up, down
    assert expert_bytes(cfg.llm, "fp8") == expert_bytes(cfg.llm, "int8") == 3 * 4096 * 1024 + scales
    # fp8 with one scale per 128x128 block: 8x32 blocks per gate/up, 32x8 per down
    assert expert_bytes(cfg.llm, "fp8-block") == 3 * 4096 * 1024 + 3 * 8 * 32 * 4
    # int4: half a byte per weight; one scale per 128 input columns of each row
    assert expert_bytes(cfg.llm, "int4") == 3 * 4096 * 1024 // 2 + (2 * 1024 * 32 + 4096 * 8) * 4
    with pytest.raises(PlanError):
        expert_bytes(cfg.llm, "fp4")


def test_expert_bytes_match_the_engine_storage(cfg):
    """The planner's sizes equal what engine.placement.quant stores (shapes of a stacked bank)."""
    import torch

    from engine.placement.quant import QUANT_STORAGE, stacked_shapes

    h, i = cfg.llm.hidden_size, cfg.llm.moe_intermediate_size
    for kind in ("fp8", "fp8-block", "int8", "int4"):
        shapes = stacked_shapes(kind, 1, i, h)
        item = torch.empty(0, dtype=QUANT_STORAGE[kind]).element_size()
        nbytes = sum(math.prod(q) * item + math.prod(sc) * 4 for q, sc in shapes.values())
        assert expert_bytes(cfg.llm, kind) == nbytes, kind


def test_cpu_only_plan(cfg):
    devices = DeviceSpec.parse("none", "64GB")
    assert devices.gpus == ()
    with pytest.raises(PlanError, match="--linear-dtype int8"):
        plan_placement(cfg, devices, "int4")  # int4 experts alone with bf16 linears, 8 GiB reserve: too big
    p = plan_placement(cfg, devices, "int4", kv_tokens=8192, host_reserve="2GiB", linear_dtype="int8")
    assert p.gpus == () and p.cpu_experts == N_EXPERTS and all(m.device == "cpu" for m in p.modules)
    assert p.host.free_bytes >= 0 and p.kv_max_tokens >= 8192
    # every byte a token reads comes from host memory: weights + KV + top-k experts per MoE layer
    rp = p.prediction.params
    s = p.sizes
    read = sum(m.decode_read_bytes for m in s.modules if m.kind != "encoder") \
        + rp.context_tokens * s.kv_bytes_per_token + 31 * 8 * s.bytes_per_expert
    assert p.prediction.host_bytes_per_token == read
    assert p.prediction.ms_per_token == pytest.approx(read / (rp.host_gbs * 1e9 * rp.efficiency) * 1e3)
    # int8 linears: attention/shared/dense/lm_head at a byte per weight (+ fp32 per output row)
    by_name = {m.name: m for m in model_sizes(cfg, linear_dtype="int8").modules}
    v, h, i_sh = 157184, 4096, 1024
    assert by_name["lm_head"].nbytes == v * h + 4 * v
    assert by_name["layers.1.shared_experts"].nbytes == 3 * h * i_sh + 4 * (2 * i_sh + h)
    assert by_name["word_embeddings"].nbytes == 2 * v * h  # looked up, not multiplied: stays bf16
    assert "no GPU" in render(p)


def test_an_fp32_load_doubles_what_is_kept_as_loaded(cfg):
    """--dtype fp32 (the engine's CPU default): norms, embeddings, encoders, unquantised linears and experts,
    and the KV cache take 4 bytes an element; quantised weights and their scales do not change."""
    bf16, fp32 = model_sizes(cfg, "int4", "int8"), model_sizes(cfg, "int4", "int8", dtype="fp32")
    by16, by32 = ({m.name: m for m in s.modules} for s in (bf16, fp32))
    for name in ("word_embeddings", "vision", "audio", "layers.1.routers"):
        assert by32[name].nbytes > by16[name].nbytes
    assert by32["word_embeddings"].nbytes == 2 * by16["word_embeddings"].nbytes
    assert by32["lm_head"].nbytes == by16["lm_head"].nbytes  # int8 + fp32 row scales either way
    assert fp32.bytes_per_expert == bf16.bytes_per_expert and fp32.kv_bytes_per_token == 2 * bf16.kv_bytes_per_token
    assert model_sizes(cfg, dtype="fp32").bytes_per_expert == 2 * model_sizes(cfg).bytes_per_expert
    devices = DeviceSpec.parse("none", "64GB")
    plan_placement(cfg, devices, "int4", kv_tokens=8192, host_reserve="2GiB", linear_dtype="int8")
    with pytest.raises(PlanError, match="--dtype bf16"):
        plan_placement(cfg, devices, "int4", kv_tokens=8192, host_reserve="2GiB", linear_dtype="int8", dtype="fp32")
    with pytest.raises(PlanError, match="unknown dtype"):
        model_sizes(cfg, dtype="fp64")


@pytest.mark.parametrize("which", ["tiny", "spec"])
def test_llm_count_matches_engine_module(which, cfg):
    """The analytic count equals what the engine's own BailingMoeV2 module consumes from a checkpoint."""
    from engine.loader import checkpoint_entries
    from engine.models.thinker.model import build_llm
    from engine.tiny import tiny_config

    c = MingConfig.from_dict(tiny_config()) if which == "tiny" else cfg
    total = sum(math.prod(shape) for _, shape in checkpoint_entries(build_llm(c, "meta")))
    assert model_sizes(c).llm_params == total


@needs_shared
@pytest.mark.filterwarnings("ignore:.*video_start_token")  # the Preview config's known pitfall (spec §1.4)
@pytest.mark.parametrize("flavour, real", [("v2", "v2"), ("preview", "preview")])
def test_real_config_counts_match_reference(flavour, real):
    cfg = MingConfig.from_file(REAL[real])
    meta = json.loads((FULL_NAMES / flavour / "meta.json").read_text())["counts"]
    s = model_sizes(cfg)
    per = meta["parameters_per_top_level_prefix"]
    enc = {m.name: m.params for m in s.modules if m.kind == "encoder"}
    assert enc == {k: per[k] for k in ("vision", "linear_proj", "audio", "linear_proj_audio")}
    assert s.llm_params == per["model"]
    assert s.total_params == meta["total_parameters"]
    assert s.routed_expert_params == meta["llm_routed_expert_parameters"]
    assert s.params_per_expert == meta["llm_parameters_per_expert"]
    n_bias = sum(1 for line in (FULL_NAMES / flavour / "names.txt").read_text().splitlines()
                 if line.split("\t")[0].endswith("expert_bias")) * cfg.llm.num_experts
    assert s.llm_bytes == 2 * per["model"] + 2 * n_bias  # expert_bias stored as fp32


@needs_shared
def test_every_module_matches_reference_name_list():
    """Per module, the planner's parameter count equals the sum over the reference state-dict names."""
    cfg = MingConfig.from_file(REAL["v2"])
    s = model_sizes(cfg)
    got = defaultdict(int)
    experts = 0
    for line in (FULL_NAMES / "v2" / "names.txt").read_text().splitlines():
        name, shape, _ = line.split("\t")
        n = math.prod(json.loads(shape))
        if name == "audio.positional_embedding":
            continue  # buffer, checked as bytes below
        m = re.match(r"model\.model\.layers\.(\d+)\.(attention|input_layernorm|post_attention_layernorm|mlp)\.?(\w*)", name)
        if m:
            layer, part, sub = m.groups()
            if part != "mlp":
                got[f"layers.{layer}.attention"] += n
            elif sub == "experts":
                experts += n
            elif sub == "shared_experts":
                got[f"layers.{layer}.shared_experts"] += n
            elif sub in ("gate", "image_gate", "audio_gate"):
                got[f"layers.{layer}.routers"] += n
            else:
                got[f"layers.{layer}.mlp"] += n
            continue
        key = {"model.model.word_embeddings": "word_embeddings", "model.model.norm": "norm",
               "model.lm_head": "lm_head"}.get(name.rsplit(".", 1)[0], name.split(".")[0])
        got[key] += n
    assert {m.name: m.params for m in s.modules} == dict(got)
    assert experts == s.routed_expert_params


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------


def _check_consistent(p):
    """Every expert has a device; per-device counts and bytes add up; nothing exceeds memory."""
    eb = p.sizes.bytes_per_expert
    assert len(p.experts) == 31 and all(len(le.device) == 256 for le in p.experts)
    for g in p.gpus:
        n = sum(le.count(g.index) for le in p.experts)
        assert n == g.experts and g.experts_bytes == n * eb
        used = g.reserve_bytes + g.modules_bytes + g.kv_bytes + g.experts_bytes
        assert used + g.free_bytes == g.memory_bytes and g.free_bytes >= 0
    assert sum(le.count(CPU) for le in p.experts) == p.host.experts
    assert p.host.reserve_bytes + p.host.modules_bytes + p.host.experts_bytes <= p.host.memory_bytes
    assert p.gpu_experts + p.cpu_experts == N_EXPERTS
    placed = {m.name for m in p.modules}
    assert placed == {m.name for m in p.sizes.modules}


def test_4x80gb_puts_all_experts_on_gpus_balanced(cfg):
    p = plan(cfg, "80GB,80GB,80GB,80GB")
    _check_consistent(p)
    assert p.cpu_experts == 0 and p.host.experts_bytes == 0
    assert all(g.experts > 0 for g in p.gpus)
    for le in p.experts:  # expert parallel: each layer spread evenly
        assert [le.count(g) for g in range(4)] == [64, 64, 64, 64]
    assert p.prediction.breakdown_ms["cpu_experts"] == 0
    assert p.prediction.bottleneck != "cpu_experts"
    assert {m.device for m in p.modules if m.kind == "attention"} == {"cuda:0"}


def test_1x24gb_puts_most_experts_on_cpu(cfg):
    p = plan(cfg, "24GB")
    _check_consistent(p)
    assert p.cpu_experts > 0.9 * N_EXPERTS and p.gpu_experts > 0
    assert p.prediction.bottleneck == "cpu_experts"
    assert p.prediction.tokens_per_s < plan(cfg, "4x80GB").prediction.tokens_per_s


def test_more_gpu_memory_never_predicts_lower_tokens_per_s(cfg):
    for dtype in ("bf16", "fp8"):
        last = 0.0
        for gb in range(16, 400, 24):
            tps = plan(cfg, f"{gb}GB", "400GB", expert_dtype=dtype).prediction.tokens_per_s
            assert tps >= last, (dtype, gb)
            last = tps
    for dtype in ("bf16", "fp8"):
        last = 0.0
        for gb in range(16, 200, 12):
            tps = plan(cfg, f"2x{gb}GB", "400GB", expert_dtype=dtype).prediction.tokens_per_s
            assert tps >= last, (dtype, gb)
            last = tps
    last = 0.0
    for n in range(1, 9):
        tps = plan(cfg, f"{n}x24GB").prediction.tokens_per_s
        assert tps >= last, n
        last = tps


def test_fp8_fits_more_experts_than_bf16(cfg):
    bf16 = plan(cfg, "80GB")
    fp8 = plan(cfg, "80GB", expert_dtype="fp8")
    int8 = plan(cfg, "80GB", expert_dtype="int8")
    _check_consistent(fp8)
    assert fp8.gpu_experts > 1.9 * bf16.gpu_experts
    assert int8.gpu_experts == fp8.gpu_experts
    assert fp8.prediction.tokens_per_s > bf16.prediction.tokens_per_s
    # --expert-dtype applies to routed experts only: non-expert bytes are unchanged.
    assert fp8.sizes.llm_bytes - fp8.sizes.routed_expert_bytes == bf16.sizes.llm_bytes - bf16.sizes.routed_expert_bytes


def test_popularity_stats_move_popular_experts_to_gpu(cfg):
    hot = lambda e: e % 16 == 3  # 16 hot experts per layer
    stats = {"layers": {str(l): [100 if hot(e) else 1 for e in range(256)] for l in range(1, 32)}}
    uniform = plan(cfg, "24GB")
    p = plan(cfg, "24GB", expert_stats=stats)
    _check_consistent(p)
    resident = [(le.layer, e) for le in p.experts for e, d in enumerate(le.device) if d != CPU]
    assert resident and all(hot(e) for _, e in resident)
    assert p.prediction.gpu_selected_fraction > 5 * uniform.prediction.gpu_selected_fraction
    assert p.prediction.tokens_per_s > uniform.prediction.tokens_per_s


def test_stats_in_list_form_and_layer_key_form_agree(cfg):
    counts = [[(e * 7 + l) % 13 + 1 for e in range(256)] for l in range(31)]
    a = normalize_expert_stats(counts, cfg.llm)
    b = normalize_expert_stats({str(l + 1): c for l, c in enumerate(counts)}, cfg.llm)
    c = normalize_expert_stats([[]] + counts, cfg.llm)  # one entry per decoder layer, dense layer empty
    assert a == b == c and set(a) == set(range(1, 32))
    assert all(abs(sum(v) - 1) < 1e-12 for v in a.values())
    partial = normalize_expert_stats({"layers": {"5": [0] * 255 + [3]}}, cfg.llm)
    assert partial[5][255] == 1.0 and partial[6] == [1 / 256] * 256


@pytest.mark.parametrize("stats, msg", [
    ({"0": [1] * 256}, "not a MoE layer"),
    ({"3": [1] * 255}, "256 counts"),
    ({"3": [-1] + [1] * 255}, "negative"),
    ([[1] * 256] * 5, "one entry per"),
    ("nonsense", "must be"),
])
def test_bad_stats_are_rejected(cfg, stats, msg):
    with pytest.raises(PlanError, match=msg):
        plan(cfg, "80GB", expert_stats=stats)


def test_impossible_configs_raise_clear_errors(cfg):
    with pytest.raises(PlanError, match="non-expert part does not fit"):
        plan(cfg, "8GB")
    with pytest.raises(PlanError, match="host memory cannot hold"):
        plan(cfg, "80GB", "64GB")
    with pytest.raises(PlanError, match="no GPUs"):
        plan(cfg, "")
    with pytest.raises(PlanError, match="kv_tokens"):
        plan(cfg, "80GB", kv_tokens=-1)
    with pytest.raises(PlanError, match="non-expert part does not fit"):
        plan(cfg, "80GB", kv_tokens=10_000_000)  # 655 GB of KV cache
    with pytest.raises(PlanError, match="efficiency"):
        plan(cfg, "80GB", roofline=RooflineParams(efficiency=1.5))
    # fp8 halves the cold experts: the same host then suffices.
    plan(cfg, "80GB", "96GB", expert_dtype="fp8")


def test_non_expert_part_is_split_over_gpus_when_one_is_too_small(cfg):
    p = plan(cfg, "2x8GB", encoders="cpu")
    _check_consistent(p)
    assert set(p.layer_home) == {0, 1} and list(p.layer_home) == sorted(p.layer_home)
    assert {m.device for m in p.modules if m.kind == "encoder"} == {"cpu"}
    assert p.gpus[0].kv_bytes > 0 and p.gpus[1].kv_bytes > 0
    assert p.prediction.breakdown_ms["transfers"] > 0


def test_kv_budget(cfg):
    p = plan(cfg, "80GB", kv_tokens=100_000)
    assert p.gpus[0].kv_bytes == 100_000 * 65536
    assert 100_000 <= p.kv_max_tokens < 100_000 + (p.sizes.bytes_per_expert // 65536) + 1
    full = plan(cfg, "4x80GB")  # everything fits: the leftover on the attention GPU becomes KV budget
    assert full.kv_max_tokens > 5 * full.kv_requested_tokens
    assert full.kv_budget_bytes == full.gpus[0].kv_bytes + full.gpus[0].free_bytes


def test_encoders_none_and_cpu_free_gpu_memory(cfg):
    on_gpu = plan(cfg, "24GB")
    no_enc = plan(cfg, "24GB", encoders="none")
    assert "vision" not in {m.name for m in no_enc.modules}
    assert no_enc.gpu_experts > on_gpu.gpu_experts
    on_cpu = plan(cfg, "24GB", encoders="cpu")
    assert on_cpu.host.modules_bytes >= on_cpu.sizes.encoder_bytes


def test_roofline_matches_hand_computation_when_everything_is_on_one_gpu(cfg):
    rp = RooflineParams(hbm_gbs=1000, efficiency=1.0, context_tokens=1000)
    p = plan(cfg, "400GB", roofline=rp)
    assert p.cpu_experts == 0 and p.embeddings == "gpu" and p.expert_gpus == 1
    h, v = 4096, 157184
    attention = 32 * (5120 * h + h * h + 2 * 128 + 2 * h) * 2
    dense = 3 * 9216 * h * 2
    shared = 31 * 3 * 1024 * h * 2
    text_gate = 31 * (256 * h * 2 + 256 * 4)
    head = (h + v * h) * 2
    embedding_row = h * 2
    experts = 31 * 8 * 3 * h * 1024 * 2  # top-8 per MoE layer
    kv = 1000 * 65536
    expected_s = (attention + dense + shared + text_gate + head + embedding_row + experts + kv) / 1e12
    layers_s = 32 * DEFAULT_GPU_LAYER_US * 1e-6  # each layer's small kernels, beyond its bytes
    assert p.prediction.ms_per_token == pytest.approx((expected_s + layers_s) * 1e3, rel=1e-12)
    assert p.prediction.breakdown_ms["gpu_layers"] == pytest.approx(layers_s * 1e3, rel=1e-12)
    assert p.prediction.hbm_bytes_per_token == pytest.approx(expected_s * 1e12, rel=1e-12)
    free = plan(cfg, "400GB", roofline=replace(rp, gpu_layer_us=0)).prediction
    assert free.ms_per_token == pytest.approx(expected_s * 1e3, rel=1e-12)  # a pure roofline without it
    assert p.prediction.breakdown_ms["transfers"] == 0


def test_expert_parallel_hops_are_counted(cfg):
    p = plan(cfg, "4x80GB")
    assert p.embeddings == "gpu" and set(p.layer_home) == {0}
    hop_s = 10e-6 + 4096 * 2 / (25e9 * 0.7)  # latency + one bf16 hidden vector over PCIe
    assert p.prediction.breakdown_ms["transfers"] == pytest.approx(31 * 2 * hop_s * 1e3, rel=1e-12)


def test_planner_keeps_experts_on_fewer_gpus_when_hops_cost_more(cfg):
    cheap = plan(cfg, "2x400GB")
    assert cheap.expert_gpus == 2
    slow = plan(cfg, "2x400GB", roofline=RooflineParams(hop_latency_us=2000))
    assert slow.expert_gpus == 1 and slow.gpus[1].experts == 0 and slow.cpu_experts == 0
    assert slow.prediction.breakdown_ms["transfers"] == 0


def _deal_by_scan(resident, counts, popularity, bws):
    """The dealing rule written out plainly: each resident expert, most popular first, to the GPU with
    room left and the least expected work per bandwidth (ties: more room left, then the lower index)."""
    device, load, left = [CPU] * len(popularity), [0.0] * len(counts), list(counts)
    for x in resident:
        g = min((g for g in range(len(counts)) if left[g] > 0), key=lambda g: (load[g] / bws[g], -left[g], g))
        device[x] = g
        load[g] += popularity[x]
        left[g] -= 1
    return device


@pytest.mark.parametrize("gpus, cpu, expert_dtype, skewed", [
    ("24GB", "256GB", "bf16", False), ("3x48GB", "256GB", "fp8", True), ("4x80GB", "64GB", "bf16", False),
    ("80GB,24GB@1008,48GB@3350", "256GB", "int4", True), ("8x24GB", "256GB", "int8", True),
])
def test_expert_dealing_gives_the_plans_of_the_plain_scan(cfg, monkeypatch, gpus, cpu, expert_dtype, skewed):
    """The planner deals each layer's experts with a heap (32 GPUs plan in well under a second); the plans
    are those of scanning every GPU for every expert, ties included (uniform or few distinct counts)."""
    stats = {"layers": {str(l): [(e * 37 + l * 11) % 5 for e in range(256)] for l in range(1, 32)}} if skewed else None
    fast = plan(cfg, gpus, cpu, expert_dtype=expert_dtype, expert_stats=stats)
    _check_consistent(fast)
    monkeypatch.setattr(planner, "_deal", _deal_by_scan)
    assert plan(cfg, gpus, cpu, expert_dtype=expert_dtype, expert_stats=stats).to_dict() == fast.to_dict()


def test_the_popularity_order_is_sorted_once_per_plan(cfg, monkeypatch):
    """Every variant a plan weighs (embeddings on GPU or host x experts on the first 1..N GPUs) shares one
    sort of the layers x experts popularity order."""
    calls = []
    sort = planner._popularity_order
    monkeypatch.setattr(planner, "_popularity_order", lambda *a: calls.append(a) or sort(*a))
    p = plan(cfg, "8x24GB")
    assert p.expert_gpus >= 1 and len(calls) == 1


def test_partly_cold_layer_with_few_remote_experts_stays_on_cpu(cfg):
    """Two GPU experts of a layer on a GPU other than its attention GPU would cost two expert-parallel
    hops per token for little gain; the planner keeps such a layer wholly on the CPU."""
    rp = RooflineParams(hop_latency_us=100)
    eb = expert_bytes(cfg.llm, "fp8")
    probe = plan(cfg, "80GB", expert_dtype="fp8", embeddings="gpu", roofline=rp)
    g0 = probe.gpus[0]
    gpu0 = g0.reserve_bytes + g0.modules_bytes + g0.kv_bytes + eb // 2  # room for no expert
    gpu1 = g0.reserve_bytes + (2 * 256 + 2) * eb
    p = plan(cfg, [f"{gpu0}B", f"{gpu1}B"], "400GB", expert_dtype="fp8", embeddings="gpu", roofline=rp)
    _check_consistent(p)
    assert p.gpus[0].experts == 0 and p.gpus[1].experts == 2 * 256
    assert [le.count(1) for le in p.experts[:3]] == [256, 256, 0] and p.experts[2].count(CPU) == 256
    # The alternative (2 experts of layer 3 on cuda:1) is predicted slower.
    from dataclasses import replace
    le = p.experts[2]
    hot2 = tuple(1 if e < 2 else CPU for e in range(256))
    alt = replace(p, experts=p.experts[:2] + (replace(le, device=hot2),) + p.experts[3:])
    assert predict_decode(alt, rp).tokens_per_s < p.prediction.tokens_per_s


def test_roofline_flags_move_the_prediction(cfg):
    base = plan(cfg, "24GB")
    faster_host = plan(cfg, "24GB", roofline=RooflineParams(host_gbs=200))
    assert faster_host.prediction.tokens_per_s > 3 * base.prediction.tokens_per_s
    overlap = predict_decode(base, RooflineParams(overlap_cpu=True))
    assert overlap.tokens_per_s >= base.prediction.tokens_per_s
    slow_hops = predict_decode(base, RooflineParams(hop_latency_us=1000))
    assert slow_hops.breakdown_ms["transfers"] > 50 * base.prediction.breakdown_ms["transfers"]


def test_measured_cpu_rates_replace_peak_times_efficiency(cfg):
    """Rates measured on the host (engine.placement.host_rates) are taken as they are: a CPU-only token costs
    its expert bytes at the expert rate plus the other bytes at the weight rate, whatever --efficiency says."""
    devices = DeviceSpec.parse("none", "64GB")
    rp = RooflineParams(context_tokens=100, efficiency=0.3, cpu_expert_gbs=12.5, cpu_weight_gbs=20.0)
    p = plan_placement(cfg, devices, "int4", kv_tokens=8192, host_reserve="2GiB", linear_dtype="int8", roofline=rp)
    s = p.sizes
    experts = 31 * 8 * s.bytes_per_expert
    other = sum(m.decode_read_bytes for m in s.modules if m.kind != "encoder") + 100 * s.kv_bytes_per_token
    assert p.prediction.ms_per_token == pytest.approx((experts / 12.5e9 + other / 20e9) * 1e3)
    assert "measured on this host" in render(p)
    # a GPU plan's cold experts run at the measured expert rate too
    gpu = plan(cfg, "24GB", roofline=RooflineParams(cpu_expert_gbs=12.5, cpu_weight_gbs=20.0))
    assert gpu.prediction.breakdown_ms["cpu_experts"] > plan(cfg, "24GB", roofline=RooflineParams(
        cpu_expert_gbs=25.0, cpu_weight_gbs=20.0)).prediction.breakdown_ms["cpu_experts"] * 1.9
    with pytest.raises(PlanError, match="cpu_expert_gbs"):
        RooflineParams(cpu_expert_gbs=0.0, cpu_weight_gbs=1.0).validate()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def config_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(spec_config_dict()))
    return tmp_path


def test_cli_json_has_prediction_field(config_dir, capsys, cfg):
    assert main(["--config", str(config_dir), "--gpus", "80GB", "--cpu-mem", "256GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = plan(cfg, "80GB").prediction.tokens_per_s
    assert out["predicted_decode_tokens_per_s"] == pytest.approx(expected)
    assert out["experts_on_gpu"] + out["experts_on_cpu"] == N_EXPERTS
    assert len(out["expert_devices"]) == 31 and len(out["expert_devices"]["1"]) == 256
    assert out["prediction"]["roofline"]["hbm_gbs"] == 2000


def test_cli_stats_file_and_flags(config_dir, tmp_path, capsys):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"layers": {"1": [0] * 200 + [5] * 56}}))
    argv = ["--config", str(config_dir), "--gpus", "24GB@1008", "--cpu-mem", "256GB", "--expert-stats", str(stats),
            "--expert-dtype", "fp8", "--host-gbs", "80", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"][0]["hbm_gbs"] == 1008 and out["expert_dtype"] == "fp8"
    assert all(d != CPU for d in out["expert_devices"]["1"][200:])


def test_cli_errors_exit_2(config_dir, capsys):
    assert main(["--config", str(config_dir), "--gpus", "80GB", "--cpu-mem", "16GB"]) == 2
    assert "host memory cannot hold" in capsys.readouterr().err
    assert main(["--config", str(config_dir), "--gpus", "80G", "--cpu-mem", "256GB", "--json"]) == 2
    assert "error" in json.loads(capsys.readouterr().out)


def test_cli_names_files_that_are_not_json_text(config_dir, tmp_path, capsys):
    """A binary file given as --expert-stats, or saved as config.json, was a UnicodeDecodeError traceback."""
    binary = tmp_path / "stats.json"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    assert main(["--config", str(config_dir), "--gpus", "80GB", "--cpu-mem", "256GB", "--expert-stats", str(binary)]) == 2
    assert f"{binary}: invalid JSON" in capsys.readouterr().err
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00\x01")
    assert main(["--config", str(tmp_path), "--gpus", "80GB", "--cpu-mem", "256GB"]) == 2
    assert f"{tmp_path / 'config.json'}: invalid JSON" in capsys.readouterr().err


def _layer_three_starting(first: str) -> str:
    """A stats file whose layer 3 lists `first` (JSON text) and then 255 ones."""
    return '{"layers": {"3": [' + first + ", 1" * 255 + "]}}"


@pytest.mark.parametrize("content, says", [
    ("null", "holds no expert statistics ('null')"), ("[]", "holds no expert statistics"),
    ("{}", "holds no expert statistics"), ("42", "holds no expert statistics ('42')"),
    ('{"layers": null}', "must be a JSON object"), ('{"layers": {}}', "name no layer"),
    ('{"layers": {"3": "%s"}}' % ("x" * 256), "layer 3 must list 256 counts"),
    (_layer_three_starting("true"), "layer 3 must list numbers, got 'true'"),
    (_layer_three_starting("[1]"), "layer 3 must list numbers, got '[1]'"),
    (_layer_three_starting('"1"'), "layer 3 must list numbers"),
    (_layer_three_starting("1" + "0" * 400), "non-finite"),
])
def test_cli_refuses_expert_stats_files_that_hold_no_statistics(config_dir, tmp_path, capsys, content, says):
    """A --expert-stats file holding JSON null, an empty object or list, or layers listing strings, booleans,
    nested lists or a number past float's range was planned as uniform popularity without a word, or ended in a
    TypeError / ValueError / OverflowError traceback: each exits 2 with one line saying what is wrong."""
    stats = tmp_path / "stats.json"
    stats.write_text(content)
    assert main(["--config", str(config_dir), "--gpus", "80GB", "--cpu-mem", "256GB", "--expert-stats", str(stats)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


def test_module_entry_point_prints_table(config_dir):
    target = REAL["v2"] if (REAL["v2"] / "config.json").is_file() else config_dir
    r = subprocess.run([sys.executable, "-m", "engine.plan", "--config", str(target), "--gpus", "80GB,80GB",
                        "--cpu-mem", "256GB"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cuda:1" in r.stdout and "predicted decode:" in r.stdout and "bottleneck" in r.stdout
    assert "KV cache" in r.stdout


@pytest.mark.parametrize("which", ["spec", "real"])
def test_planning_does_not_import_torch(config_dir, which):
    """Planning reads configs and sizes only: `python -m engine.plan` never loads torch (a second or more of
    its run), the vision_config checks included."""
    target = REAL["v2"] if which == "real" else config_dir
    if not (target / "config.json").is_file():
        pytest.skip("needs /work/shared (real configs)")
    code = ("import sys\nfrom engine.placement.planner import main\n"
            f"assert main(['--config', {str(target)!r}, '--gpus', '32x80GB', '--cpu-mem', '256GB']) == 0\n"
            "assert 'torch' not in sys.modules, 'planning imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_render_mentions_every_device(cfg):
    text = render(plan(cfg, "8x24GB"))
    for i in range(8):
        assert f"cuda:{i}" in text
    assert "tokens/s" in text and "cpu (host)" in text


def test_cli_measures_this_hosts_rates(config_dir, capsys, monkeypatch):
    from engine.kernels import native
    from engine.placement import host_rates
    if not native.available():
        pytest.skip("the native CPU kernels are not built here: --host-gbs measure says so")
    monkeypatch.setattr(host_rates, "matrix_bytes_for", lambda available=None: 4 << 20)  # fast; still streamed
    argv = ["--config", str(config_dir), "--gpus", "none", "--cpu-mem", "64GB", "--expert-dtype", "int4",
            "--linear-dtype", "int8", "--host-reserve", "2GiB", "--kv-tokens", "8192", "--host-gbs", "measure"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "CPU rates measured on this host: experts" in out and "predicted decode" in out
    assert main(argv + ["--json"]) == 0
    roofline = json.loads(capsys.readouterr().out)["prediction"]["roofline"]
    assert roofline["cpu_expert_gbs"] > 0 and roofline["cpu_weight_gbs"] > 0


def test_cli_rejects_a_host_rate_that_is_not_a_number(config_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", str(config_dir), "--gpus", "none", "--cpu-mem", "64GB", "--host-gbs", "fast"])
    assert e.value.code == 2 and "expected GB/s or 'measure'" in capsys.readouterr().err


@pytest.mark.parametrize("vision", [
    {"model_type": "qwen3_moe_vit", "depth": 1},                                  # deepstack [8, 16, 24], out 3584
    {"model_type": "qwen3_moe_vit", "depth": 1, "hidden_size": 64, "num_heads": 4, "deepstack_visual_indexes": []},
    {"model_type": "qwen2_5_vit", "depth": 1, "hidden_size": 64, "num_heads": 4},  # patch 14, out 3584
])
def test_vision_count_takes_the_config_class_defaults_the_vit_is_built_with(vision):
    # a vision_config omitting keys is built with its ViT config class's defaults (spec §4.3, §4.4):
    # the planner counts that ViT, not one with its own fallbacks (patch 14 for 2.0, no deepstack)
    import torch

    from engine.models.thinker.vision import build_vision_encoder
    from engine.placement.planner import vision_params

    with torch.device("meta"):
        vit = build_vision_encoder(dict(vision))
    count, exact = vision_params(vision, 4096)
    assert exact and count == sum(p.numel() for p in vit.parameters())
