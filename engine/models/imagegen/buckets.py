"""Image sizes (spec §8.7): the resolution-bucket tables, which bucket a request diffuses at, and the
size the result is resized to.

A request gives an explicit size (`WxH`), an aspect ratio (`W:H`), or neither (text-to-image: square;
editing: the reference image's own shape). The diffusion size is the bucket of the chosen table whose
key (= H/W) is nearest the request's H/W, ties to the first key listed.

* aspect ratio / default, text to image: the processor's request is the bucket of (512, int(512·aspect))
  (the truncated width decides near-ties: 4:3 -> 512x682 -> key 0.78), and the image is that bucket;
* editing without a size: the bucket of the reference's (h, w) (after the optional centre crop), resized
  (Lanczos) to its aspect-preserving size (H_b, ⌊w·H_b/h⌋) if H_b/h > W_b/w, else (⌊h·W_b/w⌋, W_b);
* explicit size: the table is the one whose base is nearest √(W·H), and the output is resized
  (Lanczos) to exactly W×H (our extension: upstream only takes an aspect ratio).

Limits (refused with an ImageGenError, never clamped silently): each side 1…MAX_SIDE pixels and the
long/short ratio at most MAX_ASPECT (the tables' own range, 4:1). Odd sizes are fine: only the
diffusion size has to be a multiple of 16/32, and it always is.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from engine.errors import shown, shown_number
from engine.models.imagegen.config import ImageGenError

# key (≈ H/W) -> (H, W), in the order the reference lists them (ties go to the first).
BUCKETS_512: tuple[tuple[float, tuple[int, int]], ...] = (
    (0.25, (256, 1024)), (0.26, (256, 992)), (0.27, (256, 960)), (0.28, (256, 928)), (0.32, (288, 896)),
    (0.33, (288, 864)), (0.35, (288, 832)), (0.4, (320, 800)), (0.42, (320, 768)), (0.48, (352, 736)),
    (0.5, (352, 704)), (0.52, (352, 672)), (0.57, (384, 672)), (0.6, (384, 640)), (0.68, (416, 608)),
    (0.72, (416, 576)), (0.78, (448, 576)), (0.82, (448, 544)), (0.88, (480, 544)), (0.94, (480, 512)),
    (1.0, (512, 512)), (1.07, (512, 480)), (1.13, (544, 480)), (1.21, (544, 448)), (1.29, (576, 448)),
    (1.38, (576, 416)), (1.46, (608, 416)), (1.67, (640, 384)), (1.75, (672, 384)), (2.0, (704, 352)),
    (2.09, (736, 352)), (2.4, (768, 320)), (2.5, (800, 320)), (2.89, (832, 288)), (3.0, (864, 288)),
    (3.11, (896, 288)), (3.62, (928, 256)), (3.75, (960, 256)), (3.88, (992, 256)), (4.0, (1024, 256)),
)
BUCKETS_672: tuple[tuple[float, tuple[int, int]], ...] = (
    (0.28, (352, 1280)), (0.32, (384, 1184)), (0.38, (416, 1088)), (0.44, (448, 1024)), (0.52, (480, 928)),
    (0.57, (512, 896)), (0.65, (544, 832)), (0.75, (576, 768)), (0.83, (608, 736)), (0.91, (640, 704)),
    (1.00, (672, 672)), (1.10, (704, 640)), (1.21, (736, 608)), (1.33, (768, 576)), (1.39, (800, 576)),
    (1.53, (832, 544)), (1.69, (864, 512)), (1.75, (896, 512)), (1.93, (928, 480)), (2.00, (960, 480)),
    (2.21, (992, 448)), (2.29, (1024, 448)), (2.54, (1056, 416)), (2.62, (1088, 416)), (2.69, (1120, 416)),
    (3.00, (1152, 384)), (3.08, (1184, 384)), (3.17, (1216, 384)), (3.55, (1248, 352)), (3.64, (1280, 352)),
)
# Tables the reference knows (`image_gen_highres`); 1024 (the 2.0 default) is the 512 table doubled.
REFERENCE_BASES = (512, 672, 1024)
DEFAULT_BASE = 1024
# The tiny demo checkpoint diffuses at the 512 table halved (multiples of 16, fast on a CPU); it is
# selected by `studio_demo.image_gen_bucket_base` in its config.json and never used for real weights.
DEMO_BASE = 256
# The text-to-image default request of the processor: (512, 512·aspect) (spec §8.7).
PROCESSOR_SIDE = 512
MAX_SIDE = 4096
MAX_ASPECT = 4.0


def bucket_table(base: int) -> tuple[tuple[float, tuple[int, int]], ...]:
    if base == 672:
        return BUCKETS_672
    if base in (DEMO_BASE, 512, 1024):
        f = base / 512
        return tuple((k, (int(h * f), int(w * f))) for k, (h, w) in BUCKETS_512)
    raise ImageGenError(f"unknown bucket table {base}; known: {', '.join(map(str, (DEMO_BASE, *REFERENCE_BASES)))}")


def nearest_bucket(height: float, width: float, base: int) -> tuple[int, int]:
    """(H_b, W_b) of the table entry whose key is nearest H/W (ties: first listed)."""
    ratio = height / width
    best = min(bucket_table(base), key=lambda kv: abs(kv[0] - ratio))  # min keeps the first of equals
    return best[1]


def aspect_output_size(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The reference's resize target: keep the request's aspect at the bucket's scale (spec §8.7)."""
    hb, wb = bucket
    if hb / height > wb / width:
        return hb, int(math.floor(width * hb / height))
    return int(math.floor(height * wb / width)), wb


@dataclass(frozen=True)
class SizePlan:
    """Where a request diffuses and what it returns (both (height, width))."""

    diffusion: tuple[int, int]
    output: tuple[int, int]
    table: int


ASCII_NUMBER = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*|\s*[+-]?(inf|infinity|nan)\s*",
                          re.IGNORECASE)  # what float() reads, less other scripts' digits and '_'


def parse_size(size) -> tuple[int, int] | None:
    """'WxH' / (W, H) -> (height, width); None passes through."""
    if size is None or size == "":
        return None
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(-?[0-9]+)\s*[xX×*]\s*(-?[0-9]+)\s*", size)  # ASCII digits: not '２５６' (256)
        if not m:
            raise ImageGenError(f"size '{size}' is not of the form WIDTHxHEIGHT (e.g. 1024x768)", "size")
        w, h = int(m.group(1)), int(m.group(2))
    else:
        try:
            w, h = (int(v) for v in size)
        except (TypeError, ValueError):
            raise ImageGenError(f"size {size!r} must be 'WIDTHxHEIGHT' or a (width, height) pair", "size") from None
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
        raise ImageGenError(f"size {w}x{h} is out of range: each side must be 1..{MAX_SIDE} pixels", "size")
    _check_ratio(w / h, f"size {w}x{h}", "size")
    return h, w


def parse_aspect(aspect) -> float | None:
    """'16:9', '16/9', 1.78 (width over height) -> W/H; None passes through."""
    if aspect is None or aspect == "":
        return None
    if isinstance(aspect, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*[:/]\s*([0-9]*\.?[0-9]+)\s*", aspect)
        try:
            if not (m or ASCII_NUMBER.fullmatch(aspect)):  # float() reads '١.٥' (Arabic-Indic) and '1_5' (15)
                raise ValueError
            value = float(m.group(1)) / float(m.group(2)) if m else float(aspect)
        except (ValueError, ZeroDivisionError):
            raise ImageGenError(f"aspect '{aspect}' is not a ratio like 16:9 or 1.5", "aspect") from None
    else:
        try:
            if isinstance(aspect, bool):  # JSON true is no ratio
                raise TypeError
            value = float(aspect)
        except OverflowError:  # an integer past float's range: refused below
            value = math.inf
        except (TypeError, ValueError):
            raise ImageGenError(f"aspect {shown(aspect)} is not a number or a W:H ratio", "aspect") from None
    if not math.isfinite(value) or value <= 0:
        raise ImageGenError(f"aspect {shown_number(aspect)} must be a positive ratio such as 16:9", "aspect")
    _check_ratio(value, f"aspect {aspect}", "aspect")
    return value


def _check_ratio(w_over_h: float, what: str, param: str, hint: str = "") -> None:
    if max(w_over_h, 1 / w_over_h) > MAX_ASPECT + 1e-9:
        raise ImageGenError(f"{what} is too elongated: the long side may be at most {MAX_ASPECT:g} times the short "
                            f"side (the resolution buckets span 1:4 to 4:1){hint}", param)


def check_reference_shape(height: int, width: int) -> None:
    """An edit without a size or aspect keeps its picture's shape, which must lie in the buckets' range; the refusal
    says how to edit such a picture (a panorama was refused with no way on)."""
    widest = f"{MAX_ASPECT:g}:1" if width > height else f"1:{MAX_ASPECT:g}"
    _check_ratio(width / height, f"the reference image ({width}x{height})", "image",
                 f"; ask for an aspect ratio such as {widest}, or a size, to edit its centre crop")


def plan_size(size=None, aspect=None, reference_hw: tuple[int, int] | None = None,
              bases: tuple[int, ...] = REFERENCE_BASES, default_base: int = DEFAULT_BASE) -> SizePlan:
    """The diffusion and output sizes of a request (see the module docstring)."""
    explicit = parse_size(size)
    ratio = parse_aspect(aspect)
    if explicit is not None and ratio is not None:
        raise ImageGenError("give either a size or an aspect ratio, not both", "aspect")
    if explicit is not None:
        h, w = explicit
        table = min(bases, key=lambda b: abs(b - math.sqrt(h * w)))
        return SizePlan(nearest_bucket(h, w, table), (h, w), table)
    if reference_hw is not None and ratio is None:
        h, w = reference_hw
        check_reference_shape(h, w)
    else:
        # Text to image: the processor asks for the bucket of (512, int(512·aspect)) (get_default_image_gen_hw)
        # and generate buckets that request again; the result is resized to its aspect, i.e. kept at the bucket.
        h, w = nearest_bucket(PROCESSOR_SIDE, int(PROCESSOR_SIDE * (1.0 if ratio is None else ratio)), default_base)
    bucket = nearest_bucket(h, w, default_base)
    return SizePlan(bucket, aspect_output_size(h, w, bucket), default_base)


def center_crop_box(height: int, width: int, w_over_h: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest centred crop with the given W/H (spec §8.8), rounded as the
    reference processor does: the cut side is floored (⌊r·H⌋ when W/H ≥ r, else ⌊W/r⌋, at least 1) and the
    box sits at torchvision CenterCrop's offset int(round(Δ/2)) (Python rounding, halves to even)."""
    if width / height >= w_over_h:
        new_h, new_w = height, max(1, min(int(math.floor(w_over_h * height)), width))
    else:
        new_h, new_w = max(1, min(int(math.floor(width / w_over_h)), height)), width
    top, left = int(round((height - new_h) / 2.0)), int(round((width - new_w) / 2.0))
    return left, top, left + new_w, top + new_h
