"""The image front end against the spec's §4.1 written out plainly here (sharing no code with the engine):
both smart-resize stages with their per-stage clamps, Pillow's default resize, x/255 and CLIP mean/std, the
still frame repeated to the temporal patch, and every `pixel_values` element placed by index arithmetic
(channel-major rows in merge-block order) instead of a reshape. Sizes the fixtures never use: 1x1, 27x27,
1x200 / 200x1 (the widest accepted), odd primes, a picture over the pixel ceiling, other patch / merge /
temporal sizes; 1x2000 and 2000x1 are refused with the ratio named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.media import MediaError
from engine.media.image import ImageProcessorConfig, patchify, prepare_image, preprocess_images
from tests.media.reference_image import CLIP_STD, spec_normalise, spec_pixel_values, spec_smart_resize

# §4.1 table (Stage A) and the shipped preprocessor_config.json bounds (Stage B)
STAGE_A = {"2.0": (32, 4 * 32 * 32, 16384 * 32 * 32), "preview": (28, 4 * 28 * 28, 1024 * 28 * 28)}
STAGE_B = {"2.0": (16, 4096, 16777216), "preview": (14, 78400, 2007040)}
# Pillow resizes in two 8-bit passes whose order changed in Pillow 13 (the engine pins 13's order; the
# plain Image.resize here is whichever Pillow is installed). On the smooth pictures below the other order
# moves a few pixels by up to 3 levels (bicubic's negative lobes amplify the intermediate rounding); 4 levels
# over the smallest CLIP std, in normalised units, at most; half a level on average (a wrong constant or a
# misplaced patch moves far more).
PASS_ORDER_ATOL = 4.0 / 255.0 / min(CLIP_STD)
MEAN_ATOL = 0.5 / 255.0 / min(CLIP_STD)


def stage_a(h: int, w: int, release: str) -> tuple[int, int]:
    factor, lo, hi = STAGE_A[release]
    return spec_smart_resize(h, w, factor, lo, hi, clamp_round=True, clamp_shrink=False)


def stage_b(h: int, w: int, release: str) -> tuple[int, int]:
    patch, lo, hi = STAGE_B[release]
    if release == "preview" and min(h, w) < 2 * patch:
        raise ValueError("side below factor")
    return spec_smart_resize(h, w, 2 * patch, lo, hi, clamp_round=False, clamp_shrink=release == "2.0")


def spec_chat_image(rgb: np.ndarray, release: str) -> tuple[np.ndarray, tuple, tuple]:
    image = Image.fromarray(rgb)
    h, w = stage_a(image.height, image.width, release)
    image = image.resize((w, h))  # Pillow's default filter for RGB: antialiased bicubic
    h, w = stage_b(h, w, release)
    image = image.resize((w, h)) if (w, h) != image.size else image
    rows, grid = spec_pixel_values(spec_normalise(np.asarray(image))[None], STAGE_B[release][0], 2, 2)
    return rows, grid, (h, w)


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth waves (53..203) plus noise of +-15 levels: no edge sharp enough for bicubic overshoot to be
    clipped to 0 or 255 between the two passes, so the pass order moves a pixel by rounding only."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([128 + 60 * np.sin(x / 7 + c) * np.cos(y / 5 - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.integers(-15, 16, (h, w, 3)), 0, 255).astype(np.uint8)


SIZES = [(1, 1), (27, 27), (1, 200), (200, 1), (2, 389), (31, 33), (97, 61), (240, 427), (4000, 41)]


@pytest.mark.parametrize("release", ["2.0", "preview"])
@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_chat_path_matches_the_spec_at_unseen_sizes(hw, release):
    rgb = _picture(*hw, seed=hw[0] * 7 + hw[1])
    ref_rows, ref_grid, ref_size = spec_chat_image(rgb, release)
    ours = prepare_image(rgb, ImageProcessorConfig.for_release(release))
    assert ours.sizes == [ref_size]
    assert ours.grid_thw.tolist() == [list(ref_grid)]
    assert ours.num_tokens == [ref_grid[0] * ref_grid[1] * ref_grid[2] // 4]
    assert ours.pixel_values.dtype == torch.float32
    np.testing.assert_allclose(ours.pixel_values.numpy(), ref_rows, atol=PASS_ORDER_ATOL, rtol=0)
    assert np.abs(ours.pixel_values.numpy() - ref_rows).mean() < MEAN_ATOL


@pytest.mark.parametrize("hw", [(1, 2000), (2000, 1), (3, 700)])
@pytest.mark.parametrize("release", ["2.0", "preview"])
def test_aspect_ratios_past_200_are_refused_with_the_ratio_named(hw, release):
    with pytest.raises(ValueError):
        spec_chat_image(_picture(*hw, seed=1), release)
    with pytest.raises(MediaError, match=r"aspect ratio .*at most 200:1"):
        prepare_image(_picture(*hw, seed=1), ImageProcessorConfig.for_release(release))


def _grid_sizes():
    # every (h, w) from 1..70 by a stride that visits odd, even, prime and factor-multiple sides, and a band
    # around the ceilings of both stages
    small = [(h, w) for h in range(1, 70, 3) for w in range(1, 70, 5)]
    big = [(h, w) for h in (3000, 4095, 4096, 4097, 5003) for w in (3000, 4096, 4100, 6001)]
    return small + big


@pytest.mark.parametrize("release", ["2.0", "preview"])
def test_both_stages_targets_match_the_spec_over_a_grid_of_sizes(release):
    """Stage A then Stage B sizes (no pixels) for ~400 sizes per release: only the arithmetic, so it is quick."""
    from engine.media.image import FetchImageConfig, processor_target_size, smart_resize
    config = ImageProcessorConfig.for_release(release)
    bounds = FetchImageConfig.for_release(release)
    for h, w in _grid_sizes():
        a = smart_resize(h, w, bounds.factor, bounds.min_pixels, bounds.max_pixels, "fetch")
        assert a == stage_a(h, w, release), (h, w)
        assert processor_target_size(*a, config) == stage_b(*a, release), (h, w)
        try:
            expected = stage_b(h, w, release)
        except ValueError:
            with pytest.raises(MediaError, match="too small"):
                processor_target_size(h, w, config)
            continue
        assert processor_target_size(h, w, config) == expected, (h, w)


PATCH_CONFIGS = {"p16_m2_t2": (16, 2, 2), "p14_m2_t2": (14, 2, 2), "p4_m3_t2": (4, 3, 2),
                 "p6_m1_t3": (6, 1, 3), "p5_m2_t1": (5, 2, 1)}


@pytest.mark.parametrize("n_frames", [1, 2, 3])
@pytest.mark.parametrize("sizes", PATCH_CONFIGS.values(), ids=PATCH_CONFIGS.keys())
def test_patch_rows_match_index_placement_at_other_patch_merge_and_temporal_sizes(sizes, n_frames):
    patch, merge, temporal = sizes
    config = ImageProcessorConfig(patch_size=patch, merge_size=merge, temporal_patch_size=temporal)
    side = patch * merge
    frames = np.random.default_rng(n_frames).standard_normal((n_frames, 3, 3 * side, 2 * side)).astype(np.float32)
    rows, grid = patchify(frames, config)
    ref_rows, ref_grid = spec_pixel_values(frames, patch, merge, temporal)
    assert grid == ref_grid
    np.testing.assert_array_equal(rows, ref_rows)  # a permutation of the same floats: exact


def test_processor_at_merge_size_3_resizes_to_multiples_of_patch_times_3():
    """Stage B's factor is patch x merge (§4.1), whatever the merge size."""
    config = ImageProcessorConfig(patch_size=8, merge_size=3, min_pixels=24 * 24, max_pixels=24 * 24 * 9)
    rgb = _picture(50, 97, seed=3)
    ours = preprocess_images([rgb], config)
    h, w = spec_smart_resize(50, 97, 24, 24 * 24, 24 * 24 * 9, clamp_round=False, clamp_shrink=True)
    assert ours.sizes == [(h, w)] and h % 24 == 0 and w % 24 == 0
    resized = np.asarray(Image.fromarray(rgb).resize((w, h)))
    ref_rows, ref_grid = spec_pixel_values(spec_normalise(resized)[None], 8, 3, 2)
    assert ours.grid_thw.tolist() == [list(ref_grid)]
    assert ours.num_tokens == [ref_grid[1] * ref_grid[2] // 9]
    np.testing.assert_allclose(ours.pixel_values.numpy(), ref_rows, atol=PASS_ORDER_ATOL, rtol=0)
