"""Placement planner: where every module and routed expert of a Ming checkpoint lives, and what
decode speed that placement can reach.

Given the devices (GPUs with a memory budget each, host RAM), the model config and optional expert
popularity statistics, `plan_placement` decides

* where every non-expert module lives (embeddings, attention, dense MLP, shared experts, routers,
  final norm, lm_head, vision/audio encoders and projectors): GPU 0, or split layer-wise over the
  GPUs in order when they do not fit on one;
* how large the KV-cache budget is (a requested number of tokens, grown by whatever GPU memory is
  left on the attention GPUs once experts are placed);
* which routed experts live on which GPU (expert parallel: every layer's GPU-resident experts are
  spread over the GPUs so that per-token work is balanced), and which stay in host memory and are
  computed there by the CPU (the activation moves, not the weights);

and predicts batch-1 decode tokens/s with a roofline model (`predict_decode`).

Sizes are exact, computed from the config's shapes (spec §1.3): the LLM and both encoders'
parameter counts match the upstream state dict (tests check them against the reference name list).
Non-expert weights are bf16; routers' `expert_bias` is fp32; routed experts use `expert_dtype`
(bf16, or fp8/int8 with one fp32 scale per output channel). Sizes printed as "GB" are 10^9 bytes.

CLI: ``python -m engine.plan --config CONFIG_OR_DIR --gpus 80GB,80GB --cpu-mem 256GB
[--expert-dtype bf16|fp8|int8] [--expert-stats STATS.json] [--json]`` (see ``--help`` for the
roofline bandwidth flags and their defaults).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from engine.command import EXIT_CODES_HELP
from engine.errors import EXIT_INPUT, shown
from engine.models.thinker.config import (ConfigError, LLMConfig, MingConfig, sub_config_errors,
                                         vision_config_with_defaults)

# ----------------------------------------------------------------------------------------------
# Constants and defaults (each is a CLI flag too)
# ----------------------------------------------------------------------------------------------

BF16 = 2  # bytes per activation element, and per weight of the releases' files
FP32 = 4
# The dtype weights are loaded in (`--dtype`; the engine's default on a CPU is fp32): bytes per
# element of everything kept as loaded (non-quantised linears, norms, embeddings, encoders, the KV
# cache, generators, "bf16" = unquantised experts).
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
EXPERT_WEIGHT_BYTES = {"bf16": 2, "fp8": 1, "fp8-block": 1, "int8": 1, "int4": 0.5}
# fp32 scales (engine.kernels.dequant formats): fp8/int8 one per output channel, fp8-block one per
# 128x128 block, int4 one per group of up to 128 input columns.
SCALE_BLOCK = 128
LINEAR_DTYPES = ("bf16", "int8")  # non-expert linears (attention, dense MLP, shared experts, lm_head)
ROUTING_BYTES_PER_CHOICE = 8 + 4  # int64 expert id + fp32 weight, sent with a cold-expert hop

DEFAULT_GPU_RESERVE = "3GiB"   # CUDA context, cuBLAS workspace, allocator slack, prefill activations
DEFAULT_HOST_RESERVE = "8GiB"  # OS, Python/torch, pinned staging buffers
DEFAULT_HBM_GBS = 2000.0       # H100 PCIe 80 GB peak HBM bandwidth (H100 SXM: 3350; RTX 4090: 1008)
DEFAULT_PCIE_GBS = 25.0        # PCIe 4.0 x16, achievable host<->device
DEFAULT_HOST_GBS = 50.0        # dual-channel DDR5 workstation (8-channel servers: 200-300)
DEFAULT_HOP_LATENCY_US = 10.0  # one device<->host or device<->device hop incl. sync and launch
DEFAULT_EFFICIENCY = 0.7       # fraction of peak bandwidth actually reached
DEFAULT_CONTEXT = 4096         # tokens already in the KV cache when a decode step is timed
# A decoder layer's GPU time beyond its bytes: ~45 small kernels (norms, rotary, router, one-token attention,
# the MoE pair) replayed from a CUDA graph. On an H200 at the real shape (bench/real_shape.py, batch 1) a MoE
# layer took 0.215 / 0.201 / 0.246 ms with bf16 / fp8 / int4 experts, 72 / 45 / 31 us of it its bytes at the
# measured copy bandwidth: 140-215 us more.
DEFAULT_GPU_LAYER_US = 150.0

ENCODER_CHOICES = ("gpu", "cpu", "none")
GENERATOR_CHOICES = ("auto", "ignore")
NO_GPUS = "none"  # --gpus none: a CPU-only machine
MAX_GPUS = 64  # GPUs of one machine a plan may list (the engine runs on one machine; planning time grows with the count)
EMBEDDING_CHOICES = ("auto", "gpu", "cpu")
CPU = -1  # device index of host memory / the CPU in expert maps


class PlanError(ValueError):
    """An impossible request: the message says what does not fit, by how much, and what to try."""


# ----------------------------------------------------------------------------------------------
# Sizes and devices
# ----------------------------------------------------------------------------------------------

_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'80GB' -> 80*10^9, '24GiB' -> 24*2^30, '1.5TB', '512MiB', '4096' (bytes). Decimal units are
    powers of 10, binary (KiB/MiB/GiB/TiB) powers of 2; case-insensitive. Bare 'G'/'M' are rejected
    as ambiguous."""
    if isinstance(text, bool):
        raise PlanError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise PlanError(f"size must be >= 0, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise PlanError(f"cannot parse size {text!r}: use e.g. 80GB, 24GiB, 256GB, 512MiB or a byte count")
    number, unit = m.group(1), m.group(2).lower()
    if unit == "":
        unit = "b"
    if unit not in _SIZE_UNITS:
        raise PlanError(f"unknown size unit {m.group(2)!r} in {text!r}: use B, KB, MB, GB, TB (powers of 10) "
                        f"or KiB, MiB, GiB, TiB (powers of 2)")
    size = float(number) * _SIZE_UNITS[unit]
    if not math.isfinite(size):
        raise PlanError(f"size {_quoted(text)} is too large to be a memory size")
    return int(round(size))


def _quoted(text: str, limit: int = 40) -> str:
    """`text` as repr() quotes it, its middle cut when longer than `limit` characters (a 4,000-digit size)."""
    text = str(text)
    return repr(text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}")


def format_gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass(frozen=True)
class GPUSpec:
    memory_bytes: int
    hbm_gbs: float | None = None  # None: the roofline's default HBM bandwidth
    name: str = ""


@dataclass(frozen=True)
class DeviceSpec:
    gpus: tuple[GPUSpec, ...]
    host_memory_bytes: int

    @classmethod
    def parse(cls, gpus: str | Sequence[str], cpu_mem: str | int) -> "DeviceSpec":
        """`gpus`: comma-separated sizes, each optionally 'Nx' repeated and '@GBPS' for that GPU's HBM
        bandwidth: '80GB,80GB', '8x24GB', '24GB@1008,48GB@864'; 'none' for a machine without GPUs
        (everything in host memory, computed by the CPU)."""
        if isinstance(gpus, str) and gpus.strip().lower() == NO_GPUS:
            return cls((), parse_size(cpu_mem))
        items = [s for s in (gpus.split(",") if isinstance(gpus, str) else gpus) if str(s).strip()]
        specs: list[GPUSpec] = []
        for item in items:
            # the size starts with a digit: '80XB' is a size with an unknown unit, not 80 GPUs of 'B'
            m = re.match(r"^\s*(?:(\d+)\s*[xX\u00d7]\s*)?([0-9.][^@]*?)\s*(?:@\s*([0-9.]+)\s*)?$", str(item))
            if not m:
                raise PlanError(f"cannot parse GPU {item!r}: use e.g. 80GB, 2x80GB or 24GB@1008")
            count = int(m.group(1) or 1)
            if len(specs) + count > MAX_GPUS:
                raise PlanError(f"at most {MAX_GPUS} GPUs (one machine's) can be planned for; got {_quoted(gpus)}")
            size = parse_size(m.group(2))
            if size <= 0:
                raise PlanError(f"GPU memory must be > 0, got {_quoted(item)}")
            bw = None
            if m.group(3):
                try:
                    bw = float(m.group(3))
                except ValueError:
                    raise PlanError(f"cannot parse the GPU bandwidth in {_quoted(item)}: use GB/s, e.g. 24GB@1008") from None
                if not 0 < bw < math.inf:
                    raise PlanError(f"GPU bandwidth must be a finite number > 0 GB/s, got {_quoted(item)}")
            first = len(specs)
            specs.extend([GPUSpec(size, bw, f"cuda:{first + i}") for i in range(count)])
        if not specs:
            raise PlanError("no GPUs given: pass e.g. --gpus 24GB, or --gpus none for a CPU-only machine")
        return cls(tuple(specs), parse_size(cpu_mem))


# ----------------------------------------------------------------------------------------------
# Module sizes from the config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleSize:
    """One non-expert module: parameters, resident bytes (incl. persistent buffers) and bytes read
    per decode token."""

    name: str
    kind: str  # encoder | embedding | attention | dense_mlp | shared_expert | router | norm | lm_head
    params: int
    nbytes: int
    decode_read_bytes: int
    layer: int | None = None
    exact: bool = True


@dataclass(frozen=True)
class ModelSizes:
    modules: tuple[ModuleSize, ...]          # every non-expert module
    moe_layers: tuple[int, ...]              # decoder-layer indices holding routed experts
    num_experts: int
    top_k: int
    hidden_size: int
    num_layers: int
    params_per_expert: int
    bytes_per_expert: int                    # in the chosen expert dtype, scales included
    expert_dtype: str
    kv_bytes_per_token_per_layer: int
    max_context: int = 0
    generators: tuple[ModuleSize, ...] = ()  # talker / image generator sub-folders, sized from their files
    dtype: str = "bf16"                      # the load dtype of everything not quantised

    @property
    def generator_bytes(self) -> int:
        return sum(m.nbytes for m in self.generators)

    @property
    def routed_expert_params(self) -> int:
        return self.params_per_expert * self.num_experts * len(self.moe_layers)

    @property
    def routed_expert_bytes(self) -> int:
        return self.bytes_per_expert * self.num_experts * len(self.moe_layers)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_per_layer * self.num_layers

    def _sum(self, attr: str, encoders: bool) -> int:
        return sum(getattr(m, attr) for m in self.modules if (m.kind == "encoder") == encoders)

    @property
    def llm_params(self) -> int:
        return self._sum("params", False) + self.routed_expert_params

    @property
    def llm_bytes(self) -> int:
        return self._sum("nbytes", False) + self.routed_expert_bytes

    @property
    def encoder_params(self) -> int:
        return self._sum("params", True)

    @property
    def encoder_bytes(self) -> int:
        return self._sum("nbytes", True)

    @property
    def total_params(self) -> int:
        return self.llm_params + self.encoder_params

    @property
    def exact(self) -> bool:
        return all(m.exact for m in self.modules)


def _int4_group(cols: int) -> int:
    group = SCALE_BLOCK
    while cols % group:
        group //= 2
    return group


def expert_scale_count(expert_dtype: str, h: int, i: int) -> int:
    """fp32 scales of one expert (gate/up [I, H], down [H, I]) stored as `expert_dtype`."""
    if expert_dtype in ("fp8", "int8"):
        return 2 * i + h
    if expert_dtype == "fp8-block":
        return 3 * -(-i // SCALE_BLOCK) * -(-h // SCALE_BLOCK)
    if expert_dtype == "int4":
        return 2 * i * (h // _int4_group(h)) + h * (i // _int4_group(i))
    return 0


def expert_bytes(llm: LLMConfig, expert_dtype: str = "bf16", dtype: str = "bf16") -> int:
    """Bytes of one routed expert: gate/up [I_e, H] and down [H, I_e] in the expert dtype ("bf16": not
    quantised, so in the load `dtype`), plus its fp32 scales (see `expert_scale_count`)."""
    if expert_dtype not in EXPERT_WEIGHT_BYTES:
        raise PlanError(f"unknown expert dtype {expert_dtype!r}: choose one of {sorted(EXPERT_WEIGHT_BYTES)}")
    h, i = llm.hidden_size, llm.moe_intermediate_size
    if expert_dtype == "int4" and (h % 2 or i % 2):
        raise PlanError(f"--expert-dtype int4 stores two input columns per byte, so hidden_size ({h}) and "
                        f"moe_intermediate_size ({i}) must be even: use --expert-dtype int8 (or fp8) for this model")
    per_weight = dtype_bytes(dtype) if expert_dtype == "bf16" else EXPERT_WEIGHT_BYTES[expert_dtype]
    return int(3 * h * i * per_weight) + expert_scale_count(expert_dtype, h, i) * FP32


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a weight kept as loaded in `dtype` (see DTYPE_BYTES)."""
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"unknown dtype {dtype!r}: choose one of {list(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def _linear(n_out: int, n_in: int, bias: bool = True) -> int:
    return n_out * n_in + (n_out if bias else 0)


def vision_params(vision: Mapping, llm_hidden: int) -> tuple[int, bool]:
    """(parameter count of the ViT, exact?) from the raw `vision_config` (spec §1.3, §4.3, §4.4)."""
    if not vision:
        return 0, True
    vision = vision_config_with_defaults(dict(vision))  # what the ViT is built with (spec §4.3, §4.4)
    mt = vision.get("model_type")
    d = int(vision.get("depth", 0))
    w = int(vision.get("hidden_size", 0))
    mlp = int(vision.get("intermediate_size", 0))
    out = int(vision.get("out_hidden_size", llm_hidden))
    p = int(vision.get("patch_size", 14))
    tp = int(vision.get("temporal_patch_size", 2))
    c = int(vision.get("in_channels", 3))
    m2 = int(vision.get("spatial_merge_size", 2)) ** 2
    if mt == "qwen3_moe_vit":
        block = 4 * w + _linear(3 * w, w) + _linear(w, w) + _linear(mlp, w) + _linear(w, mlp)
        merger_in = w * m2
        merger = 2 * w + _linear(merger_in, merger_in) + _linear(out, merger_in)
        deepstack = 2 * merger_in + _linear(merger_in, merger_in) + _linear(out, merger_in)
        n_deep = len(vision.get("deepstack_visual_indexes") or ())
        pos = int(vision.get("num_position_embeddings", 0)) * w
        patch = _linear(w, c * tp * p * p)
        return patch + pos + d * block + merger + n_deep * deepstack, True
    if mt == "qwen2_5_vit":
        block = 2 * w + _linear(3 * w, w) + _linear(w, w) + 2 * _linear(mlp, w) + _linear(w, mlp)
        merger_in = w * m2
        merger = w + _linear(merger_in, merger_in) + _linear(out, merger_in)
        patch = _linear(w, c * tp * p * p, bias=False)
        return patch + d * block + merger, True
    # Unknown ViT flavour: a generic pre-LN transformer estimate (attention 4w², MLP 2·w·mlp).
    return d * (4 * w * w + 2 * w * mlp) + _linear(out, w * m2), False


def audio_params(audio: Mapping) -> tuple[int, int, bool]:
    """(parameters, persistent-buffer elements, exact?) of the Whisper encoder (spec §1.3, §5.2)."""
    wc = (audio or {}).get("whisper_encoder_config") or {}
    if not wc:
        return 0, 0, True
    mels, ctx, s, layers = (int(wc[k]) for k in ("n_mels", "n_ctx", "n_state", "n_layer"))
    conv = _linear(s, mels * 3) + _linear(s, s * 3)
    block = 3 * _linear(s, s) + _linear(s, s, bias=False) + 2 * s + _linear(4 * s, s) + _linear(s, 4 * s) + 2 * s
    return conv + layers * block + 2 * s, ctx * s, True


def projector_params(in_dim: int, llm_hidden: int, depth: int, conv_kernel: int | None = None) -> int:
    """`linear_proj` (Linear in→H) or `linear_proj_audio` (Conv1d in→H, kernel k), then (depth−1) Linear H→H."""
    first = _linear(llm_hidden, in_dim * (conv_kernel or 1))
    return first + (depth - 1) * _linear(llm_hidden, llm_hidden)


def model_sizes(config: MingConfig, expert_dtype: str = "bf16", linear_dtype: str = "bf16",
                dtype: str = "bf16") -> ModelSizes:
    """Exact sizes of every module of the thinker (LLM + encoders + projectors), loaded in `dtype`
    ("bf16" as the releases store it, or "fp32"). `linear_dtype` "int8": the LLM's non-expert linears
    (attention, dense MLP, shared experts, lm_head) hold int8 weights with one fp32 scale per output
    channel (norms, routers, embeddings and encoders stay in `dtype`)."""
    if linear_dtype not in LINEAR_DTYPES:
        raise PlanError(f"unknown linear dtype {linear_dtype!r}: choose one of {list(LINEAR_DTYPES)}")
    w = dtype_bytes(dtype)
    llm = config.llm
    h, v, hd = llm.hidden_size, llm.vocab_size, llm.head_dim
    mods: list[ModuleSize] = []

    def add(name, kind, params, nbytes=None, read=None, layer=None, exact=True):
        nb = params * w if nbytes is None else nbytes
        mods.append(ModuleSize(name, kind, params, nb, nb if read is None else read, layer, exact))

    def linear_bytes(params: int, rows: int, small: int = 0) -> int:
        """As loaded, or int8 + fp32 per output row; `small` parameters (norms, biases) stay as loaded."""
        if linear_dtype == "bf16":
            return (params + small) * w
        return params + rows * FP32 + small * w

    depth = config.projector_depth
    if config.vision:
        with sub_config_errors(config.source, "vision_config"):
            from engine.models.thinker.vision_config import VisionConfig  # noqa: PLC0415  (its checks name the key)

            VisionConfig.from_dict(dict(config.vision))
            vp, exact = vision_params(config.vision, h)
            out = int(vision_config_with_defaults(dict(config.vision)).get("out_hidden_size", h))
        add("vision", "encoder", vp, read=0, exact=exact)
        add("linear_proj", "encoder", projector_params(out, h, depth), read=0)
    wc = (config.audio or {}).get("whisper_encoder_config") or {}
    if wc:
        with sub_config_errors(config.source, "audio_config"):
            ap, buf, exact = audio_params(config.audio)
            proj = projector_params(int(wc["n_state"]), h, depth, int(config.audio.get("ds_kernel_size", 3)))
        add("audio", "encoder", ap, nbytes=(ap + buf) * w, read=0, exact=exact)
        add("linear_proj_audio", "encoder", proj, read=0)

    add("word_embeddings", "embedding", v * h, read=h * w)  # decode reads one row
    qkv_rows = (llm.num_attention_heads + 2 * llm.num_key_value_heads) * hd
    attn_small = 2 * hd + 2 * h + (qkv_rows if llm.use_qkv_bias else 0) + (h if llm.use_bias else 0)
    attn = (_linear(qkv_rows, h, llm.use_qkv_bias) + _linear(h, llm.num_attention_heads * hd, llm.use_bias)
            + 2 * hd + 2 * h)
    attn_bytes = linear_bytes(attn - attn_small, qkv_rows + h, attn_small)
    e = llm.num_experts
    n_gates = 3 if llm.uses_multi_router else 1
    moe_layers = []
    for layer in range(llm.num_hidden_layers):
        add(f"layers.{layer}.attention", "attention", attn, nbytes=attn_bytes, layer=layer)  # incl. q/k and layer norms
        if llm.is_moe_layer(layer):
            moe_layers.append(layer)
            if llm.num_shared_experts:
                i_sh = llm.moe_intermediate_size * llm.num_shared_experts
                add(f"layers.{layer}.shared_experts", "shared_expert", 3 * h * i_sh,
                    nbytes=linear_bytes(3 * h * i_sh, 2 * i_sh + h), layer=layer)
            # Routers: weight [E, H] as loaded + expert_bias [E] fp32 each; decode uses only the text gate (§2.7).
            add(f"layers.{layer}.routers", "router", n_gates * (e * h + e),
                nbytes=n_gates * (e * h * w + e * FP32), read=e * h * w + e * FP32, layer=layer)
        else:
            add(f"layers.{layer}.mlp", "dense_mlp", 3 * h * llm.intermediate_size,
                nbytes=linear_bytes(3 * h * llm.intermediate_size, 2 * llm.intermediate_size + h), layer=layer)
    add("norm", "norm", h)
    if not llm.tie_word_embeddings:
        add("lm_head", "lm_head", v * h, nbytes=linear_bytes(v * h, v))
    else:  # tied: lm_head reads the embedding table every token
        add("lm_head", "lm_head", 0, nbytes=0, read=v * h * w)
    return ModelSizes(
        modules=tuple(mods), moe_layers=tuple(moe_layers), num_experts=e, top_k=llm.num_experts_per_tok,
        hidden_size=h, num_layers=llm.num_hidden_layers, params_per_expert=3 * h * llm.moe_intermediate_size,
        bytes_per_expert=expert_bytes(llm, expert_dtype, dtype), expert_dtype=expert_dtype,
        kv_bytes_per_token_per_layer=2 * llm.num_key_value_heads * hd * w,
        max_context=llm.max_position_embeddings, generators=generator_sizes(_checkpoint_dir(config), dtype),
        dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Expert popularity
# ----------------------------------------------------------------------------------------------


def load_expert_stats(path: str | Path) -> dict:
    """Read an expert-statistics JSON file (format: see `normalize_expert_stats`); PlanError for a file that
    cannot be read, is no JSON, or holds no statistics (`null`, an empty object or list, a number: a file given
    on purpose never means 'uniform')."""
    try:
        stats = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise PlanError(f"{path}: cannot read expert statistics ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # not JSON, or not text at all
        raise PlanError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(stats, (dict, list)) or not stats:
        raise PlanError(f"{path}: holds no expert statistics ({shown(json.dumps(stats))}); expected "
                        "{\"layers\": {layer: [counts]}} or a list of per-layer count lists")
    return stats


def normalize_expert_stats(stats, llm: LLMConfig) -> dict[int, list[float]]:
    """Per MoE layer, the fraction of expert selections that went to each expert (sums to 1).

    Accepted forms (counts are per-expert selection counts, any non-negative numbers):
      * ``{"layers": {"1": [c_0, ..., c_{E-1}], "2": [...], ...}}`` keyed by decoder-layer index;
      * the same mapping without the ``"layers"`` wrapper;
      * a list of per-layer count lists, one per MoE layer (layers first_k_dense_replace…) or one
        per decoder layer (entries of dense layers must be empty or null).
    Layers that are missing or all-zero are uniform."""
    e, moe = llm.num_experts, [l for l in range(llm.num_hidden_layers) if llm.is_moe_layer(l)]
    uniform = {l: [1.0 / e] * e for l in moe} if e else {}
    if stats is None:
        return uniform
    if isinstance(stats, Mapping) and "layers" in stats:
        stats = stats["layers"]
    if isinstance(stats, Mapping):
        try:
            items = {int(k): val for k, val in stats.items()}
        except (TypeError, ValueError) as err:
            raise PlanError(f"expert stats: layer keys must be decoder-layer indices ({err})") from err
    elif isinstance(stats, Sequence) and not isinstance(stats, (str, bytes)):
        if len(stats) == len(moe):
            items = dict(zip(moe, stats))
        elif len(stats) == llm.num_hidden_layers:
            items = {l: val for l, val in enumerate(stats) if val}
        else:
            raise PlanError(f"expert stats: a list must have one entry per MoE layer ({len(moe)}) or per "
                            f"decoder layer ({llm.num_hidden_layers}), got {len(stats)}")
    else:
        raise PlanError("expert stats must be a JSON object {\"layers\": {layer: [counts]}} or a list of lists")
    if not items:
        raise PlanError("expert stats name no layer: give {\"layers\": {layer: [counts]}} (or leave them out: uniform)")
    out = dict(uniform)
    for layer, counts in items.items():
        if layer not in uniform:
            raise PlanError(f"expert stats: layer {layer} is not a MoE layer (MoE layers: {moe[0]}..{moe[-1]})"
                            if moe else "expert stats given but the model has no routed experts")
        vals = _layer_counts(layer, counts, e)
        total = sum(vals)
        if total > 0:
            out[layer] = [c / total for c in vals]
    return out


# ----------------------------------------------------------------------------------------------
# Plan data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RooflineParams:
    """Batch-1 decode roofline inputs. Bandwidths in GB/s (10^9 bytes/s) are peaks; `efficiency`
    scales all of them. `overlap_cpu`: CPU-computed experts run concurrently with GPU experts
    (default False: back to back, as a first runtime does). `cpu_expert_gbs` / `cpu_weight_gbs`: rates
    measured on this host (engine.placement.host_rates: the CPU kernels streaming routed experts / the
    other weights and the KV cache), taken as they are, without `efficiency`; None: host_gbs x efficiency."""

    hbm_gbs: float = DEFAULT_HBM_GBS
    pcie_gbs: float = DEFAULT_PCIE_GBS
    host_gbs: float = DEFAULT_HOST_GBS
    hop_latency_us: float = DEFAULT_HOP_LATENCY_US
    efficiency: float = DEFAULT_EFFICIENCY
    context_tokens: int = DEFAULT_CONTEXT
    overlap_cpu: bool = False
    cpu_expert_gbs: float | None = None
    cpu_weight_gbs: float | None = None
    gpu_layer_us: float = DEFAULT_GPU_LAYER_US  # each GPU decoder layer's time beyond its bytes (not scaled)

    def validate(self) -> None:
        """Raise PlanError unless every rate is a finite number > 0 (NaN and inf included: they would predict
        'inf tokens/s'), the efficiency in (0, 1] and the hop latency and context finite and >= 0."""
        for name in ("hbm_gbs", "pcie_gbs", "host_gbs"):
            if not 0 < getattr(self, name) < math.inf:
                raise PlanError(f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("cpu_expert_gbs", "cpu_weight_gbs"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) < math.inf:
                raise PlanError(f"{name} must be a finite number > 0 when given, got {getattr(self, name)}")
        if not 0 < self.efficiency <= 1:
            raise PlanError(f"--efficiency must be in (0, 1], got {self.efficiency}")
        if not 0 <= self.gpu_layer_us < math.inf:
            raise PlanError(f"--gpu-layer-us must be finite and >= 0, got {self.gpu_layer_us}")
        if not (0 <= self.hop_latency_us < math.inf and self.context_tokens >= 0):
            raise PlanError(f"--hop-latency-us and --context must be finite and >= 0, got {self.hop_latency_us} and "
                            f"{self.context_tokens}")

    @property
    def measured(self) -> bool:
        return self.cpu_expert_gbs is not None and self.cpu_weight_gbs is not None

    def cpu_rates(self) -> tuple[float, float]:
        """Bytes/s of the CPU streaming routed experts and the other host weights (and KV cache)."""
        peak = self.host_gbs * 1e9 * self.efficiency
        return (peak if self.cpu_expert_gbs is None else self.cpu_expert_gbs * 1e9,
                peak if self.cpu_weight_gbs is None else self.cpu_weight_gbs * 1e9)


@dataclass(frozen=True)
class ModulePlacement:
    name: str
    kind: str
    nbytes: int
    device: str  # "cuda:N" or "cpu" (host memory, run on the CPU)
    layer: int | None = None


@dataclass(frozen=True)
class LayerExperts:
    """Routed experts of one MoE layer: `device[e]` is the GPU index holding expert e, or -1 (CPU)."""

    layer: int
    device: tuple[int, ...]
    popularity: tuple[float, ...]  # fraction of this layer's selections per expert

    def count(self, dev: int) -> int:
        return sum(1 for d in self.device if d == dev)

    def mass(self, dev: int) -> float:
        return sum(p for d, p in zip(self.device, self.popularity) if d == dev)


@dataclass(frozen=True)
class GPUPlan:
    index: int
    name: str
    memory_bytes: int
    reserve_bytes: int
    modules_bytes: int
    kv_bytes: int          # requested KV budget held here
    experts: int
    experts_bytes: int
    free_bytes: int        # left after everything; added to the KV budget where attention lives
    hbm_gbs: float


@dataclass(frozen=True)
class HostPlan:
    memory_bytes: int
    reserve_bytes: int
    modules_bytes: int
    experts: int
    experts_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Prediction:
    tokens_per_s: float
    ms_per_token: float
    breakdown_ms: dict[str, float]      # critical-path time per component
    bottleneck: str                     # key of breakdown_ms with the most time
    bottleneck_text: str
    hbm_bytes_per_token: float          # expected, all GPUs together
    host_bytes_per_token: float
    gpu_selected_fraction: float        # expected fraction of selected experts that are GPU-resident
    params: RooflineParams


BOTTLENECK_TEXT = {
    "gpu_weights": "GPU HBM bandwidth: non-expert weights (attention, shared experts, routers, lm_head)",
    "kv_cache": "GPU HBM bandwidth: KV-cache reads",
    "gpu_experts": "GPU HBM bandwidth: GPU-resident routed experts",
    "cpu_experts": "host memory bandwidth: routed experts computed on the CPU",
    "transfers": "PCIe transfers and hop latency (activations to/from the CPU and between GPUs)",
    "gpu_layers": "GPU time per layer beyond its bytes (small kernels: norms, rotary, router, attention)",
    "host_weights": "host memory bandwidth: non-expert weights and KV cache on the CPU (no GPU)",
}
GPU_PLAN_PARTS = tuple(k for k in BOTTLENECK_TEXT if k != "host_weights")


@dataclass(frozen=True)
class Plan:
    source: str
    release: str
    expert_dtype: str
    sizes: ModelSizes
    modules: tuple[ModulePlacement, ...]
    layer_home: tuple[int, ...]            # GPU holding each decoder layer's attention (and its KV)
    head_home: int                         # GPU holding final norm + lm_head
    experts: tuple[LayerExperts, ...]
    gpus: tuple[GPUPlan, ...]
    host: HostPlan
    kv_requested_tokens: int
    kv_budget_bytes: int
    kv_max_tokens: int
    embeddings: str                        # "gpu" | "cpu"
    encoders: str                          # "gpu" | "cpu" | "none"
    expert_gpus: int                       # GPUs used for routed experts (the first N)
    prediction: Prediction
    notes: tuple[str, ...] = field(default_factory=tuple)
    generators: tuple[ModulePlacement, ...] = ()  # "cuda:N" resident, or "cpu>cuda:N" moved in on demand

    @property
    def gpu_experts(self) -> int:
        return sum(g.experts for g in self.gpus)

    @property
    def cpu_experts(self) -> int:
        return self.host.experts

    def expert_device(self, layer: int, expert: int) -> str:
        for le in self.experts:
            if le.layer == layer:
                d = le.device[expert]
                return "cpu" if d == CPU else f"cuda:{d}"
        raise KeyError(f"layer {layer} has no routed experts")

    def to_dict(self) -> dict:
        s = self.sizes
        return {
            "predicted_decode_tokens_per_s": self.prediction.tokens_per_s,
            "source": self.source,
            "release": self.release,
            "expert_dtype": self.expert_dtype,
            "model": {
                "llm_params": s.llm_params, "llm_bytes": s.llm_bytes,
                "encoder_params": s.encoder_params, "encoder_bytes": s.encoder_bytes,
                "total_params": s.total_params, "sizes_exact": s.exact,
                "routed_experts": s.num_experts * len(s.moe_layers), "moe_layers": list(s.moe_layers),
                "experts_per_layer": s.num_experts, "top_k": s.top_k,
                "params_per_expert": s.params_per_expert, "bytes_per_expert": s.bytes_per_expert,
                "kv_bytes_per_token": s.kv_bytes_per_token,
            },
            "gpus": [asdict(g) for g in self.gpus],
            "host": asdict(self.host),
            "modules": [asdict(m) for m in self.modules],
            "layer_home": list(self.layer_home),
            "head_home": self.head_home,
            "embeddings": self.embeddings,
            "encoders": self.encoders,
            "expert_gpus": self.expert_gpus,
            "experts_on_gpu": self.gpu_experts,
            "experts_on_cpu": self.cpu_experts,
            "expert_devices": {str(le.layer): list(le.device) for le in self.experts},
            "kv_cache": {"requested_tokens": self.kv_requested_tokens, "budget_bytes": self.kv_budget_bytes,
                         "max_tokens": self.kv_max_tokens, "bytes_per_token": s.kv_bytes_per_token},
            "prediction": {**{k: v for k, v in asdict(self.prediction).items() if k != "params"},
                           "roofline": asdict(self.prediction.params)},
            "notes": list(self.notes),
            "generators": [asdict(m) for m in self.generators],
        }


# ----------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------


def _gpu_name(i: int) -> str:
    return "cpu" if i == CPU else f"cuda:{i}"


def _place_nonexpert(sizes: ModelSizes, usable: list[int], gpu_reserve: int, kv_tokens: int,
                     encoders: str, embeddings: str) -> tuple[list[ModulePlacement], list[int], int, list[int], list[int]]:
    """Fill GPUs in order with the non-expert groups (encoders, embeddings, layer 0…L−1 with their KV,
    final norm + lm_head). Returns placements, per-GPU module bytes, host module bytes, layer homes,
    per-GPU KV bytes."""
    kv_layer = sizes.kv_bytes_per_token_per_layer * kv_tokens
    groups: list[tuple[list[ModuleSize], int, int | None]] = []  # (modules, kv bytes, layer)
    host_mods: list[ModuleSize] = []
    enc = [m for m in sizes.modules if m.kind == "encoder"]
    if encoders == "gpu":
        groups.append((enc, 0, None))
    elif encoders == "cpu":
        host_mods.extend(enc)
    emb = [m for m in sizes.modules if m.kind == "embedding"]
    if embeddings == "gpu":
        groups.append((emb, 0, None))
    else:
        host_mods.extend(emb)
    for layer in range(sizes.num_layers):
        groups.append(([m for m in sizes.modules if m.layer == layer], kv_layer, layer))
    groups.append(([m for m in sizes.modules if m.kind in ("norm", "lm_head")], 0, None))

    n = len(usable)
    used = [0] * n
    kv = [0] * n
    home = [0] * sizes.num_layers
    placed: list[ModulePlacement] = []
    g = 0
    for mods, kvb, layer in groups:
        need = sum(m.nbytes for m in mods) + kvb
        while g < n and used[g] + need > usable[g]:
            g += 1
        if g == n:
            total = sum(sum(m.nbytes for m in ms) + k for ms, k, _ in groups)
            what = f"layer {layer}" if layer is not None else "+".join(sorted({m.kind for m in mods}))
            on_host = ("; word embeddings already in host memory" if embeddings == "cpu" else "") + \
                      ("; encoders already in host memory" if encoders == "cpu" else "")
            tips = ([] if encoders != "gpu" else ["--encoders cpu (or none)"]) + \
                   ([] if embeddings == "cpu" else ["--embeddings cpu"]) + \
                   ["a smaller --kv-tokens or --gpu-reserve", "more GPU memory"]
            raise PlanError(
                f"the non-expert part does not fit on the GPUs: it needs {format_gb(total)} of GPU memory "
                f"(weights {format_gb(total - kv_layer * sizes.num_layers)} + KV cache "
                f"{format_gb(kv_layer * sizes.num_layers)} for {kv_tokens} tokens{on_host}) but the GPUs offer "
                f"{format_gb(sum(usable))} after the per-GPU reserve of {format_gb(gpu_reserve)} (filling them in "
                f"order, {what} ({format_gb(need)}) found no room). Try " + ", ".join(tips) + ".")
        used[g] += need
        kv[g] += kvb
        if layer is not None:
            home[layer] = g
        placed.extend(ModulePlacement(m.name, m.kind, m.nbytes, _gpu_name(g), m.layer) for m in mods)
    placed.extend(ModulePlacement(m.name, m.kind, m.nbytes, "cpu", m.layer) for m in host_mods)
    modules_bytes = [used[i] - kv[i] for i in range(n)]
    return placed, modules_bytes, sum(m.nbytes for m in host_mods), home, kv


def _split_total(total: int, caps: list[int], weights: list[float]) -> list[int]:
    """Split `total` items over bins in proportion to `weights`, never above a bin's cap (water
    filling: bins that hit their cap keep it and the rest is shared among the others)."""
    n = len(caps)
    if total >= sum(caps):
        return list(caps)
    share = [0.0] * n
    open_bins = [i for i in range(n) if caps[i] > 0]
    rest = float(total)
    while open_bins and rest > 1e-9:
        wsum = sum(weights[i] for i in open_bins)
        capped = [i for i in open_bins if share[i] + rest * weights[i] / wsum >= caps[i]]
        if not capped:
            for i in open_bins:
                share[i] += rest * weights[i] / wsum
            rest = 0.0
            break
        for i in capped:
            rest -= caps[i] - share[i]
            share[i] = float(caps[i])
        open_bins = [i for i in open_bins if i not in capped]
    out = [min(caps[i], int(math.floor(share[i] + 1e-9))) for i in range(n)]
    left = total - sum(out)
    for i in sorted(range(n), key=lambda i: (-(share[i] - out[i]), i)):
        if left <= 0:
            break
        if out[i] < caps[i]:
            out[i] += 1
            left -= 1
    return out


def _popularity_order(sizes: ModelSizes, pop: dict[int, list[float]]) -> list[tuple[int, int]]:
    """Every (MoE-layer position, expert) pair, most popular first (ties: earlier layers first, so cold
    experts gather in few layers and few layers pay a CPU hop). The same for every variant a plan
    weighs, so `plan_placement` sorts once."""
    layers = sizes.moe_layers
    return sorted(((li, x) for li in range(len(layers)) for x in range(sizes.num_experts)),
                  key=lambda t: (-pop[layers[t[0]]][t[1]], t[0], t[1]))


def _assign_experts(sizes: ModelSizes, pop: dict[int, list[float]], slots: list[int],
                    bws: list[float], order: list[tuple[int, int]]) -> list[LayerExperts]:
    """The first (most popular) pairs of `order` (see `_popularity_order`) go to the GPUs; each
    layer's resident experts are dealt over the GPUs in proportion to their capacity, then by
    popularity mass (largest first, to the GPU with the least expected work)."""
    layers, n_gpu = list(sizes.moe_layers), len(slots)
    total = min(sum(slots), len(order))
    per_layer: list[list[int]] = [[] for _ in layers]
    for li, x in order[:total]:
        per_layer[li].append(x)  # stays in popularity order within the layer
    quota = _split_total(total, slots, bws)
    assigned = [0] * n_gpu
    cum = 0
    out = []
    for li, layer in enumerate(layers):
        resident = per_layer[li]
        k = len(resident)
        cum += k
        # Exact cumulative apportionment: GPU g should have cum·quota_g/total experts so far.
        num = [cum * quota[g] - assigned[g] * total for g in range(n_gpu)] if total else [0] * n_gpu
        counts = [max(0, min(num[g] // total if total else 0, quota[g] - assigned[g])) for g in range(n_gpu)]
        while sum(counts) > k:
            g = max((g for g in range(n_gpu) if counts[g] > 0), key=lambda g: (counts[g] * total - num[g], g))
            counts[g] -= 1
        while sum(counts) < k:
            g = max((g for g in range(n_gpu) if assigned[g] + counts[g] < quota[g]),
                    key=lambda g: (num[g] - counts[g] * total, -g))
            counts[g] += 1
        device = _deal(resident, counts, pop[layer], bws)
        for g in range(n_gpu):
            assigned[g] += counts[g]
        out.append(LayerExperts(layer, tuple(device), tuple(pop[layer])))
    return out


def _deal(resident: list[int], counts: list[int], popularity: list[float], bws: list[float]) -> list[int]:
    """One layer's device per expert: `resident` experts (most popular first) each go to the GPU with
    the least expected work per bandwidth among those with room left (`counts[g]` experts for GPU g;
    ties: more room left, then the lower index); the others stay on the CPU. A heap keyed by exactly
    that order keeps it O(k log n) instead of scanning every GPU for every expert (32 GPUs x 8k experts)."""
    device = [CPU] * len(popularity)
    load = [0.0] * len(counts)
    heap = [(0.0, -c, g) for g, c in enumerate(counts) if c > 0]
    heapq.heapify(heap)
    for x in resident:
        _, neg_left, g = heapq.heappop(heap)
        device[x] = g
        load[g] += popularity[x]
        if neg_left < -1:
            heapq.heappush(heap, (load[g] / bws[g], neg_left + 1, g))
    return device


def _build(config: MingConfig, sizes: ModelSizes, devices: DeviceSpec, pop: dict[int, list[float]],
           kv_tokens: int, gpu_reserve: int, host_reserve: int, encoders: str, embeddings: str,
           expert_gpus: int, roofline: RooflineParams, order: list[tuple[int, int]]) -> Plan:
    gpus = devices.gpus
    usable = [max(0, g.memory_bytes - gpu_reserve) for g in gpus]
    placed, mod_bytes, host_mod_bytes, home, kv = _place_nonexpert(sizes, usable, gpu_reserve, kv_tokens,
                                                                   encoders, embeddings)
    head_home = next(int(p.device.split(":")[1]) for p in placed if p.kind == "lm_head")
    free = [usable[i] - mod_bytes[i] - kv[i] for i in range(len(gpus))]
    eb = sizes.bytes_per_expert
    slots = [free[i] // eb if (i < expert_gpus and sizes.moe_layers) else 0 for i in range(len(gpus))]
    bws = [g.hbm_gbs or roofline.hbm_gbs for g in gpus]
    experts = _assign_experts(sizes, pop, slots, bws, order) if sizes.moe_layers else []
    n_cpu = sum(le.count(CPU) for le in experts)
    host_need = host_mod_bytes + n_cpu * eb + host_reserve
    # A partly cold layer whose few GPU experts sit on other GPUs than its attention pays two
    # expert-parallel hops for them; when that costs more than it saves, keep the layer on the CPU.
    rates = _Rates.of(roofline, bws, sizes.hidden_size)
    for i, le in enumerate(experts):
        counts, mass = _tally(le, len(gpus))
        home_gpu = home[le.layer]
        if not counts[-1] or not any(c for g, c in enumerate(counts[:-1]) if g != home_gpu):
            continue
        moved = sum(counts[:-1])
        if host_need + moved * eb > devices.host_memory_bytes:
            continue
        now = sum(_moe_layer_cost(counts, mass, home_gpu, sizes, rates)[0].values())
        all_cpu = sum(_moe_layer_cost([0] * len(gpus) + [sizes.num_experts], [0.0] * len(gpus) + [1.0],
                                      home_gpu, sizes, rates)[0].values())
        if all_cpu < now:
            experts[i] = LayerExperts(le.layer, (CPU,) * sizes.num_experts, le.popularity)
            n_cpu += moved
            host_need += moved * eb
    per_device = Counter(d for le in experts for d in le.device)
    n_on = [per_device[i] for i in range(len(gpus))]

    if host_need > devices.host_memory_bytes:
        raise PlanError(
            f"host memory cannot hold what stays on the CPU: {n_cpu} cold experts "
            f"({format_gb(n_cpu * eb)}) + host-resident modules ({format_gb(host_mod_bytes)}) + reserve "
            f"({format_gb(host_reserve)}) = {format_gb(host_need)} > --cpu-mem {format_gb(devices.host_memory_bytes)}. "
            f"Try --expert-dtype fp8/int8, more GPU memory, more host RAM or a smaller --host-reserve.")

    # KV budget: the requested tokens plus whatever is left on the GPUs that hold attention layers.
    left = [free[i] - n_on[i] * eb for i in range(len(gpus))]
    per_tok_layer = sizes.kv_bytes_per_token_per_layer
    layers_on = [home.count(i) for i in range(len(gpus))]
    kv_budget = sum(kv[i] + left[i] for i in range(len(gpus)) if layers_on[i])
    kv_max = min((kv[i] + left[i]) // (layers_on[i] * per_tok_layer) for i in range(len(gpus)) if layers_on[i]) \
        if per_tok_layer and sizes.num_layers else 0

    gpu_plans = tuple(GPUPlan(i, g.name or _gpu_name(i), g.memory_bytes, min(gpu_reserve, g.memory_bytes),
                              mod_bytes[i], kv[i], n_on[i], n_on[i] * eb, left[i], bws[i])
                      for i, g in enumerate(gpus))
    host = HostPlan(devices.host_memory_bytes, host_reserve, host_mod_bytes, n_cpu, n_cpu * eb,
                    devices.host_memory_bytes - host_need)
    plan = Plan(source=config.source, release=config.release, expert_dtype=sizes.expert_dtype, sizes=sizes,
                modules=tuple(placed), layer_home=tuple(home), head_home=head_home, experts=tuple(experts),
                gpus=gpu_plans, host=host, kv_requested_tokens=kv_tokens, kv_budget_bytes=kv_budget,
                kv_max_tokens=int(kv_max), embeddings=embeddings, encoders=encoders, expert_gpus=expert_gpus,
                prediction=None)  # type: ignore[arg-type]
    return _with_prediction(plan, predict_decode(plan, roofline))


def _build_cpu_only(config: MingConfig, sizes: ModelSizes, devices: DeviceSpec, pop: dict[int, list[float]],
                    kv_tokens: int, host_reserve: int, encoders: str, roofline: RooflineParams,
                    generators: str = "auto") -> Plan:
    """No GPU: every module, expert, generator (`generators` "auto") and the KV cache in host memory,
    computed by the CPU. The generators run one at a time on the CPU, so one workspace is kept for them:
    GENERATOR_WORKSPACE, or the largest generator's own size when smaller (a small generator's step
    needs less; the demo checkpoint's are a few MB)."""
    mods = [m for m in sizes.modules if encoders != "none" or m.kind != "encoder"]
    placed = tuple(ModulePlacement(m.name, m.kind, m.nbytes, "cpu", m.layer) for m in mods)
    modules_bytes = sum(m.nbytes for m in mods)
    n_exp = sizes.num_experts * len(sizes.moe_layers)
    kv_bytes = kv_tokens * sizes.kv_bytes_per_token
    gens = sizes.generators if generators == "auto" else ()
    gen_bytes = sum(m.nbytes for m in gens) + (min(GENERATOR_WORKSPACE, max(m.nbytes for m in gens)) if gens else 0)
    need = modules_bytes + n_exp * sizes.bytes_per_expert + kv_bytes + gen_bytes + host_reserve
    if need > devices.host_memory_bytes:
        loaded_as = dtype_bytes(sizes.dtype)
        raise PlanError(
            f"host memory cannot hold the model without a GPU: modules {format_gb(modules_bytes)} + routed experts "
            f"({sizes.expert_dtype}) {format_gb(n_exp * sizes.bytes_per_expert)} + KV cache {format_gb(kv_bytes)} "
            f"for {kv_tokens} tokens"
            + (f" + generators and their workspace {format_gb(gen_bytes)}" if gens else "")
            + f" + reserve {format_gb(host_reserve)} = {format_gb(need)} > host memory "
            f"{format_gb(devices.host_memory_bytes)}. Try "
            + ", ".join(([] if sizes.dtype == "bf16" else ["--dtype bf16"])
                        + ([] if sizes.expert_dtype == "int4" else ["--expert-dtype int4"])
                        + ([] if modules_bytes < sum(m.params for m in mods) * loaded_as else ["--linear-dtype int8"])
                        + ([] if encoders == "none" else ["--encoders none"])
                        + (["--generators ignore (no speech or image output)"] if gens else [])
                        + ["a smaller --kv-tokens or --host-reserve", "more RAM"]) + ".")
    free = devices.host_memory_bytes - need
    per_token = sizes.kv_bytes_per_token
    experts = tuple(LayerExperts(l, (CPU,) * sizes.num_experts, tuple(pop[l])) for l in sizes.moe_layers)
    host = HostPlan(devices.host_memory_bytes, host_reserve, modules_bytes, n_exp, n_exp * sizes.bytes_per_expert, free)
    plan = Plan(source=config.source, release=config.release, expert_dtype=sizes.expert_dtype, sizes=sizes,
                modules=placed, layer_home=(CPU,) * sizes.num_layers, head_home=CPU, experts=experts, gpus=(),
                host=host, kv_requested_tokens=kv_tokens, kv_budget_bytes=kv_bytes + free,
                kv_max_tokens=int((kv_bytes + free) // per_token) if per_token else 0, embeddings="cpu",
                encoders=encoders, expert_gpus=0, prediction=None,  # type: ignore[arg-type]
                generators=tuple(ModulePlacement(m.name, m.kind, m.nbytes, "cpu") for m in gens))
    return _with_prediction(plan, predict_decode(plan, roofline))


def _predict_cpu_only(plan: Plan, rp: RooflineParams) -> Prediction:
    """Decode on the CPU alone: every byte a token needs is read from host memory."""
    s = plan.sizes
    expert_rate, weight_rate = rp.cpu_rates()
    weights = sum(m.decode_read_bytes for m in s.modules if m.kind != "encoder")
    kv = rp.context_tokens * s.kv_bytes_per_token
    experts = len(s.moe_layers) * s.top_k * s.bytes_per_expert
    t = {k: 0.0 for k in BOTTLENECK_TEXT}
    t["host_weights"], t["cpu_experts"] = (weights + kv) / weight_rate, experts / expert_rate
    total = sum(t.values())
    bottleneck = max(t, key=lambda key: t[key])
    return Prediction(tokens_per_s=1.0 / total if total > 0 else float("inf"), ms_per_token=total * 1e3,
                      breakdown_ms={k: v * 1e3 for k, v in t.items() if k in ("host_weights", "cpu_experts")},
                      bottleneck=bottleneck, bottleneck_text=BOTTLENECK_TEXT[bottleneck], hbm_bytes_per_token=0.0,
                      host_bytes_per_token=weights + kv + experts, gpu_selected_fraction=0.0, params=rp)


def _with_prediction(plan: Plan, pred: Prediction, notes: tuple[str, ...] = ()) -> Plan:
    return replace(plan, prediction=pred, notes=plan.notes + notes)


def plan_placement(config: MingConfig, devices: DeviceSpec, expert_dtype: str = "bf16", expert_stats=None, *,
                   kv_tokens: int | None = None, gpu_reserve: int | str = DEFAULT_GPU_RESERVE,
                   host_reserve: int | str = DEFAULT_HOST_RESERVE, encoders: str = "gpu",
                   embeddings: str = "auto", roofline: RooflineParams | None = None,
                   generators: str = "auto", linear_dtype: str = "bf16", dtype: str = "bf16") -> Plan:
    """Decide where everything lives and predict decode speed.

    Without GPUs (``DeviceSpec.gpus`` empty, ``--gpus none``) everything lives in host memory and the
    CPU computes it all, generators included (they run there); `linear_dtype` "int8" sizes the
    non-expert linears as int8, `dtype` ("bf16" | "fp32") what is kept as loaded (see `model_sizes`).

    `expert_stats`: per-layer selection counts (see `normalize_expert_stats`), uniform when None.
    `kv_tokens`: KV-cache tokens to reserve (default: the model's max_position_embeddings).
    `encoders`: "gpu", "cpu" (host memory, run on the CPU at prefill) or "none" (text-only, not loaded).
    `embeddings`: "gpu", "cpu" (the table stays in host memory; one row is sent per token), or "auto".
    `generators` ("auto" | "ignore"): place the checkpoint's talker / image generator (see
    `place_generators`); "ignore" plans the thinker alone.

    Among the feasible variants (embedding table on GPU or host when "auto"; routed experts on the
    first 1…N GPUs), the one with the highest predicted decode tokens/s is returned, so appending a
    GPU never lowers the prediction (the smaller machine's variants stay available); more memory on a
    GPU only moves experts from the CPU to it (tests check the prediction is monotone on grids)."""
    roofline = roofline or RooflineParams()
    roofline.validate()
    if encoders not in ENCODER_CHOICES:
        raise PlanError(f"encoders must be one of {ENCODER_CHOICES}, got {encoders!r}")
    if embeddings not in EMBEDDING_CHOICES:
        raise PlanError(f"embeddings must be one of {EMBEDDING_CHOICES}, got {embeddings!r}")
    if generators not in GENERATOR_CHOICES:
        raise PlanError(f"generators must be one of {GENERATOR_CHOICES}, got {generators!r}")
    if config.llm.tie_word_embeddings and embeddings == "cpu":
        raise PlanError("tied word embeddings are lm_head's weight: they cannot stay in host memory")
    sizes = model_sizes(config, expert_dtype, linear_dtype, dtype)
    pop = normalize_expert_stats(expert_stats, config.llm)
    kv_tokens = config.llm.max_position_embeddings if kv_tokens is None else int(kv_tokens)
    if kv_tokens < 0:
        raise PlanError(f"kv_tokens must be >= 0, got {kv_tokens}")
    gpu_reserve, host_reserve = parse_size(gpu_reserve), parse_size(host_reserve)
    if not devices.gpus:
        plan = _build_cpu_only(config, sizes, devices, pop, kv_tokens, host_reserve, encoders, roofline, generators)
        return _with_prediction(plan, plan.prediction, _notes(plan, sizes, 0))
    emb_options = ["gpu", "cpu"] if embeddings == "auto" else [embeddings]
    if config.llm.tie_word_embeddings:
        emb_options = ["gpu"]
    best: Plan | None = None
    error: PlanError | None = None
    n_gpu = len(devices.gpus)
    order = _popularity_order(sizes, pop)
    for emb in emb_options:
        for n in range(1, n_gpu + 1):
            try:
                p = _build(config, sizes, devices, pop, kv_tokens, gpu_reserve, host_reserve, encoders, emb, n,
                           roofline, order)
            except PlanError as e:
                error = e
                continue
            if best is None or p.prediction.tokens_per_s > best.prediction.tokens_per_s * (1 + 1e-12):
                best = p
    if best is None:
        assert error is not None
        raise error
    plan = _with_prediction(best, best.prediction, _notes(best, sizes, n_gpu))
    if generators == "auto" and sizes.generators and devices.gpus:
        def replan(devs: DeviceSpec) -> Plan:
            return plan_placement(config, devs, expert_dtype, expert_stats, kv_tokens=kv_tokens,
                                  gpu_reserve=gpu_reserve, host_reserve=host_reserve, encoders=encoders,
                                  embeddings=embeddings, roofline=roofline, generators="ignore", linear_dtype=linear_dtype,
                                  dtype=dtype)
        plan = place_generators(plan, devices, replan)
    return plan


# ----------------------------------------------------------------------------------------------
# Generators: the talker and the image generator (checkpoint sub-folders, sized from their files)
# ----------------------------------------------------------------------------------------------

GENERATOR_FOLDERS = {"image_generator": ("mlp", "connector", "transformer", "vae", "byt5"), "talker": ("talker",)}
GENERATOR_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")
# Working memory of a generator on its GPU: a 1024² DiT step with CFG (batch 2) and the VAE decode.
GENERATOR_WORKSPACE = parse_size("4GiB")


def _checkpoint_dir(config: MingConfig) -> Path | None:
    path = Path(config.source) if config.source else None
    return path.parent if path is not None and path.name == "config.json" and path.is_file() else None


def generator_sizes(root: str | Path | None, dtype: str = "bf16") -> tuple[ModuleSize, ...]:
    """The generators a checkpoint directory holds, each sized by its weight files on disk (the
    releases store them in bf16, so file bytes = resident bf16 bytes; scaled for another load `dtype`)."""
    if root is None:
        return ()
    root = Path(root)
    out = []
    for name, folders in GENERATOR_FOLDERS.items():
        present = [root / f for f in folders if (root / f).is_dir()]
        if not present:
            continue
        nbytes = sum(p.stat().st_size for d in present for p in d.rglob("*")
                     if p.is_file() and p.name.endswith(GENERATOR_WEIGHT_SUFFIXES))
        params = nbytes // BF16
        out.append(ModuleSize(name, "generator", params, params * dtype_bytes(dtype), 0, exact=False))
    return tuple(out)


def place_generators(plan: Plan, devices: DeviceSpec, replan=None) -> Plan:
    """Put each generator where it is used: resident on the GPU with the most memory left by the
    thinker's plan when its weights + workspace fit there; otherwise it rests in host memory and is
    moved to GPU 0 for each request ("cpu>cuda:0"), for which `replan` (the thinker planned again with
    GPU 0 smaller) keeps room for the largest one. Without that room it runs on the CPU ("cpu")."""
    gens = sorted(plan.sizes.generators, key=lambda m: -m.nbytes)
    free = [g.free_bytes for g in plan.gpus]
    placed, resident_all = [], True
    for m in gens:
        g = max(range(len(free)), key=lambda i: free[i]) if free else None
        if g is not None and free[g] >= m.nbytes + GENERATOR_WORKSPACE:
            free[g] -= m.nbytes + GENERATOR_WORKSPACE
            placed.append(ModulePlacement(m.name, m.kind, m.nbytes, _gpu_name(g)))
        else:
            resident_all = False
            placed.append(ModulePlacement(m.name, m.kind, m.nbytes, "cpu"))
    if resident_all or replan is None:
        return replace(plan, generators=tuple(placed))
    swap = gens[0].nbytes + GENERATOR_WORKSPACE
    gpu0 = devices.gpus[0]
    try:
        smaller = replan(replace(devices, gpus=(replace(gpu0, memory_bytes=max(0, gpu0.memory_bytes - swap)),)
                                 + tuple(devices.gpus[1:])))
    except PlanError:
        return replace(plan, generators=tuple(placed),
                       notes=plan.notes + ("no room on GPU 0 to move a generator in: they run on the CPU",))
    moved = tuple(p if p.device != "cpu" else replace(p, device="cpu>cuda:0") for p in placed)
    note = (f"{format_gb(swap)} of GPU 0 kept free for the generators (moved in from host memory on demand, "
            f"one at a time)")
    return replace(smaller, generators=moved, notes=smaller.notes + (note,))


def _notes(plan: Plan, sizes: ModelSizes, n_gpu: int) -> tuple[str, ...]:
    notes = []
    if not sizes.exact:
        notes.append("encoder sizes are approximate (unknown vision model_type)")
    if plan.encoders == "cpu":
        notes.append("encoders and projectors in host memory, run on the CPU at prefill (no decode cost)")
    if plan.encoders == "none":
        notes.append("encoders not loaded: text-only serving")
    if n_gpu == 0:
        notes.append("no GPU: every module, routed expert and the KV cache in host memory, computed by the CPU")
    elif plan.embeddings == "cpu":
        notes.append("word embeddings in host memory: one row per token is looked up on the CPU and sent over PCIe")
    if plan.expert_gpus < n_gpu:
        notes.append(f"routed experts use only the first {plan.expert_gpus} of {n_gpu} GPUs: spreading them "
                     f"further is predicted slower (hop latency outweighs the bandwidth gain)")
    if plan.prediction.params.context_tokens > plan.kv_max_tokens:
        notes.append(f"decode context {plan.prediction.params.context_tokens} exceeds the KV capacity "
                     f"{plan.kv_max_tokens} tokens")
    return tuple(notes)


# ----------------------------------------------------------------------------------------------
# Roofline decode model
# ----------------------------------------------------------------------------------------------


def _tally(le: LayerExperts, n_gpu: int) -> tuple[list[int], list[float]]:
    """Expert counts and popularity mass per device: indices 0…n_gpu−1 are GPUs, the last is the CPU."""
    counts, mass = [0] * (n_gpu + 1), [0.0] * (n_gpu + 1)
    for d, p in zip(le.device, le.popularity):
        counts[d] += 1  # d == -1 (CPU) lands on the last slot
        mass[d] += p
    return counts, mass


@dataclass(frozen=True)
class _Rates:
    """Effective bandwidths (bytes/s) and hop model of a roofline."""

    hbm: tuple[float, ...]
    host: float
    pcie: float
    latency: float
    act_bytes: int
    overlap: bool

    @classmethod
    def of(cls, rp: RooflineParams, hbm_gbs: Sequence[float], hidden: int) -> "_Rates":
        e = rp.efficiency
        return cls(tuple(b * 1e9 * e for b in hbm_gbs), rp.cpu_rates()[0], rp.pcie_gbs * 1e9 * e,
                   rp.hop_latency_us * 1e-6, hidden * BF16, rp.overlap_cpu)

    def hop(self, nbytes: float) -> float:
        return self.latency + nbytes / self.pcie


def _moe_layer_cost(counts: list[int], mass: list[float], home: int, sizes: ModelSizes,
                    rates: _Rates) -> tuple[dict[str, float], float, float]:
    """Critical-path seconds of one MoE layer's routed experts per component, plus expected HBM and
    host bytes read. GPUs work in parallel; CPU work follows (or overlaps with) the GPU work."""
    n_gpu, k, eb = len(counts) - 1, sizes.top_k, sizes.bytes_per_expert
    gpu_exp, remote, hbm = 0.0, False, 0.0
    for g in range(n_gpu):
        if counts[g]:
            read = k * mass[g] * eb
            hbm += read
            gpu_exp = max(gpu_exp, read / rates.hbm[g])
            remote |= g != home
    ep_hops = 2 * rates.hop(rates.act_bytes) if remote else 0.0
    t = {"gpu_experts": 0.0, "cpu_experts": 0.0, "transfers": 0.0}
    host = 0.0
    if not counts[-1]:
        t["gpu_experts"], t["transfers"] = gpu_exp, ep_hops
        return t, hbm, host
    host = k * mass[-1] * eb
    cpu_exp = host / rates.host
    # Hidden vector + routing down, result up; taken whenever the layer has cold experts.
    cpu_hops = rates.hop(rates.act_bytes + k * ROUTING_BYTES_PER_CHOICE) + rates.hop(rates.act_bytes)
    if rates.overlap:
        if gpu_exp + ep_hops >= cpu_exp + cpu_hops:
            t["gpu_experts"], t["transfers"] = gpu_exp, ep_hops
        else:
            t["cpu_experts"], t["transfers"] = cpu_exp, cpu_hops
    else:
        t["gpu_experts"], t["cpu_experts"], t["transfers"] = gpu_exp, cpu_exp, ep_hops + cpu_hops
    return t, hbm, host


def predict_decode(plan: Plan, rp: RooflineParams | None = None) -> Prediction:
    """Batch-1 decode time per token, all steps memory-bound (arithmetic intensity ≈ 1–2 flop/byte).

    Per decoder layer, on its home GPU: read attention + norms, the dense MLP or shared expert and the
    text router (decode uses only the text gate), and the layer's KV for `context_tokens`.
    Per MoE layer: top-k experts are selected; GPU g reads k·mass_g experts (mass_g = popularity
    mass it holds), the CPU reads k·mass_cpu experts from host memory. GPUs of one layer run in
    parallel (expert parallel); when a layer has experts on a GPU other than its home, that costs
    two hops (send the hidden vector, gather the partial sums). A layer with any CPU-resident expert
    costs two host hops per token (hidden + routing down, result up) — taken whether or not a cold
    expert is selected, since the host must look at the routing. CPU and GPU expert work add up
    (`overlap_cpu` False) or overlap (max). Layer boundaries between GPUs and a host-resident
    embedding table cost one hop each; final norm + lm_head read once. Every decoder layer on a GPU also
    costs `gpu_layer_us`, its small kernels' time beyond its bytes (measured: DEFAULT_GPU_LAYER_US). Expected
    values are used (E[max] ≥ max E), so the model is optimistic, as a roofline is."""
    rp = rp or plan.prediction.params
    if not plan.gpus:
        return _predict_cpu_only(plan, rp)
    s = plan.sizes
    n_gpu = len(plan.gpus)
    rates = _Rates.of(rp, [g.hbm_gbs for g in plan.gpus], s.hidden_size)
    bw = rates.hbm
    h_act = rates.act_bytes
    t = {k: 0.0 for k in GPU_PLAN_PARTS}
    hbm_bytes = 0.0
    host_bytes = 0.0

    # Embedding row.
    emb = next(m for m in plan.modules if m.kind == "embedding")
    emb_dev = CPU if emb.device == "cpu" else int(emb.device.split(":")[1])
    if emb_dev == CPU:
        t["transfers"] += rates.hop(h_act)
        host_bytes += h_act
    else:
        t["gpu_weights"] += h_act / bw[emb_dev]
        hbm_bytes += h_act
    read_by_layer: dict[int, int] = {}
    for m in s.modules:
        if m.layer is not None:
            read_by_layer[m.layer] = read_by_layer.get(m.layer, 0) + m.decode_read_bytes
    experts = {le.layer: le for le in plan.experts}
    prev_home = emb_dev if emb_dev != CPU else (plan.layer_home[0] if plan.layer_home else 0)
    gpu_fracs = []
    kv_read = rp.context_tokens * s.kv_bytes_per_token_per_layer
    for layer in range(s.num_layers):
        g0 = plan.layer_home[layer]
        if g0 != prev_home:
            t["transfers"] += rates.hop(h_act)
        prev_home = g0
        read = read_by_layer.get(layer, 0)
        t["gpu_weights"] += read / bw[g0]
        t["gpu_layers"] += rp.gpu_layer_us * 1e-6
        t["kv_cache"] += kv_read / bw[g0]
        hbm_bytes += read + kv_read
        le = experts.get(layer)
        if le is None:
            continue
        counts, mass = _tally(le, n_gpu)
        gpu_fracs.append(sum(mass[:-1]))
        parts, hb, cb = _moe_layer_cost(counts, mass, g0, s, rates)
        for key, v in parts.items():
            t[key] += v
        hbm_bytes += hb
        host_bytes += cb
    # Final norm + lm_head.
    if plan.layer_home and plan.head_home != plan.layer_home[-1]:
        t["transfers"] += rates.hop(h_act)
    head = sum(m.decode_read_bytes for m in s.modules if m.kind in ("norm", "lm_head"))
    t["gpu_weights"] += head / bw[plan.head_home]
    hbm_bytes += head
    total = sum(t.values())
    bottleneck = max(t, key=lambda key: t[key])
    return Prediction(
        tokens_per_s=1.0 / total if total > 0 else float("inf"), ms_per_token=total * 1e3,
        breakdown_ms={key: v * 1e3 for key, v in t.items()}, bottleneck=bottleneck,
        bottleneck_text=BOTTLENECK_TEXT[bottleneck], hbm_bytes_per_token=hbm_bytes,
        host_bytes_per_token=host_bytes,
        gpu_selected_fraction=sum(gpu_fracs) / len(gpu_fracs) if gpu_fracs else 1.0, params=rp)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _ranges(idx: list[int]) -> str:
    if not idx:
        return "-"
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header), "  " + "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def render(plan: Plan) -> str:
    s, p, rp = plan.sizes, plan.prediction, plan.prediction.params
    n_exp = s.num_experts * len(s.moe_layers)
    lines = [
        f"Ming placement plan: {plan.source} (release {plan.release})",
        f"  model: LLM {s.llm_params / 1e9:.2f} B params ({format_gb(s.llm_bytes)} with {plan.expert_dtype} experts), "
        f"encoders+projectors {s.encoder_params / 1e9:.2f} B ({format_gb(s.encoder_bytes)})"
        + ("" if s.exact else " [approximate]"),
        f"  routed experts: {n_exp} = {len(s.moe_layers)} layers x {s.num_experts}, top-{s.top_k}, "
        f"{s.bytes_per_expert / 1e6:.2f} MB each ({plan.expert_dtype})",
        "",
        "Devices",
    ]
    rows = []
    for g in plan.gpus:
        rows.append([g.name, format_gb(g.memory_bytes), format_gb(g.reserve_bytes), format_gb(g.modules_bytes),
                     format_gb(g.kv_bytes), f"{g.experts} ({format_gb(g.experts_bytes)})", format_gb(g.free_bytes)])
    h = plan.host
    rows.append(["cpu (host)", format_gb(h.memory_bytes), format_gb(h.reserve_bytes), format_gb(h.modules_bytes),
                 "-", f"{h.experts} ({format_gb(h.experts_bytes)})", format_gb(h.free_bytes)])
    lines += _table(rows, ["device", "memory", "reserve", "modules", "KV cache", "routed experts", "free"])
    lines += ["", "What lives where"]
    devs = sorted({m.device for m in plan.modules}, key=lambda d: (d == "cpu", d))
    for d in devs:
        ms = [m for m in plan.modules if m.device == d]
        parts = []
        enc = [m for m in ms if m.kind == "encoder"]
        if enc:
            parts.append(f"encoders+projectors {format_gb(sum(m.nbytes for m in enc))}")
        for m in ms:
            if m.kind == "embedding":
                parts.append(f"word_embeddings {format_gb(m.nbytes)}")
        lay = sorted({m.layer for m in ms if m.layer is not None})
        if lay:
            parts.append(f"layers {_ranges(lay)} (attention, dense MLP/shared experts, routers) "
                         f"{format_gb(sum(m.nbytes for m in ms if m.layer is not None))}")
        head = [m for m in ms if m.kind in ("norm", "lm_head")]
        if head:
            parts.append(f"final norm + lm_head {format_gb(sum(m.nbytes for m in head))}")
        lines.append(f"  {d:<8} " + "; ".join(parts))
    if plan.experts:
        lines += ["", f"Routed experts: {plan.gpu_experts}/{n_exp} on GPU ({100 * plan.gpu_experts / n_exp:.1f}%), "
                      f"{plan.cpu_experts} on CPU; expected share of selected experts on GPU: "
                      f"{100 * p.gpu_selected_fraction:.1f}%"]
        # Consecutive layers are grouped while they use the same devices and differ by at most one
        # expert per device.
        groups: list[tuple[list[tuple[int, ...]], list[int]]] = []
        for le in plan.experts:
            sig = tuple(le.count(g) for g in range(len(plan.gpus))) + (le.count(CPU),)
            if groups:
                sigs, lays = groups[-1]
                cand = sigs + [sig]
                if all((min(c[j] for c in cand) > 0) == (max(c[j] for c in cand) > 0)
                       and max(c[j] for c in cand) - min(c[j] for c in cand) <= 1 for j in range(len(sig))):
                    sigs.append(sig)
                    lays.append(le.layer)
                    continue
            groups.append(([sig], [le.layer]))
        names = [g.name for g in plan.gpus] + ["cpu"]
        for sigs, lays in groups:
            parts = []
            for j, name in enumerate(names):
                lo, hi = min(c[j] for c in sigs), max(c[j] for c in sigs)
                if hi:
                    parts.append(f"{lo if lo == hi else f'{lo}-{hi}'} on {name}")
            if not sigs[0][-1] and all(not c[-1] for c in sigs):
                parts.append("none on cpu")
            lines.append(f"  layers {_ranges(lays):<8} " + ", ".join(parts))
    lines += ["", f"KV cache: {format_gb(plan.kv_budget_bytes)} {'on the attention GPU(s)' if plan.gpus else 'in host memory'} = max "
                  f"{plan.kv_max_tokens:,} cached tokens over all sequences (requested {plan.kv_requested_tokens:,}; "
                  f"{s.kv_bytes_per_token:,} B/token; model max context {s.max_context:,})"]
    bws = sorted({g.hbm_gbs for g in plan.gpus})
    lines += [
        "",
        (f"Decode roofline (batch 1, {rp.context_tokens} tokens of context, {int(rp.efficiency * 100)}% of peak: "
         f"HBM {'/'.join(f'{b:g}' for b in bws)} GB/s, "
         + (f"CPU experts {rp.cpu_expert_gbs:.1f} GB/s measured, " if rp.measured else f"host {rp.host_gbs:g} GB/s, ")
         + f"PCIe {rp.pcie_gbs:g} GB/s, "
         f"hop {rp.hop_latency_us:g} us, {rp.gpu_layer_us:g} us a GPU layer beyond its bytes, "
         f"CPU/GPU experts {'overlapped' if rp.overlap_cpu else 'back to back'})"
         if plan.gpus else
         (f"Decode roofline (batch 1, {rp.context_tokens} tokens of context, CPU rates measured on this host: "
          f"experts {rp.cpu_expert_gbs:.1f} GB/s, other weights and KV cache {rp.cpu_weight_gbs:.1f} GB/s; no GPU)"
          if rp.measured else
          f"Decode roofline (batch 1, {rp.context_tokens} tokens of context, {int(rp.efficiency * 100)}% of peak: "
          f"host memory {rp.host_gbs:g} GB/s; no GPU)")),
        f"  reads per token: {format_gb(p.hbm_bytes_per_token)} from HBM, {format_gb(p.host_bytes_per_token)} "
        f"from host memory",
        "  time per token: " + ", ".join(f"{k} {v:.2f} ms" for k, v in p.breakdown_ms.items())
        + f" = {p.ms_per_token:.2f} ms",
        f"  predicted decode: {p.tokens_per_s:.1f} tokens/s   bottleneck: {p.bottleneck_text}",
    ]
    if plan.generators:
        lines += ["", "Generators: " + "; ".join(
            f"{m.name} {format_gb(m.nbytes)} " + ("resident on " + m.device if m.device.startswith("cuda")
                                               else "in host memory, moved to " + m.device.split(">")[1] + " on demand"
                                               if ">" in m.device else "in host memory, run on the CPU")
            for m in plan.generators)]
    if plan.notes:
        lines += [""] + [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI

def _layer_counts(layer: int, counts, experts: int) -> list[float]:
    """One layer's selection counts as floats; PlanError unless they are `experts` finite non-negative numbers
    (a string, true/false, a nested list or an integer past float's range is no count)."""
    if not isinstance(counts, Sequence) or isinstance(counts, str) or len(counts) != experts:
        raise PlanError(f"expert stats: layer {layer} must list {experts} counts, got "
                        f"{len(counts) if isinstance(counts, list) else shown(json.dumps(counts))}")
    not_numbers = [c for c in counts if isinstance(c, bool) or not isinstance(c, (int, float))]
    if not_numbers:
        raise PlanError(f"expert stats: layer {layer} must list numbers, got {shown(json.dumps(not_numbers[0]))}")
    try:
        vals = [float(c) for c in counts]
    except OverflowError:  # an integer of hundreds of digits
        vals = [math.inf]
    if any(not math.isfinite(c) or c < 0 for c in vals):
        raise PlanError(f"expert stats: layer {layer} has negative or non-finite counts")
    return vals

# ----------------------------------------------------------------------------------------------


MEASURE = "measure"


def _host_gbs(text: str) -> float | str:
    if text == MEASURE:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GB/s or '{MEASURE}', got {text!r}") from None


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m engine.plan",
        description="Plan where a Ming checkpoint's modules and routed experts live (GPUs, host memory/CPU) "
                    "and predict batch-1 decode tokens/s with a roofline model.",
        epilog=EXIT_CODES_HELP)
    ap.add_argument("--config", required=True, help="checkpoint directory or config.json")
    ap.add_argument("--gpus", required=True,
                    help="GPU memory budgets, comma-separated: 80GB,80GB or 8x24GB; '@GBPS' sets one GPU's HBM "
                         "bandwidth (24GB@1008). GB = 10^9 bytes, GiB = 2^30. 'none': a CPU-only machine")
    ap.add_argument("--cpu-mem", required=True, help="host RAM available to the model, e.g. 256GB")
    ap.add_argument("--expert-dtype", choices=sorted(EXPERT_WEIGHT_BYTES), default="bf16",
                    help="routed experts only, with their fp32 scales (fp8/int8: per output channel, fp8-block: per "
                         "128x128 block, int4: per group of 128 inputs); default bf16")
    ap.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16",
                    help="the dtype weights are loaded in (what launch.py's --dtype says; the engine's default on a "
                         "CPU is fp32): everything not quantised is kept in it; default bf16, as the releases store it")
    ap.add_argument("--linear-dtype", choices=LINEAR_DTYPES, default="bf16",
                    help="the LLM's other linears (attention, dense MLP, shared experts, lm_head): bf16 or int8 "
                         "with one fp32 scale per output channel; default bf16")
    ap.add_argument("--expert-stats", help="JSON with per-layer per-expert selection counts "
                                           "({\"layers\": {\"1\": [c0, ..., c255], ...}}); uniform when absent")
    ap.add_argument("--kv-tokens", type=int, default=None,
                    help="KV-cache tokens to reserve (default: the model's max_position_embeddings)")
    ap.add_argument("--gpu-reserve", default=DEFAULT_GPU_RESERVE,
                    help=f"per-GPU activation/workspace margin (default {DEFAULT_GPU_RESERVE})")
    ap.add_argument("--host-reserve", default=DEFAULT_HOST_RESERVE,
                    help=f"host memory kept free for the OS and runtime (default {DEFAULT_HOST_RESERVE})")
    ap.add_argument("--encoders", choices=ENCODER_CHOICES, default="gpu",
                    help="vision/audio encoders + projectors on GPU (default), in host memory on the CPU, or not loaded")
    ap.add_argument("--generators", choices=GENERATOR_CHOICES, default="auto",
                    help="the checkpoint's talker and image generator: placed and counted (auto, default), or left out "
                         "(ignore: the thinker alone, as the engine loads it where they do not fit)")
    ap.add_argument("--embeddings", choices=EMBEDDING_CHOICES, default="auto",
                    help="word-embedding table on GPU, in host memory, or auto (whichever predicts faster)")
    ap.add_argument("--hbm-gbs", type=float, default=DEFAULT_HBM_GBS,
                    help=f"GPU memory bandwidth, GB/s (default {DEFAULT_HBM_GBS:g}: H100 PCIe; SXM 3350, RTX 4090 1008)")
    ap.add_argument("--pcie-gbs", type=float, default=DEFAULT_PCIE_GBS,
                    help=f"host<->GPU and GPU<->GPU link, GB/s (default {DEFAULT_PCIE_GBS:g}: PCIe 4.0 x16)")
    ap.add_argument("--host-gbs", type=_host_gbs, default=DEFAULT_HOST_GBS,
                    help=f"host memory bandwidth the CPU experts get, GB/s (default {DEFAULT_HOST_GBS:g}: "
                         f"dual-channel DDR5 workstation), or 'measure': the rates at which this machine's CPU kernels "
                         f"stream the chosen formats, measured now (about a second; taken without --efficiency)")
    ap.add_argument("--hop-latency-us", type=float, default=DEFAULT_HOP_LATENCY_US,
                    help=f"fixed cost of one transfer hop incl. synchronisation, us (default {DEFAULT_HOP_LATENCY_US:g})")
    ap.add_argument("--gpu-layer-us", type=float, default=DEFAULT_GPU_LAYER_US,
                    help=f"a GPU decoder layer's time beyond its bytes, us (default {DEFAULT_GPU_LAYER_US:g}: "
                         f"measured on an H200 at the real shape, batch 1, CUDA graphs)")
    ap.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY,
                    help=f"fraction of peak bandwidth achieved (default {DEFAULT_EFFICIENCY:g})")
    ap.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                    help=f"tokens in the KV cache when decode is timed (default {DEFAULT_CONTEXT})")
    ap.add_argument("--overlap-cpu", action="store_true",
                    help="model CPU experts running concurrently with GPU experts (default: back to back)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (the full plan)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        config = MingConfig.from_file(args.config)
        devices = DeviceSpec.parse(args.gpus, args.cpu_mem)
        stats = load_expert_stats(args.expert_stats) if args.expert_stats else None
        roofline = RooflineParams(hbm_gbs=args.hbm_gbs, pcie_gbs=args.pcie_gbs,
                                  host_gbs=DEFAULT_HOST_GBS if args.host_gbs == MEASURE else args.host_gbs,
                                  hop_latency_us=args.hop_latency_us, efficiency=args.efficiency,
                                  context_tokens=args.context, overlap_cpu=args.overlap_cpu,
                                  gpu_layer_us=args.gpu_layer_us)
        if args.host_gbs == MEASURE:
            from engine.placement.host_rates import measure_rates  # noqa: PLC0415  (imports torch)
            rates = measure_rates(args.expert_dtype, args.linear_dtype, args.dtype)
            if rates is None:
                raise PlanError("--host-gbs measure needs the native CPU kernels (a C compiler; see "
                                "engine.kernels.native), which are not built here: give --host-gbs in GB/s")
            roofline = replace(roofline, cpu_expert_gbs=rates.cpu_expert_gbs, cpu_weight_gbs=rates.cpu_weight_gbs)
        plan = plan_placement(config, devices, args.expert_dtype, stats, kv_tokens=args.kv_tokens,
                              gpu_reserve=args.gpu_reserve, host_reserve=args.host_reserve,
                              encoders=args.encoders, embeddings=args.embeddings, roofline=roofline,
                              generators=args.generators,
                              linear_dtype=args.linear_dtype, dtype=args.dtype)
    except (PlanError, ConfigError) as e:
        if args.json:
            print(json.dumps({"error": str(e)}))
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    print(json.dumps(plan.to_dict()) if args.json else render(plan))
    return 0


if __name__ == "__main__":
    from engine.command import run_command

    sys.exit(run_command(main))
