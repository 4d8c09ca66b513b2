"""The typed `vision_config` of the thinker's two ViTs (spec §4.3, §4.4), apart from their modules
(engine.models.thinker.vision) so that what only reads a checkpoint's config, the placement planner
(`python -m engine.plan`), checks it without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.models.thinker.config import UPSTREAM_VISION_DEFAULTS

QWEN3_VIT = "qwen3_moe_vit"
QWEN2_5_VIT = "qwen2_5_vit"
#: What the Preview's `Qwen2_5_VLVisionConfig` / the 2.0's `Qwen3VLMoeVisionConfig` build for a key a
#: vision_config omits (spec §4.3, §4.4): the classes' defaults, never the released checkpoints' values
#: (the 2.0 class: out_hidden_size 3584 and three deepstack mergers)
QWEN2_5_DEFAULTS = UPSTREAM_VISION_DEFAULTS[QWEN2_5_VIT]
QWEN3_DEFAULTS = UPSTREAM_VISION_DEFAULTS[QWEN3_VIT]
#: `hidden_act` names as transformers' ACT2FN spells them, the ones the ViTs take (their functions:
#: engine.models.thinker.vision._ACTIVATIONS)
VISION_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_python", "gelu_new", "gelu_fast", "silu", "swish",
                      "quick_gelu", "relu", "relu2", "relu6", "tanh", "sigmoid", "linear")


@dataclass(frozen=True)
class VisionConfig:
    """Typed view of a checkpoint's `vision_config` (both ViT flavours)."""

    model_type: str
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    # 2.0 only
    num_position_embeddings: int | None = None
    deepstack_visual_indexes: tuple[int, ...] = ()
    # Preview only
    window_size: int | None = None
    fullatt_block_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        """Patches per LLM token (m²)."""
        return self.spatial_merge_size ** 2

    @property
    def merged_hidden_size(self) -> int:
        """Width of a 2x2 (m x m) group of patch tokens concatenated: hidden·m²."""
        return self.hidden_size * self.merge_unit

    @property
    def patch_dim(self) -> int:
        """Length of one `pixel_values` row: C·tp·P·P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def num_grid_per_side(self) -> int:
        """Side G of the learned G×G position table (2.0): ⌊√n⌋, as upstream's int(n ** 0.5)."""
        if not self.num_position_embeddings:
            raise ValueError("this vision config has no learned position table")
        return math.isqrt(self.num_position_embeddings)

    @property
    def window_merged(self) -> int:
        """Preview window side in merged tokens: window_size // merge // patch (112/2/14 = 4)."""
        if not self.window_size:
            raise ValueError("this vision config has no window_size")
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        if not isinstance(d, dict) or not d:
            raise ValueError("vision_config must be a non-empty dict")
        model_type = d.get("model_type")
        if model_type not in (QWEN3_VIT, QWEN2_5_VIT):
            raise ValueError(f"vision_config.model_type {model_type!r} is not supported "
                             f"(expected {QWEN3_VIT!r} or {QWEN2_5_VIT!r})")

        defaults = QWEN2_5_DEFAULTS if model_type == QWEN2_5_VIT else QWEN3_DEFAULTS

        def req(key: str) -> int:
            if key not in d and key not in defaults:
                raise ValueError(f"vision_config ({model_type}): missing required key {key!r}")
            value = d[key] if key in d else defaults[key]
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                value = None  # (a null, list or object: refused below, naming the key)
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ValueError(f"vision_config ({model_type}): key {key!r} is {d[key]!r}, not an integer") from None

        # Both ViTs read `patch_size` only (`spatial_patch_size` is noise there)
        patch = req("patch_size")
        fullatt = d.get("fullatt_block_indexes", defaults.get("fullatt_block_indexes"))
        # omitted: the class default; present but null or empty: none (deepstack is never run, spec §4.3)
        deepstack = d.get("deepstack_visual_indexes", defaults.get("deepstack_visual_indexes"))
        cfg = cls(
            model_type=model_type,
            depth=req("depth"),
            hidden_size=req("hidden_size"),
            num_heads=req("num_heads"),
            intermediate_size=req("intermediate_size"),
            out_hidden_size=req("out_hidden_size"),
            patch_size=patch,
            temporal_patch_size=req("temporal_patch_size"),
            spatial_merge_size=req("spatial_merge_size"),
            in_channels=int(d.get("in_channels", 3) if model_type == QWEN3_VIT else d.get("in_channels", d.get("in_chans", 3))),
            hidden_act=str(d.get("hidden_act", "gelu_pytorch_tanh" if model_type == QWEN3_VIT else "silu")),
            num_position_embeddings=(req("num_position_embeddings") if model_type == QWEN3_VIT else None),
            deepstack_visual_indexes=tuple(int(i) for i in (deepstack or ())),
            window_size=(req("window_size") if model_type == QWEN2_5_VIT else None),
            fullatt_block_indexes=tuple(int(i) for i in (fullatt or ())),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        where = f"vision_config ({self.model_type})"
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{where}: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"{where}: head_dim {self.head_dim} must be a multiple of 4 for the 2-D rotary")
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act {self.hidden_act!r} not supported ({sorted(VISION_ACTIVATIONS)})")
        if self.model_type == QWEN3_VIT:
            # upstream takes G = int(sqrt(n)) and leaves a non-square table's last n - G² rows unread
            if (self.num_position_embeddings or 0) < 1:
                raise ValueError(f"{where}: num_position_embeddings {self.num_position_embeddings} must be positive")
        if self.model_type == QWEN2_5_VIT and self.window_merged < 1:
            raise ValueError(f"{where}: window_size {self.window_size} is smaller than one merged token")
