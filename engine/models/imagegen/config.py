"""Typed settings of the image generator, read from the checkpoint's own sub-folders (spec §1.2, §8):
`mlp/config.json` (+ the query-token names in `mlp/model.safetensors`), `transformer/config.json`
(which DiT), `byt5/byt5.json`. Everything the pipeline needs to know about sizes comes from these
files or from tensor shapes; nothing is hard-coded per release."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from engine.errors import MingError

# The checkpoint sub-folders of the 2.0 image generator (spec §1.2). `byt5/` is optional upstream:
# without it quoted text is simply not rendered through glyph embeddings.
REQUIRED_FOLDERS = ("mlp", "connector", "transformer", "vae", "scheduler")
OPTIONAL_FOLDERS = ("byt5",)
QUERY_TOKEN_PREFIX = "query_tokens_dict."
_QUERY_NAME = re.compile(r"^query_tokens_dict\.(\d+)x(\d+)$")
# The 2.0 DiT (Z-Image); the Preview ships an SD3-style DiT that is not implemented (spec §8.10).
ZIMAGE = "zimage"
ZIMAGE_CLASS = "ZImageTransformer2DModel"
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
    `param` names the request field at fault (None: the checkpoint, or no one field)."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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
    dit_type: str
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
                   dit_type=str(data.get("dit_type") or ZIMAGE).lower(),
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


def check_dit_kind(root: str | Path, head: QueryHeadConfig) -> None:
    """Refuse a DiT this engine does not implement (the Preview's SD3-style one, spec §8.10)."""
    cfg_path = Path(root) / "transformer" / "config.json"
    cls_name = _read_json(cfg_path).get("_class_name", ZIMAGE_CLASS) if cfg_path.is_file() else ZIMAGE_CLASS
    if head.dit_type != ZIMAGE or cls_name != ZIMAGE_CLASS:
        raise ImageGenUnsupported(
            f"this checkpoint's image generator uses dit_type '{head.dit_type}' ({cls_name}); only the 2.0 "
            f"Z-Image DiT ({ZIMAGE_CLASS}) is implemented. The Preview's SD3-style DiT (spec §8.10) is not: "
            "load Ming-flash-omni-2.0 for image generation.")
