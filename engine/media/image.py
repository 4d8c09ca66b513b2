"""Image front end: load a picture and turn it into the vision encoder's patch input.

The path follows the reference exactly (spec §4.1):

1. **Stage A** (`fetch_image`): decode, convert to RGB, smart-resize with the release's factor
   (32 for 2.0, 28 for the Preview) and its own pixel bounds, PIL bicubic.
2. **Stage B** (`preprocess_images`): the image processor's own smart-resize variant with
   ``patch_size * merge_size`` and the ``preprocessor_config.json`` bounds (a no-op for 2.0 images
   that went through Stage A), then ``x/255``, CLIP mean/std in float32, duplication of the still
   frame to ``temporal_patch_size`` frames, and channel-major patch flattening in merge-block order.

Decoding converts a picture with an ICC colour profile other than sRGB (Display P3, Adobe RGB, a CMYK print
profile) to sRGB through it (`in_srgb`), where the reference reads the stored numbers as sRGB: the model sees the
colours the user's viewer shows. Pictures without a profile or in sRGB are read bit for bit as the reference does.

Resizing is bit-compatible with Pillow >= 13 on any installed Pillow: Pillow resizes in two
separable passes and since 13.0 runs the vertical pass first when the height shrinks by more
than twice as many pixels as the width. The reference fixtures were made that way, so
`resize_bicubic` forces that order with two single-axis resizes (each pass is identical across
Pillow versions).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from engine.errors import IMAGE_FORMATS, unread_picture

from .errors import MediaError, not_a_file

Release = Literal["2.0", "preview"]
SmartResizeVariant = Literal["fetch", "processor_v2", "processor_preview"]
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: Largest ratio between the long and the short side that smart resize accepts.
MAX_ASPECT_RATIO = 200
#: Decoded images above this many pixels are refused before they are loaded (Pillow's own
#: decompression-bomb error threshold).
DEFAULT_MAX_INPUT_PIXELS = 178_956_970
#: The keys of a chat message's image element that Stage A (`fetch_image`) reads.
FETCH_OPTION_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class FetchImageConfig:
    """Stage A (`fetch_image`) bounds of one release (spec §4.1 table)."""

    factor: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def for_release(cls, release: Release) -> "FetchImageConfig":
        if release == "2.0":
            return cls(factor=32, min_pixels=4 * 32 * 32, max_pixels=16384 * 32 * 32)
        if release == "preview":
            return cls(factor=28, min_pixels=4 * 28 * 28, max_pixels=1024 * 28 * 28)
        raise ValueError(f"unknown release {release!r}; expected '2.0' or 'preview'")


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The image processor settings of a checkpoint (``preprocessor_config.json``).

    Defaults are the 2.0 values; `from_json_file` reads a checkpoint's file. ``release`` picks
    the processor's smart-resize variant and the Stage A bounds.
    """

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 4096
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    release: Release = "2.0"

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageProcessorConfig.{name} must be a positive int, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need three values (R, G, B)")
        if self.release not in ("2.0", "preview"):
            raise ValueError(f"unknown release {self.release!r}; expected '2.0' or 'preview'")

    @property
    def factor(self) -> int:
        """Side multiple of processed images: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one ``pixel_values`` row: 3 * temporal_patch_size * patch_size**2."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def fetch(self) -> FetchImageConfig:
        return FetchImageConfig.for_release(self.release)

    @classmethod
    def for_release(cls, release: Release) -> "ImageProcessorConfig":
        """The shipped ``preprocessor_config.json`` values of a release (spec §1.1)."""
        if release == "2.0":
            return cls()
        if release == "preview":
            return cls(patch_size=14, min_pixels=78400, max_pixels=2007040, release="preview")
        raise ValueError(f"unknown release {release!r}; expected '2.0' or 'preview'")

    @classmethod
    def class_defaults(cls, release: Release) -> dict:
        """What the release's ``BailingMM2ImageProcessor.__init__`` takes for a key its file omits (or
        sets to null). Not the shipped files' values: the 2.0 class's max_pixels is 32*32*1280 =
        1310720 (the file says 16777216), the Preview class's patch is 14 with 78400 / 2007040."""
        if release == "2.0":
            return {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
                    "min_pixels": 64 * 64, "max_pixels": 32 * 32 * 1280}
        if release == "preview":
            return {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
                    "min_pixels": 78400, "max_pixels": 2007040}
        raise ValueError(f"unknown release {release!r}; expected '2.0' or 'preview'")

    @classmethod
    def from_dict(cls, data: dict, release: Release | None = None) -> "ImageProcessorConfig":
        """Build from a parsed ``preprocessor_config.json``; unknown keys (``size`` among them: both
        processors overwrite it) are ignored, and an omitted or null key takes the release's processor
        class default (`class_defaults`).

        Without ``release`` it is inferred: the 2.0 file carries ``use_interleaved_frame_timestamp``
        and 16-pixel patches, the Preview's has 14-pixel patches.
        """
        if release is None:
            if data.get("use_interleaved_frame_timestamp"):
                release = "2.0"
            else:
                release = "preview" if data.get("patch_size") == 14 else "2.0"
        defaults = cls.class_defaults(release)

        def get(key: str):
            value = data.get(key)
            return defaults[key] if value is None else value

        def per_channel(value, default):
            # a single number is every channel's (transformers' normalize repeats it)
            if value is None:
                return default
            return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)

        return cls(
            patch_size=int(get("patch_size")),
            merge_size=int(get("merge_size")),
            temporal_patch_size=int(get("temporal_patch_size")),
            min_pixels=int(get("min_pixels")),
            max_pixels=int(get("max_pixels")),
            image_mean=per_channel(data.get("image_mean"), CLIP_MEAN),
            image_std=per_channel(data.get("image_std"), CLIP_STD),
            release=release,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, release: Release | None = None) -> "ImageProcessorConfig":
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh), release=release)


@dataclass
class ImageInputs:
    """Vision encoder input for one or more images.

    ``pixel_values``: [sum(t*h*w), 3*T*P*P] float32, images concatenated in order.
    ``grid_thw``: [n_images, 3] int64, (t, h, w) in patch units.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    merge_size: int = 2
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) after resizing

    @property
    def num_tokens(self) -> list[int]:
        """LLM ``<imagePatch>`` count per image: t*h*w / merge_size**2."""
        return [image_token_count(tuple(int(v) for v in g), self.merge_size) for g in self.grid_thw]


def image_token_count(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """Number of LLM tokens for a (t, h, w) patch grid."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)


# --------------------------------------------------------------------------- loading


def load_image(source: ImageSource, *, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
               as_shown: bool = False) -> Image.Image:
    """Decode an image from a path, encoded bytes, a PIL image or a uint8 array; return it as RGB.

    Arrays may be HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA, alpha dropped) and must be uint8.
    Colours are in sRGB (`in_srgb`: an embedded ICC profile is applied).
    `as_shown`: the picture as a viewer shows it (`shown_upright`), for a picture that comes back edited; else as
    the reference's fetch_image reads it (spec §4.1): EXIF orientation not applied, alpha dropped.
    Raises `MediaError` for empty, corrupt, zero-sized or oversized input.
    """
    if isinstance(source, Image.Image):
        image = source
        _check_size(image.size, max_input_pixels, "image")
    elif isinstance(source, np.ndarray):
        image = _image_from_array(source, max_input_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise MediaError("image data is empty (0 bytes)")
        image = _open_encoded(io.BytesIO(data), "image bytes", max_input_pixels)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise not_a_file(path, "image")
        if path.stat().st_size == 0:
            raise MediaError(f"image file is empty (0 bytes): {path}")
        with open(path, "rb") as fh:
            image = _open_encoded(io.BytesIO(fh.read()), f"image file {path}", max_input_pixels)
    else:
        raise MediaError(
            f"unsupported image input of type {type(source).__name__}; "
            "expected a path, bytes, a PIL image or a uint8 numpy array"
        )
    try:
        image = in_srgb(image)
        if as_shown:
            image = shown_upright(image)
        if image.mode in _HIGH_DEPTH_MODES:
            image = _to_8bit(image)
        return image.convert("RGB") if image.mode != "RGB" else image
    except (OSError, ValueError) as exc:
        raise MediaError(f"image could not be decoded: {exc}") from exc


def frame_count(source: ImageSource) -> int:
    """How many frames a picture holds: more than one for an animated GIF, WebP or APNG, of which load_image and
    load_alpha read the first only (say so: animated_note); 1 for an array, and for what cannot be opened (load_image
    says why)."""
    if isinstance(source, Image.Image):
        return getattr(source, "n_frames", 1)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif not isinstance(source, (str, os.PathLike)):
        return 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(source) as image:
                return getattr(image, "n_frames", 1)
    except Exception:  # noqa: BLE001  (not a picture: its decoding says so)
        return 1


def animated_note(what: str, frames: int) -> str:
    """What an answer says of an animated input picture `what` of `frames` frames (frame_count)."""
    return f"{what} is animated ({frames} frames): only its first frame was used"


def load_alpha(data: bytes, *, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> np.ndarray:
    """An edit mask's alpha channel (HxW uint8, 0 where it is transparent: OpenAI's mask, whose transparent pixels
    mark where to edit), the way up a viewer shows it. Raises `MediaError` for empty, corrupt or oversized input, and
    for a picture without transparency (a black-and-white mask says nothing in OpenAI's form)."""
    if not data:
        raise MediaError("the mask is empty (0 bytes)")
    image = _open_encoded(io.BytesIO(bytes(data)), "the mask", max_input_pixels)
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if not image.has_transparency_data:
        raise MediaError(f"the mask ({image.mode}, {image.width}x{image.height}) has no alpha channel: its fully "
                         "transparent pixels mark where to edit; save it as a PNG with transparency")
    return np.asarray(image.convert("RGBA").getchannel("A"))


# --------------------------------------------------------------------------- colour profiles

SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# Colorimetric: colours sRGB can show stay as they are, the rest go to the nearest it can (a matrix/TRC display
# profile such as Display P3 or Adobe RGB has no other intent; a printer's CMYK profile is read the same way)
COLOUR_INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC
# A profile that sends every probe colour (SRGB_PROBE_LEVELS levels per channel) to itself within this many
# levels is sRGB under another name (a camera's "sRGB IEC61966-2.1"): its pixels are kept as stored, untouched
SRGB_PROBE_LEVELS = 16
SRGB_TOLERANCE = 1
_PROFILE_MODES = {"RGB ": ("RGB", "RGBA"), "CMYK": ("CMYK",)}  # the profile's colour space -> modes it describes
GREY_SPACE = "GRAY"  # a grey profile's colour space (L, LA, 16-bit grey and palette pictures are read through it)


def in_srgb(image: Image.Image) -> Image.Image:
    """The picture's colours in sRGB, the space the model was trained on: a picture whose embedded ICC profile says
    its numbers mean other colours (a Display P3 phone photo, an Adobe RGB or a CMYK print file) is converted through
    its profile (alpha kept, the rest of `info` too: EXIF orientation), and so is a grey one whose grey profile gives
    its tones another curve (`_grey_in_srgb`); one in sRGB, with no profile, or with one that cannot be read or does
    not describe its mode is returned as it is (the numbers as stored, what the reference reads)."""
    icc = image.info.get("icc_profile")
    if not icc:
        return image
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space
    except (OSError, ValueError, TypeError):  # a damaged profile: the pixels as stored
        return image
    if space == GREY_SPACE:
        return _grey_in_srgb(image, profile)
    modes = _PROFILE_MODES.get(space, ())
    if image.mode in ("P", "PA") or image.mode == "RGB" and "transparency" in image.info:
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    if image.mode not in modes or modes == ("RGB", "RGBA") and _is_srgb(icc):
        return image
    out_mode = "RGBA" if image.mode == "RGBA" else "RGB"
    converted = ImageCms.profileToProfile(image, profile, SRGB_PROFILE, renderingIntent=COLOUR_INTENT,
                                          outputMode=out_mode)
    converted.info = {k: v for k, v in image.info.items() if k not in ("icc_profile", "transparency")}
    return converted


def _grey_in_srgb(image: Image.Image, profile: ImageCms.ImageCmsProfile) -> Image.Image:
    """A grey picture (L, LA, 16-bit grey, or a palette one) read through its grey profile (a scanner's linear grey,
    a gamma-1.8 proof: their mid-grey is not sRGB's) into sRGB RGB, or RGBA with its alpha; `info` kept but the
    profile. A picture of another mode (a grey profile on RGB: a mislabelled file) is returned as it is."""
    info = {k: v for k, v in image.info.items() if k not in ("icc_profile", "transparency")}
    if image.mode in ("P", "PA") or image.mode == "L" and "transparency" in image.info:
        image = image.convert("LA" if image.has_transparency_data else "L")
    elif image.mode in _HIGH_DEPTH_MODES:
        image = _to_8bit(image)
    if image.mode not in ("L", "LA"):  # (a float picture on the 0..255 scale stays as convert("RGB") reads it)
        return image
    converted = ImageCms.profileToProfile(image.getchannel("L"), profile, SRGB_PROFILE,
                                          renderingIntent=COLOUR_INTENT, outputMode="RGB")
    if image.mode == "LA":
        converted.putalpha(image.getchannel("A"))
    converted.info = info
    return converted


@functools.lru_cache(maxsize=16)
def _is_srgb(icc: bytes) -> bool:
    """Whether an RGB profile shows the probe colours as sRGB does (SRGB_TOLERANCE); asked once per profile."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    levels = np.linspace(0, 255, SRGB_PROBE_LEVELS).round().astype(np.uint8)
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(1, -1, 3)
    probe = Image.fromarray(cube, mode="RGB")
    shown = ImageCms.profileToProfile(probe, profile, SRGB_PROFILE, renderingIntent=COLOUR_INTENT, outputMode="RGB")
    return int(np.abs(np.asarray(shown, dtype=np.int16) - cube).max()) <= SRGB_TOLERANCE


EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a camera's stored picture is turned for display (1: as stored)
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
FLATTEN_ONTO = (255, 255, 255, 255)  # what shows through a transparent picture: a white page


def shown_upright(image: Image.Image) -> Image.Image:
    """The picture as a viewer shows it: turned by its EXIF orientation (a phone's portrait photo is stored sideways)
    and its transparent parts over white (dropping alpha shows whatever colour the file keeps there, often black).
    For a picture edited or segmented: the result comes back the way up, and over the background, the user saw."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in TRANSPARENT_MODES or image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, FLATTEN_ONTO), image.convert("RGBA"))
    return image


# 16-bit / 32-bit single-channel modes: Pillow's convert("RGB") clips them at 255 (a 16-bit grey PNG,
# mode I;16, comes out almost white), so they are rescaled to 8 bits first: integer modes by their bit
# depth, float images from [0, 1]. This differs from the reference on purpose: its fetch_image calls
# convert("RGB") on every image and so sees such a picture almost white. Values already on the 0..255
# scale (an "I" image up to 255, an "F" image above 1) are left to convert("RGB"), as the reference does.
# 16-bit colour PNGs (RGB, RGBA, grey + alpha) Pillow decodes to 8 bits a sample itself (the high byte),
# the same pixels the reference gets.
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_8bit(image: Image.Image) -> Image.Image:
    arr = np.asarray(image)
    if image.mode == "F":
        if np.nanmax(arr, initial=0.0) > 1.0:
            return image
        scaled = np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0) * 255.0
    else:
        top = 65535.0 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        scaled = np.clip(arr.astype(np.float64), 0.0, top) * (255.0 / top)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def _check_size(size: tuple[int, int], max_input_pixels: int, what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise MediaError(f"{what} has zero size ({width}x{height})")
    if width * height > max_input_pixels:
        raise MediaError(
            f"{what} is too large: {width}x{height} = {width * height} pixels "
            f"(limit {max_input_pixels})"
        )


def _open_encoded(stream: io.BytesIO, what: str, max_input_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=tuple(IMAGE_FORMATS))
            _check_size(image.size, max_input_pixels, what)
            image.load()
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"{what} is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise MediaError(unread_picture(what)) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"{what} is corrupt or truncated: {exc}") from exc
    return image


def _image_from_array(array: np.ndarray, max_input_pixels: int) -> Image.Image:
    if array.dtype != np.uint8:
        raise MediaError(f"image arrays must be uint8 (0..255), got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        mode = "RGB" if array.shape[2] == 3 else "RGBA"
    else:
        raise MediaError(f"image array must be HxW, HxWx3 or HxWx4, got shape {tuple(array.shape)}")
    _check_size((array.shape[1], array.shape[0]), max_input_pixels, "image array")
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


# --------------------------------------------------------------------------- resizing


def check_aspect(width: int, height: int) -> None:
    """Refuse (`MediaError`) a zero-sized image, or one whose long side is more than
    `MAX_ASPECT_RATIO` times its short side (smart resize cannot keep its shape)."""
    if height <= 0 or width <= 0:
        raise MediaError(f"image has zero size ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise MediaError(
            f"image aspect ratio {ratio:.1f} ({width}x{height}) is too extreme; "
            f"at most {MAX_ASPECT_RATIO}:1 is supported"
        )


def smart_resize(
    height: int,
    width: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    variant: SmartResizeVariant = "fetch",
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor`` with about the same aspect ratio and a
    pixel count inside [min_pixels, max_pixels] (spec §4.1).

    ``variant`` selects where the reference clamps a side to at least ``factor``:

    - ``"fetch"`` (Stage A, and video frames): ``max(F, round(x/F)*F)`` in the rounding step only;
    - ``"processor_v2"`` (2.0 image processor): no clamp when rounding, ``max(F, floor(.))``
      when shrinking;
    - ``"processor_preview"`` (Preview image processor): no clamp anywhere, and a side shorter
      than ``factor`` is an error.

    Rounding is Python's ``round`` (ties to even): 400/32 = 12.5 -> 12.
    """
    check_aspect(width, height)
    if variant == "processor_preview" and (height < factor or width < factor):
        raise MediaError(f"image side too small: {width}x{height}, both sides must be at least {factor} pixels")
    if variant not in ("fetch", "processor_v2", "processor_preview"):
        raise ValueError(f"unknown smart_resize variant {variant!r}")

    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if variant == "fetch":
        h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)

    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
        if variant == "processor_v2":
            h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor

    if h_bar <= 0 or w_bar <= 0:
        raise MediaError(
            f"image {width}x{height} cannot be resized to a positive multiple of {factor} "
            f"within [{min_pixels}, {max_pixels}] pixels"
        )
    return h_bar, w_bar


def resize_bicubic(image: Image.Image, width: int, height: int) -> Image.Image:
    """Pillow antialiased bicubic resize with Pillow 13's pass order, on any Pillow version.

    Pillow's default ``Image.resize`` filter for RGB is bicubic with ``reducing_gap=None``; it
    works in two separable 8-bit passes. The vertical pass runs first iff the height shrinks and
    ``in_h - out_h > 2 * (in_w - out_w)``; otherwise the horizontal pass runs first.
    """
    in_w, in_h = image.size
    if (in_w, in_h) == (width, height):
        return image.copy()
    if in_w == width or in_h == height:  # one pass only
        return image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=None)
    vertical_first = height < in_h and (in_h - height) > 2 * (in_w - width)
    if vertical_first:
        half = image.resize((in_w, height), Image.Resampling.BICUBIC, reducing_gap=None)
    else:
        half = image.resize((width, in_h), Image.Resampling.BICUBIC, reducing_gap=None)
    return half.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=None)


def fetch_image(
    source: ImageSource,
    release: Release = "2.0",
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    resized_height: int | None = None,
    resized_width: int | None = None,
) -> Image.Image:
    """Stage A: decode to RGB and resize to the release's smart-resize target (spec §4.1).

    A chat message element may override ``min_pixels``/``max_pixels`` or ask for an explicit
    ``resized_height``/``resized_width`` (rounded to the factor by smart resize; both or neither: one
    alone is ignored, as the reference's ``"resized_height" in ele and "resized_width" in ele`` does).
    """
    image = load_image(source)
    bounds = FetchImageConfig.for_release(release)
    lo = bounds.min_pixels if min_pixels is None else int(min_pixels)
    hi = bounds.max_pixels if max_pixels is None else int(max_pixels)
    # the reference takes the explicit size only when the element holds both keys; one alone is unread
    if resized_height is not None and resized_width is not None:
        h, w = smart_resize(int(resized_height), int(resized_width), bounds.factor,
                            bounds.min_pixels, bounds.max_pixels, "fetch")
    else:
        h, w = smart_resize(image.height, image.width, bounds.factor, lo, hi, "fetch")
    return resize_bicubic(image, w, h)


# --------------------------------------------------------------------------- processor


def normalize_image(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW: ``x/255`` (computed in float64, stored float32), then
    ``(x - mean) / std`` in float32, as the transformers image processor does."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise MediaError(f"expected a uint8 HxWx3 image, got {rgb.dtype} {tuple(rgb.shape)}")
    x = (rgb.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def patchify(frames: np.ndarray, config: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Flatten normalised frames [T, 3, H, W] into ``pixel_values`` and the (t, h, w) grid.

    T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame. Rows are
    ordered (t, h/m, w/m, m, m) -- the m x m patches of a merge block are consecutive -- and each
    row is channel-major (c, tau, y, x).
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise MediaError(f"expected frames [T, 3, H, W], got shape {tuple(frames.shape)}")
    n_frames, channels, height, width = frames.shape
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    if n_frames == 0:
        raise MediaError("no frames to process")
    if height % (p * m) or width % (p * m):
        raise MediaError(f"frame size {width}x{height} is not a multiple of {p * m}")
    if n_frames % tp:
        repeat = np.repeat(frames[-1:], tp - n_frames % tp, axis=0)
        frames = np.concatenate([frames, repeat], axis=0)
    grid_t, grid_h, grid_w = frames.shape[0] // tp, height // p, width // p
    x = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    x = x.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    return np.ascontiguousarray(x, dtype=np.float32), (grid_t, grid_h, grid_w)


def _processor_variant(config: ImageProcessorConfig) -> SmartResizeVariant:
    return "processor_v2" if config.release == "2.0" else "processor_preview"


def processor_target_size(height: int, width: int, config: ImageProcessorConfig,
                          min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """Stage B target (height, width) for an image of the given size."""
    return smart_resize(
        height, width, config.factor,
        config.min_pixels if min_pixels is None else int(min_pixels),
        config.max_pixels if max_pixels is None else int(max_pixels),
        _processor_variant(config),
    )


def preprocess_images(
    images: Sequence[ImageSource],
    config: ImageProcessorConfig,
    *,
    do_resize: bool = True,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ImageInputs:
    """Stage B: the image processor on one call's images; patches are concatenated in order.

    ``min_pixels``/``max_pixels`` override the config's bounds for this call (the reference
    processor instance allows it).
    """
    if isinstance(images, (str, bytes, np.ndarray, Image.Image)) or not isinstance(images, Sequence):
        images = [images]  # type: ignore[list-item]
    if len(images) == 0:
        raise MediaError("no images given")
    rows, grids, sizes = [], [], []
    for source in images:
        image = load_image(source)
        if do_resize:
            h, w = processor_target_size(image.height, image.width, config, min_pixels, max_pixels)
            image = resize_bicubic(image, w, h)
        frame = normalize_image(np.asarray(image), config.image_mean, config.image_std)
        pixel_values, grid = patchify(frame[None], config)
        rows.append(pixel_values)
        grids.append(grid)
        sizes.append((image.height, image.width))
    return ImageInputs(
        pixel_values=torch.from_numpy(np.concatenate(rows, axis=0)),
        grid_thw=torch.tensor(grids, dtype=torch.int64),
        merge_size=config.merge_size,
        sizes=sizes,
    )


def prepare_images(
    sources: Sequence[ImageSource],
    config: ImageProcessorConfig,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    resized_height: int | None = None,
    resized_width: int | None = None,
) -> ImageInputs:
    """The chat path: Stage A (`fetch_image`, with any per-message overrides) then Stage B."""
    if isinstance(sources, (str, bytes, np.ndarray, Image.Image)) or not isinstance(sources, Sequence):
        sources = [sources]  # type: ignore[list-item]
    fetched = [
        fetch_image(s, config.release, min_pixels=min_pixels, max_pixels=max_pixels,
                    resized_height=resized_height, resized_width=resized_width)
        for s in sources
    ]
    return preprocess_images(fetched, config)


def prepare_image(source: ImageSource, config: ImageProcessorConfig | None = None, **overrides) -> ImageInputs:
    """Chat-path input for a single image (2.0 defaults when ``config`` is None)."""
    return prepare_images([source], config or ImageProcessorConfig(), **overrides)
