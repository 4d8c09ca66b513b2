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


def test_mask_colours_are_words_whatever_their_case():
    """The SDK's rewrite puts the user's own colour word in the prompt ("用橙色..." -> "orange mask"); "Green" or
    " red " were refused as unknown colours, and orange was not offered."""
    assert segmentation_prompt("the tower", " Orange ").endswith("with orange mask.")
    assert "red mask" in segmentation_prompt("hair", "RED")
    image, target = _scene(4)
    assert np.array_equal(overlay(image, target, "Green"), overlay(image, target, "green"))
    assert tuple(overlay(np.zeros((1, 1, 3), np.uint8), np.ones((1, 1), bool), "purple")[0, 0]) == (64, 0, 64)
    with pytest.raises(ImageGenError, match="mask colour"):
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


def _sdk_mask(reference: np.ndarray, output: np.ndarray) -> np.ndarray:
    """The SDK's get_mask(ref, pre) as it is written (ming_sdk/ming_img.py): gaussian_kernel(3, 1) sampled at
    torch.linspace(-1.5, 1.5, 3), unpadded depthwise conv2d, (pre - 0.5 ref) * 2, |diff|, blur, channel mean
    > 0.15, medianBlur 11. Its mask is 2 pixels smaller than the picture on every side."""
    import cv2
    import torch
    x, y = torch.meshgrid(torch.linspace(-1.5, 1.5, 3), torch.linspace(-1.5, 1.5, 3), indexing="ij")
    g = torch.exp(-(x ** 2 + y ** 2) / 2.0)
    conv = torch.nn.Conv2d(3, 3, 3, groups=3, bias=False)
    conv.weight.data = (g / g.sum()).expand(3, 3, 3).unsqueeze(1)
    with torch.no_grad():
        f1, f2 = (conv(torch.from_numpy(a).permute(2, 0, 1).float().div(255).unsqueeze(0)) for a in (reference, output))
        score = conv((f1 - (f2 - 0.5 * f1) * 2).abs()).mean(dim=1)[0]
    return cv2.medianBlur((score > 0.15).numpy().astype(np.uint8) * 255, 11) > 0


def test_mask_recovery_blurs_with_the_sdks_kernel():
    """The SDK samples its 3x3 sigma-1 Gaussian at -1.5, 0, 1.5 (0.197 / 0.606 / 0.197), not at -1, 0, 1 as
    cv2.GaussianBlur does (0.274 / 0.452 / 0.274). Where the output differs from the input in fine detail
    (stripes 39/255 darker on every other column, next to a painted region) the two kernels put the score
    on either side of the 0.15 threshold: with cv2's the whole striped area was marked."""
    image, target = _scene(3)
    painted = overlay(image, target, "green").astype(np.int16)
    painted[10:86, 64:90:2] -= 39
    painted = np.clip(painted, 0, 255).astype(np.uint8)
    ours = recover_mask(image, painted)
    sdk = _sdk_mask(image, painted)
    assert ours.shape == image.shape[:2] and sdk.shape == (92, 92)
    inner = ours[2:-2, 2:-2][5:-5, 5:-5]  # the SDK's pixels whose median window lies inside its smaller mask
    assert np.array_equal(inner, sdk[5:-5, 5:-5])
    assert inner.any() and not inner.all()
