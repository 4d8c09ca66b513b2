"""Segmentation prompt, mask recovery from a 50 % colour blend (spec §8.9), overlay and presets."""

import numpy as np
import pytest

from engine.models.imagegen.config import ImageGenError
from engine.models.imagegen.segmentation import (EMPTY_MASK_NOTE, FULL_MASK_NOTE, mask_note, overlay, preset_prompt,
                                                 recover_mask, segmentation_prompt)


def _scene(seed=0):
    rng = np.random.default_rng(seed)
    base = np.kron(rng.integers(40, 200, (8, 8, 3)), np.ones((12, 12, 1))).astype(np.uint8)  # 96x96 blocks
    target = np.zeros(base.shape[:2], bool)
    target[30:70, 20:60] = True
    return base, target


def test_prompt_template_strips_quotes_and_checks_the_colour():
    assert segmentation_prompt('"the cup"') == ("Given the following instructions: the cup; please perform referring "
                                               "segmentation on this image with green mask.")
    assert "red mask" in segmentation_prompt("hair", "red")
    with pytest.raises(ImageGenError):
        segmentation_prompt("  ")
    with pytest.raises(ImageGenError):
        segmentation_prompt("hair", "plaid")


def test_mask_of_a_half_blend_matches_the_painted_region():
    image, target = _scene()
    painted = overlay(image, target, "green")
    mask = recover_mask(image, painted)
    iou = (mask & target).sum() / (mask | target).sum()
    assert iou > 0.9


def test_unchanged_output_gives_an_empty_mask():
    image, _ = _scene(1)
    mask = recover_mask(image, image.copy())
    assert not mask.any() and mask_note(mask) == EMPTY_MASK_NOTE


def test_a_repainted_picture_marks_no_region_and_says_so():
    image, target = _scene(2)
    repainted = ((image.astype(np.int16) + 128) % 256).astype(np.uint8)  # every pixel changed, as random weights do
    mask = recover_mask(image, repainted)
    assert mask.all() and mask_note(mask) == FULL_MASK_NOTE
    assert mask_note(recover_mask(image, overlay(image, target, "green"))) == ""  # a real region: nothing to say


def test_presets_wrap_the_text():
    assert "sunny beach" in preset_prompt("replace_background", "a sunny beach")
    assert preset_prompt("remove_object", "cup").startswith("Remove the cup")
    with pytest.raises(ImageGenError):
        preset_prompt("recolour", "x")
