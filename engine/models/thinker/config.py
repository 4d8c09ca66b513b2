"""Typed configuration parsed from a checkpoint's own config.json (upstream format).

Two layouts exist upstream:
  * the composite thinker (`BailingMM2Config`, model_type "bailingmm_moe_v2_lite"): `llm_config`,
    `vision_config`, `audio_config`, `mlp_depth`; its LLM weights live under the prefix `model.`;
  * a standalone `BailingMoeV2Config` (the keys of `llm_config`), whose weights have no prefix.
Both parse into `MingConfig`; `MingConfig.llm_weight_prefix` says where the LLM's tensors live.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import MingError

# The upstream modelling class hard-sets these on its own config at construction (spec §1.4 item 7).
UPSTREAM_SPATIAL_MERGE_SIZE = 2
UPSTREAM_TOKENS_PER_SECOND = 2
# Default of the upstream `routed_scaling_factor` attribute; the shipped config only has the
# (ignored) `moe_router_topk_scaling_factor` key, so the default is what the reference uses.
UPSTREAM_ROUTED_SCALING_DEFAULT = 2.5
# The router types the reference builds: "MultiRouter" (text / image / audio gates, spec §2.7) and
# "topN" (one gate, the BailingMoeV2Config default). "TopkRouter" is this engine's older name for topN.
MULTI_ROUTER = "MultiRouter"
SINGLE_ROUTER = "topN"
VIDEO_ROPE = "video_rope"  # rope_scaling["type"] of both releases: the 3-D video rotary (spec §2.4)
# No rope_scaling (absent or null): transformers' "default" rope type, plain partial RoPE of the whole rotary
# width on one position per token (the temporal axis p_T, which is every axis of a text token); the
# reference picks its 1-D BailingMoeV2RotaryEmbedding then
DEFAULT_ROPE = "default"
SINGLE_ROUTER_ALIASES = (SINGLE_ROUTER, "TopkRouter")
# BailingMM2Config's default for `mlp_depth` (both releases' config.json state 2).
UPSTREAM_MLP_DEPTH_DEFAULT = 1
# BailingMoeV2Config's defaults for keys a config.json may omit (the released files carry them all).
UPSTREAM_LLM_DEFAULTS = {"use_bias": True, "use_qkv_bias": False, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-5,
                         "max_position_embeddings": 16384, "router_type": SINGLE_ROUTER, "rope_theta": 10000.0,
                         "num_experts": 16, "num_experts_per_tok": 2, "n_group": 8, "topk_group": 4,
                         "use_sliding_window": False, "sliding_window": 81920,
                         # the 2.0 class's default; the Preview code has no interleaved path at all (spec §1.1)
                         "use_interleaved_frame_timestamp": True}
#: What each ViT's config class builds for a key its vision_config omits (spec §4.3, §4.4): the classes'
#: own defaults (Qwen3VLMoeVisionConfig, Qwen2_5_VLVisionConfig), never the released checkpoints' values
UPSTREAM_VISION_DEFAULTS = {
    "qwen3_moe_vit": {"depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4304,
                      "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "out_hidden_size": 3584, "num_position_embeddings": 2304,
                      "deepstack_visual_indexes": [8, 16, 24]},
    "qwen2_5_vit": {"depth": 32, "hidden_size": 3584, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                    "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31]},
}


def vision_config_with_defaults(vision: dict) -> dict:
    """A raw vision_config with the keys it omits filled from its ViT class's defaults (unknown types as given)."""
    return {**UPSTREAM_VISION_DEFAULTS.get((vision or {}).get("model_type"), {}), **(vision or {})}


class ConfigError(MingError, ValueError):
    """A config.json that cannot describe a Ming model; the message names the file and key."""

    code = "invalid_config"


def _require(d: dict, key: str, where: str, kind: type | None = None) -> Any:
    """d[key], read as `kind` (e.g. int) when given: ConfigError naming the key when it is absent or of the wrong type."""
    if key not in d:
        raise ConfigError(f"{where}: missing required key '{key}'")
    if kind is None:
        return d[key]
    try:
        return _integer(d[key]) if kind is int else kind(d[key])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: key '{key}' is {d[key]!r}, not {'an integer' if kind is int else kind.__name__}") from e


def _integer(value: Any) -> int:
    """A JSON integer (or a float with an integral value, 32.0): TypeError for anything else, true/false, "32" and
    4.5 included, which int() would turn into 1, 32 and 4 and so into a different model."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise TypeError(f"{value!r} is not an integer")
    return int(value)


@contextmanager
def sub_config_errors(source: str, key: str) -> Iterator[None]:
    """Reading sub-config `key` (vision_config, audio_config) of the config file `source`: a missing key or a value
    of the wrong type becomes a ConfigError naming the file and the sub-config."""
    try:
        yield
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ConfigError(f"{source}: {detail if detail.startswith(key) else f'{key}: {detail}'}") from e


def _sub_config(d: dict, key: str, source: str) -> dict:
    """A sub-config object (llm_config, vision_config, audio_config): absent or null reads as {}."""
    value = d.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{key}' must be a JSON object, found {type(value).__name__}")
    return value


def _count(d: dict, key: str, where: str) -> int:
    """An integer key the reference uses as given, BailingMoeV2Config's default when omitted; null (which the
    reference keeps and then fails on) is refused naming the key."""
    value = d.get(key, UPSTREAM_LLM_DEFAULTS[key])
    if not isinstance(value, (int, float)) or isinstance(value, bool) or int(value) != value:
        raise ConfigError(f"{where}: '{key}' must be an integer (got {value!r})")
    return int(value)


@dataclass(frozen=True)
class LLMConfig:
    """BailingMoeV2 language-model hyper-parameters (the keys of `llm_config`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    partial_rotary_factor: float
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    first_k_dense_replace: int
    router_type: str
    use_qkv_bias: bool
    use_bias: bool
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    image_patch_token: int
    video_patch_token: int
    image_start_token: int
    video_start_token: int
    use_interleaved_frame_timestamp: bool
    rope_scaling_type: str | None
    hidden_act: str = "silu"
    # Keys a query attends to: i - sliding_window < j <= i (slot indices, padding included) when set; None: all
    sliding_window: int | None = None
    shared_experts_built: bool = True
    spatial_merge_size: int = UPSTREAM_SPATIAL_MERGE_SIZE
    tokens_per_second: int = UPSTREAM_TOKENS_PER_SECOND
    # Informational only: the reference never reads it (spec §1.4 item 2).
    moe_router_topk_scaling_factor: float | None = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def uses_video_rope(self) -> bool:
        """The 3-D video rotary (rope_scaling type video_rope); otherwise plain RoPE on p_T (DEFAULT_ROPE)."""
        return self.rope_scaling_type == VIDEO_ROPE

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    @property
    def uses_multi_router(self) -> bool:
        return self.router_type == MULTI_ROUTER

    @property
    def video_start_token_is_image_end(self) -> bool:
        """The upstream misconfiguration (spec §1.4 item 1): `video_start_token` holds `</image>`."""
        return self.video_start_token == self.image_start_token + 1

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.num_experts > 0 and layer_idx >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, d: dict, where: str = "llm_config", *, interleaving_code: bool = True) -> "LLMConfig":
        """`interleaving_code`: whether the release's code has the interleaved-timestamp video path (2.0 and
        its standalone LLM do, default on; the Preview's has none, so it is off whatever the config says)."""
        hidden = _require(d, "hidden_size", where, int)
        heads = _require(d, "num_attention_heads", where, int)
        if heads < 1:
            raise ConfigError(f"{where}: num_attention_heads {heads} must be at least 1")
        head_dim = d.get("head_dim") or hidden // heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        rope_scaling = d.get("rope_scaling")
        routed = d.get("routed_scaling_factor")
        try:
            cfg = cls(
                vocab_size=_require(d, "vocab_size", where, int),
                hidden_size=hidden,
                # both default to None in BailingMoeV2Config: needed only by the layers that use them (validate)
                intermediate_size=int(d.get("intermediate_size") or 0),
                moe_intermediate_size=int(d.get("moe_intermediate_size") or 0),
                num_hidden_layers=_require(d, "num_hidden_layers", where, int),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                partial_rotary_factor=float(d.get("partial_rotary_factor", UPSTREAM_LLM_DEFAULTS["partial_rotary_factor"])),
                rope_theta=float(d.get("rope_theta", UPSTREAM_LLM_DEFAULTS["rope_theta"])),
                rms_norm_eps=float(d.get("rms_norm_eps", UPSTREAM_LLM_DEFAULTS["rms_norm_eps"])),
                max_position_embeddings=int(d.get("max_position_embeddings", UPSTREAM_LLM_DEFAULTS["max_position_embeddings"])),
                # null num_experts: every layer dense (the reference tests `num_experts is not None`)
                num_experts=0 if d.get("num_experts", 0) is None else _count(d, "num_experts", where),
                num_experts_per_tok=_count(d, "num_experts_per_tok", where),
                num_shared_experts=int(d.get("num_shared_experts") or 0),
                # The reference builds the shared-expert MLP unless the key is null, even 0 wide (then it adds zeros
                # and its checkpoint holds zero-size tensors); a missing key is the config class's default, 0.
                shared_experts_built=d.get("num_shared_experts", 0) is not None,
                n_group=_count(d, "n_group", where),
                topk_group=_count(d, "topk_group", where),
                routed_scaling_factor=float(routed if routed is not None else UPSTREAM_ROUTED_SCALING_DEFAULT),
                first_k_dense_replace=int(d.get("first_k_dense_replace", 0)),
                router_type=str(d.get("router_type") or UPSTREAM_LLM_DEFAULTS["router_type"]),
                use_qkv_bias=bool(d.get("use_qkv_bias", UPSTREAM_LLM_DEFAULTS["use_qkv_bias"])),
                use_bias=bool(d.get("use_bias", UPSTREAM_LLM_DEFAULTS["use_bias"])),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                pad_token_id=d.get("pad_token_id"),
                image_patch_token=_require(d, "image_patch_token", where, int),
                video_patch_token=_require(d, "video_patch_token", where, int),
                image_start_token=_require(d, "image_start_token", where, int),
                video_start_token=_require(d, "video_start_token", where, int),
                use_interleaved_frame_timestamp=interleaving_code and bool(
                    d.get("use_interleaved_frame_timestamp", UPSTREAM_LLM_DEFAULTS["use_interleaved_frame_timestamp"])),
                rope_scaling_type=(DEFAULT_ROPE if rope_scaling is None
                                   else rope_scaling.get("type") if isinstance(rope_scaling, dict) else None),
                hidden_act=str(d.get("hidden_act", "silu")),
                # the reference's eager (and masked SDPA) causal mask windows every layer when use_sliding_window is
                # set and sliding_window is not null (flash_attention_2 ignores both)
                sliding_window=(int(d.get("sliding_window", UPSTREAM_LLM_DEFAULTS["sliding_window"]))
                                if d.get("use_sliding_window", UPSTREAM_LLM_DEFAULTS["use_sliding_window"])
                                and d.get("sliding_window", UPSTREAM_LLM_DEFAULTS["sliding_window"]) is not None else None),
                moe_router_topk_scaling_factor=d.get("moe_router_topk_scaling_factor"),
            )
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # an optional key of the wrong type (the required ones say which)
            raise ConfigError(f"{where}: a value has the wrong type ({e})") from e
        cfg.validate(where)
        return cfg

    def validate(self, where: str) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"{where}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise bad(f"{name} {getattr(self, name)} must be at least 1")
        for name in ("num_experts", "num_shared_experts", "first_k_dense_replace"):
            if getattr(self, name) < 0:
                raise bad(f"{name} {getattr(self, name)} must not be negative")
        if not 0 < self.partial_rotary_factor <= 1:
            raise bad(f"partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1]")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise bad(f"rope_theta {self.rope_theta} must be a finite number > 0")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps >= 0):
            raise bad(f"rms_norm_eps {self.rms_norm_eps} must be a finite number >= 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                      f"num_key_value_heads {self.num_key_value_heads}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise bad(f"rotary dim {self.rotary_dim} (head_dim x partial_rotary_factor) must be even and <= head_dim")
        layers = range(self.num_hidden_layers)
        if any(not self.is_moe_layer(i) for i in layers) and self.intermediate_size <= 0:
            raise bad("missing or zero 'intermediate_size' (the width of the dense layers before first_k_dense_replace)")
        if any(self.is_moe_layer(i) for i in layers) and self.moe_intermediate_size <= 0:
            raise bad("missing or zero 'moe_intermediate_size' (the width of each routed and shared expert)")
        if self.num_experts:
            if self.n_group < 1:
                raise bad(f"n_group {self.n_group} must be >= 1")
            if self.num_experts % self.n_group:
                raise bad(f"num_experts {self.num_experts} is not divisible by n_group {self.n_group}")
            if not 0 < self.topk_group <= self.n_group:
                raise bad(f"topk_group {self.topk_group} must be in 1..n_group ({self.n_group})")
            if not 0 < self.num_experts_per_tok <= self.topk_group * (self.num_experts // self.n_group):
                raise bad(f"num_experts_per_tok {self.num_experts_per_tok} cannot be chosen from "
                          f"{self.topk_group} groups of {self.num_experts // self.n_group} experts")
        if self.rope_scaling_type not in (VIDEO_ROPE, DEFAULT_ROPE):
            raise bad(f"rope_scaling {{'type': {self.rope_scaling_type!r}}} is not supported: the reference reads "
                      f"rope_scaling['type'] and both releases set {VIDEO_ROPE!r} (3-D video rotary, spec §2.4); "
                      f"leave rope_scaling out (or null) for plain RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise bad(f"sliding_window {self.sliding_window} must be >= 1 (a query would attend to no key)")
        if self.hidden_act != "silu":
            raise bad(f"hidden_act '{self.hidden_act}' is not supported (BailingMoeV2 uses silu)")
        if self.router_type != MULTI_ROUTER and self.router_type not in SINGLE_ROUTER_ALIASES:
            raise bad(f"router_type '{self.router_type}' is not supported ({MULTI_ROUTER!r} or {SINGLE_ROUTER!r})")


@dataclass(frozen=True)
class MingConfig:
    """A whole checkpoint's config: the LLM plus the raw sub-configs the encoders will parse."""

    llm: LLMConfig
    model_type: str
    is_composite: bool
    vision: dict = field(default_factory=dict)
    audio: dict = field(default_factory=dict)
    mlp_depth: int | None = None
    torch_dtype: str | None = None
    source: str = ""

    @property
    def projector_depth(self) -> int:
        """Linears in `linear_proj` (and Linears after the conv in `linear_proj_audio`), as the reference builds
        them: `mlp_depth`, the config class's default 1 when omitted; it loops range(1, mlp_depth), so 0 or less
        also gives the single first layer (spec §4.5, §5.3)."""
        depth = UPSTREAM_MLP_DEPTH_DEFAULT if self.mlp_depth is None else int(self.mlp_depth)
        return max(1, depth)

    @property
    def llm_weight_prefix(self) -> str:
        """Prefix of the LLM's tensor names in the checkpoint (`model.` in the composite thinker)."""
        return "model." if self.is_composite else ""

    @property
    def release(self) -> str:
        """'2.0', 'preview' or 'llm-only', decided by the ViT type as the spec recommends (§1.1)."""
        vt = self.vision.get("model_type")
        if vt == "qwen3_moe_vit":
            return "2.0"
        if vt == "qwen2_5_vit":
            return "preview"
        return "llm-only"

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "MingConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: top level must be a JSON object")
        if "llm_config" in d:
            vision, audio = _sub_config(d, "vision_config", source), _sub_config(d, "audio_config", source)
            llm = LLMConfig.from_dict(_sub_config(d, "llm_config", source), where=f"{source}: llm_config",
                                      interleaving_code=vision.get("model_type") != "qwen2_5_vit")
            if d.get("mlp_depth") is not None:
                _require(d, "mlp_depth", source, int)  # (the projectors' depth: 'deep' failed building them)
            cfg = cls(llm=llm, model_type=str(d.get("model_type", "")), is_composite=True,
                      vision=dict(vision), audio=dict(audio),
                      mlp_depth=d.get("mlp_depth"), torch_dtype=d.get("torch_dtype"), source=source)
        elif d.get("model_type") == "bailing_moe_v2" or "num_experts" in d:
            llm = LLMConfig.from_dict(d, where=source)
            cfg = cls(llm=llm, model_type="bailing_moe_v2", is_composite=False,
                      torch_dtype=d.get("torch_dtype"), source=source)
        else:
            raise ConfigError(f"{source}: neither a Ming (BailingMM2) config with 'llm_config' nor a "
                              f"BailingMoeV2 config (model_type={d.get('model_type')!r}): this is another model's "
                              "checkpoint; give the folder of a Ming-flash-omni 2.0 or Preview checkpoint")
        if cfg.llm.video_start_token_is_image_end and not cfg.llm.use_interleaved_frame_timestamp:
            warnings.warn(
                f"{source}: video_start_token={cfg.llm.video_start_token} is the id of </image> (upstream "
                "misconfiguration, spec §1.4); as in the reference, video frames get 1-D positions. "
                "PositionTokens.from_config(cfg, fix_video_start_token=<id of <video>>) uses <video> instead.",
                stacklevel=2)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "MingConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json found: give the folder of a Ming-flash-omni checkpoint (it "
                              "holds config.json beside model.safetensors.index.json and the *.safetensors shards)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: invalid JSON ({e}): a config.json is UTF-8 JSON text; download the "
                              "checkpoint's config.json again") from e
        except OSError as e:  # permission denied, an I/O error
            raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from e
        return cls.from_dict(data, source=str(path))
