"""Image front end: smart-resize rules, Pillow-compatible resizing, patch layout, configs, errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.media import MediaError
from engine.media.image import (
    EXIF_ORIENTATION,
    ImageProcessorConfig,
    check_aspect,
    fetch_image,
    load_image,
    normalize_image,
    patchify,
    prepare_image,
    processor_target_size,
    preprocess_images,
    resize_bicubic,
    smart_resize,
)

from tests.paths import REAL_CONFIGS


def _rng_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- smart resize


def test_smart_resize_rounds_ties_to_even():
    # 400/32 = 12.5 -> 12 and 80/32 = 2.5 -> 2 (Python round), not 13 and 3
    assert smart_resize(80, 400, 32, 4096, 16777216, "fetch") == (64, 384)
    assert smart_resize(80, 400, 32, 4096, 16777216, "processor_v2") == (64, 384)
    # 1.5 -> 2 (even), 3.5 -> 4 (even)
    assert smart_resize(48, 112, 32, 1024, 16777216, "fetch") == (64, 128)


def test_smart_resize_enlarges_small_images_to_min_pixels():
    h, w = smart_resize(30, 20, 32, 4096, 16777216, "fetch")
    assert (h, w) == (96, 64)  # beta = sqrt(4096/600); ceil(30*beta/32)=3, ceil(20*beta/32)=2
    assert h * w >= 4096


def test_smart_resize_shrinks_to_max_pixels_with_floor():
    # beta = sqrt(640*480/16384) = 4.33: floor(480/beta/32)=3, floor(640/beta/32)=4
    assert smart_resize(480, 640, 32, 4096, 16384, "processor_v2") == (96, 128)


def test_fetch_variant_clamps_rounded_side_processor_v2_does_not():
    # 15/32 rounds to 0: Stage A clamps it to 32; the 2.0 processor keeps 0 and the min-pixel
    # branch then scales both sides up instead
    assert smart_resize(15, 1000, 32, 4096, 16777216, "fetch") == (32, 992)
    assert smart_resize(15, 1000, 32, 4096, 16777216, "processor_v2") == (32, 544)


def test_processor_v2_clamps_when_shrinking_fetch_cannot():
    # beta = sqrt(20*3000/20480): floor(20/beta/32) = 0 -> the 2.0 processor clamps to 32
    assert smart_resize(20, 3000, 32, 1024, 20480, "processor_v2") == (32, 1728)
    with pytest.raises(MediaError, match="cannot be resized"):
        smart_resize(20, 3000, 32, 1024, 20480, "fetch")


def test_preview_processor_rejects_sides_below_factor():
    with pytest.raises(MediaError, match="at least 28"):
        smart_resize(20, 300, 28, 78400, 2007040, "processor_preview")


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(MediaError, match="aspect ratio 201"):
        smart_resize(10, 2010, 32, 4096, 16777216)
    assert smart_resize(10, 2000, 32, 4096, 16777216)  # exactly 200:1 is allowed


def test_check_aspect_tells_what_smart_resize_will_refuse_from_the_size_alone():
    check_aspect(1, 200)
    for width, height, message in ((1, 201, "aspect ratio 201"), (0, 5, "zero size")):
        with pytest.raises(MediaError, match=message):
            check_aspect(width, height)


# --------------------------------------------------------------------------- resizing


def test_resize_bicubic_pass_order_follows_pillow_13():
    img = Image.fromarray(_rng_image(77, 123, seed=1))
    vertical_first = img.resize((123, 64), Image.BICUBIC).resize((128, 64), Image.BICUBIC)
    horizontal_first = img.resize((128, 77), Image.BICUBIC).resize((128, 64), Image.BICUBIC)
    assert not np.array_equal(np.asarray(vertical_first), np.asarray(horizontal_first))
    # height shrinks by 13 > 2 * (123 - 128): vertical pass first
    assert np.array_equal(np.asarray(resize_bicubic(img, 128, 64)), np.asarray(vertical_first))

    img = Image.fromarray(_rng_image(80, 400, seed=2))
    horizontal_first = img.resize((384, 80), Image.BICUBIC).resize((384, 64), Image.BICUBIC)
    # 80 - 64 = 16 is not > 2 * (400 - 384) = 32: horizontal pass first
    assert np.array_equal(np.asarray(resize_bicubic(img, 384, 64)), np.asarray(horizontal_first))


def test_fetch_image_output_size_and_rgb():
    gray = Image.fromarray(np.full((77, 123), 100, dtype=np.uint8), mode="L")
    out = fetch_image(gray, "2.0")
    assert out.mode == "RGB" and out.size == (128, 64)
    out = fetch_image(gray, "preview")  # factor 28: round(77/28)=3 -> 84, round(123/28)=4 -> 112
    assert out.size == (112, 84)
    assert fetch_image(gray, "2.0", resized_height=100, resized_width=200).size == (192, 96)


# --------------------------------------------------------------------------- patch layout


def test_patchify_is_channel_major_in_merge_block_order():
    cfg = ImageProcessorConfig(patch_size=2, merge_size=2, temporal_patch_size=2)
    h, w = 4, 8  # grid 2 x 4 patches of 2 x 2 pixels
    c, y, x = np.meshgrid(np.arange(3), np.arange(h), np.arange(w), indexing="ij")
    frame = (c * 1000 + y * 10 + x).astype(np.float32)
    rows, grid = patchify(frame[None], cfg)
    assert grid == (1, 2, 4)
    assert rows.shape == (8, 3 * 2 * 2 * 2)

    def patch(row, col):  # expected vector of patch (row, col): c, tau, y, x
        block = frame[:, row * 2:row * 2 + 2, col * 2:col * 2 + 2]
        return np.stack([block, block], axis=1).reshape(-1)

    # rows: block (0,0) = patches (0,0),(0,1),(1,0),(1,1); then block (0,1) = (0,2),(0,3),(1,2),(1,3)
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    for i, (r, cc) in enumerate(order):
        np.testing.assert_array_equal(rows[i], patch(r, cc))


def test_normalize_uses_clip_mean_std():
    rgb = np.array([[[0, 128, 255]]], dtype=np.uint8)
    out = normalize_image(rgb, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    np.testing.assert_allclose(out[:, 0, 0], [(0 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.5, 0.5], rtol=0, atol=1e-6)


def test_still_image_is_duplicated_in_time():
    cfg = ImageProcessorConfig()
    res = preprocess_images([_rng_image(64, 64)], cfg)
    assert res.grid_thw.tolist() == [[1, 4, 4]]
    vec = res.pixel_values[0].reshape(3, 2, 16, 16)
    assert np.array_equal(vec[:, 0].numpy(), vec[:, 1].numpy())
    assert res.num_tokens == [4]


# --------------------------------------------------------------------------- configs and releases


def test_config_from_real_preprocessor_files():
    v2_file = REAL_CONFIGS / "ming-flash-omni-2.0" / "preprocessor_config.json"
    pv_file = REAL_CONFIGS / "ming-flash-omni-preview" / "preprocessor_config.json"
    if not v2_file.is_file() or not pv_file.is_file():
        pytest.skip("real configs not available")
    v2 = ImageProcessorConfig.from_json_file(v2_file)
    pv = ImageProcessorConfig.from_json_file(pv_file)
    assert v2 == ImageProcessorConfig.for_release("2.0")
    assert pv == ImageProcessorConfig.for_release("preview")
    assert (pv.factor, pv.min_pixels, pv.max_pixels, pv.release) == (28, 78400, 2007040, "preview")
    assert v2.patch_dim == 1536 and pv.patch_dim == 1176


def test_preview_chat_path_enlarges_small_images_in_stage_b():
    # Stage A (factor 28, min 3136): 30x20 -> 84x56; Stage B (min 78400): 84x56 -> 364x252
    res = prepare_image(_rng_image(30, 20), ImageProcessorConfig.for_release("preview"))
    assert res.sizes == [(364, 252)]
    assert res.grid_thw.tolist() == [[1, 26, 18]]
    assert tuple(res.pixel_values.shape) == (26 * 18, 1176)
    assert res.num_tokens == [117]


def test_image_inputs_from_path_bytes_and_array_agree(tmp_path):
    arr = _rng_image(50, 70, seed=3)
    path = tmp_path / "pic.png"
    Image.fromarray(arr).save(path)
    cfg = ImageProcessorConfig()
    a = prepare_image(arr, cfg)
    b = prepare_image(str(path), cfg)
    c = prepare_image(path.read_bytes(), cfg)
    assert np.array_equal(a.pixel_values.numpy(), b.pixel_values.numpy())
    assert np.array_equal(a.pixel_values.numpy(), c.pixel_values.numpy())


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "source, message",
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n garbage", "not a recognised image|corrupt"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "zero size"),
        (np.zeros((10, 10, 3), dtype=np.float32), "must be uint8"),
        (np.zeros((10, 10, 2), dtype=np.uint8), "HxW, HxWx3 or HxWx4"),
        (12345, "unsupported image input of type int"),
        ("/nonexistent/picture.png", "not found"),
        (str(Path(__file__).parent), "is a folder, not an image file"),
    ],
)
def test_load_image_errors_name_the_problem(source, message):
    with pytest.raises(MediaError, match=message):
        load_image(source)


def test_truncated_png_is_reported_corrupt():
    buf = io.BytesIO()
    Image.fromarray(_rng_image(64, 64)).save(buf, format="PNG")
    with pytest.raises(MediaError, match="corrupt|truncated|recognised"):
        load_image(buf.getvalue()[:200])


def test_huge_images_are_refused_before_decoding():
    buf = io.BytesIO()
    Image.fromarray(_rng_image(100, 100)).save(buf, format="PNG")
    with pytest.raises(MediaError, match="too large"):
        load_image(buf.getvalue(), max_input_pixels=5000)


def test_media_error_is_a_value_error():
    assert issubclass(MediaError, ValueError)


def _png(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **save)
    return buf.getvalue()


def test_alpha_palette_and_exif_are_handled_as_the_reference_does():
    # alpha dropped (no compositing on white), palette looked up, EXIF orientation not applied
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)                      # fully transparent dark pixels stay dark
    assert np.asarray(load_image(rgba)).reshape(-1, 3).tolist() == [[10, 20, 30]] * 6
    la = Image.fromarray(np.dstack([np.full((2, 2), 40, np.uint8), np.zeros((2, 2), np.uint8)]), mode="LA")
    assert np.asarray(load_image(_png(la))).reshape(-1).tolist() == [40] * 12
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert np.asarray(load_image(_png(pal, transparency=0))).reshape(-1, 3).tolist() == [[0, 0, 0], [200, 100, 50]]
    exif = Image.Exif()
    exif[0x0112] = 6                                  # "rotate 90° CW to display"
    buf = io.BytesIO()
    Image.fromarray(_rng_image(20, 50)).save(buf, "JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (50, 20)


def test_float_images_on_the_8_bit_scale_convert_as_the_reference_does():
    """A float ("F") TIFF holding 0..255 levels (as an 8-bit picture saved as float) came out almost white:
    every value was taken as a [0, 1] intensity and clipped at 1. The reference converts it with
    convert("RGB") (bailingmm_utils.fetch_image); a [0, 1] float image is still scaled to 0..255."""
    levels = _rng_image(6, 9)[..., 0].astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(levels, mode="F").save(buf, "TIFF")
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(buf.getvalue())), expected)
    assert np.array_equal(expected[..., 0], levels.astype(np.uint8))
    unit = Image.fromarray(levels / 255.0, mode="F")
    assert np.abs(np.asarray(load_image(unit))[..., 0].astype(int) - levels.astype(int)).max() <= 1


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> grey, grey + alpha, RGB, RGBA


def _png16(samples: np.ndarray) -> bytes:
    """A 16-bit-per-sample PNG of `samples` (HxW or HxWxC uint16), written by hand (Pillow cannot save 48- or
    64-bit RGB PNGs)."""
    import struct
    import zlib
    h, w = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", w, h, 16, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [3, 4, 2])
def test_16_bit_colour_pngs_decode_as_the_reference_does(channels):
    """16-bit RGB, RGBA and grey + alpha PNGs: Pillow decodes them to 8 bits a sample (the high byte) and the
    reference's fetch_image converts that to RGB; ours gives the same pixels (spec §4.1)."""
    samples = np.random.default_rng(channels).integers(0, 65536, (5, 7, channels)).astype(np.uint16)
    raw = _png16(samples)
    expected = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(raw)), expected)
    assert np.array_equal(expected[..., 0], (samples[..., 0] >> 8).astype(np.uint8))


def test_16_bit_grey_pngs_keep_their_tones_where_the_reference_clips_them():
    """A 16-bit grey PNG opens as mode I;16, which the reference's convert("RGB") clips at 255: almost every
    pixel white. Ours deliberately scales it by its bit depth instead (65535 -> 255), so the picture keeps its
    tones; the round trip is exact to the nearest 8-bit level."""
    levels = np.arange(0, 65536, 257, dtype=np.uint16)[:240].reshape(12, 20)  # each an exact 8-bit level x 257
    raw = _png16(levels)
    assert Image.open(io.BytesIO(raw)).mode == "I;16"
    clipped = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    assert (clipped == 255).mean() > 0.99  # what the reference sees
    ours = np.asarray(load_image(raw))
    assert np.array_equal(ours, np.repeat((levels // 257).astype(np.uint8)[..., None], 3, axis=2))


def test_preprocessor_keys_omitted_take_the_processor_class_defaults():
    # BailingMM2ImageProcessor's own defaults (spec §4.1, §1.1), not the shipped file's values: the 2.0
    # class caps at 32*32*1280 pixels, the Preview class has 14-pixel patches and 78400 / 2007040
    v2 = ImageProcessorConfig.from_dict({"use_interleaved_frame_timestamp": True, "max_pixels": None})
    assert (v2.release, v2.patch_size, v2.min_pixels, v2.max_pixels) == ("2.0", 16, 4096, 1310720)
    assert ImageProcessorConfig.from_dict({}).max_pixels == 1310720
    assert processor_target_size(2000, 2000, v2) == (1120, 1120)
    pv = ImageProcessorConfig.from_dict({"min_pixels": 3136}, release="preview")
    assert (pv.patch_size, pv.merge_size, pv.min_pixels, pv.max_pixels) == (14, 2, 3136, 2007040)
    assert ImageProcessorConfig.from_dict({"patch_size": 14}).release == "preview"
    full = ImageProcessorConfig.from_dict({"min_pixels": 4096, "max_pixels": 16777216, "patch_size": 16,
                                           "size": {"shortest_edge": 1, "longest_edge": 2}})
    assert (full.min_pixels, full.max_pixels) == (4096, 16777216)


def test_fetch_image_ignores_a_lone_resized_side_as_the_reference_does():
    # the reference reads the explicit size only when the element holds both resized_height and
    # resized_width; one alone leaves the min/max smart-resize path (spec §4.1), it is not an error
    image = Image.fromarray(_rng_image(77, 300))
    plain = fetch_image(image, "2.0").size
    assert plain == (288, 64)
    assert fetch_image(image, "2.0", resized_height=500).size == plain
    assert fetch_image(image, "2.0", resized_width=500, max_pixels=64 * 64 * 2).size == \
        fetch_image(image, "2.0", max_pixels=64 * 64 * 2).size == (160, 32)


def test_a_single_number_mean_or_std_applies_to_every_channel():
    # the processor passes image_mean / image_std to transformers' normalize, which repeats a single
    # number for each channel (spec §4.1): a file saying 0.5 / 0.25 normalises (x/255 - 0.5) / 0.25
    cfg = ImageProcessorConfig.from_dict({"patch_size": 16, "image_mean": 0.5, "image_std": 0.25})
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == (0.25, 0.25, 0.25)
    rgb = np.full((32, 32, 3), 51, dtype=np.uint8)
    x = normalize_image(rgb, cfg.image_mean, cfg.image_std)
    np.testing.assert_allclose(x, (0.2 - 0.5) / 0.25, atol=1e-6)


def test_a_picture_as_shown_is_upright_and_over_white():
    """An edited picture comes back as the user saw it (`as_shown`): a phone's portrait photo, stored 50x20 with
    EXIF orientation 6, is read 20x50 (it was edited lying on its side), and transparent parts are white (dropping
    alpha showed the black the file keeps there); half-transparent pixels blend, palette transparency too."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = _rng_image(20, 50)
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "PNG", exif=exif)
    upright = np.asarray(load_image(buf.getvalue(), as_shown=True))
    assert upright.shape == (50, 20, 3) and np.array_equal(upright, np.rot90(stored, -1))
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (0, 0, 0, 128)
    shown = np.asarray(load_image(_png(Image.fromarray(rgba, mode="RGBA")), as_shown=True)).reshape(-1, 3).tolist()
    assert shown[0] == [10, 20, 30] and shown[2:] == [[255, 255, 255]] * 2 and abs(shown[1][0] - 127) <= 1
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert np.asarray(load_image(_png(pal, transparency=0), as_shown=True)).reshape(-1, 3).tolist() == \
        [[255, 255, 255], [200, 100, 50]]
    plain = _rng_image(4, 6)
    assert np.array_equal(np.asarray(load_image(plain, as_shown=True)), plain)  # nothing to turn or flatten


# --------------------------------------------------------------------------- colour profiles


def _encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_display_p3_picture_is_read_in_srgb(fmt):
    """A phone photo tagged Display P3 was read with its numbers taken as sRGB (colours duller than the phone
    showed). Now its colours are converted through its profile: what the matrices of both spaces say, within a
    level; the chat path (fetch_image) and an edit's (as_shown) read the same colours."""
    from tests.media.icc import display_p3_profile, p3_to_srgb

    stored = _rng_image(64, 64, seed=3)  # (a size fetch_image keeps)
    raw = _encoded(Image.fromarray(stored), fmt, icc_profile=display_p3_profile(), quality=95)
    as_stored = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))  # (JPEG: its own rounding)
    expected = p3_to_srgb(as_stored).astype(int)
    for read in (load_image(raw), load_image(raw, as_shown=True), fetch_image(raw)):
        got = np.asarray(read).astype(int)
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1
    assert np.abs(expected - as_stored).max() > 40  # (the conversion moves colours a lot: the test can fail)


def test_a_profiled_picture_keeps_its_orientation_and_transparency():
    """The conversion keeps what the picture's viewer uses next: its EXIF orientation and its alpha (over white)."""
    from tests.media.icc import display_p3_profile, p3_to_srgb

    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored = _rng_image(20, 50)
    raw = _encoded(Image.fromarray(stored), "PNG", icc_profile=display_p3_profile(), exif=exif)
    upright = np.asarray(load_image(raw, as_shown=True)).astype(int)
    assert upright.shape == (50, 20, 3) and np.abs(upright - np.rot90(p3_to_srgb(stored), -1)).max() <= 1
    rgba = np.dstack([stored, np.where(np.arange(50) < 25, 255, 0).astype(np.uint8)[None].repeat(20, 0)])
    shown = np.asarray(load_image(_encoded(Image.fromarray(rgba, "RGBA"), "PNG", icc_profile=display_p3_profile()),
                                  as_shown=True)).astype(int)
    assert np.abs(shown[:, :25] - p3_to_srgb(stored)[:, :25]).max() <= 1 and (shown[:, 25:] == 255).all()


def test_a_cmyk_picture_with_a_profile_is_read_through_it():
    """A CMYK print file's colours are what its profile says, not Pillow's profile-blind 255 - ink: with a profile
    that prints every ink mix as Lab (50.2, 0, 0) the picture is that grey in sRGB (worked out from L*); without a
    profile Pillow's conversion stays (the red of cyan-free magenta + yellow)."""
    from tests.media.icc import flat_cmyk_profile

    cmyk = Image.new("CMYK", (6, 4), (0, 255, 255, 0))
    lightness = 128 / 255 * 100
    y = ((lightness + 16) / 116) ** 3
    grey = round((1.055 * y ** (1 / 2.4) - 0.055) * 255)
    for fmt in ("JPEG", "TIFF"):
        got = np.asarray(load_image(_encoded(cmyk, fmt, icc_profile=flat_cmyk_profile()))).astype(int)
        assert np.abs(got - grey).max() <= 1, fmt
    assert np.asarray(load_image(_encoded(cmyk, "TIFF"))).reshape(-1, 3).tolist()[0] == [255, 0, 0]


def test_srgb_tagged_and_unreadable_profiles_leave_the_pixels_as_stored():
    """A camera's sRGB profile (any name) is sRGB: the pixels are the stored ones, bit for bit (what the reference
    reads); so are a damaged profile's and a grey picture's."""
    from PIL import ImageCms

    stored = _rng_image(16, 16, seed=5)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for icc in (srgb, b"not a profile", srgb[:200]):
        assert np.array_equal(np.asarray(load_image(_png(Image.fromarray(stored), icc_profile=icc))), stored)
    grey = Image.fromarray(stored[..., 0])
    assert np.array_equal(np.asarray(load_image(_png(grey, icc_profile=srgb)))[..., 1], stored[..., 0])


def test_grey_and_palette_pictures_with_a_grey_profile_are_read_through_it():
    """A scanner's grey picture tagged with a linear grey profile was read as stored (its mid-grey 128 shown 188 by a
    viewer came to the model as 128), in each of L, LA, 16-bit grey and palette; each is now RGB in sRGB (within 1
    level of the profile's curve worked out here), alpha and EXIF orientation kept."""
    from tests.media.icc import grey_profile, grey_to_srgb

    levels = np.tile(np.arange(0, 256, 17, dtype=np.uint8), (4, 1))  # 4x16
    expected = grey_to_srgb(levels, 1.0).astype(int)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side
    pictures = {"L": Image.fromarray(levels), "I;16": Image.fromarray(levels.astype(np.uint16) * 257),
                "P": Image.fromarray(levels).convert("P")}
    for mode, picture in pictures.items():
        got = np.asarray(load_image(_png(picture, icc_profile=grey_profile(1.0)))).astype(int)
        assert picture.mode == mode and got.shape == (4, 16, 3) and np.abs(got - expected[..., None]).max() <= 1, mode
    with_alpha = Image.fromarray(np.stack([levels, np.full_like(levels, 255)], -1), "LA")
    shown = load_image(_png(with_alpha, icc_profile=grey_profile(1.0), exif=exif), as_shown=True)
    assert shown.size == (4, 16)  # turned upright: the orientation was kept through the conversion
    assert np.abs(np.asarray(shown).astype(int)[..., 0] - np.rot90(expected, -1)).max() <= 1
