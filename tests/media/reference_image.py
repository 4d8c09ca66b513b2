"""The spec's §4.1 image rules written out plainly for the front-end tests (sharing no code with the engine): smart
resize with its per-stage clamps, CLIP normalisation, and `pixel_values` rows placed by index arithmetic."""

from __future__ import annotations

import math

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def spec_smart_resize(h: int, w: int, factor: int, lo: int, hi: int, clamp_round: bool, clamp_shrink: bool):
    """§4.1 steps 1-4; `clamp_round` / `clamp_shrink`: whether max(F, .) applies in step 2 / step 3."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError("aspect")
    side = (lambda v: max(factor, v)) if clamp_round else (lambda v: v)
    hb, wb = side(round(h / factor) * factor), side(round(w / factor) * factor)
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        shrink = (lambda v: max(factor, v)) if clamp_shrink else (lambda v: v)
        hb, wb = shrink(math.floor(h / beta / factor) * factor), shrink(math.floor(w / beta / factor) * factor)
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def spec_pixel_values(frames: np.ndarray, patch: int, merge: int, temporal: int) -> tuple[np.ndarray, tuple]:
    """frames [T, 3, H, W] -> rows by index: row (t, bh, bw, ih, iw), column (c, tau, y, x) (§4.1)."""
    while frames.shape[0] % temporal:
        frames = np.concatenate([frames, frames[-1:]])
    gt, gh, gw = frames.shape[0] // temporal, frames.shape[2] // patch, frames.shape[3] // patch
    out = np.empty((gt * gh * gw, 3 * temporal * patch * patch), np.float32)
    row = 0
    for t in range(gt):
        for bh in range(gh // merge):
            for bw in range(gw // merge):
                for ih in range(merge):
                    for iw in range(merge):
                        r, c = bh * merge + ih, bw * merge + iw
                        block = frames[t * temporal:(t + 1) * temporal, :, r * patch:(r + 1) * patch,
                                       c * patch:(c + 1) * patch]  # [tau, ch, y, x]
                        out[row] = block.transpose(1, 0, 2, 3).reshape(-1)
                        row += 1
    return out, (gt, gh, gw)


def spec_normalise(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float32) / np.float32(255.0)
    return ((x - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(2, 0, 1)
