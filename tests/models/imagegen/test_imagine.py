"""Engine.imagine end to end on the tiny checkpoint: generate / edit / segment, event order, same seed
same bytes, cancellation, and bad input answered with clear errors (the engine keeps serving)."""

import io
import threading

import numpy as np
import pytest
from PIL import Image

from engine.events import Done, Error, ImageDone, ImagePreview, Progress
from engine.runtime import Engine
from tests.cli_checks import check_unloadable_checkpoint

FAST = {"steps": 2, "size": "64x48"}


def _png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(h=60, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _final(events):
    assert events and isinstance(events[-1], (Done, Error))
    assert sum(isinstance(e, (Done, Error)) for e in events) == 1
    return events[-1]


def test_generate_streams_progress_previews_then_the_image(tiny_engine):
    assert tiny_engine.has_image_generator and "image generator" in tiny_engine.placement
    events = list(tiny_engine.imagine('A sign saying "OPEN"', steps=4, preview_every=1, seed=3, size="100x60"))
    kinds = [type(e) for e in events]
    done = _final(events)
    assert isinstance(done, Done) and done.finish_reason == "stop"
    first_image = kinds.index(ImageDone)
    previews = [e for e in events if isinstance(e, ImagePreview)]
    assert [p.step for p in previews] == [1, 2, 3] and all(kinds.index(ImagePreview) < first_image for _ in previews)
    assert isinstance(events[0], Progress)
    image = events[first_image]
    assert Image.open(io.BytesIO(image.image)).size == (100, 60) == (image.width, image.height)
    assert done.stats.image_steps == 4 and done.stats.images == 1 and done.stats.image_step_s > 0
    assert 0 < done.stats.time_to_first_preview_s < done.stats.total_s
    assert done.result["glyph_text"] == 'Text "OPEN". ' and done.result["seed"] == 3


def test_same_seed_gives_identical_png_bytes(tiny_engine):
    def run(seed):
        return next(e for e in tiny_engine.imagine("a cat", seed=seed, **FAST) if isinstance(e, ImageDone)).image
    a, b, c = run(11), run(11), run(12)
    assert a == b and a != c


def test_requests_choose_the_pipelines_cfg_truncation_and_normalization(tiny_engine):
    """cfg_truncation / cfg_normalization reach the denoise loop (spec §8.6); their defaults are the
    reference pipeline's (1.0 / False), so giving them explicitly changes nothing."""
    def run(**kw):  # 3 steps: the last one (sigma 0 -> 0) moves nothing, the second does
        return next(e for e in tiny_engine.imagine("a cat", seed=11, **{**FAST, "steps": 3}, **kw)
                    if isinstance(e, ImageDone)).image
    default = run()
    assert run(cfg_truncation=1.0, cfg_normalization=False) == default
    assert run(cfg_truncation=0.0) != default  # the second step (DiT timestep > 0) runs without CFG
    assert run(cfg_normalization=0.5) != default


def test_edit_uses_every_image_in_the_prompt(tiny_engine):
    events = list(tiny_engine.imagine("make it blue", images=[_photo(), _photo(seed=1)], steps=2))
    done = _final(events)
    assert isinstance(done, Done) and done.result["task"] == "edit"
    assert (done.result["width"], done.result["height"]) == (288, 216)  # the reference's 4:3 at the demo scale
    assert done.stats.media_encode_s > 0


def test_segmentation_returns_mask_and_overlay(tiny_engine):
    events = list(tiny_engine.imagine("the cup", images=[_photo()], task="segment", steps=2, seed=1))
    done = _final(events)
    image = next(e for e in events if isinstance(e, ImageDone))
    mask = np.asarray(Image.open(io.BytesIO(image.mask)))
    over = Image.open(io.BytesIO(image.overlay))
    assert mask.shape == (image.height, image.width) and set(np.unique(mask)) <= {0, 255}
    assert over.size == (image.width, image.height)
    assert done.result["mask_pixels"] == int((mask > 0).sum())
    assert (image.note == "") == (0 < (mask > 0).mean() < 0.98)


def test_cancel_between_steps(tiny_engine):
    cancel = threading.Event()
    events = []
    for ev in tiny_engine.imagine("a cat", steps=6, preview_every=1, seed=2, size="64x64", cancel=cancel):
        events.append(ev)
        if isinstance(ev, ImagePreview):
            cancel.set()
    done = _final(events)
    assert isinstance(done, Done) and done.finish_reason == "cancelled"
    assert not any(isinstance(e, ImageDone) for e in events) and done.result["steps_done"] == 1


def test_cancel_before_denoising_starts(tiny_engine):
    cancel = threading.Event()
    cancel.set()
    done = _final(list(tiny_engine.imagine("a cat", cancel=cancel, **FAST)))
    assert done.finish_reason == "cancelled" and done.result["steps_done"] == 0


def test_cancel_while_the_source_picture_is_encoded(tiny_engine):
    """An edit cancelled during its picture's encoding stops inside the encoder (a huge picture kept it busy
    to the end before): no encoding time is recorded, nothing is denoised."""
    cancel = threading.Event()
    cancel.set()
    done = _final(list(tiny_engine.imagine("make it blue", images=[_photo()], steps=2, cancel=cancel)))
    assert done.finish_reason == "cancelled" and done.result["steps_done"] == 0
    assert done.stats.media_encode_s == 0.0


def _cmyk_jpeg():
    return _png_bytes(Image.new("CMYK", (40, 30), (0, 128, 255, 0)), "JPEG")


def _gif_animated():
    frames = [Image.new("P", (32, 32), i * 40) for i in range(3)]
    return _png_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def _sixteen_bit():
    return _png_bytes(Image.fromarray((np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)))


def _rgba():
    return _png_bytes(Image.new("RGBA", (30, 20), (10, 200, 30, 0)))


@pytest.mark.parametrize("source", [_cmyk_jpeg, _gif_animated, _sixteen_bit, _rgba,
                                    lambda: _png_bytes(Image.new("RGB", (1, 1), (5, 6, 7))),
                                    lambda: _png_bytes(Image.new("RGB", (3000, 2000), (90, 20, 200)))],
                         ids=["cmyk", "animated", "16bit", "alpha", "1x1", "6MP"])
def test_unusual_reference_images_are_accepted(tiny_engine, source, monkeypatch):
    import engine.imagine
    monkeypatch.setattr(engine.imagine, "MAX_REFERENCE_PIXELS", 256 * 256)  # the tiny ViT on a CPU: keep it quick
    done = _final(list(tiny_engine.imagine("edit it", images=[source()], **FAST)))
    assert isinstance(done, Done), done


def test_sixteen_bit_images_keep_their_tones():
    from engine.media.image import load_image
    rgb = np.asarray(load_image(_sixteen_bit()))
    assert 0.2 < rgb.mean() / 255 < 0.8 and rgb.max() > 200 and rgb.min() < 10   # not clipped to white


@pytest.mark.parametrize("kw, code, words", [
    ({"prompt": ""}, "invalid_request", "empty"),
    ({"prompt": "x" * 100_000}, "invalid_request", "characters"),
    ({"prompt": "a", "size": "0x64"}, "invalid_request", "out of range"),
    ({"prompt": "a", "size": "20000x20000"}, "invalid_request", "out of range"),
    ({"prompt": "a", "aspect": "50:1"}, "invalid_request", "elongated"),
    ({"prompt": "a", "steps": 0}, "invalid_request", "steps"),
    ({"prompt": "a", "guidance": float("nan")}, "invalid_request", "guidance"),
    ({"prompt": "a", "seed": "abc"}, "invalid_type", "seed"),  # text for a number: the type's code
    ({"prompt": "a", "task": "paint"}, "invalid_request", "task"),
    ({"prompt": "a", "task": "edit"}, "invalid_request", "input image"),
    ({"prompt": "  ", "task": "segment", "images": [_photo()]}, "invalid_request", "target"),
    ({"prompt": "a", "images": [b"\x89PNG\r\n\x1a\nnot really"]}, "invalid_media", "corrupt|recognised"),
    ({"prompt": "a", "images": [_photo(2, 500)]}, "invalid_request", "elongated"),
    ({"prompt": "a", "colour": "red"}, "invalid_request", "option"),
    ({"prompt": "a", "cfg_truncation": float("inf")}, "invalid_request", "cfg_truncation"),
    ({"prompt": "a", "cfg_normalization": -1.0}, "invalid_request", "cfg_normalization"),
])
def test_bad_requests_get_clear_errors(tiny_engine, kw, code, words):
    import re
    err = _final(list(tiny_engine.imagine(**{"steps": 1, **kw})))
    assert isinstance(err, Error) and err.code == code and re.search(words, err.message), err
    assert isinstance(_final(list(tiny_engine.imagine("still serving", **FAST))), Done)


def test_a_checkpoint_without_the_image_generator_says_so(tiny_engine):
    bare = Engine(tiny_engine.model, tiny_engine.tokenizer, is_demo=True)
    err = _final(list(bare.imagine("a cat")))
    assert isinstance(err, Error) and err.code == "unsupported_model" and "image generator" in err.message


def test_cli_writes_image_mask_and_overlay(tiny_checkpoint, tmp_path, capsys):
    """The image in the format its --out suffix names (seg.jpg was a PNG under that name), mask and overlay PNGs."""
    from engine.imagine import main
    src = tmp_path / "in.png"
    Image.fromarray(_photo()).save(src)
    out = tmp_path / "seg.jpg"
    assert main(["--model", str(tiny_checkpoint), "--edit", str(src), "--segment", "the cup", "--steps", "2",
                 "--seed", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "s/step" in printed and "per image" in printed
    assert [Image.open(p).format for p in (out, tmp_path / "seg_mask.png", tmp_path / "seg_overlay.png")] == \
        ["JPEG", "PNG", "PNG"]


def test_cli_refuses_an_out_of_a_format_it_cannot_write_before_the_model_loads(tmp_path, capsys):
    from engine.imagine import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "never_loaded"), "--prompt", "a cup", "--out", str(tmp_path / "a.gif")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and ".png, .jpg, .jpeg, .webp" in err and not (tmp_path / "a.gif").exists(), err


@pytest.mark.parametrize("flags, says", [
    (["--size", "512x512", "--aspect", "16:9"], "either a size or an aspect ratio"),
    (["--size", "big"], "not of the form WIDTHxHEIGHT"),
    (["--aspect", "9:1"], "aspect"),
    (["--steps", "0"], "steps"),
])
def test_cli_refuses_what_needs_no_model_before_the_model_loads(tmp_path, capsys, flags, says):
    """--size with --aspect (or a size that is no size, 0 steps) was refused only once
    the model had loaded, a minute on the real checkpoint; now before (the model path here does not exist)."""
    from engine.imagine import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "never_loaded"), "--prompt", "a cup", "--out", str(tmp_path / "a.png"),
              *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and says in err and "never_loaded" not in err, err


def _window_mask(w=64, h=48, box=(16, 12, 48, 36)) -> Image.Image:
    """OpenAI's edit mask: opaque but for `box` (transparent: where to edit)."""
    mask = Image.new("RGBA", (w, h), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def test_cli_edits_inside_its_mask_only(tiny_engine, tmp_path, monkeypatch, capsys):
    """`python -m engine.imagine` had no --mask (the server and the client take OpenAI's): `--edit a.png --mask m.png`
    keeps every pixel outside the mask the original's (tolerance 0: composited, written as PNG) at the picture's size.
    (Engine.load gives the session's tiny engine: loading it again takes seconds.)"""
    from engine.imagine import main
    from engine.runtime import Engine

    monkeypatch.setattr(Engine, "load", lambda *args, **kwargs: tiny_engine)
    original, out = _photo(48, 64, seed=3), tmp_path / "out.png"
    Image.fromarray(original).save(tmp_path / "a.png")
    _window_mask().save(tmp_path / "m.png")
    assert main(["--edit", str(tmp_path / "a.png"), "--mask", str(tmp_path / "m.png"), "--prompt", "make it blue",
                 "--steps", "1", "--seed", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    got = np.asarray(Image.open(out).convert("RGB"))
    outside = np.ones((48, 64), bool)
    outside[12:36, 16:48] = False
    assert got.shape == (48, 64, 3) and np.array_equal(got[outside], original[outside])


def test_cli_says_an_animated_mask_was_read_at_its_first_frame(tiny_engine, tmp_path, monkeypatch, capsys):
    """`--mask anim.png` (an APNG of 3 frames) was read at its first frame without a word, where the API says so: the
    CLI's note line says it in the API's words (animated_note)."""
    from engine.imagine import main
    from engine.runtime import Engine

    monkeypatch.setattr(Engine, "load", lambda *args, **kwargs: tiny_engine)
    Image.fromarray(_photo(48, 64, seed=3)).save(tmp_path / "a.png")
    frames = [_window_mask(box=(8 * i, 12, 48, 36)) for i in range(1, 4)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    assert main(["--edit", str(tmp_path / "a.png"), "--mask", str(tmp_path / "anim.png"), "--prompt", "make it blue",
                 "--steps", "1", "--out", str(tmp_path / "out.png")]) == 0, capsys.readouterr().err
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes and f"--mask {tmp_path / 'anim.png'} is animated (3 frames): only its first frame was used" in notes[0]


@pytest.mark.parametrize("mask, flags, says", [
    (None, [], "--mask {mask}: no such file"),
    ("folder", [], "is a folder, not a picture"),
    (b"not a picture", [], "the mask"),
    (Image.new("RGB", (64, 48)), [], "has no alpha channel"),
    (_window_mask(box=(0, 0, 0, 0)), [], "opaque everywhere"),
    (_window_mask(32, 32), [], "the mask is 32x32; it must be the size of the picture it marks, 64x48"),
    (_window_mask(), ["--aspect", "1:1"], "leave out the aspect"),
    (_window_mask(), ["--no-edit"], "'generate' takes none"),
], ids=["missing", "folder", "not-a-picture", "no-alpha", "opaque", "other-size", "aspect", "no-edit"])
def test_cli_refuses_a_mask_before_the_model_loads(tmp_path, capsys, mask, flags, says):
    """--mask's refusals (the engine's own words) come before the model loads (the model path here does not exist),
    exit 2, nothing written."""
    from engine.imagine import main

    path, out = tmp_path / "m.png", tmp_path / "out.png"
    if mask == "folder":
        path.mkdir()
    elif isinstance(mask, bytes):
        path.write_bytes(mask)
    elif mask is not None:
        mask.save(path)
    Image.fromarray(_photo(48, 64)).save(tmp_path / "a.png")
    edit = [] if "--no-edit" in flags else ["--edit", str(tmp_path / "a.png")]
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "never_loaded"), "--prompt", "make it blue", "--mask", str(path), *edit,
              *(f for f in flags if f != "--no-edit"), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and says.format(mask=path) in err and "never_loaded" not in err, err
    assert not out.exists()


def test_edit_sizes_and_reference_frame_come_from_the_picture_as_given(tiny_engine, monkeypatch):
    """Only the ViT input is shrunk to MAX_REFERENCE_PIXELS; the reference processor builds the VAE
    reference (bilinear to the bucket) and the output size from the picture as given. A 307x250 picture
    shrunk first (to 283x230 here) came back 274 wide instead of 275 = floor(307·224/250)."""
    import engine.imagine
    monkeypatch.setattr(engine.imagine, "MAX_REFERENCE_PIXELS", 256 * 256)
    seen = []
    real = engine.imagine._reference_pixels
    monkeypatch.setattr(engine.imagine, "_reference_pixels", lambda image, *a: seen.append(image.size) or real(image, *a))
    done = _final(list(tiny_engine.imagine("make it blue", images=[_photo(250, 307)], steps=1, seed=1)))
    assert isinstance(done, Done), done
    assert (done.result["height"], done.result["width"]) == (224, 275)
    assert (done.result["diffusion_height"], done.result["diffusion_width"]) == (224, 272)
    assert seen == [(307, 250)]


def test_a_picture_over_the_vits_limit_is_shrunk_to_its_own_ratio_and_the_image_says_so(tiny_engine, monkeypatch):
    """A 4000x1000 edit: the ViT read it shrunk (to at most MAX_REFERENCE_PIXELS) without a word. It is read at the
    picture's own 4:1 (2048x512 at the real limit; 256x64 at the small limit set here to keep the test quick) and the
    image's note says so. The short side is rounded, not cut: 3000x1999 was 1254x835."""
    import engine.imagine
    from engine.imagine import MAX_REFERENCE_PIXELS, vit_size

    assert vit_size(4000, 1000, MAX_REFERENCE_PIXELS) == (2048, 512)
    assert vit_size(1000, 4000, MAX_REFERENCE_PIXELS) == (512, 2048)
    for w, h in ((3000, 1999), (4032, 3024), (1920, 1081), (5000, 37)):
        sw, sh = vit_size(w, h, MAX_REFERENCE_PIXELS)
        assert sw * sh <= MAX_REFERENCE_PIXELS and abs(sh - sw * h / w) <= 0.5, (w, h, sw, sh)
    assert vit_size(640, 480, MAX_REFERENCE_PIXELS) == (640, 480)
    monkeypatch.setattr(engine.imagine, "MAX_REFERENCE_PIXELS", 256 * 64)
    events = list(tiny_engine.imagine("make it blue", images=[_photo(1000, 4000)], steps=1, seed=1, size="400x100"))
    done = _final(events)
    assert isinstance(done, Done), done
    image = next(e for e in events if isinstance(e, ImageDone))
    assert (image.width, image.height) == (400, 100)
    assert "picture 1 (4000x1000) was read at 256x64" in image.note and image.note in done.text


def test_glyph_text_is_read_from_the_whole_chat_prompt(tiny_engine):
    """The reference processor runs get_text_from_prompt on the chat text it is given (system prompt, role
    tags and the user's words), not on the user's words alone: an apostrophe in a custom system prompt makes
    the prompt's single quotes odd (no '…' -> "…"), and a remove keyword there drops a lone quoted span."""
    def glyph(prompt, system=None):
        done = _final(list(tiny_engine.imagine(prompt, system_prompt=system, seed=1, **{**FAST, "steps": 1})))
        assert isinstance(done, Done), done
        return done.result["glyph_text"]
    assert glyph("Write 'OPEN' on the door") == 'Text "OPEN". '
    assert glyph("Write 'OPEN' on the door", "You're a sign painter.") == ""
    assert glyph('Paint "SALE" on the window', "Never remove the subject.") == ""
    assert glyph('Paint "SALE" on the window', "You paint signs.") == 'Text "SALE". '


def test_a_bf16_engine_hands_the_dit_the_condition_in_fp32(tiny_checkpoint):
    """The reference computes proj_out and the L2 normalisation under bf16 autocast: F.normalize's norm is taken
    in fp32 and the division promotes, so the condition is the fp32 normalisation of the bf16 proj_out output;
    ZImagePipeline hands it on uncast, the wrapper's x1000 renormalisation runs in fp32, and the DiT's
    cap_embedder RMSNorm (fp32 statistics) rounds to bf16 once. We rounded the condition to bf16 after
    normalising it and the caption features again before the DiT (spec §8.3 step 4, §8.5 wrapper)."""
    import torch
    import torch.nn.functional as F

    from engine import imagine

    bf16 = Engine.load(tiny_checkpoint, dtype="bf16", device="cpu")
    gen = bf16.image_generator
    assert gen.transformer.dtype == torch.bfloat16 and gen.head_config.text_encoder_norm
    seen = {}

    def keep(name, value) -> None:  # hooks must return None to leave the call alone
        seen.setdefault(name, value)

    hooks = [gen.query_head.proj_out.register_forward_hook(lambda m, a, out: keep("proj_out", out)),
             gen.transformer.register_forward_pre_hook(lambda m, args: keep("captions", args[2]))]
    real = imagine.condition_from_prompt
    try:
        imagine.condition_from_prompt = lambda *a, **k: seen.setdefault("trace", real(*a, **k))
        done = _final(list(bf16.imagine("a cat", seed=5, **{**FAST, "steps": 1})))
    finally:
        imagine.condition_from_prompt = real
        for h in hooks:
            h.remove()
    assert isinstance(done, Done), done
    assert seen["proj_out"].dtype == torch.bfloat16
    cond = seen["trace"].condition
    assert cond.dtype == torch.float32
    torch.testing.assert_close(cond, F.normalize(seen["proj_out"].float(), dim=-1), rtol=1e-6, atol=1e-7)
    positive = seen["captions"][0]
    assert positive.dtype == torch.float32
    torch.testing.assert_close(positive, F.normalize(cond[0], dim=-1) * 1000.0, rtol=1e-6, atol=1e-4)


def test_a_segmentation_cut_to_an_aspect_compares_the_cut_picture(tiny_engine):
    """With an aspect ratio the edited picture is the centre crop (the VAE reference frame, bucket and output
    size are the crop's), so the mask must compare the output with that crop and the overlay paint it; both used
    the whole picture squeezed to the output's shape, so every column was off (the studio sends 1:1)."""
    from engine.models.imagegen.segmentation import overlay, recover_mask

    photo = _photo(60, 80, seed=4)
    events = list(tiny_engine.imagine("the cup", images=[photo], task="segment", aspect="1:1", steps=1, seed=2))
    done = _final(events)
    assert isinstance(done, Done), done
    image = next(e for e in events if isinstance(e, ImageDone))
    out = np.asarray(Image.open(io.BytesIO(image.image)))
    cut = np.asarray(Image.fromarray(photo[:, 10:70]).resize((image.width, image.height), Image.Resampling.LANCZOS))
    mask = np.asarray(Image.open(io.BytesIO(image.mask))) > 0
    assert np.array_equal(mask, recover_mask(cut, out))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.overlay))), overlay(cut, mask, "green"))


def test_an_edit_at_an_explicit_size_cuts_the_picture_to_its_proportions(tiny_engine, monkeypatch):
    """An explicit size on an edit asks for a shape as an aspect ratio does, so the picture is centre-cropped to
    W:H before it is bilinear-resized to the bucket; it was resized whole, so a 4:3 photo edited at 64x64 came
    back squashed into the square."""
    import engine.imagine
    seen = []
    real = engine.imagine._reference_pixels
    monkeypatch.setattr(engine.imagine, "_reference_pixels", lambda image, *a: seen.append(image) or real(image, *a))
    photo = _photo(60, 80, seed=5)
    done = _final(list(tiny_engine.imagine("make it blue", images=[photo], size="64x64", steps=1, seed=1)))
    assert isinstance(done, Done), done
    assert (done.result["width"], done.result["height"]) == (64, 64)
    assert [im.size for im in seen] == [(60, 60)] and np.array_equal(np.asarray(seen[0]), photo[:, 10:70])


def test_cli_names_a_checkpoint_it_cannot_load_and_exits_2(tmp_path, capsys):
    """Another model's checkpoint (or a broken config.json) was a ConfigError traceback."""
    from engine.imagine import main

    out = tmp_path / "out.png"
    check_unloadable_checkpoint(main, tmp_path, capsys, ["--prompt", "a cup", "--out", str(out)], 2, out)


@pytest.mark.parametrize("out, says", [("a_folder", "is a folder"), ("a_file/out.png", "is a file, not a folder")])
def test_cli_refuses_an_out_it_cannot_write_before_the_model_loads(tmp_path, capsys, out, says):
    """--out naming a folder was an IsADirectoryError traceback after the image had been made (the work lost);
    it is a usage error before the load (here --model names no checkpoint: the refusal comes first)."""
    from engine.imagine import main

    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "never_loaded"), "--prompt", "a cup", "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--out {tmp_path / out}: " in err and says in err, err


def test_cli_a_missing_input_image_is_refused_input_with_exit_2(tmp_path, capsys):
    """--edit of a file that does not exist exited 1, the code of a generation that failed; it is the user's input
    refused: 2, before the model loads (the model path here does not exist), and no output file."""
    from engine.imagine import main

    out = tmp_path / "new" / "out.png"  # a folder --out may still create
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "never_loaded"), "--edit", str(tmp_path / "nope.png"), "--prompt", "a cup",
              "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "nope.png: no such file" in err and "never_loaded" not in err, err
    assert not out.exists()


def test_cli_prompt_dash_is_read_from_stdin(tmp_path, capsys, monkeypatch):
    """'--prompt -' drew the prompt '-'; it is stdin's text (bytes that are not UTF-8: a usage error first)."""
    import io

    from engine.imagine import main

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe")))
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "never_loaded"), "--prompt", "-", "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "--prompt -: stdin is not UTF-8 text" in capsys.readouterr().err


def test_a_dit_without_the_pipelines_patch_is_refused_at_load_and_imagine_says_why(tiny_checkpoint, tmp_path):
    """The pipeline patchifies the latent 2x2, one frame deep (spec §8.5), whatever embedders transformer/config.json
    builds: a DiT built for 1x1 patches only loaded, and every image then ended in 'Error AssertionError: '. It is
    refused when the model loads (the rest serving), and imagine says that reason, not that the checkpoint has no
    image generator."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    config_file = ckpt / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["all_patch_size"] = [1]
    config_file.write_text(json.dumps(config))
    weights_file = next((ckpt / "transformer").glob("*.safetensors"))
    state = load_file(str(weights_file))
    channels, dim = config["in_channels"], config["dim"]
    one = {"all_x_embedder.1-1.weight": torch.randn(dim, channels), "all_x_embedder.1-1.bias": torch.zeros(dim),
           "all_final_layer.1-1.linear.weight": torch.randn(channels, dim),
           "all_final_layer.1-1.linear.bias": torch.zeros(channels)}
    for key in [k for k in state if ".2-1." in k]:
        value = state.pop(key)
        one.setdefault(key.replace(".2-1.", ".1-1."), value)
    save_file({**state, **one}, str(weights_file))
    engine = Engine.load(ckpt, dtype="fp32", device="cpu")
    assert not engine.has_image_generator
    said = "the DiT embeds (patch, frame patch) [(1, 1)] but the pipeline patchifies (2, 1)"
    assert said in engine.image_generator_error
    refused = _final(list(engine.imagine("a cat")))
    assert isinstance(refused, Error) and "patchifies (2, 1)" in refused.message


def test_an_animated_picture_is_edited_from_its_first_frame_and_the_image_says_so(tiny_engine, tmp_path):
    """An animated GIF given to an edit (engine.imagine --edit wave.gif, or its bytes) was read at its first frame
    without a word; the image's note says so (a still picture's does not)."""
    frames = [Image.fromarray(np.full((48, 64, 3), 60 * i, np.uint8)) for i in range(3)]
    gif = tmp_path / "wave.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    events = list(tiny_engine.imagine("make it blue", images=[str(gif), frames[0]], steps=1, seed=1, size="48x32"))
    image = next(e for e in events if isinstance(e, ImageDone))
    assert "picture 1 is animated (3 frames): only its first frame was used" in image.note
    assert image.note in _final(events).text and "picture 2" not in image.note


def test_a_picture_encoded_for_output_is_opened_as_the_decoder_opens_one():
    """encoded_as opened what it was given with any format Pillow reads (a PCX came out as a JPEG); it reads the
    decoder's formats only (engine.errors.IMAGE_FORMATS), another is refused naming them, and a PNG is re-encoded."""
    from engine.errors import image_formats_named
    from engine.imagine import encoded_as
    from engine.media.errors import MediaError
    picture = Image.fromarray(_photo(8, 8))
    assert encoded_as(_png_bytes(picture), "jpeg")[:3] == b"\xff\xd8\xff"  # (a JPEG's start)
    with pytest.raises(MediaError) as info:
        encoded_as(_png_bytes(picture, "PCX"), "jpeg")
    assert image_formats_named() in str(info.value), info.value
