"""/v1/images/generations, /edits and /segmentations against the tiny engine (few steps, small sizes):
OpenAI's shapes (and OpenAI's own client), n images with their seeds, streamed previews before the
final image, segmentation masks, cancellation between steps, and bad input (each a 400 with a stable
code, or a documented clamping; never a 500 or a wrong size)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from engine.models.imagegen.segmentation import OVERLAY_ALPHA, overlay
from tests.server import FakeEngine, fake_server, leave_stream_at, running_server, sse_events
from tests.server.test_fuzz import png_claiming

FAST = {"steps": 2, "size": "48x32"}


def png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def picture(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(tiny_engine, max_image_pixels=4_000_000) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_generations_in_openais_shape_with_n_and_seeds(http):
    r = http.post("/v1/images/generations", json={"prompt": "a red teapot", "n": 2, "seed": 7, **FAST})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == "48x32" and body["output_format"] == "png" and body["usage"]["input_tokens"] > 0
    assert [d["seed"] for d in body["data"]] == [7, 8] and [d["index"] for d in body["data"]] == [0, 1]
    images = [decoded(d["b64_json"]) for d in body["data"]]
    assert all(im.size == (48, 32) and im.format == "PNG" for im in images)
    assert body["metrics"]["images"] == 2 and body["metrics"]["image_steps"] == 4
    again = http.post("/v1/images/generations", json={"prompt": "a red teapot", "seed": 8, **FAST}).json()
    assert again["data"][0]["b64_json"] == body["data"][1]["b64_json"]  # same seed -> same PNG bytes
    jpeg = http.post("/v1/images/generations", json={"prompt": "a red teapot", "output_format": "jpeg", **FAST})
    assert decoded(jpeg.json()["data"][0]["b64_json"]).format == "JPEG"


def test_quality_is_honoured_as_steps_and_openais_other_values_are_taken(http):
    """OpenAI's `quality` had no effect: `low` now runs QUALITY_STEPS' 10 steps, `medium` 20 (a rougher picture,
    sooner), `high` the model's default; a `steps` given wins. style / moderation / input_fidelity take their values."""
    from engine.server.images_api import QUALITY_STEPS, openai_steps

    r = http.post("/v1/images/generations", json={"prompt": "a cup", "size": "32x32", "quality": "low",
                                                  "style": "natural", "moderation": "low"})
    assert r.status_code == 200 and r.json()["metrics"]["image_steps"] == QUALITY_STEPS["low"], r.text
    assert openai_steps({"quality": "medium"}) == QUALITY_STEPS["medium"]
    assert openai_steps({"quality": "medium", "steps": 3}) == 3
    for default in ("high", "xhigh", "max", "hd", "standard", "auto"):  # OpenAI's SDK's values: the model's default
        assert openai_steps({"quality": default, "input_fidelity": "high", "complexity": "high"}) is None


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_output_compression_is_openais_quality_100_the_best(fmt):
    """OpenAI's output_compression (0-100, default 100) is the lossy encoder's quality: 100 was written at quality 0
    (the worst file, for OpenAI's own default) and 0 at 95. Each step up now keeps the picture closer to the PNG
    made; left out, the file is written at the default quality, between 50 and 100."""
    from engine.events import ImageDone
    from engine.server.images_api import encoder_of

    smooth = np.linspace(0, 255, 96 * 96 * 3).reshape(96, 96, 3).astype(np.uint8) ^ np.asarray(picture(96, 96)) // 8
    made = ImageDone(png(Image.fromarray(smooth)), 96, 96)

    def error(compression):
        out = np.asarray(decoded(encoder_of(fmt, compression)(made)).convert("RGB"), dtype=float)
        return np.abs(out - smooth).mean()

    assert error(100) < error(None) < error(50) < error(0)
    assert decoded(encoder_of("png", 0)(made)).tobytes() == Image.fromarray(smooth).tobytes()  # png: lossless


def test_streams_previews_before_the_final_image(http):
    with http.stream("POST", "/v1/images/generations",
                     json={"prompt": "a boat", "stream": True, "partial_images": 2, "steps": 6, "size": "32x32",
                           "n": 2, "quality": "medium"}) as r:
        events = sse_events(r)
    data = [e for e in events if isinstance(e, dict)]
    kinds = [e["type"] for e in data]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"] + \
        ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e["partial_image_index"] for e in data if e["type"].endswith("partial_image")] == [0, 1, 0, 1]
    assert {e["quality"] for e in data} == {"medium"}  # the setting asked (every event said "auto")
    assert [e["index"] for e in data] == [0, 0, 0, 1, 1, 1]
    assert "usage" not in data[2] and data[-1]["usage"]["input_tokens"] > 0  # the request's totals on the last
    assert data[-1]["metrics"]["time_to_first_preview_ms"] > 0
    # without stream the previews asked for were made and thrown away (time to a preview nobody saw was reported)
    r = http.post("/v1/images/generations", json={"prompt": "a boat", "partial_images": 3, "steps": 2, "size": "32x32"})
    assert r.status_code == 200 and r.json()["metrics"]["time_to_first_preview_ms"] == 0, r.text
    assert any(isinstance(e, str) and e.startswith(": progress") for e in events)
    assert decoded(data[0]["b64_json"]).format == "PNG" and data[-1]["size"] == "32x32"


def test_openais_own_client_generates_edits_and_streams(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        res = client.images.generate(model="default", prompt="a lighthouse", size="1024x1024", n=1,
                                     extra_body={"steps": 1})
        assert decoded(res.data[0].b64_json).size == (1024, 1024)
        res = client.images.edit(model="default", image=[("a.png", png(picture()), "image/png")], prompt="make it blue",
                                 extra_body={"steps": 1, "size": "64x48"})
        assert decoded(res.data[0].b64_json).size == (64, 48)
        kinds = [ev.type for ev in client.images.generate(model="default", prompt="a fox", stream=True,
                                                          partial_images=1, extra_body={"steps": 3, "size": "32x32"})]
        assert kinds == ["image_generation.partial_image", "image_generation.completed"]


def test_segmentation_returns_image_mask_and_overlay(http):
    r = http.post("/v1/images/segmentations", files={"image": ("cup.png", png(picture()), "image/png")},
                  data={"prompt": "the cup", "steps": "2"})
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    mask, overlay = decoded(item["mask"]), decoded(item["overlay"])
    w, h = decoded(item["b64_json"]).size
    assert mask.size == overlay.size == (w, h) and w / h == pytest.approx(64 / 48, rel=0.02)  # the input's shape
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    empty = not np.asarray(mask).any()
    assert ("empty" in item["note"]) == empty  # an empty mask is said plainly


def edit(http, raw: bytes, **fields):
    data = {"prompt": "make it blue", "steps": "1", "size": "32x32", **fields}
    return http.post("/v1/images/edits", files=[("image[]", ("in.png", raw, "image/png"))], data=data)


def test_awkward_but_valid_images_are_accepted(http):
    """Documented handling: CMYK and 16-bit converted, animations use the first frame, alpha over white,
    a 1x1 reference resized to the bucket."""
    frames = [picture(32, 32, s) for s in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    sixteen = Image.fromarray(np.random.default_rng(1).integers(0, 65535, (40, 40)).astype(np.uint16))
    for raw in (png(picture().convert("CMYK"), "JPEG"), png(sixteen), gif.getvalue(), png(picture().convert("RGBA")),
                png(Image.new("RGB", (1, 1)))):
        r = edit(http, raw)
        assert r.status_code == 200 and decoded(r.json()["data"][0]["b64_json"]).size == (32, 32), r.text


def test_an_edit_works_on_the_picture_as_the_user_sees_it(http):
    """A phone photo stored 64x48 with EXIF orientation 6 is shown 48x64: its edit came back 64x48 (288x216), lying
    on its side. A logo on a transparent background was segmented over the black kept under the transparency: its
    overlay (the picture, green at OVERLAY_ALPHA where the mask is) was dark where the user saw white."""
    exif = Image.Exif()
    exif[0x0112] = 6
    r = http.post("/v1/images/edits", files=[("image", ("phone.jpg", png(picture(), "JPEG", exif=exif), "image/jpeg"))],
                  data={"prompt": "make it blue", "steps": "1", "seed": "1"})
    assert r.status_code == 200, r.text
    w, h = decoded(r.json()["data"][0]["b64_json"]).size
    assert h > w and w / h == pytest.approx(48 / 64, rel=0.02)
    logo = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    logo.paste((200, 30, 30, 255), (24, 16, 40, 32))
    r = http.post("/v1/images/segmentations", files={"image": ("logo.png", png(logo), "image/png")},
                  data={"prompt": "the red square", "steps": "1", "seed": "1", "size": "64x48"})
    assert r.status_code == 200, r.text
    red = np.asarray(decoded(r.json()["data"][0]["overlay"]).convert("RGB"))[..., 0].astype(int)
    red[12:36, 20:44] = 255  # (the square, and the resize's ringing at its edge)
    assert red.min() >= (1 - OVERLAY_ALPHA) * 255 - 2  # white, under the green mask wherever the model painted


def test_a_display_p3_picture_is_segmented_in_srgb_and_the_results_carry_no_other_profile(http):
    """A Display P3 photo was segmented with its numbers read as sRGB: the overlay (the picture, tinted where the
    mask is) came back duller than the user's. It is converted first (engine.media.image.in_srgb); the PNGs and JPEGs
    made carry no ICC profile, so a viewer shows them as sRGB, which they are."""
    from tests.media.icc import display_p3_profile, p3_to_srgb

    stored = np.asarray(picture(64, 48, seed=4))
    raw = png(Image.fromarray(stored), icc_profile=display_p3_profile())
    r = http.post("/v1/images/segmentations", files={"image": ("p3.png", raw, "image/png")},
                  data={"prompt": "the cup", "steps": "1", "seed": "2", "size": "64x48", "output_format": "jpeg"})
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    mask = np.asarray(decoded(item["mask"])) > 0
    expected = overlay(p3_to_srgb(stored), mask).astype(int)  # (the random model's mask: mostly everywhere)
    assert np.abs(np.asarray(decoded(item["overlay"]).convert("RGB")).astype(int) - expected).max() <= 1
    for made in (item["b64_json"], item["mask"], item["overlay"]):
        assert decoded(made).info.get("icc_profile") is None


@pytest.mark.parametrize("raw, code", [
    (b"", "invalid_image"), (b"\x89PNG\r\n\x1a\nbroken", "invalid_image"), (b"plain text", "invalid_image"),
    (png_claiming(50_000, 50_000), "image_too_large"), (png(Image.new("RGB", (4000, 10))), "invalid_image"),
])
def test_bad_images_are_400s(http, raw, code):
    r = edit(http, raw)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


@pytest.mark.parametrize("body, code, words", [
    ({"prompt": ""}, "invalid_value", "empty"),
    ({"prompt": "x" * 100_000}, "invalid_value", "at most 32,000"),  # OpenAI's most (it was 20,000)
    ({"prompt": "a", "size": "0x0"}, "invalid_request", "1..4096"),
    ({"prompt": "a", "size": "20000x20000"}, "invalid_request", "1..4096"),
    ({"prompt": "a", "size": "10x1000"}, "invalid_request", "elongated"),
    ({"prompt": "a", "size": "big"}, "invalid_request", "WIDTHxHEIGHT"),
    ({"prompt": "a", "aspect": "100:1"}, "invalid_request", "elongated"),
    ({"prompt": "a", "n": 11}, "invalid_value", "'n' must be in [1, 10]"),  # OpenAI's most (it was 4)
    ({"prompt": "a", "response_format": "url"}, "unsupported_parameter", "never hosts"),
    ({"prompt": "a", "output_format": "gif"}, "unsupported_parameter", "png, jpeg or webp"),
    ({"prompt": "a", "output_format": ["png"]}, "unsupported_parameter", "png, jpeg or webp"),  # was a 500
    ({"prompt": "a", "output_format": {"type": "png"}}, "unsupported_parameter", "png, jpeg or webp"),
    ({"prompt": "a", "background": "transparent"}, "unsupported_parameter", "opaque"),
    ({"prompt": "a", "background": "clear"}, "invalid_value", "background 'clear' is not one of"),  # was "opaque"
    ({"prompt": "a", "quality": "ultra"}, "invalid_value", "quality 'ultra' is not one of"),  # each was taken
    ({"prompt": "a", "quality": 3}, "invalid_value", "quality"),
    ({"prompt": "a", "style": "anime"}, "invalid_value", "style 'anime' is not one of OpenAI's values: vivid"),
    ({"prompt": "a", "moderation": "strict"}, "invalid_value", "moderation 'strict'"),
    ({"prompt": "a", "input_fidelity": "max"}, "invalid_value", "input_fidelity 'max'"),
    ({"prompt": "a", "complexity": "extreme"}, "invalid_value", "complexity 'extreme'"),
    ({"prompt": "a", "partial_images": 7}, "invalid_value", "partial_images"),
    ({"prompt": "a", "steps": 0}, "invalid_request", "steps"),
    ({"prompt": "a", "guidance": 1e9}, "invalid_request", "guidance"),
    ({"prompt": 5}, "invalid_type", "string"),
    ({"prompt": "a", "steps": "1"}, "invalid_type", "steps must be a whole number"),  # a number as text: the
    ({"prompt": "a", "guidance": "2"}, "invalid_type", "guidance '2' is not a number"),  # type's code, as elsewhere
])
def test_bad_requests_are_400s(http, body, code, words):
    r = http.post("/v1/images/generations", json={"steps": 1, **body})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == code and words in err["message"], r.text


@pytest.mark.parametrize("path, body, param", [
    ("/v1/images/generations", {"size": "0x0"}, "size"),
    ("/v1/images/generations", {"size": "10x1000"}, "size"),
    ("/v1/images/generations", {"aspect": "1:0"}, "aspect"),
    ("/v1/images/generations", {"size": "\uff12\uff15\uff16x\uff12\uff15\uff16"}, "size"),  # full-width digits: 256x256
    ("/v1/images/generations", {"aspect": "\u0661.\u0665"}, "aspect"),  # Arabic-Indic digits: float() read 1.5
    ("/v1/images/generations", {"steps": 0}, "steps"),
    ("/v1/images/generations", {"steps": 1.5}, "steps"),
    ("/v1/images/generations", {"guidance": 1e9}, "guidance"),
    ("/v1/images/generations", {"guidance": 10 ** 400}, "guidance"),  # float() overflowed: these two were 500s
    ("/v1/images/generations", {"aspect": 10 ** 400}, "aspect"),
    ("/v1/images/generations", {"guidance": True}, "guidance"),   # these three were taken as 1.0, 2.0 and 1:1
    ("/v1/images/generations", {"guidance": "2"}, "guidance"),
    ("/v1/images/generations", {"aspect": True}, "aspect"),
    ("/v1/images/generations", {"preview_every": -1}, "preview_every"),
    ("/v1/images/generations", {"preset": "remove_object"}, "preset"),
    ("/v1/images/edits", {"preset": "zzz"}, "preset"),
    ("/v1/images/segmentations", {"mask_color": "notacolor"}, "mask_color"),
    ("/v1/images/generations", {"cfg_truncation": "soon"}, "cfg_truncation"),
    ("/v1/images/generations", {"cfg_normalization": -1}, "cfg_normalization"),
    ("/v1/images/edits", {"image_guidance": 2.0}, "image_guidance"),  # the 2.0 pipeline has none
    ("/v1/images/segmentations", {"image_guidance": 2.0}, "image_guidance"),
    ("/v1/images/generations", {"image_guidance": 2.0}, "image_guidance"),  # no reference picture to guide
    ("/v1/images/segmentations", {"prompt": "\"''\""}, "prompt"),
    ("/v1/images/generations", {"negative_prompt": "dogs"}, "negative_prompt"),  # 2.0 guides against zeros
    ("/v1/images/edits", {"negative_prompt": "dogs"}, "negative_prompt"),
    ("/v1/images/generations", {"negative_prompt": 5}, "negative_prompt"),
    ("/v1/images/generations", {"negative_prompt": "x" * 32_001}, "negative_prompt"),
])
def test_what_the_image_generator_refuses_names_its_field(http, path, body, param):
    """These were the engine's refusals, with param null."""
    image = {} if path.endswith("generations") else {"image": base64.b64encode(png(picture())).decode()}
    r = http.post(path, json={"prompt": "a", "steps": 1, **image, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_the_pipelines_cfg_options_reach_the_image_generator(http):
    """cfg_truncation / cfg_normalization (diffusers' Z-Image pipeline options, spec §8.6) were taken by the
    engine and its CLI but not by the server: the fields were refused as unknown. JSON and multipart take
    them; normalising the guided prediction to a small factor of the positive one changes the picture."""
    body = {"prompt": "a red teapot", "seed": 3, "steps": 2, "guidance": 5.0, "size": "32x32"}
    plain = http.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    capped = http.post("/v1/images/generations", json={**body, "cfg_normalization": 0.05})
    assert capped.status_code == 200, capped.text
    assert capped.json()["data"][0]["b64_json"] != plain
    assert http.post("/v1/images/generations", json={**body, "cfg_normalization": False,
                                                       "cfg_truncation": 1.0}).json()["data"][0]["b64_json"] == plain
    form = {k: str(v) for k, v in body.items()}
    edits = [http.post("/v1/images/edits", files=[("image", ("a.png", png(picture()), "image/png"))],
                       data={**form, **extra}) for extra in ({}, {"cfg_normalization": "0.05"},
                                                             {"cfg_normalization": "false"})]
    assert [r.status_code for r in edits] == [200] * 3, [r.text for r in edits]
    first, capped_edit, off = (r.json()["data"][0]["b64_json"] for r in edits)
    assert capped_edit != first and off == first


def test_image_guidance_is_refused_by_name_where_nothing_uses_it(http):
    """image_guidance is the Preview SD3 pipeline's reference-picture guidance (spec §8.10): the 2.0 pipeline has
    none, and a generation has no reference picture; each refusal says why (it was an unknown field everywhere)."""
    edit = http.post("/v1/images/edits", files=[("image", ("a.png", png(picture()), "image/png"))],
                     data={"prompt": "blue", "steps": "1", "image_guidance": "2"})
    err = edit.json()["error"]
    assert edit.status_code == 400 and err["param"] == "image_guidance" and "2.0 pipeline has none" in err["message"]
    generation = http.post("/v1/images/generations", json={"prompt": "a", "steps": 1, "image_guidance": 2.0})
    err = generation.json()["error"]
    assert generation.status_code == 400 and err["code"] == "unsupported_parameter", generation.text
    assert "/v1/images/edits" in err["message"]


@pytest.fixture(scope="module")
def preview_http(preview_engine):
    with running_server(preview_engine) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


def test_a_preview_edit_takes_image_guidance(preview_http):
    """On the Preview, image_guidance reaches the edit's 4-branch CFG from JSON and multipart: its default (2.0, the
    card's image_defaults) is the picture made without it, 1.0 (the reference unguided: 2 branches) another one;
    out of range is a 400 naming it, as the engine's own check says."""
    card = preview_http.get("/v1/models").json()["data"][0]
    assert card["image_defaults"]["image_guidance"] == 2.0
    image = base64.b64encode(png(picture())).decode()
    body = {"prompt": "make it blue", "image": image, "seed": 4, **FAST}

    def made(**extra):
        r = preview_http.post("/v1/images/edits", json={**body, **extra})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["b64_json"]

    default = made()
    assert made(image_guidance=2.0) == default
    unguided = made(image_guidance=1.0)
    assert unguided != default
    form = {k: str(v) for k, v in {**body, "image_guidance": 1.0}.items() if k != "image"}
    r = preview_http.post("/v1/images/edits", files=[("image", ("a.png", png(picture()), "image/png"))], data=form)
    assert r.status_code == 200 and r.json()["data"][0]["b64_json"] == unguided, r.text
    for bad_value in (31, -1, "2", True):
        r = preview_http.post("/v1/images/edits", json={**body, "image_guidance": bad_value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "image_guidance", (bad_value, r.text)


def test_a_preview_request_takes_a_negative_prompt(preview_http):
    """On the Preview, negative_prompt conditions the negative CFG branch (spec §8.2): from JSON (generations) and
    multipart (edits) it changes the picture, blank is no negative prompt, and a wrong type or a too long one is a
    400 naming it."""
    body = {"prompt": "a red cat", "seed": 4, **FAST}

    def made(path="/v1/images/generations", **extra):
        r = preview_http.post(path, json={**body, **extra})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["b64_json"]

    plain = made()
    assert made(negative_prompt="") == plain
    assert made(negative_prompt="blurry, watermark") != plain
    form = {k: str(v) for k, v in body.items()}
    edits = [preview_http.post("/v1/images/edits", files=[("image", ("a.png", png(picture()), "image/png"))],
                               data={**form, **extra}) for extra in ({}, {"negative_prompt": "blurry"})]
    assert [r.status_code for r in edits] == [200, 200], [r.text for r in edits]
    assert edits[0].json()["data"][0]["b64_json"] != edits[1].json()["data"][0]["b64_json"]
    for bad_value, code in ((["blurry"], "invalid_type"), ("x" * 32_001, "invalid_value")):
        r = preview_http.post("/v1/images/generations", json={**body, "negative_prompt": bad_value})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "negative_prompt" and err["code"] == code, r.text


def test_an_edit_picture_outside_the_buckets_range_names_the_image(http):
    """An edit without a size or aspect keeps its picture's shape; one past 4:1 is refused, and the refusal
    named no field (the engine's, after queueing). Cut to an aspect ratio the same picture is fine."""
    image = base64.b64encode(png(picture(300, 20))).decode()
    r = http.post("/v1/images/edits", json={"prompt": "a", "steps": 1, "image": image})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "image" and "elongated" in err["message"], r.text
    assert "aspect ratio such as 4:1, or a size, to edit its centre crop" in err["message"]  # (it said no way on)
    r = http.post("/v1/images/edits", json={"prompt": "a", "steps": 1, "image": image, "aspect": "4:1"})
    assert r.status_code == 200 and decoded(r.json()["data"][0]["b64_json"]).size == (512, 128), r.text


def test_odd_sizes_are_made_exactly(http):
    r = http.post("/v1/images/generations", json={"prompt": "a", "size": "33x17", "steps": 1})
    assert decoded(r.json()["data"][0]["b64_json"]).size == (33, 17)


def test_edits_refuse_a_mask_without_alpha_and_need_an_image(http):
    r = http.post("/v1/images/edits", files=[("image", ("a.png", png(picture()), "image/png")),
                                             ("mask", ("m.png", png(picture()), "image/png"))], data={"prompt": "x"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "invalid_image" and "no alpha channel" in err["message"], r.text
    r = http.post("/v1/images/edits", json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_field"
    r = http.post("/v1/images/edits", json={"prompt": "x", "steps": 1, "size": "32x32",
                                            "images": [{"image_url": "data:image/png;base64,"
                                                        + base64.b64encode(png(picture())).decode()}]})
    assert r.status_code == 200, r.text  # OpenAI's JSON edit shape
    usage = r.json()["usage"]  # the picture's patch tokens were counted as text, image_tokens 0
    details = usage["input_tokens_details"]
    assert details["image_tokens"] > 0 and details["text_tokens"] + details["image_tokens"] == usage["input_tokens"]


def test_openais_other_picture_shapes_and_too_many_pictures_are_refused_by_name(http):
    """OpenAI's {"file_id"} was "'image[0]' must be a string, got NoneType", a web URL "not valid base64", and 12
    pictures "9 input images" in JSON (counted after a cut at 9) or "Maximum number of files is 10" in a form. The
    most is OpenAI's 16 (it was 8): 17 are refused naming it."""
    one = base64.b64encode(png(picture(16, 16))).decode()
    for body, code, words in (
            ({"images": [{"file_id": "file-abc"}]}, "unsupported_parameter", "no Files API"),
            ({"images": [{"image_url": "https://example.com/a.png"}]}, "url_not_supported", "does not fetch URLs"),
            ({"image": "https://example.com/a.png"}, "url_not_supported", "does not fetch URLs"),
            ({"image": [one] * 9, "images": [{"image_url": "data:image/png;base64," + one}] * 8}, "invalid_value",
             "17 input images; at most 16")):
        r = http.post("/v1/images/edits", json={"prompt": "x", "steps": 1, **body})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == code and words in err["message"], r.text
        assert err["param"] == "image" if code == "invalid_value" else err["param"] == "image[0]"
    r = http.post("/v1/images/edits", files=[("image[]", (f"{i}.png", png(picture(16, 16)), "image/png"))
                                             for i in range(17)], data={"prompt": "x", "steps": "1"})
    assert r.status_code == 400 and "17 input images; at most 16" in r.json()["error"]["message"], r.text


def test_a_client_going_away_stops_between_steps(server, http):
    body = {"prompt": "a slow one", "stream": True, "steps": 200, "size": "32x32", "partial_images": 3}
    record = leave_stream_at(server, http, "/v1/images/generations", body, "partial_image", "images.image_generation")
    assert record.finish_reason == "cancelled" and record.cancel_latency_s < 5


def test_ten_pictures_are_made_one_at_a_time_each_with_its_progress_and_a_client_leaving_stops_the_rest(server,
                                                                                                         http):
    """OpenAI allows n up to 10 (ours refused more than 4): they are made one after another, each progress line says
    which picture it is about, and a client that goes away after the first stops the request there."""
    body = {"prompt": "ten boats", "stream": True, "steps": 1, "size": "32x32", "n": 10}
    record = leave_stream_at(server, http, "/v1/images/generations", body, "picture 2 of 10", "images.image_generation")
    assert record.finish_reason == "cancelled"


def test_an_engine_without_an_image_generator_says_so():
    with fake_server(FakeEngine()) as srv:
        r = httpx.post(srv.url + "/v1/images/generations", json={"prompt": "a cat"}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] == "modality_not_supported"


def test_a_forms_pictures_keep_the_forms_order(http):
    """A form sending image[] (a tall picture) then image (a wide one) had its `image` parts taken first: the wide
    picture was edited. The first picture of the form is the one edited (its shape kept)."""
    tall, wide = png(picture(32, 64, seed=1)), png(picture(64, 32, seed=2))
    r = http.post("/v1/images/edits", files=[("image[]", ("tall.png", tall, "image/png")),
                                             ("image", ("wide.png", wide, "image/png"))],
                  data={"prompt": "make it blue", "steps": "1", "seed": "1"})
    assert r.status_code == 200, r.text
    w, h = decoded(r.json()["data"][0]["b64_json"]).size
    assert h > w, (w, h)


def test_an_edit_takes_openais_sixteen_pictures():
    """gpt-image-1 takes 16 pictures in an edit; ours refused more than 8, though the model reads any number that fits
    its context (spec §8.8): the server's count and the engine's own checks take 16 (17: see the test above)."""
    from engine.imagine import MAX_REFERENCE_IMAGES
    from engine.server.images_api import MAX_INPUT_IMAGES, check_image_count, check_image_request

    assert MAX_INPUT_IMAGES == MAX_REFERENCE_IMAGES == 16
    check_image_count(16)
    check_image_request({"prompt": "blend them", "task": "edit", "steps": 1, "size": "32x32",
                         "images": [np.asarray(picture(16, 16, seed=i)) for i in range(16)]})


def window_mask(w: int = 64, h: int = 48, box=(16, 12, 48, 36)) -> Image.Image:
    """OpenAI's mask: opaque everywhere but `box`, transparent (where the edit goes)."""
    mask = Image.new("RGBA", (w, h), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def test_a_masked_edit_changes_the_picture_inside_the_mask_only(http):
    """OpenAI's mask (transparent where to edit, the first picture's size) was refused. The edit is composited into the
    picture: outside the mask every pixel is the original's (tolerance 0: the composite copies them, PNG is lossless),
    inside it the edit (away from the feathered edge); the result keeps the picture's size. JSON's mask is read too."""
    from engine.imagine import MASK_FEATHER_PX

    original = picture(64, 48, seed=3)
    form = {"prompt": "make it blue", "steps": "1", "seed": "2", "size": "64x48"}  # (the picture's own size)
    r = http.post("/v1/images/edits", files=[("image", ("a.png", png(original), "image/png")),
                                             ("mask", ("m.png", png(window_mask()), "image/png"))], data=form)
    assert r.status_code == 200, r.text
    made = decoded(r.json()["data"][0]["b64_json"])
    assert made.size == (64, 48)
    got, kept = np.asarray(made.convert("RGB")).astype(int), np.asarray(original).astype(int)
    outside = np.ones((48, 64), bool)
    outside[12:36, 16:48] = False
    assert np.array_equal(got[outside], kept[outside])
    f = 2 * MASK_FEATHER_PX
    assert np.abs(got[12 + f:36 - f, 16 + f:48 - f] - kept[12 + f:36 - f, 16 + f:48 - f]).mean() > 20
    as_json = {"prompt": "make it blue", "steps": 1, "images": [{"image_url": data_url(png(original))}],
               "mask": {"image_url": data_url(png(window_mask(32, 32)))}}  # OpenAI's JSON shape: read, and checked
    r = http.post("/v1/images/edits", json=as_json)
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask" and "32x32" in r.text, r.text


def test_the_clients_edit_takes_a_mask(server):
    """engine.client's imagine had no way to send OpenAI's mask: `mask=` goes as the form's mask file, and the edit
    is kept inside it (outside, the original's pixels, tolerance 0)."""
    from engine.client import EngineClient
    from engine.events import ImageDone

    original = picture(64, 48, seed=5)
    events = list(EngineClient(server.url).imagine("make it blue", task="edit", images=[png(original)],
                                                   mask=np.asarray(window_mask()), steps=1, size="64x48", seed=1))
    (done,) = [e for e in events if isinstance(e, ImageDone)]
    got = np.asarray(Image.open(io.BytesIO(done.image)).convert("RGB"))
    assert got.shape == (48, 64, 3) and np.array_equal(got[:12], np.asarray(original)[:12]), events[-1]


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


@pytest.mark.parametrize("path, mask, extra, code, param, words", [
    ("/v1/images/edits", window_mask(32, 32), {}, "invalid_request", "mask", "it must be the size of the picture"),
    ("/v1/images/edits", window_mask().convert("RGB"), {}, "invalid_image", "mask", "no alpha channel"),
    ("/v1/images/edits", window_mask(), {"aspect": "1:1"}, "invalid_request", "aspect", "own size"),
    ("/v1/images/edits", window_mask(), {"size": "32x32"}, "invalid_request", "size", "own size, 64x48"),
    ("/v1/images/segmentations", window_mask(), {}, "invalid_request", "mask", "'segment' takes none"),
    ("/v1/images/edits", window_mask(box=(0, 0, 0, 0)), {}, "invalid_request", "mask", "opaque everywhere"),
])
def test_a_mask_that_does_not_fit_is_refused_naming_why(http, path, mask, extra, code, param, words):
    r = http.post(path, files=[("image", ("a.png", png(picture()), "image/png")),
                               ("mask", ("m.png", png(mask), "image/png"))],
                  data={"prompt": "x", "steps": "1", **extra})
    err = r.json()["error"]
    assert r.status_code == 400 and (err["code"], err["param"]) == (code, param) and words in err["message"], r.text


def test_a_prompt_of_openais_32000_characters_is_taken():
    """gpt-image-1 takes prompts of up to 32,000 characters; ours refused more than 20,000."""
    from engine.server.images_api import check_image_request

    check_image_request({"prompt": "a red cup. " * 2_909, "steps": 1})  # 31,999 characters: no refusal


def test_an_animated_reference_is_edited_from_its_first_frame_and_the_answer_says_so(http):
    """An animated GIF given to an edit was read at its first frame without a word (the user may have meant another)."""
    frames = [picture(seed=s) for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    r = http.post("/v1/images/edits", files={"image": ("wave.gif", buf.getvalue(), "image/gif")},
                  data={"prompt": "make it blue", "steps": "1", "size": "48x32"})
    assert r.status_code == 200, r.text
    assert "'image[0]' is animated (3 frames): only its first frame was used" in r.json()["data"][0]["note"]
    still = http.post("/v1/images/edits", files={"image": ("still.png", png(frames[0]), "image/png")},
                      data={"prompt": "make it blue", "steps": "1", "size": "48x32"})
    assert "animated" not in still.json()["data"][0]["note"]
