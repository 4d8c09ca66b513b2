"""Typed settings of the image generator, read from the checkpoint's own sub-folders (spec §1.2, §8):
`mlp/config.json` (+ the query-token names in `mlp/model.safetensors`), `transformer/config.json`
(which DiT), `byt5/byt5.json`. Everything the pipeline needs to know about sizes comes from these
files or from tensor shapes; nothing is hard-coded per release."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from safetensors import safe_open

from engine.errors import MingError

# The checkpoint sub-folders of the 2.0 image generator (spec §1.2). `byt5/` is optional upstream:
# without it quoted text is simply not rendered through glyph embeddings.
REQUIRED_FOLDERS = ("mlp", "connector", "transformer", "vae", "scheduler")
OPTIONAL_FOLDERS = ("byt5",)
# The config file of each diffusers component folder. Without its own, diffusers falls back to the checkpoint's
# top-level config.json (Ming's) and fails later on a weight shape, saying nothing of the missing file.
COMPONENT_CONFIGS = {"transformer": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}
QUERY_TOKEN_PREFIX = "query_tokens_dict."
_QUERY_NAME = re.compile(r"^query_tokens_dict\.(\d+)x(\d+)$")
# The DiT kinds, by transformer/config.json's `_class_name`: the 2.0 Z-Image (spec §8.5) and the Preview's
# SD3-style one (spec §8.10, the Preview's diffusion/sd3_transformer.py).
ZIMAGE = "zimage"
ZIMAGE_CLASS = "ZImageTransformer2DModel"
SD3 = "sd3"
SD3_CLASS = "SD3Transformer2DModel"
DIT_CLASSES = {ZIMAGE_CLASS: ZIMAGE, SD3_CLASS: SD3}
# The Preview hard-codes its DiT's 3-axis RoPE (sd3_transformer.py: axes_dim_rope [20, 22, 22], theta 10000;
# the axes must fill the head). Its rotary grid is the token grid (spec §8.10), latent size // patch_size: the
# config's patch_size, as diffusers' SD3 pipeline reads it for μ and the size unit (2 in the Preview).
SD3_ROPE_AXES = (20, 22, 22)
SD3_ROPE_THETA = 10000.0
# The DiT-wrapper switch `text_encoder_norm` when mlp/config.json omits it: the reference loader
# passes `text_encoder_norm=False` to ZImageLoss then (ZImageModel_withMLP's own default too), so the
# x1000 re-normalisation is off unless the file turns it on (spec §8.5). `use_identity_mlp` omitted:
# the caption MLP runs when `mlp.*` weights ship (the reference's default False); without them the
# reference cannot load at all and we run the identity.
DEFAULT_TEXT_ENCODER_NORM = False


def wrapper_switches(data: dict, has_caption_weights: bool) -> tuple[bool, bool]:
    """(use_identity_mlp, text_encoder_norm) of mlp/config.json's `data`, with the defaults above."""
    identity = data.get("use_identity_mlp")
    return (bool(identity) if identity is not None else not has_caption_weights,
            bool(data.get("text_encoder_norm", DEFAULT_TEXT_ENCODER_NORM)))


class ImageGenError(MingError):
    """A request or checkpoint the image generator cannot serve; the message says what is valid and
    `param` names the request field at fault (None: the checkpoint, or no one field); `code` the OpenAI error code
    (TYPE_CODE: a value of the wrong JSON type)."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code


TYPE_CODE = "invalid_type"  # an ImageGenError's code for a value of the wrong type ("steps": "1")


class ImageGenUnsupported(ImageGenError):
    """The checkpoint's image generator is of a kind this engine does not implement."""

    code = "unsupported_model"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ImageGenError(f"{path}: cannot read ({e})") from e
    if not isinstance(data, dict):
        raise ImageGenError(f"{path}: expected a JSON object")
    return data


def has_image_generator(root: str | Path) -> bool:
    """True when a checkpoint directory holds the image generator's sub-folders."""
    root = Path(root)
    return all((root / name).is_dir() for name in REQUIRED_FOLDERS)


def missing_folders(root: str | Path) -> list[str]:
    root = Path(root)
    return [name for name in REQUIRED_FOLDERS if not (root / name).is_dir()]


def missing_component_configs(root: str | Path) -> list[str]:
    """The diffusers component folders' config files absent from a checkpoint (e.g. "vae/config.json")."""
    root = Path(root)
    return [f"{folder}/{name}" for folder, name in COMPONENT_CONFIGS.items() if not (root / folder / name).is_file()]


def safetensors_names(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of every *.safetensors file of a folder (headers only)."""
    out: dict[str, tuple[int, ...]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    out[k] = tuple(h.get_slice(k).get_shape())
        except Exception as e:
            raise ImageGenError(f"{f}: cannot read safetensors header ({e})") from e
    return out


@dataclass(frozen=True)
class QueryHeadConfig:
    """`mlp/`: the learned query tokens per scale, proj_in/proj_out and the optional caption MLP."""

    scales: tuple[int, ...]          # query blocks appended in this order; only the last conditions (§8.2)
    llm_hidden: int                  # width of the query tokens (= the thinker's hidden size)
    connector_hidden: int            # proj_in output width
    c_dim: int                       # diffusion_c_input_dim: proj_out output width
    dit_type: str                    # mlp/config.json's `dit_type` ("" when omitted: the DiT's class decides)
    use_identity_mlp: bool
    text_encoder_norm: bool
    caption_mlp_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # `mlp.*` tensors, if any

    @property
    def query_tokens(self) -> int:
        """Condition tokens handed to the DiT: the last scale's s^2."""
        return self.scales[-1] ** 2

    @classmethod
    def from_folder(cls, folder: str | Path) -> "QueryHeadConfig":
        folder = Path(folder)
        data = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        shapes = safetensors_names(folder)
        if not shapes:
            raise ImageGenError(f"{folder}: no *.safetensors with the query tokens")
        stored = {}
        for name, shape in shapes.items():
            m = _QUERY_NAME.match(name)
            if m:
                if m.group(1) != m.group(2) or len(shape) != 2 or shape[0] != int(m.group(1)) ** 2:
                    raise ImageGenError(f"{folder}: tensor '{name}' has shape {list(shape)}, expected "
                                        f"[{int(m.group(1)) ** 2}, hidden]")
                stored[int(m.group(1))] = shape
        if not stored:
            raise ImageGenError(f"{folder}: no '{QUERY_TOKEN_PREFIX}<s>x<s>' tensors")
        scales_cfg = data.get("img_gen_scales")
        scales = tuple(int(s) for s in scales_cfg) if scales_cfg else tuple(sorted(stored))
        missing = [s for s in scales if s not in stored]
        if missing:
            raise ImageGenError(f"{folder}: img_gen_scales {list(scales)} but no query tokens for "
                                f"{', '.join(f'{s}x{s}' for s in missing)}")
        for name in ("proj_in.weight", "proj_out.weight"):
            if name not in shapes:
                raise ImageGenError(f"{folder}: tensor '{name}' is missing")
        llm_hidden = stored[scales[0]][1]
        connector_hidden, proj_in_in = shapes["proj_in.weight"]
        c_dim, proj_out_in = shapes["proj_out.weight"]
        if proj_in_in != llm_hidden or proj_out_in != connector_hidden:
            raise ImageGenError(f"{folder}: proj_in {list(shapes['proj_in.weight'])} / proj_out "
                                f"{list(shapes['proj_out.weight'])} do not chain from the query width {llm_hidden}")
        if "diffusion_c_input_dim" in data and int(data["diffusion_c_input_dim"]) != c_dim:
            raise ImageGenError(f"{folder}: diffusion_c_input_dim {data['diffusion_c_input_dim']} but proj_out "
                                f"produces {c_dim}")
        caption_mlp = {k: v for k, v in shapes.items() if k.startswith("mlp.")}
        identity, norm = wrapper_switches(data, bool(caption_mlp))
        return cls(scales=scales, llm_hidden=llm_hidden, connector_hidden=connector_hidden, c_dim=c_dim,
                   dit_type=str(data.get("dit_type") or "").lower(),
                   use_identity_mlp=identity, text_encoder_norm=norm,
                   caption_mlp_shapes=caption_mlp)


@dataclass(frozen=True)
class ByT5Settings:
    """`byt5/byt5.json` (spec §1.2, §8.4)."""

    folder: Path
    ckpt_path: str                   # the T5 config + ByT5 tokenizer folder (relative to byt5/)
    special_token: bool
    color_special_token: bool
    font_special_token: bool
    font_ann_path: str | None
    color_ann_path: str | None
    multilingual: bool
    mapper_layers: int
    sdxl_channels: int
    max_length: int

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ByT5Settings":
        folder = Path(folder)
        data = _read_json(folder / "byt5.json")
        bc: dict[str, Any] = data.get("byt5_config") or {}
        mc: dict[str, Any] = data.get("byt5_mapper_config") or {}
        for key, where in (("byt5_ckpt_path", bc), ("num_layers", mc), ("sdxl_channels", mc)):
            if key not in where:
                raise ImageGenError(f"{folder / 'byt5.json'}: missing '{key}'")
        if "byt5_max_length" not in data:
            raise ImageGenError(f"{folder / 'byt5.json'}: missing 'byt5_max_length'")
        return cls(folder=folder, ckpt_path=str(bc["byt5_ckpt_path"]), special_token=bool(bc.get("special_token", False)),
                   color_special_token=bool(bc.get("color_special_token", False)),
                   font_special_token=bool(bc.get("font_special_token", False)),
                   font_ann_path=bc.get("font_ann_path"), color_ann_path=bc.get("color_ann_path"),
                   multilingual=bool(bc.get("multilingual", False)), mapper_layers=int(mc["num_layers"]),
                   sdxl_channels=int(mc["sdxl_channels"]), max_length=int(data["byt5_max_length"]))


@dataclass(frozen=True)
class SD3DiTConfig:
    """transformer/config.json of the Preview's SD3-style DiT (the Preview's SD3Transformer2DModel arguments,
    with its defaults for keys the file omits)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    vae_ref_channel_cat: bool = False
    rope_max_index: int = 1024

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_file(cls, path: str | Path) -> "SD3DiTConfig":
        path = Path(path)
        data = _read_json(path)
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data or data[f.name] is None:
                continue
            v = data[f.name]
            try:
                if f.name == "dual_attention_layers":
                    kw[f.name] = tuple(int(i) for i in v)
                elif f.name == "qk_norm":
                    kw[f.name] = str(v)
                elif f.name == "vae_ref_channel_cat":
                    kw[f.name] = bool(v)
                else:
                    if isinstance(v, bool) or int(v) != v or int(v) <= 0:
                        raise ValueError
                    kw[f.name] = int(v)
            except (TypeError, ValueError):
                raise ImageGenError(f"{path}: '{f.name}' is {str(v)[:40]!r}, not a valid value") from None
        if "out_channels" in data and data["out_channels"] is None:
            # diffusers' SD3Transformer2DModel: an explicit null predicts as many channels as it takes in
            kw["out_channels"] = kw.get("in_channels", cls.in_channels)
        cfg = cls(**kw)
        cfg.check(path)
        return cfg

    def check(self, path: Path) -> None:
        """Refuse settings the Preview's DiT cannot run as written upstream."""
        problems = []
        if sum(SD3_ROPE_AXES) != self.attention_head_dim:
            problems.append(f"attention_head_dim {self.attention_head_dim}: the Preview's RoPE axes "
                            f"{list(SD3_ROPE_AXES)} need {sum(SD3_ROPE_AXES)}")
        if self.vae_ref_channel_cat:
            problems.append("vae_ref_channel_cat true (the reference channel-concatenation variant) is not implemented")
        if self.caption_projection_dim != self.inner_dim:
            problems.append(f"caption_projection_dim {self.caption_projection_dim} differs from the joint blocks' "
                            f"width {self.inner_dim}")
        if problems:
            raise ImageGenUnsupported(f"{path}: " + "; ".join(problems))


def dit_kind(root: str | Path, head: QueryHeadConfig) -> str:
    """Which DiT the checkpoint ships (ZIMAGE or SD3), by transformer/config.json's `_class_name`; any other
    DiT, or an mlp/config.json `dit_type` naming another, is refused."""
    cfg_path = Path(root) / "transformer" / "config.json"
    cls_name = _read_json(cfg_path).get("_class_name", ZIMAGE_CLASS) if cfg_path.is_file() else ZIMAGE_CLASS
    kind = DIT_CLASSES.get(cls_name)
    if kind is None:
        raise ImageGenUnsupported(
            f"this checkpoint's image generator uses the DiT {cls_name!r}; only the 2.0 Z-Image DiT "
            f"({ZIMAGE_CLASS}) and the Preview's SD3-style DiT ({SD3_CLASS}) are implemented")
    if head.dit_type and (head.dit_type != ZIMAGE if kind == ZIMAGE else SD3 not in head.dit_type):
        raise ImageGenUnsupported(f"mlp/config.json says dit_type '{head.dit_type}' but transformer/config.json "
                                  f"is a {cls_name} ({kind})")
    if kind == SD3 and (head.use_identity_mlp or head.text_encoder_norm or not head.caption_mlp_shapes):
        raise ImageGenError(f"{root}: the Preview's SD3 DiT always runs its caption MLP (SD3Model_withMLP): "
                            "mlp/ must ship the 'mlp.*' weights, with use_identity_mlp and text_encoder_norm off")
    return kind


def check_dit_kind(root: str | Path, head: QueryHeadConfig) -> None:
    """Refuse a DiT this engine does not implement (see dit_kind)."""
    dit_kind(root, head)
