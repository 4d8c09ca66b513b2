"""Image generation, editing and generative segmentation as a stream of events, and the command line
`python -m engine.imagine --model DIR --prompt "..." [--edit in.png ... [--mask mask.png]] [--segment "the cup"]
[--size WxH | --aspect 16:9] [--steps N] [--seed S] --out out.png` (or .jpg, .webp).

One request: build the chat prompt (input images as ViT parts, then the text), run the thinker with
the learned query tokens -> condition (+ ByT5 glyphs for quoted text), diffuse with CFG from seeded
CPU noise (editing: the first input image is also the VAE reference frame), decode, resize. Events:
`Progress` (stages and steps), `ImagePreview` every `preview_every` steps (a cheap latent->RGB map),
`ImageDone` (PNG; segmentation adds the mask and overlay PNGs), then one `Done` (figures) or `Error`.
Cancellation is checked between steps.

Limits and clamping (everything else is refused with a clear error): the prompt is 1..MAX_PROMPT_CHARS
characters and must fit the thinker's context with its images and query tokens; steps 1..MAX_STEPS;
guidance 0..MAX_GUIDANCE (<= 1 turns CFG off; the Preview's SD3 DiT adds image_guidance, its editing
CFG over 4 branches, spec §8.10); a negative prompt (the Preview only, at most MAX_PROMPT_CHARS; blank:
none) conditions the negative CFG branch, and a 2.0 model refuses one (spec §8.2, §8.6); sizes per
engine.models.imagegen.buckets; a seed of None or < 0 draws a random one (reported); reference images
are decoded by engine.media.image as a viewer shows them (turned by their EXIF orientation, transparency over
white; the first frame of an animation, 16-bit rescaled; colours in sRGB) and
shrunk to at most MAX_REFERENCE_PIXELS before the ViT, keeping their aspect ratio (`vit_size`; the image's note
says so); the VAE reference (bilinear to the bucket), the
bucket, the output size and a segmentation's mask are taken from the first picture as given, centre-cropped
to a requested aspect (or an explicit size's proportions), as the reference processor does.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, UnidentifiedImageError

from engine.command import EXIT_CODES_HELP, output_file_problem, text_argument
from engine.errors import (EXIT_FAILED, EXIT_INPUT, IMAGE_FORMATS, LOAD_ERRORS, MingError, error_exit_code,
                           load_failure, shown, shown_number, unread_picture)
from engine.generate import Cancelled
from engine.events import Done, Error, Event, GenerationStats, ImageDone, ImagePreview, Progress
from engine.media.errors import MediaError
from engine.media.image import animated_note, frame_count, load_alpha, load_image
from engine.models.imagegen.buckets import SizePlan, center_crop_box, parse_aspect, parse_size, plan_size
from engine.models.imagegen.condition import condition_from_prompt
from engine.models.imagegen.config import (REQUIRED_FOLDERS, SD3, TYPE_CODE, ImageGenError,
                                           missing_folders)
from engine.models.imagegen.diffusion import (CfgOptions, caption_features, check_latent_grid, decode_latents, denoise,
                                              encode_reference, latent_shape, make_scheduler, seeded_noise,
                                              steps_for_preview)
from engine.models.imagegen.glyph import glyph_text_from_prompt
from engine.models.imagegen.preview import preview_png, preview_size
from engine.models.imagegen.segmentation import (DEFAULT_MASK_COLOR, mask_note, overlay, preset_prompt,
                                                 recover_mask, segmentation_prompt)

TASKS = ("generate", "edit", "segment")
DEFAULT_STEPS = 30          # spec §8.6
DEFAULT_GUIDANCE = 2.0      # image_gen_cfg, spec §8.6
# The Preview's SD3 pipeline (spec §8.10): image_gen_cfg 5.0, image_gen_image_cfg 2.0 (the reference frame's
# guidance in the 4-branch CFG of an edit).
PREVIEW_GUIDANCE = 5.0
PREVIEW_IMAGE_GUIDANCE = 2.0
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 32_000  # OpenAI's for gpt-image-1 (it was 20 000); the thinker's context bounds the tokens too
# An edit's pictures: OpenAI's most (gpt-image-1's 16; it was 8). The model itself has no count (spec §8.8: every
# picture goes to the ViT, the first is also the VAE reference); what bounds them is the thinker's context (§2.1:
# 32 768 tokens): each picture is shrunk to MAX_REFERENCE_PIXELS for the ViT, 1 024 tokens at most (§4.1: one per
# 32x32 pixels), so 16 take at most 16 384, half of it (_check_context refuses a prompt past it, naming its tokens);
# and memory: each picture held decoded (the server's max_image_pixels x 3 bytes at most: 48 MB at its default).
MAX_REFERENCE_IMAGES = 16
MAX_REFERENCE_PIXELS = 1024 * 1024
MAX_SEED = 2**63 - 1
OPAQUE = 255  # a mask's alpha where the picture is kept as it is
MASK_FEATHER_PX = 3  # over how many pixels a masked edit's weight ramps up inside the mask's edge (masked_composite)
# The files an image is written as (the server's output_format, the CLI's --out suffix), and the quality of the
# lossy ones when none is asked for (0-100, 100 the best)
IMAGE_FILE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
DEFAULT_LOSSY_QUALITY = 95


@dataclass
class ImagineRequest:
    """One image request, validated by `check` (MingError with what is valid otherwise)."""

    prompt: str
    images: list = field(default_factory=list)
    task: str = "generate"
    size: Any = None
    aspect: Any = None
    steps: int | None = None
    guidance: float | None = None
    cfg_truncation: float | None = CfgOptions.truncation          # ZImagePipeline's, spec §8.6 (off)
    cfg_normalization: bool | float = CfgOptions.normalization    # ZImagePipeline's, spec §8.6 (off)
    image_guidance: float | None = None  # the Preview's image_cfg (SD3 DiT only; default PREVIEW_IMAGE_GUIDANCE)
    seed: int | None = None
    preview_every: int = 0
    mask_color: str = DEFAULT_MASK_COLOR
    preset: str | None = None
    negative_prompt: str | None = None   # the Preview's negative CFG branch (spec §8.2); refused by 2.0 (§8.6)
    system_prompt: str | None = None
    mask: np.ndarray | None = None  # an edit's mask: HxW alpha (engine.media.image.load_alpha), 0 where to edit

    def check(self, kind: str | None = None) -> None:
        """Validate and fill the defaults; `kind` is the loaded DiT's (config.ZIMAGE or SD3; None: not known
        yet, the 2.0 defaults)."""
        if self.task not in TASKS:
            raise ImageGenError(f"task '{self.task}' is not one of {', '.join(TASKS)}")
        if not isinstance(self.prompt, str):
            raise ImageGenError("the prompt must be text")
        if not self.prompt.strip():
            what = "a target to segment (e.g. 'the cup')" if self.task == "segment" else "a description"
            raise ImageGenError(f"the prompt is empty: give {what}", "prompt")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ImageGenError(f"the prompt is {len(self.prompt):,} characters; image prompts may have at most "
                                f"{MAX_PROMPT_CHARS:,}", "prompt")
        images = self.images if isinstance(self.images, (list, tuple)) else [self.images]
        self.images = [i for i in images if i is not None]
        if self.task in ("edit", "segment") and not self.images:
            raise ImageGenError(f"'{self.task}' needs an input image", "image")
        if self.task == "segment" and len(self.images) != 1:
            raise ImageGenError("segmentation takes exactly one input image", "image")
        if len(self.images) > MAX_REFERENCE_IMAGES:
            raise ImageGenError(f"{len(self.images)} input images; at most {MAX_REFERENCE_IMAGES} are accepted",
                                "image")
        if self.task == "generate" and self.images:
            self.task = "edit"  # images given: an edit (the first one is the VAE reference)
        self.steps = _int_in("steps", DEFAULT_STEPS if self.steps is None else self.steps, 1, MAX_STEPS)
        sd3 = kind == SD3
        self.guidance = _guidance("guidance", self.guidance, request_defaults(kind)["guidance"])
        if self.image_guidance is not None or sd3:
            self.image_guidance = _guidance("image_guidance", self.image_guidance, PREVIEW_IMAGE_GUIDANCE)
        for name in ("truncation", "normalization"):
            try:
                CfgOptions(**{name: getattr(self, f"cfg_{name}")})
            except ValueError as e:
                raise ImageGenError(str(e), f"cfg_{name}") from None
        if sd3 and self.cfg_options() != CfgOptions():
            raise ImageGenError("cfg_truncation and cfg_normalization are options of the 2.0 (Z-Image) pipeline; the "
                                "Preview's SD3 pipeline has none", "cfg_truncation")
        if kind is not None and not sd3 and self.image_guidance is not None:
            raise ImageGenError("image_guidance is an option of the Preview's SD3 pipeline; the 2.0 pipeline has none",
                                "image_guidance")
        self.negative_prompt = _negative_prompt(self.negative_prompt, kind)
        self.preview_every = _int_in("preview_every", self.preview_every or 0, 0, MAX_STEPS)
        if self.seed is not None:
            self.seed = _int_in("seed", self.seed, -MAX_SEED, MAX_SEED)
        if self.preset is not None and self.task == "generate":
            raise ImageGenError("edit presets need an input image", "preset")
        parse_aspect(self.aspect)  # early, clear errors for sizes too
        parse_size(self.size)
        if self.size is not None and self.aspect is not None:
            raise ImageGenError("give either a size or an aspect ratio, not both", "aspect")
        self._check_mask()

    def _check_mask(self) -> None:
        """A mask goes with an edit of a picture of its size, which the result keeps (no aspect; a size only its own);
        `images[0]` given as an array (the server's) is checked here, a path or bytes once read (check_mask_size)."""
        if self.mask is None:
            return
        if self.task != "edit":
            raise ImageGenError(f"a mask marks where an edit changes the picture; '{self.task}' takes none", "mask")
        if not isinstance(self.mask, np.ndarray) or self.mask.ndim != 2 or self.mask.dtype != np.uint8:
            raise ImageGenError("the mask must be the HxW uint8 alpha of a picture (0 where to edit)", "mask")
        if self.aspect is not None:
            raise ImageGenError("a masked edit keeps the picture's own size and shape: leave out the aspect", "aspect")
        if int(self.mask.min()) == OPAQUE:
            raise ImageGenError("the mask is opaque everywhere, so nothing would be edited: make the part to edit "
                                "transparent", "mask")
        if isinstance(self.images[0], np.ndarray):
            check_mask_size(self, *self.images[0].shape[:2])

    def masked(self) -> bool:
        return self.mask is not None

    def cfg_options(self) -> CfgOptions:
        """The pipeline's CFG truncation / normalisation this request asks for (spec §8.6)."""
        return CfgOptions(truncation=self.cfg_truncation, normalization=self.cfg_normalization)

    def instruction(self) -> str:
        """The text the thinker reads (segmentation and presets wrap the user's words)."""
        if self.task == "segment":
            return segmentation_prompt(self.prompt, self.mask_color)
        if self.preset:
            return preset_prompt(self.preset, self.prompt)
        return self.prompt


def check_mask_size(request: ImagineRequest, height: int, width: int) -> None:
    """The mask must be the size of the picture it marks (as shown), and a size asked for must be the picture's."""
    mh, mw = request.mask.shape
    if (mh, mw) != (height, width):
        raise ImageGenError(f"the mask is {mw}x{mh}; it must be the size of the picture it marks, {width}x{height}",
                            "mask")
    if request.size is not None and parse_size(request.size) != (height, width):
        raise ImageGenError(f"a masked edit keeps the picture's own size, {width}x{height}: leave out the size or ask "
                            "for that one", "size")


def masked_composite(original: Image.Image, edited: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The edit inside the mask only: the edited picture (resized to the original's size) where the mask is
    transparent, the original, bit for bit, where it is opaque; a partly transparent pixel blends the two, and the
    edit's weight ramps up over MASK_FEATHER_PX inside the transparent area (no hard seam, nothing outside touched)."""
    inside = 1.0 - alpha.astype(np.float32) / OPAQUE
    blurred = Image.fromarray(np.round(inside * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(MASK_FEATHER_PX))
    weight = np.minimum(inside, np.asarray(blurred, dtype=np.float32) / 255.0)[..., None]
    resized = np.asarray(Image.fromarray(edited).resize(original.size, Image.Resampling.LANCZOS), dtype=np.float32)
    kept = np.asarray(original.convert("RGB"), dtype=np.float32)
    return np.round(kept + weight * (resized - kept)).astype(np.uint8)


def _guidance(name: str, value, default: float) -> float:
    """A CFG scale in 0..MAX_GUIDANCE (None: `default`)."""
    g = default if value is None else value
    if isinstance(g, bool) or not isinstance(g, (int, float, np.integer, np.floating)):
        raise ImageGenError(f"{name} {shown(value)} is not a number", name, TYPE_CODE)
    try:
        g = float(g)
    except OverflowError:  # an integer past float's range (JSON allows one): out of range below
        g = math.inf
    if not math.isfinite(g) or not 0 <= g <= MAX_GUIDANCE:
        raise ImageGenError(f"{name} {shown_number(value)} must be between 0 and {MAX_GUIDANCE:g} (<= 1: no CFG)", name)
    return g


def _negative_prompt(value, kind: str | None) -> str | None:
    """What the negative CFG branch is conditioned on: the words (None when absent or blank: zeros, spec §8.2).
    The Preview's SD3 pipeline takes them; 2.0's Z-Image pipeline runs its negative branch on zeros whatever the
    prompt (spec §8.6), so a 2.0 engine refuses them rather than drop them unsaid (`kind` None: not known yet)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ImageGenError(f"the negative prompt must be text, got {type(value).__name__}", "negative_prompt")
    if len(value) > MAX_PROMPT_CHARS:
        raise ImageGenError(f"the negative prompt is {len(value):,} characters; at most {MAX_PROMPT_CHARS:,}",
                            "negative_prompt")
    if not value.strip():
        return None
    if kind is not None and kind != SD3:
        raise ImageGenError("negative_prompt is an option of the Preview's SD3 pipeline; the 2.0 (Z-Image) pipeline "
                            "guides against an all-zero condition whatever the negative prompt, so it would be ignored",
                            "negative_prompt")
    return value


def _int_in(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (
            isinstance(value, float) and value.is_integer()):
        raise ImageGenError(f"{name} must be a whole number, got {value!r}", name, TYPE_CODE)
    value = int(value)
    if not lo <= value <= hi:
        raise ImageGenError(f"{name} {value} is out of range {lo}..{hi}", name)
    return value


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def encoded_as(png: bytes, fmt: str, quality: int | None = None) -> bytes:
    """The engine's PNG as a file of `fmt` (IMAGE_FILE_FORMATS): a png as it is, a jpeg or webp at `quality` (0-100,
    100 the best; None: DEFAULT_LOSSY_QUALITY)."""
    if fmt == "png":
        return png
    buf = io.BytesIO()
    try:
        img = Image.open(io.BytesIO(png), formats=tuple(IMAGE_FORMATS))
    except UnidentifiedImageError:
        raise MediaError(unread_picture("the picture to encode")) from None
    with img:
        img.convert("RGB").save(buf, IMAGE_FILE_FORMATS[fmt], quality=DEFAULT_LOSSY_QUALITY if quality is None else quality)
    return buf.getvalue()


def vit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) a picture is shrunk to for the ViT: itself when it has at most `max_pixels`, else the long side
    scaled by sqrt(max_pixels / pixels) and the short one rounded from the picture's own ratio (within half a pixel
    of it: 4000x1000 -> 2048x512), never over `max_pixels`."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    long_side, short_side = max(width, height), min(width, height)
    new_long = max(1, int(long_side * scale))
    new_short = max(1, min(round(new_long * short_side / long_side), max_pixels // new_long))
    return (new_long, new_short) if width >= height else (new_short, new_long)


def _vit_picture(picture: Image.Image, number: int) -> tuple[Image.Image, str]:
    """An input picture as the ViT reads it (vit_size, Lanczos) and, when it was shrunk, a note that says so."""
    size = vit_size(picture.width, picture.height, MAX_REFERENCE_PIXELS)
    if size == picture.size:
        return picture, ""
    note = (f"picture {number} ({picture.width}x{picture.height}) was read at {size[0]}x{size[1]} by the vision "
            f"encoder (at most {MAX_REFERENCE_PIXELS:,} pixels); the edit starts from the picture as given")
    return picture.resize(size, Image.Resampling.LANCZOS), note


def _edited_picture(picture: Image.Image, aspect: float | None) -> Image.Image:
    """The picture an edit works on (spec §8.8): the first input, centre-cropped to the requested aspect
    (largest centred crop; an explicit size asks for its W:H). The VAE reference frame, the bucket and
    output size, and a segmentation's mask and overlay all come from it; the ViT reads the pictures
    uncropped."""
    return picture if aspect is None else picture.crop(center_crop_box(picture.height, picture.width, aspect))


def _reference_pixels(image: Image.Image, plan: SizePlan) -> torch.Tensor:
    """The VAE reference (spec §8.8): the edited picture bilinear-resized to the bucket, mapped to [−1, 1]:
    [1, 3, H_b, W_b]."""
    hb, wb = plan.diffusion
    arr = np.asarray(image.resize((wb, hb), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) * 2 - 1


def request_defaults(kind: str | None) -> dict[str, float]:
    """What a request naming no steps or guidance runs with on an image generator whose DiT is `kind` (the
    model card says it, so a client's controls start where the model does): the Preview's SD3 pipeline
    guides at 5.0 (and its edits' reference at 2.0), 2.0's Z-Image at 2.0."""
    if kind == SD3:
        return {"steps": DEFAULT_STEPS, "guidance": PREVIEW_GUIDANCE, "image_guidance": PREVIEW_IMAGE_GUIDANCE}
    return {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}


def imagine(engine, request: ImagineRequest, cancel: threading.Event | None = None) -> Iterator[Event]:
    """Stream one image request on a loaded Engine (see the module docstring)."""
    t_start = time.perf_counter()
    gen = getattr(engine, "image_generator", None)
    if gen is None:  # a checkpoint holding (some of) its folders: why it could not be loaded (Engine.load said it)
        holds_some = len(missing_folders(engine.model.path)) < len(REQUIRED_FOLDERS)
        why = getattr(engine, "image_generator_error", None) if holds_some else None
        yield Error(why or "this checkpoint has no image generator (its mlp/, connector/, transformer/, vae/ and "
                    "scheduler/ folders); load Ming-flash-omni-2.0 or the tiny demo model", code="unsupported_model")
        return
    try:
        request.check(gen.kind)
        instruction = request.instruction()
        # The ViT's inputs are shrunk; the VAE reference, the bucket, the output size and a segmentation's mask
        # come from the first picture as given, cut to a requested aspect (spec §8.8), the only one kept at its size.
        images, ref, shrunk = [], None, []
        for number, src in enumerate(request.images, 1):
            picture = load_image(src, as_shown=True)  # the way up, and over the white, the user sees it
            if ref is None and request.masked():
                check_mask_size(request, picture.height, picture.width)
            ref = picture if ref is None else ref
            image, note = _vit_picture(picture, number)
            images.append(image)
            frames = frame_count(src)  # (an animated GIF was edited from its first frame without a word)
            shrunk += [note, animated_note(f"picture {number}", frames) if frames > 1 else ""]
        if ref is not None:
            explicit = parse_size(request.size)  # (h, w): its proportions, as an aspect ratio would be
            ref = _edited_picture(ref, parse_aspect(request.aspect) if explicit is None else explicit[1] / explicit[0])
        plan = plan_size(request.size, None if ref is not None else request.aspect,
                         None if ref is None else (ref.height, ref.width), gen.bucket_bases, gen.default_base)
        if gen.kind == SD3 and parse_size(request.size) is None:
            # The Preview returns the bucket-size picture (its generate() leaves the resize to the requested size
            # commented out); an explicit size is still met (our extension, engine.models.imagegen.buckets).
            plan = dataclasses.replace(plan, output=plan.diffusion)
        check_latent_grid(*plan.diffusion, gen.vae_scale, gen.dit_patch)
        content = [{"type": "image", "image": img} for img in images] + [{"type": "text", "text": instruction}]
        prompt = engine.processor.build([{"role": "user", "content": content}], system_prompt=request.system_prompt)
        _check_context(engine, gen, prompt, "the prompt with its images", "prompt")
        negative_chat = None
        if request.negative_prompt is not None:  # the same chat template, words only (see _negative_condition)
            words = [{"type": "text", "text": request.negative_prompt}]
            negative_chat = engine.processor.build([{"role": "user", "content": words}],
                                                   system_prompt=request.system_prompt)
            _check_context(engine, gen, negative_chat, "the negative prompt", "negative_prompt")
    except (MingError, ValueError) as e:
        yield Error(str(e), code=getattr(e, "code", "invalid_request"))
        return
    seed = request.seed if request.seed is not None and request.seed >= 0 else secrets.randbelow(2**31)
    t_wait = time.perf_counter()
    with engine._lock:
        waited = time.perf_counter() - t_wait
        try:
            yield from _run(engine, gen, request, prompt, negative_chat, plan, ref, seed, cancel,
                            t_start, waited, "; ".join(filter(None, shrunk)))
        except MingError as e:
            yield Error(str(e), code=e.code)
        except Exception as e:  # the stream ends with a clear error; the engine keeps serving
            yield Error(f"{type(e).__name__}: {e}")


def _check_context(engine, gen, prompt, what: str, param: str) -> None:
    """The thinker's condition pass reads `prompt` with the query blocks appended: it must fit the context."""
    n_query = sum(s * s + 2 for s in gen.head_config.scales)
    context = engine.model.config.llm.max_position_embeddings
    if len(prompt.ids) + n_query > context:
        raise ImageGenError(f"{what} is {len(prompt.ids):,} tokens; with the {n_query} query tokens it exceeds the "
                            f"model's context of {context:,}", param)


def stopped(stats: GenerationStats, t_start: float, seed: int, steps_done: int) -> Done:
    """The Done of a request cancelled after `steps_done` denoising steps."""
    stats.total_s = time.perf_counter() - t_start
    return Done(text="", finish_reason="cancelled", stats=stats, result={"seed": seed, "steps_done": steps_done})


def _run(engine, gen, request: ImagineRequest, prompt, negative_chat, plan: SizePlan, ref: Image.Image | None,
         seed: int, cancel, t_start: float, waited: float, input_note: str = "") -> Iterator[Event]:
    """The image of a checked request; `input_note` says what the user should know of the input pictures."""
    stats = GenerationStats(queue_wait_s=waited)
    model = engine.model
    yield Progress("encoding prompt", message=f"{len(prompt.ids)} tokens, {len(prompt.images)} image(s)"
                   + (f", negative prompt {len(negative_chat.ids)} tokens" if negative_chat is not None else ""))
    t_enc = time.perf_counter()
    try:
        mm = engine.encode_media(prompt, cancel) if prompt.images else None
    except Cancelled:  # stopped while a (large) source picture was encoded
        yield stopped(stats, t_start, seed, 0)
        return
    stats.media_encode_s = time.perf_counter() - t_enc if mm is not None else 0.0
    # The reference processor reads the glyph text from the whole chat text (system prompt, role tags, the
    # user's words); the image-token expansions in ours hold no quotes or keywords (spec §8.4).
    glyph_text = glyph_text_from_prompt(prompt.text, preview=gen.kind == SD3) if gen.glyph is not None else ""
    with gen.on_compute():
        dev = gen.compute
        with torch.inference_mode():
            trace = condition_from_prompt(model.llm, model.numerics, gen.query_head, gen.connector, prompt.ids,
                                          mm.image_embeds if mm is not None else None, prompt.image_grid_thw)
            cond = trace.condition.to(dev)
            stats.prompt_tokens = int(trace.layout.input_ids.shape[1])
            stats.prompt_image_tokens = prompt.image_tokens  # the input pictures' (the query tokens are not pictures)
            if glyph_text:
                cond = torch.cat([cond, gen.glyph([glyph_text]).embeds.to(dev, cond.dtype)], dim=1)
            if gen.kind == SD3:
                negative_cond = None
                if negative_chat is not None:
                    negative_cond, negative_tokens = _negative_condition(model, gen, negative_chat, cond)
                    stats.prompt_tokens += negative_tokens  # the thinker read both prompts
                scheduler, steps = _sd3_sampling(gen, request, cond, negative_cond, ref, plan, seed, dev)
            else:
                caption = caption_features(cond[0].float(), gen.head_config, gen.caption_mlp)
                negative = caption_features(torch.zeros_like(cond[0]).float(), gen.head_config, gen.caption_mlp)
                ref_latent = None
                if ref is not None:
                    ref_latent = encode_reference(gen.vae, _reference_pixels(ref, plan).to(dev))
                shape = latent_shape(*plan.diffusion, gen.latent_channels, gen.vae_scale)
                latents, step_noise = seeded_noise(seed, shape, dev)
                scheduler, _ = make_scheduler(gen.scheduler_config, request.steps, shape[2:], device=dev)
                steps = denoise(gen.transformer, scheduler, latents, caption, negative, request.guidance, ref_latent,
                                request.cfg_options(), step_noise)
        n = len(scheduler.timesteps)
        if cancel is not None and cancel.is_set():  # stopped while the prompt was being encoded
            yield stopped(stats, t_start, seed, 0)
            return
        previews = steps_for_preview(n, request.preview_every)
        rgb_map = gen.latent_rgb() if previews else None
        yield Progress("denoising", 0, n)
        t_loop = time.perf_counter()
        done_steps = 0
        for step in steps:
            latents = step.latents_out
            done_steps += 1
            yield Progress("denoising", done_steps, n)
            if step.index in previews:
                ph, pw = preview_size(plan.output)
                png = preview_png(rgb_map.to_rgb(step.predicted_clean()), (ph, pw))
                if not stats.time_to_first_preview_s:
                    stats.time_to_first_preview_s = time.perf_counter() - t_start
                yield ImagePreview(png, step=done_steps, total_steps=n, width=pw, height=ph)
            if cancel is not None and cancel.is_set() and done_steps < n:
                break
        loop_s = time.perf_counter() - t_loop
        stats.image_steps = done_steps
        stats.image_step_s = loop_s / done_steps if done_steps else 0.0
        if done_steps < n:
            yield stopped(stats, t_start, seed, done_steps)
            return
        yield Progress("decoding image")
        with torch.inference_mode():
            _, _, rgb = decode_latents(gen.vae, latents)
    h, w = plan.output
    image = Image.fromarray(rgb)
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    out = np.asarray(image)
    if request.masked():  # (the picture's own size: the edit composited into it)
        out = masked_composite(ref, out, request.mask)
        h, w = out.shape[:2]
    mask_png = overlay_png = None
    note = input_note
    result = {"seed": seed, "task": request.task, "width": w, "height": h, "diffusion_width": plan.diffusion[1],
              "diffusion_height": plan.diffusion[0], "glyph_text": glyph_text}
    if request.task == "segment":
        ref_out = np.asarray(ref.resize((w, h), Image.Resampling.LANCZOS))
        mask = recover_mask(ref_out, out)
        mask_png = _png((mask * 255).astype(np.uint8))
        overlay_png = _png(overlay(ref_out, mask, request.mask_color))
        result["mask_pixels"] = int(mask.sum())
        note = "; ".join(filter(None, (mask_note(mask), input_note)))
    stats.images = 1
    stats.total_s = time.perf_counter() - t_start
    yield ImageDone(image=_png(out), width=w, height=h, seed=seed, mask=mask_png, overlay=overlay_png, note=note)
    yield Done(text=note, finish_reason="stop", stats=stats, result=result)


def _negative_condition(model, gen, negative_chat, cond: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The Preview's negative branch for an explicit negative prompt (spec §8.2): its chat prompt (the same template
    and system prompt, the words alone: the input pictures guide the edit through their own branches) through the
    same query tokens, thinker pass, connector, proj_out and normalisation as the positive. The glyph rows (quoted
    text, spec §8.4) stay zeros in the negative branch. Returns ([1, L, C] like `cond`, the tokens the thinker read).
    Call under inference mode."""
    trace = condition_from_prompt(model.llm, model.numerics, gen.query_head, gen.connector, negative_chat.ids)
    words = trace.condition.to(cond.device, cond.dtype)
    return torch.cat([words, torch.zeros_like(cond[:, words.shape[1]:])], dim=1), int(trace.layout.input_ids.shape[1])


def _sd3_sampling(gen, request: ImagineRequest, cond: torch.Tensor, negative_cond: torch.Tensor | None,
                  ref: Image.Image | None, plan: SizePlan, seed: int, dev) -> tuple[Any, Iterator]:
    """The Preview's scheduler and step iterator (spec §8.10): noise in the DiT's dtype, the reference latent
    (posterior mode, (z − shift)·scale) at the bucket size, the 2- or 4-branch CFG loop against `negative_cond`
    (None: zeros)."""
    from engine.models.imagegen.diffusion import encode_latents
    from engine.models.imagegen.sd3 import denoise_sd3, make_sd3_scheduler, sd3_latent_shape, sd3_noise

    dtype = next(gen.transformer.parameters()).dtype
    ref_latent = None if ref is None else encode_latents(gen.vae, _reference_pixels(ref, plan).to(dev))
    shape = sd3_latent_shape(*plan.diffusion, gen.latent_channels, gen.vae_scale)
    latents = sd3_noise(seed, shape, dtype, dev)
    scheduler = make_sd3_scheduler(gen.scheduler_config, request.steps, shape[2:], gen.dit_patch, device=dev)
    return scheduler, denoise_sd3(gen.transformer, gen.caption_mlp, scheduler, latents, cond, request.guidance,
                                  request.image_guidance, ref_latent, negative_cond)


# ------------------------------------------------------------------------------------------ CLI


def _write_image_files(out: Path, done: ImageDone, mask_note: str = "") -> None:
    """The image at `out`, in the format its suffix names (a segmentation's mask and overlay beside it, as
    OUT_mask.png and OUT_overlay.png), then the image's note with what the CLI knows of the --mask (`mask_note`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encoded_as(done.image, IMAGE_SUFFIXES[out.suffix.lower()]))
    print(f"wrote {out} ({done.width}x{done.height}, seed {done.seed})")
    for kind, data in (("mask", done.mask), ("overlay", done.overlay)):
        if data is not None:
            path = out.with_name(f"{out.stem}_{kind}.png")
            path.write_bytes(data)
            print(f"wrote {path}")
    note = "; ".join(filter(None, (done.note, mask_note)))
    if note:
        print(f"note: {note}")


def _read_mask(ap: argparse.ArgumentParser, path: Path) -> tuple[np.ndarray, str]:
    """--mask's alpha (engine.media.image.load_alpha) and its note: an animated mask is read at its first frame, said
    as the API says it (animated_note; the engine gets the alpha only). Or a usage error (exit 2) naming the file:
    missing, a folder, unreadable, not a picture, or a picture without transparency."""
    if not path.is_file():
        ap.error(f"--mask {path}: " + ("is a folder, not a picture" if path.is_dir() else "no such file"))
    try:
        data = path.read_bytes()
        frames = frame_count(data)
        return load_alpha(data), animated_note(f"--mask {path}", frames) if frames > 1 else ""
    except OSError as e:
        ap.error(f"--mask {path}: cannot be read ({e.strerror or e})")
    except MediaError as e:
        ap.error(f"--mask {path}: {e}")


def _check_mask_fits(ap: argparse.ArgumentParser, req: ImagineRequest, picture: str) -> None:
    """Before the model loads: the mask is the size of the --edit picture it marks (as shown), as the engine checks."""
    try:
        shown = load_image(picture, as_shown=True)
        check_mask_size(req, shown.height, shown.width)
    except MingError as e:
        ap.error(f"--edit {picture}: {e}" if isinstance(e, MediaError) else str(e))


def main(argv: list[str] | None = None) -> int:
    from engine.runtime import Engine

    ap = argparse.ArgumentParser(prog="python -m engine.imagine",
                                 description="Generate, edit or segment an image; prints seconds per step and per image.",
                                 epilog=EXIT_CODES_HELP)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the tiny random demo model)")
    ap.add_argument("--prompt", default=None,
                    help="what to draw / how to edit (the target for --segment); '-': read it from stdin")
    ap.add_argument("--edit", nargs="+", default=[], metavar="IMAGE", help="input image(s); the first is the reference")
    ap.add_argument("--mask", type=Path, default=None, metavar="PNG",
                    help="with --edit: a PNG the size of the first picture, transparent where to edit (OpenAI's mask); "
                         "every opaque pixel keeps the original's")
    ap.add_argument("--segment", default=None, metavar="TARGET", help="segment TARGET in the --edit image")
    ap.add_argument("--preset", choices=["replace_background", "remove_object"], default=None,
                    help="edit preset: --prompt is the new background / the object to remove")
    ap.add_argument("--size", default=None, help="WIDTHxHEIGHT of the result")
    ap.add_argument("--aspect", default=None, help="aspect ratio W:H, e.g. 16:9")
    ap.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {DEFAULT_STEPS})")
    ap.add_argument("--guidance", type=float, default=None,
                    help=f"CFG scale (default {DEFAULT_GUIDANCE}; the Preview's: {PREVIEW_GUIDANCE})")
    ap.add_argument("--image-guidance", type=float, default=None,
                    help=f"Preview only: the reference image's CFG scale when editing (default {PREVIEW_IMAGE_GUIDANCE})")
    ap.add_argument("--negative-prompt", default=None, metavar="TEXT",
                    help="Preview only: what the picture should not show (the negative CFG branch's condition); "
                         "a 2.0 model refuses it (its pipeline guides against zeros whatever the negative prompt)")
    ap.add_argument("--cfg-truncation", type=float, default=CfgOptions.truncation,
                    help="no CFG on steps whose DiT timestep exceeds this (default %(default)s: never)")
    ap.add_argument("--cfg-normalization", type=float, default=float(CfgOptions.normalization),
                    help="cap the guided prediction's norm at this times the positive's (default 0: off)")
    ap.add_argument("--seed", type=int, default=None, help="same seed -> same pixels on the same device")
    ap.add_argument("--mask-color", default=DEFAULT_MASK_COLOR, help="segmentation colour (default green)")
    ap.add_argument("--preview-every", type=int, default=0, help="write a preview every N steps (--preview-dir)")
    ap.add_argument("--preview-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True,
                    help="output image: .png, .jpg or .webp (segmentation adds OUT_mask.png / OUT_overlay.png); existing "
                         "files of these names are replaced, written only once the image is done")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                    help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--compile", action="store_true", help="CUDA: torch.compile the DiT's blocks")
    args = ap.parse_args(argv)
    args.prompt = text_argument(ap, "--prompt", args.prompt)
    if args.segment is None and not args.prompt:
        ap.error("--prompt is required (or --segment TARGET with --edit IMAGE)")
    out_problem = output_file_problem(args.out, makes_folders=True)
    if out_problem:  # (a folder was an IsADirectoryError traceback after the image was made)
        ap.error(f"--out {args.out}: {out_problem}")
    if args.out.suffix.lower() not in IMAGE_SUFFIXES:  # (a PNG was written under any name: out.jpg was a PNG)
        ap.error(f"--out {args.out}: name a {', '.join(IMAGE_SUFFIXES)} file (its suffix says the format)")
    if args.preview_dir is not None and args.preview_dir.exists() and not args.preview_dir.is_dir():
        ap.error(f"--preview-dir {args.preview_dir}: is a file, not a folder")
    task = "segment" if args.segment is not None else ("edit" if args.edit else "generate")
    mask, mask_note = (None, "") if args.mask is None else _read_mask(ap, args.mask)
    req = ImagineRequest(prompt=args.segment if args.segment is not None else args.prompt, images=[str(p) for p in args.edit],
                         task=task, size=args.size, aspect=args.aspect, steps=args.steps, guidance=args.guidance,
                         image_guidance=args.image_guidance, negative_prompt=args.negative_prompt,
                         cfg_truncation=args.cfg_truncation, cfg_normalization=args.cfg_normalization,
                         seed=args.seed, preview_every=args.preview_every if args.preview_dir else 0,
                         mask_color=args.mask_color, preset=args.preset,
                         mask=mask)
    try:  # what needs no model is checked before the load (a clash of --size and --aspect came after a minute)
        dataclasses.replace(req).check()
    except ImageGenError as e:
        ap.error(str(e))
    missing = [Path(p) for p in args.edit if not Path(p).is_file()]
    if missing:
        ap.error(f"--edit {missing[0]}: " + ("is a folder, not a picture" if missing[0].is_dir() else "no such file"))
    if req.masked():
        _check_mask_fits(ap, req, args.edit[0])
    log = lambda line: print(f"[{line}]", file=sys.stderr)  # noqa: E731
    try:
        engine = Engine.load(args.model, dtype=args.dtype, device=args.device, log=log)
    except LOAD_ERRORS as e:
        print(load_failure(args.model, e), file=sys.stderr)
        return EXIT_INPUT
    if engine.is_demo:
        log("random demo weights: the picture is noise; use --model for the real checkpoint")
    if args.compile and engine.image_generator is not None:
        engine.image_generator.compile_transformer()
    code = 0
    for ev in engine.imagine_request(req):
        if isinstance(ev, Progress) and ev.stage != "denoising":
            log(ev.stage + (f": {ev.message}" if ev.message else ""))
        elif isinstance(ev, ImagePreview):
            args.preview_dir.mkdir(parents=True, exist_ok=True)
            (args.preview_dir / f"step_{ev.step:03d}.png").write_bytes(ev.image)
        elif isinstance(ev, ImageDone):
            try:
                _write_image_files(args.out, ev, mask_note)
            except OSError as e:  # a full disk, a folder made read-only meanwhile
                print(f"error: cannot write {e.filename or args.out} ({e.strerror or e})", file=sys.stderr)
                code = EXIT_FAILED
        elif isinstance(ev, Done):
            s = ev.stats
            print(f"{s.image_steps} steps, {s.image_step_s:.3f} s/step, {s.total_s:.2f} s per image "
                  f"(prompt + condition {max(0.0, s.total_s - s.image_steps * s.image_step_s):.2f} s incl. decode)"
                  + (", cancelled" if ev.finish_reason == "cancelled" else ""))
        elif isinstance(ev, Error):
            print(f"error: {ev.message}", file=sys.stderr)
            code = error_exit_code(ev.code)
    return code


if __name__ == "__main__":
    from engine.command import run_command

    sys.exit(run_command(main))
