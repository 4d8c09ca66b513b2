"""Images out over HTTP: POST /v1/images/generations and /v1/images/edits (OpenAI's shapes plus our
fields) and our POST /v1/images/segmentations (image + target -> image, mask and overlay PNGs).

A request makes `n` images one after another (the first image's seed + i when a seed is given).
Answers: a JSON body with `data: [{b64_json}...]`, or with `stream: true` an SSE stream of
`<kind>.partial_image` previews (`partial_images` 0-3 per image) and `<kind>.completed` events.
Everything runs through the server's one scheduler (queue positions, limits; a client that goes
away cancels the request, and the engine stops between denoising steps). Text fields pass the same
checks as chat's; images are decoded and size-checked by engine.server.codec before the engine sees
them (corrupt, empty, too many pixels: 400s); the engine refuses bad sizes, aspects, steps and
prompts with messages that say what is valid.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from engine.events import Done, Error, Event, GenerationStats, ImageDone, ImagePreview, Progress
from engine.server import codec, fields
from engine.server import protocol as wire
from engine.server.bodies import JSON, MULTIPART, body_kind, form_body, form_flag, form_number, form_text, json_body
from engine.server.codec import bad, need_number
from engine.server.context import ServerContext
from engine.server.http_api import (collect, ctx_of, error_response, first_events, job_metrics, refuse_extensions,
                                    refused_at_once, stream_response, text_field)
from engine.server.params import flag
from engine.server.protocol import ApiError
from engine.server.scheduler import Job

router = APIRouter()            # OpenAI's routes
extension_router = APIRouter()  # ours (absent with --openai-only)

MAX_N = 10  # OpenAI's most; made one after another, so memory holds one picture in the making at a time
MAX_PARTIAL_IMAGES = 3
MAX_INPUT_IMAGES = 16  # engine.imagine.MAX_REFERENCE_IMAGES (why 16: there), checked here before a picture is decoded
# The file parts a multipart edit may hold for the parser: more than the pictures taken, so that a request with too
# many is refused saying how many it sent (at MAX_INPUT_IMAGES + 2 it was "Maximum number of files is 10")
MAX_FORM_FILES = 4 * MAX_INPUT_IMAGES
IMAGE_PARTS = ("image", "image[]")  # a multipart edit's picture fields (OpenAI's SDK sends image[] for a list)
OUTPUT_FORMATS = ("png", "jpeg", "webp")  # engine.imagine.IMAGE_FILE_FORMATS
IGNORED_FIELDS = fields.IMAGE_IGNORED
# OpenAI's values of its image fields (the GPT image models' and dall-e-3's, as OpenAI's SDK types them): another
# value is refused naming the field. `quality` is honoured as steps (QUALITY_STEPS); `style` (dall-e-3's look),
# `moderation` (there is none here), `input_fidelity` (an edit's reference is always read in full) and `complexity`
# have no effect; `background` transparent is refused.
OPENAI_CHOICES = {
    "quality": ("auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"),
    "style": ("vivid", "natural"),
    "moderation": ("auto", "low"),
    "input_fidelity": ("low", "high"),
    "complexity": ("low", "medium", "high"),
    "background": ("auto", "opaque", "transparent"),
}
# The denoising steps a `quality` stands for when the request names no `steps`: fewer steps, a rougher picture sooner.
# The others (high, xhigh, max, hd, standard, auto) run the pipeline's own schedule (engine.imagine.DEFAULT_STEPS,
# spec §8.6: more steps than the model was made for buy nothing certain).
QUALITY_STEPS = {"low": 10, "medium": 20}
# How a stream's events name a request's quality setting (theirs has no dall-e-3 values: hd is its high, standard
# its default)
STREAM_QUALITY = {"hd": "high", "standard": "auto"}
NUMBER_FIELDS = ("n", "partial_images", "steps", "guidance", "image_guidance", "cfg_truncation", "seed",
                 "preview_every", "output_compression")
FLAG_FIELDS = ("stream",)
TEXT_FIELDS = ("prompt", "model", "size", "response_format", "output_format", "background", "aspect",
               "negative_prompt", "preset", "mask_color", "quality") + IGNORED_FIELDS


def image_generator_of(ctx: ServerContext):
    engine = ctx.engine
    if not getattr(engine, "has_image_generator", False):
        why = getattr(engine, "image_generator_error", "") or "the loaded model has no image generator"
        raise ApiError(f"image output is not available: {why}", code="modality_not_supported")
    return engine


# --------------------------------------------------------------------------- reading a request


async def image_body(request: Request, ctx: ServerContext, with_images: bool) -> tuple[dict, list[bytes]]:
    """(fields, input image files): JSON, or multipart with `image` / `image[]` file parts (edits and
    segmentations). JSON images: `image` (base64 or a data: URL, or a list of them) or OpenAI's
    `images: [{"image_url": "data:..."}]`."""
    if body_kind(request, (JSON, MULTIPART) if with_images else (JSON,)) == MULTIPART:
        return await _multipart(request, ctx)
    body = await json_body(request, ctx.limits)
    (fields.IMAGE_EDITS if with_images else fields.IMAGE_GENERATIONS).check(body)
    images: list[bytes] = []
    if with_images:
        sources = body.get("image")
        sources = list(sources) if isinstance(sources, list) else ([] if sources is None else [sources])
        extra = body.get("images") or []
        if not isinstance(extra, list):
            raise bad("'images' must be a list of {\"image_url\": \"data:...\"}", "invalid_type", "images")
        sources += extra
        check_image_count(len(sources))
        images = [_json_image(src, f"image[{i}]", ctx.limits.max_request_bytes) for i, src in enumerate(sources)]
        if body.get("mask") is not None:  # OpenAI's {"image_url": "data:..."}, or base64 / a data: URL as `image`
            body["mask"] = _json_image(body["mask"], "mask", ctx.limits.max_request_bytes)
    return body, images


def check_image_count(count: int) -> None:
    if count > MAX_INPUT_IMAGES:
        raise bad(f"{count} input images; at most {MAX_INPUT_IMAGES}", "invalid_value", "image")


def _json_image(src, name: str, max_bytes: int) -> bytes:
    """One JSON picture: base64, a data: URL, or OpenAI's {"image_url": ...}. OpenAI's {"file_id": ...} and web URLs
    are refused by name (they were "must be a string, got NoneType" and "not valid base64")."""
    if isinstance(src, dict):
        if src.get("file_id") is not None:
            raise bad(f"'{name}' names a file_id: this server has no Files API; send the picture inline as "
                      "'image_url': 'data:image/png;base64,...'", "unsupported_parameter", name)
        src = src.get("image_url", src.get("url"))
        src = src.get("url") if isinstance(src, dict) else src
    if isinstance(src, str) and ("://" in src[:16] or src[:5].lower() in ("data:", "file:")):
        return codec.data_url(src, name, max_bytes)[1]  # (which refuses a URL to fetch)
    return codec.b64decode(src, name, max_bytes)


async def _multipart(request: Request, ctx: ServerContext) -> tuple[dict, list[bytes]]:
    form = await form_body(request, ctx.limits, max_files=MAX_FORM_FILES)
    try:
        fields.IMAGE_EDITS.check({key: form.get(key) for key in form.keys()})
        images, body = [], {}
        for key, part in form.multi_items():  # in the form's order ("image" parts were all taken before "image[]")
            if key not in (*IMAGE_PARTS, "mask"):
                continue
            if isinstance(part, str):
                raise bad(f"'{key}' must be an image file upload", "invalid_type", key)
            if key == "mask":
                body["mask"] = await part.read()
            else:
                images.append(await part.read())
        for name in TEXT_FIELDS:
            body[name] = form_text(form, name, 200_000)
        for name in NUMBER_FIELDS:
            body[name] = form_number(form, name)
        for name in FLAG_FIELDS:
            body[name] = form_flag(form, name) if form.get(name) is not None else None
        normalization = form.get("cfg_normalization")  # true / false, or a factor
        if isinstance(normalization, str) and normalization.strip().lower() in ("true", "false"):
            body["cfg_normalization"] = form_flag(form, "cfg_normalization")
        elif normalization is not None:
            body["cfg_normalization"] = form_number(form, "cfg_normalization")
    finally:
        await form.close()
    return {k: v for k, v in body.items() if v is not None}, images


def _seed(body: dict) -> int | None:
    seed = body.get("seed")
    return None if seed is None else int(need_number(seed, "seed", 0, 2 ** 63 - 1 - MAX_N, integer=True))


def first_frame_notes(images: list[bytes], mask: bytes | None) -> str:
    """What the answer says of the animated pictures given (a GIF, WebP or APNG of several frames): only the first frame
    is read (an animated GIF was edited from its first frame without a word). The engine gets them decoded."""
    from engine.media.image import animated_note, frame_count  # noqa: PLC0415

    named = [(f"'image[{i}]'", raw) for i, raw in enumerate(images)] + ([("'mask'", mask)] if mask is not None else [])
    return "; ".join(animated_note(name, frames) for name, frames in ((n, frame_count(raw)) for n, raw in named)
                     if frames > 1)


def image_requests(body: dict, images: list, task: str, ctx: ServerContext) -> tuple[list[dict], int | None]:
    """engine.imagine keyword arguments, one per image (`n`), and the previews per image asked for."""
    from engine.imagine import DEFAULT_STEPS, MAX_PROMPT_CHARS  # noqa: PLC0415

    what = "the target to segment" if task == "segment" else "the prompt"
    prompt = text_field(body.get("prompt"), "prompt", MAX_PROMPT_CHARS)
    if not prompt.strip():
        raise bad(f"'prompt' is empty: give {what}", "invalid_value", "prompt")
    n = int(need_number(body.get("n", 1), "n", 1, MAX_N, integer=True))
    fmt = body.get("response_format", "b64_json")
    if fmt == "url":
        raise bad("response_format 'url' is not supported: this server never hosts files; use 'b64_json'",
                  "unsupported_parameter", "response_format")
    if fmt != "b64_json":
        raise bad("response_format must be 'b64_json'", "invalid_value", "response_format")
    steps = openai_steps(body)
    size = body.get("size")
    if size is not None:
        size = text_field(size, "size", 32)
        size = None if size == "auto" else size
    partials = body.get("partial_images")
    if partials is not None:
        partials = int(need_number(partials, "partial_images", 0, MAX_PARTIAL_IMAGES, integer=True))
    preview_every = body.get("preview_every")
    if preview_every is None and partials and flag(body, "stream"):  # (an answer in one body has no previews)
        preview_every = max(1, math.ceil((steps if isinstance(steps, int) else DEFAULT_STEPS) / (partials + 1)))
    check_image_count(len(images))
    arrays = [codec.image_array(raw, ctx.limits, f"image[{i}]", as_shown=True) for i, raw in enumerate(images)]
    if task in ("edit", "segment") and not arrays:
        raise bad("'image' (the picture to work on) is required", "missing_field", "image")
    mask = body.get("mask")
    if mask is not None:
        mask = codec.image_array(mask, ctx.limits, "mask", alpha=True)
    options = {"mask": mask,
               "mask_color": text_field(body.get("mask_color"), "mask_color", 32, required=False),
               "preset": text_field(body.get("preset"), "preset", 64, required=False),
               "negative_prompt": text_field(body.get("negative_prompt"), "negative_prompt", MAX_PROMPT_CHARS,
                                             required=False)}
    base = {"prompt": prompt, "images": arrays, "task": task, "size": size, "aspect": body.get("aspect"),
            "steps": steps, "guidance": body.get("guidance"), "preview_every": preview_every or 0,
            **{k: v for k, v in options.items() if v is not None},
            **{k: body[k] for k in ("cfg_truncation", "cfg_normalization", "image_guidance")
               if k in body}}  # checked by the engine
    seed = _seed(body)
    requests = [{**base, "seed": None if seed is None else seed + i} for i in range(n)]
    check_image_request(requests[-1], getattr(getattr(ctx.engine, "image_generator", None), "kind", None))
    return requests, partials


def openai_steps(body: dict):
    """Checks OpenAI's fields of fixed values (OPENAI_CHOICES) and the free-text ones; returns the denoising steps: the
    request's `steps`, else what its `quality` stands for (QUALITY_STEPS), else None (the engine's default)."""
    for name, choices in OPENAI_CHOICES.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, str) or value not in choices):
            raise bad(f"{name} {str(value)[:40]!r} is not one of OpenAI's values: {', '.join(choices)}",
                      "invalid_value", name)
    if body.get("background") == "transparent":
        raise bad("background 'transparent' is not supported: the images have no transparency (use 'auto' or "
                  "'opaque')", "unsupported_parameter", "background")
    for name in IGNORED_FIELDS:
        if name not in OPENAI_CHOICES and body.get(name) is not None:
            codec.need_str(body[name], name)
    steps = body.get("steps")
    return QUALITY_STEPS.get(body.get("quality")) if steps is None else steps


def check_image_request(kwargs: dict, kind: str | None = None) -> None:
    """The image generator's own checks of a request (engine.imagine.ImagineRequest: steps, guidance,
    previews, preset; its size or aspect, or the edited picture's shape; its mask colour; the options the loaded
    DiT `kind` has, e.g. image_guidance on the Preview's alone), run here so that a refusal names its field."""
    from engine.imagine import ImagineRequest  # noqa: PLC0415
    from engine.models.imagegen.buckets import check_reference_shape, parse_size  # noqa: PLC0415
    from engine.models.imagegen.config import ImageGenError  # noqa: PLC0415

    request = ImagineRequest(**kwargs)
    try:
        request.check(kind)
        request.instruction()
        if parse_size(request.size) is None and request.aspect is None and request.images:
            check_reference_shape(*request.images[0].shape[:2])  # the edit keeps the picture's shape
    except ImageGenError as e:
        raise bad(str(e), e.code, e.param) from None


def output_format(body: dict) -> tuple[str, int | None]:
    fmt = body.get("output_format", "png")
    if not isinstance(fmt, str) or fmt not in OUTPUT_FORMATS:  # (a list or an object cannot be looked up)
        raise bad(f"output_format {str(fmt)[:20]!r} is not supported; use png, jpeg or webp", "unsupported_parameter",
                  "output_format")
    quality = body.get("output_compression")
    if quality is not None:
        quality = int(need_number(quality, "output_compression", 0, 100, integer=True))
    return fmt, quality


def encoder_of(fmt: str, compression: int | None):
    """ImageDone -> base64 of the image file in `fmt` (engine.imagine.encoded_as: the engine's PNG as it is, else
    re-encoded at the quality `compression` says, OpenAI's output_compression: 100 the best and largest file, 0 the
    smallest). It was taken as 100 - quality, but for 0, which gave 95: OpenAI's default of 100 made the worst file."""
    from engine.imagine import encoded_as  # noqa: PLC0415

    def encode(ev: ImageDone) -> str:
        return base64.b64encode(encoded_as(ev.image, fmt, compression)).decode("ascii")

    return encode


# --------------------------------------------------------------------------- running n images


def imagine_n(engine, requests: list[dict], cancel, note: str = "") -> Iterator[Event]:
    """The images of one request, one after another, as one event stream: previews and images carry
    their index, and with more than one picture each progress event says which ("picture 2 of 4"); one Done at the
    end with the figures of all of them (time to first preview: the first image's), or the first Error. A cancel
    stops between steps, and no further picture is started. `note`: what the server says of the request's pictures
    (first_frame_notes), added to each image's note and the Done's text."""
    t_start = time.perf_counter()
    total = GenerationStats()
    seeds, notes, step_s = [], [], 0.0
    for i, kwargs in enumerate(requests):
        for ev in engine.imagine(cancel=cancel, **kwargs):
            if isinstance(ev, (ImagePreview, ImageDone)):
                ev.index = i
            if isinstance(ev, ImageDone) and note:
                ev.note = "; ".join(filter(None, (ev.note, note)))
            if isinstance(ev, Progress) and len(requests) > 1:
                ev.message = "; ".join(filter(None, (f"picture {i + 1} of {len(requests)}", ev.message)))
            if isinstance(ev, Error):
                yield ev
                return
            if not isinstance(ev, Done):
                yield ev
                continue
            s = ev.stats
            total.prompt_tokens += s.prompt_tokens
            total.prompt_image_tokens += s.prompt_image_tokens
            total.media_encode_s += s.media_encode_s
            total.image_steps += s.image_steps
            total.images += s.images
            step_s += s.image_step_s * s.image_steps
            if i == 0:
                total.queue_wait_s = s.queue_wait_s
                total.time_to_first_preview_s = s.time_to_first_preview_s
            seeds.append((ev.result or {}).get("seed"))
            if ev.text or note:
                notes.append("; ".join(filter(None, (ev.text, note))))
            if ev.finish_reason == "cancelled":
                break
        if cancel is not None and getattr(cancel, "peek", cancel.is_set)():
            break
    total.image_step_s = step_s / total.image_steps if total.image_steps else 0.0
    total.total_s = time.perf_counter() - t_start
    reason = "stop" if total.images == len(requests) else "cancelled"
    yield Done(text="\n".join(notes), finish_reason=reason, stats=total,
               result={"seeds": seeds, "images": total.images})


async def run_images(request: Request, task: str, kind: str):
    received = time.perf_counter()
    ctx = ctx_of(request)
    engine = image_generator_of(ctx)
    body, images = await image_body(request, ctx, with_images=task != "generate")
    ctx.check_model(body.get("model"), "image")
    refuse_extensions(ctx, body, fields.IMAGE_EXTENSIONS + fields.IMAGE_REFERENCE_EXTENSIONS)
    fmt, compression = output_format(body)
    stream = flag(body, "stream")
    requests, partials = await asyncio.to_thread(image_requests, body, images, task, ctx)  # decodes the images
    note = await asyncio.to_thread(first_frame_notes, images, body.get("mask"))
    job = Job(lambda cancel: imagine_n(engine, requests, cancel, note), label=f"images.{kind}")
    job.media_bytes = sum(a.nbytes for a in requests[0]["images"] + [requests[0].get("mask")] if a is not None)
    # (the n requests share the pictures)
    ctx.scheduler.submit(job)
    created, encode = int(time.time()), encoder_of(fmt, compression)
    if not stream:
        got, final = await collect(request, ctx, job)
        if isinstance(final, Error):
            return error_response(wire.engine_error(final))
        pairs = [(ev, await asyncio.to_thread(encode, ev)) for ev in got.images]
        return JSONResponse(wire.images_body(created, pairs, final, fmt, job_metrics(job, received, final),
                                             extensions=not ctx.openai_only))
    head, events = await first_events(job)
    refused = refused_at_once(head)
    if refused is not None:
        return error_response(wire.engine_error(refused))
    quality = body.get("quality") or "auto"
    enc = wire.ImageSseEncoder(kind, fmt, created, encode, partials, extensions=not ctx.openai_only,
                               quality=STREAM_QUALITY.get(quality, quality))
    return stream_response(ctx, job, enc.encode, lambda final: enc.finish(final, job_metrics(job, received, final)),
                           events)


@router.post("/v1/images/generations")
async def generations(request: Request):
    return await run_images(request, "generate", "image_generation")


@router.post("/v1/images/edits")
async def edits(request: Request):
    return await run_images(request, "edit", "image_edit")


@extension_router.post("/v1/images/segmentations")
async def segmentations(request: Request):
    return await run_images(request, "segment", "image_segmentation")
