"""Generative segmentation and the edit presets (spec §8.9).

Segmentation is an ordinary edit: the model is asked to paint the target in a colour and returns the
input with the target overlaid; the binary mask is recovered from the difference between the input
and the output, as the SDK does:

1. blur both images (3×3 Gaussian, σ = 1, sampled as the SDK's `gaussian_kernel` does: at
   linspace(−k/2, k/2, k) = −1.5, 0, 1.5, so 0.197 / 0.606 / 0.197 per axis), in [0, 1];
2. d = f₁ − (2·f₂ − f₁) with f₁ the input (the reference) and f₂ the output [U: the SDK's argument
   order was not visible; with a 50 % blend of the colour inside the mask this is |f₁ − colour|
   there and 0 elsewhere];
3. blur |d| again and average over the channels;
4. threshold > 0.15;
5. median filter, kernel 11.

The mask keeps the picture's size: the blurs reflect at the border where the SDK's unpadded
convolutions drop two pixels a side (and its cut-out stretches that smaller mask back), so the two
agree away from the border.

An empty mask means the model painted nothing: the target was not found, and the result says so. A
mask over (nearly) the whole picture means the model repainted everything instead of marking a region
(what random demo weights do): no region was found either, and the result says that too.
"""

from __future__ import annotations

import cv2
import numpy as np

from engine.models.imagegen.config import ImageGenError

SEGMENT_TEMPLATE = ("Given the following instructions: {target}; please perform referring segmentation on this "
                    "image with {color} mask.")
DEFAULT_MASK_COLOR = "green"
# Colour words the prompt names and the overlay paints (the SDK's rewrite template takes the user's own word,
# e.g. "orange mask"); matched without regard to case or surrounding spaces.
MASK_COLORS = {"green": (0, 255, 0), "red": (255, 0, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
               "cyan": (0, 255, 255), "magenta": (255, 0, 255), "white": (255, 255, 255), "black": (0, 0, 0),
               "orange": (255, 165, 0), "purple": (128, 0, 128)}
BLUR_KERNEL, BLUR_SIGMA = 3, 1.0
MASK_THRESHOLD = 0.15
MEDIAN_KERNEL = 11
OVERLAY_ALPHA = 0.5
EMPTY_MASK_NOTE = "the mask is empty: the target was not found in the picture"
FULL_MASK_FRACTION = 0.98  # a mask covering at least this share of the picture marks no region
FULL_MASK_NOTE = ("the mask covers the whole picture: the model repainted all of it instead of marking the "
                  "target, so no region was found")
# Edit presets: prompt templates around the user's text (our product wording, not upstream's).
EDIT_PRESETS = {
    "replace_background": "Replace the background with {text}. Keep the main subject unchanged.",
    "remove_object": "Remove the {text} from the image and fill the area naturally.",
}
_QUOTES = "\"'“”‘’「」『』"


def mask_color_name(color) -> str:
    """The MASK_COLORS key a request's colour names ('Green ' -> 'green'); refused when it names none."""
    name = color.strip().lower() if isinstance(color, str) else None
    if name not in MASK_COLORS:
        raise ImageGenError(f"mask colour {color!r} is not one of {', '.join(MASK_COLORS)}", "mask_color")
    return name


def segmentation_prompt(target: str, color: str = DEFAULT_MASK_COLOR) -> str:
    """The SDK rewrite template, quotes stripped from the target (spec §8.9)."""
    clean = "".join(ch for ch in target if ch not in _QUOTES).strip()
    if not clean:
        raise ImageGenError("segmentation needs a target to find, e.g. 'the cup'", "prompt")
    return SEGMENT_TEMPLATE.format(target=clean, color=mask_color_name(color))


def preset_prompt(preset: str, text: str) -> str:
    if preset not in EDIT_PRESETS:
        raise ImageGenError(f"unknown edit preset '{preset}'; choose one of {', '.join(EDIT_PRESETS)}", "preset")
    if not text.strip():
        raise ImageGenError(f"the '{preset}' preset needs a text (what to put in / what to remove)", "prompt")
    return EDIT_PRESETS[preset].format(text=text.strip())


def blur_kernel(size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """The SDK's normalised Gaussian per axis, exp(−x²/2σ²) at x = linspace(−size/2, size/2, size) (its 2-D
    kernel is the outer product)."""
    x = np.linspace(-size / 2, size / 2, size)
    g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


def _blur(x: np.ndarray) -> np.ndarray:
    k = blur_kernel()
    return cv2.sepFilter2D(x, -1, k, k, borderType=cv2.BORDER_REFLECT_101)


def recover_mask(reference: np.ndarray, output: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] input and output (same size) -> bool [H, W] mask (steps 1-5 above)."""
    if reference.shape != output.shape or reference.ndim != 3:
        raise ValueError(f"images must be the same [H, W, 3] size, got {reference.shape} and {output.shape}")
    f1 = _blur(reference.astype(np.float32) / 255.0)
    f2 = _blur(output.astype(np.float32) / 255.0)
    d = np.abs(f1 - (2.0 * f2 - f1))
    score = _blur(d).mean(axis=2)
    mask = (score > MASK_THRESHOLD).astype(np.uint8) * 255
    return cv2.medianBlur(mask, MEDIAN_KERNEL) > 0


def mask_note(mask: np.ndarray) -> str:
    """What to tell the user about a recovered mask that marks no region ("" when it marks one)."""
    if not mask.any():
        return EMPTY_MASK_NOTE
    if mask.mean() >= FULL_MASK_FRACTION:
        return FULL_MASK_NOTE
    return ""


def overlay(image: np.ndarray, mask: np.ndarray, color: str = DEFAULT_MASK_COLOR,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The input with the mask painted in `color` at `alpha` (what the model itself is asked to draw)."""
    out = image.astype(np.float32).copy()
    tint = np.asarray(MASK_COLORS[mask_color_name(color)], dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * tint
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
