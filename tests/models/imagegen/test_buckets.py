"""Resolution buckets and output sizes (spec §8.7), and the limits on sizes and aspect ratios."""

import pytest

from engine.models.imagegen.buckets import (MAX_SIDE, aspect_output_size, bucket_table, center_crop_box,
                                            nearest_bucket, parse_aspect, plan_size)
from engine.models.imagegen.config import ImageGenError


def test_tables_match_the_spec():
    assert len(bucket_table(512)) == 40 and len(bucket_table(672)) == 30
    assert dict(bucket_table(1024))[1.0] == (1024, 1024) and dict(bucket_table(1024))[0.57] == (768, 1344)
    assert dict(bucket_table(1024))[1.75] == (1344, 768)
    assert all(h % 64 == 0 and w % 64 == 0 for _, (h, w) in bucket_table(1024))
    assert all(h % 32 == 0 and w % 32 == 0 for base in (512, 672) for _, (h, w) in bucket_table(base))


def test_default_text_to_image_is_1024_square_and_aspect_keeps_its_ratio():
    assert plan_size().diffusion == (1024, 1024) and plan_size().output == (1024, 1024)
    # The processor asks for the bucket of (512, int(512·aspect)); generate buckets that again and resizes to
    # its aspect-preserving size, which is the bucket itself: 16:9 -> (512, 910) -> key 0.57 -> 768x1344.
    p = plan_size(aspect="16:9")
    assert p.diffusion == (768, 1344) and p.output == (768, 1344)
    assert nearest_bucket(100, 100, 512) == (512, 512)
    # equally near keys: the first one listed wins
    assert nearest_bucket(0.255, 1, 512) == (256, 1024)


def test_output_size_formula():
    assert aspect_output_size(96, 128, (208, 288)) == (216, 288)
    assert aspect_output_size(100, 50, (704, 352)) == (704, 352)
    assert aspect_output_size(300, 100, (864, 288)) == (864, 288)


def test_explicit_size_is_returned_exactly_and_picks_the_nearest_table():
    p = plan_size("513x257")      # odd sizes are fine: the diffusion size is a bucket, the output exact
    assert p.output == (257, 513) and p.table == 512 and p.diffusion == (352, 704)
    assert plan_size("1920x1080").table == 1024 and plan_size("1920x1080").output == (1080, 1920)
    assert plan_size(reference_hw=(70, 90), default_base=256).diffusion == (224, 288)


@pytest.mark.parametrize("kw, words", [
    ({"size": "0x512"}, "out of range"), ({"size": f"{MAX_SIDE + 1}x512"}, "out of range"),
    ({"size": "20000x20000"}, "out of range"), ({"size": "big"}, "WIDTHxHEIGHT"),
    ({"size": "2048x100"}, "elongated"), ({"aspect": "100:1"}, "elongated"), ({"aspect": "0:1"}, "positive"),
    ({"aspect": "nan"}, "positive"), ({"size": "512x512", "aspect": "1:1"}, "either"),
    ({"reference_hw": (10, 1000)}, "elongated"),
    # other scripts' digits and '_' were read as numbers (int() / float() take them; the CLI passed them on)
    ({"size": "\uff12\uff15\uff16x\uff12\uff15\uff16"}, "WIDTHxHEIGHT"), ({"size": "\u0662\u0665\u0666x256"}, "WIDTHxHEIGHT"),
    ({"aspect": "\u0661.\u0665"}, "not a ratio"), ({"aspect": "1_5"}, "not a ratio"),
])
def test_bad_sizes_are_refused_clearly(kw, words):
    with pytest.raises(ImageGenError, match=words) as refused:
        plan_size(**kw)
    assert refused.value.param in kw or "reference_hw" in kw or "either" in words


@pytest.mark.parametrize("aspect, ratio", [("1.5", 1.5), (" 2 ", 2.0), (".5", 0.5), ("1e0", 1.0), ("16/9", 16 / 9)])
def test_aspects_written_in_ascii_are_read(aspect, ratio):
    assert parse_aspect(aspect) == pytest.approx(ratio)


def test_centre_crop_is_the_largest_centred_box():
    assert center_crop_box(100, 300, 1.0) == (100, 0, 200, 100)
    assert center_crop_box(300, 100, 1.0) == (0, 100, 100, 200)


def test_centre_crop_rounds_like_the_reference_processor():
    """The reference (crop_to_aspect_max) floors the cropped side (floor(r·H) / floor(W/r)) and places the box
    with torchvision's CenterCrop offsets, int(round(Δ/2)) with Python's half-to-even rounding; we rounded the
    side and floored the offset, so the VAE reference of an edit with an aspect ratio was cut a pixel off."""
    # 300x100 at 16:9: side floor(177.78) = 177 (not 178), offset round(123/2 = 61.5) = 62 (not 61)
    assert center_crop_box(100, 300, 16 / 9) == (62, 0, 239, 100)
    # 195x100 square: offset round(47.5) = 48 (half to even), where 95 // 2 = 47
    assert center_crop_box(100, 195, 1.0) == (48, 0, 148, 100)
    assert center_crop_box(100, 193, 1.0) == (46, 0, 146, 100)   # round(46.5) = 46
    # taller than the target: floor(W / r) rows, offset round(Δ/2)
    assert center_crop_box(301, 100, 0.75) == (0, 84, 100, 217)
    # W/H equal to the target takes the "wider" branch: floor(r·H), which float rounding can make W - 1
    assert center_crop_box(47, 3, 3 / 47) == (0, 0, 2, 47)


@pytest.mark.parametrize("aspect, bucket", [("4:3", (896, 1152)), ("4:5", (1152, 896)), ("8:3", (640, 1600)),
                                            ("10:7", (832, 1152)), ("16:9", (768, 1344)), ("1:1", (1024, 1024))])
def test_text_to_image_aspect_is_the_bucket_of_the_truncated_processor_width(aspect, bucket):
    """The reference processor's default size is process_ratio(512, int(512·aspect)): the truncated width
    decides near-ties (4:3: 512/682 = 0.7507 -> key 0.78, where 512/682.67 = 0.75 tied 0.72/0.78 and took 0.72),
    and that bucket is what generate gets as the requested size, so the image comes back at the bucket (we
    resized 16:9 to 768x1365)."""
    p = plan_size(aspect=aspect)
    assert p.diffusion == bucket and p.output == bucket
