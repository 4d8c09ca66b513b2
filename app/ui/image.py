"""The Image tab: generate a picture from a prompt (aspect ratio or size, steps, guidance, seed with
a random-seed button), edit one or more reference images (presets for background replacement and
object removal; an optional mask, transparent where to edit, keeps every other pixel the original's), or segment a
target (mask and overlay, both downloadable); on a Preview engine an Image guidance slider guides an Edit or a
Segment toward its reference; up to MAX_PICTURES pictures a press (seed, seed + 1, ...). Previews every few steps
and a progress bar (which picture, which step) while it is made; Stop ends it between steps; a gallery keeps the
results with their settings (an Edit's or a Segment's pictures and mask too), each as soon as it is made, reusable
with one click (kept by the browser across a page reload, as is the last request with its pictures and mask; what
earlier studios kept under older keys is carried over once)."""

from __future__ import annotations

import io
import json
import random
import re
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr
from PIL import Image, UnidentifiedImageError

from app.engine_link import IMAGE_OUT, EngineLink
from app.media_check import IMAGE_FORMATS, media_problem
from app.ui.common import (GENERATING, STOPPED_BEFORE_START, InFlight, capability_note, chosen_seed,
                           engine_limits, error_line,
                           error_text, failure, figures_line, on_engine_change, on_page_load, queue_line, run_button,
                           runs_tab, seed_box,
                           DRAWN_SEED_MAX, from_json, seed_problem, session_of, toolbar,
                           BrowserRequest, HIDDEN_STEP, browser_secret, browser_storage, check_on_upload, kept_request,
                           restore_request, say_refused_files, says_refused, wire_stop)
from engine.client import IMAGE_FORMATS as DECODED_IMAGE_FORMATS, unread_picture
from engine.events import Done, Error, ImageDone, ImagePreview, Progress, QueuePosition

TAB = "image"
MODES = {"Generate": "generate", "Edit": "edit", "Segment": "segment"}
# The engine crops an Edit's or a Segment's reference to the aspect asked (spec §8.8): the box starts at "Auto", sent
# as no aspect (a Generate is square, an Edit or a Segment keeps its reference's shape); 1:1 went out by default and
# the 512x384 cup came back square, cut at both sides.
AUTO_ASPECT = "Auto"
ASPECTS = [AUTO_ASPECT, "1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3", "21:9"]
PRESETS = {"(none)": None, "Replace the background": "replace_background", "Remove an object": "remove_object"}
# What an Edit's prompt is, per preset (the engine wraps it: "Remove the {prompt} from the image ..."), said when
# it is empty (the engine's "'prompt' is empty: give the prompt" came back after the upload).
EDIT_PROMPT_HINTS = {"(none)": "Edit needs a prompt: say what to change (e.g. 'make the cup blue').",
                     "Replace the background": "Describe the new background in the prompt (e.g. 'a sunny beach').",
                     "Remove an object": "Name the object to remove in the prompt (e.g. 'cup')."}
# A Generate makes a picture from the prompt alone: pictures left in the box from an Edit are not sent (the engine
# takes a generate with pictures for an edit of the first), and the status line says so.
REFS_NOT_USED = "the reference image(s) were not used: Generate draws from the prompt alone (Edit changes a picture)"
# Said when a run stopped or failed after a preview: the Result keeps that preview (what was seen is not lost), and its
# download gave it as 'image.png' with only "cancelled" said, as if it were the picture asked for.
UNFINISHED_PREVIEW = "the picture shown is the preview after step {step} of {total}, not a finished image"
# Said with each picture the tiny random checkpoint makes (the page's banner says so, scrolled away on a phone)
DEMO_PICTURE = "random demo weights: the picture is noise, not Ming's (load the real model with --model)"
PRESET_INFO = "With a preset the prompt is only the new background, or the object to remove."
REQUEST_KEY = "ming-studio-image-request-json"  # the browser's key of the last request (common.BrowserRequest)
REQUEST_FIELDS = ("mode", "prompt", "target")
# The browser's localStorage key of the gallery kept across reloads, read and written by the page itself at each
# result: a gr.BrowserState, written whole from each tab's own copy, made the results of one tab overwrite another's.
KEPT_GALLERY_KEY = "ming-studio-image-results-list"
STORED_RESULTS, WRITE_RESULTS_JS = browser_storage(KEPT_GALLERY_KEY, "[]")
SAVED_PREFIX = "ming-image-"  # the folders (in the temp folder) _save_png writes to
CAPTION_CHARS = 48  # the most of a prompt a gallery caption shows (the whole prompt comes back with a click)
SETTINGS = ("mode", "prompt", "preset", "target", "aspect", "size", "steps", "guidance", "seed")
IMAGE_GUIDANCE = "image_guidance"  # the model card's image_defaults key of the Preview's reference guidance
REFERENCES = "references"  # an Edit's or a Segment's pictures, copies kept with the result (_keep_copy)
MASK = "mask"  # an Edit's mask (OpenAI's: transparent where to edit), a copy kept with the result (_keep_copy)
MASKED = "masked"  # what a masked Edit's gallery caption says
# A result's settings that are there only when they were sent (the image guidance of a Preview's Edit or Segment):
# an entry kept by an earlier studio, without them, still comes back.
OPTIONAL_SETTINGS = (IMAGE_GUIDANCE, REFERENCES, MASK)
# The kept request (REQUEST_KEY) holds the reference pictures and the mask given as copies on this studio's machine
# (REFERENCES, MASK: paths, which localStorage's few MB always hold; _saved_here checks them when they come back): a
# reload mid masked edit gave back the prompt and an empty Mask box without a word. Those that could not be copied, or
# are gone when the page is reloaded (the machine cleaned its temp folder), are named on the status line.
NOT_KEPT = "not_kept"  # the kept request's names of the pictures that could not be copied
FILES_NOT_BACK = ("{names} did not come back (the copy kept with your last request is not on the studio's machine "
                  "any more): give {them} again.")
# Where studios before kept the gallery and the last request: gr.BrowserState, which Gradio encrypts (the gallery with a
# key drawn anew at each studio start; the request, from some version on, with common.browser_secret, still in the
# studio cache). Read at page load through BrowserStates of the same keys (kept_before), carried over once into
# KEPT_GALLERY_KEY and REQUEST_KEY, then removed; what cannot be read is removed too, and said once (NOT_CARRIED_OVER).
REQUEST_BEFORE_KEY, RESULTS_BEFORE_KEY = "ming-studio-image-request", "ming-studio-image-results"
KEYS_BEFORE = {REQUEST_BEFORE_KEY: "last request", RESULTS_BEFORE_KEY: "results gallery"}
FOUND_BEFORE_JS = f"JSON.stringify({list(KEYS_BEFORE)!r}.filter((k) => localStorage.getItem(k) !== null))"
NOT_CARRIED_OVER = ("The Image tab's {what} kept in this browser by an earlier version of the studio could not be read "
                    "(it was encrypted with a key that studio drew when it started) and {was} removed.")
# What the page does with carry_over's answer: the values carried over written under their new keys, the old ones removed
CARRY_OVER_JS = """(carried) => {
  try {
    const c = JSON.parse(carried || "{}");
    for (const [key, value] of Object.entries(c.write || {})) localStorage.setItem(key, value);
    for (const key of c.remove || []) localStorage.removeItem(key);
  } catch {}
  return [];
}"""
MASK_LABEL = "Mask (PNG, transparent where to edit)"
MASK_MODE = "Edit"  # the one task that takes a mask (the box is hidden in the others)
REFERENCE_TASKS = ("edit", "segment")  # the tasks with a reference picture, which the image guidance guides
# The most pictures one press makes (the request's n; the engine makes them one after another, seed, seed + 1, ...):
# the engine server's most, OpenAI's 10 (engine.server.images_api.MAX_N; the slider stopped at 4)
MAX_PICTURES = 10


def _save_png(data: bytes, stem: str) -> str:
    path = Path(tempfile.mkdtemp(prefix=SAVED_PREFIX)) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.png"
    path.write_bytes(data)
    return str(path)


def _keep_copy(data: bytes, name: str) -> str:
    """A reference picture kept, under its own name, with the result made from it: reopened, the result brings it
    back (the upload box may hold other pictures by then, or none after a reload)."""
    path = Path(tempfile.mkdtemp(prefix=SAVED_PREFIX)) / Path(name).name
    path.write_bytes(data)
    return str(path)


# The copies kept of the files given (_copy_kept): (path, size, modification time) -> the copy, the last few only
_copies: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_copies_lock = threading.Lock()
REMEMBERED_COPIES = 256


def _copy_kept(path: str) -> str:
    """_keep_copy of the file at `path`, made once per file given: the kept request (kept_image_request) and the
    result made from it (make) share it (each press copied every reference picture and the mask twice). A copy gone
    since (the temp folder cleaned) is made again."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    with _copies_lock:
        copy = _copies.get(key)
    if copy is not None and _saved_here(copy) is not None:
        return copy
    copy = _keep_copy(Path(path).read_bytes(), path)
    with _copies_lock:
        _copies[key] = copy
        while len(_copies) > REMEMBERED_COPIES:
            _copies.popitem(last=False)
    return copy


def _saved_here(path_text) -> Path | None:
    """The file at `path_text` when this studio saved it (_save_png, _keep_copy) and it is still there, else None:
    the browser holds what it gives back, so a path anywhere else is not opened."""
    path = Path(str(path_text or "")).resolve()
    temp = Path(tempfile.gettempdir()).resolve()
    ours = path.parent.parent == temp and path.parent.name.startswith(SAVED_PREFIX)
    return path if ours and path.is_file() else None


def _pil(data: bytes) -> Image.Image:
    """A picture the engine sent (a preview), opened as the engine's decoder opens one (IMAGE_FORMATS only)."""
    try:
        with Image.open(io.BytesIO(data), formats=tuple(DECODED_IMAGE_FORMATS)) as image:
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(unread_picture("the engine's preview picture")) from None


def parse_size(text: str | None) -> str | None:
    """'1024x768' (or empty) -> the size string the engine takes; anything else is refused there."""
    text = (text or "").strip().lower().replace(" ", "").replace("×", "x")
    return text or None


# A size not of the form WIDTHxHEIGHT ("1024 by 768", typed by a careless user) was sent and came back as "Error
# (invalid_request): size '...' is not of the form WIDTHxHEIGHT (e.g. 1024x768)", the wire's words: said here first.
SIZE_FORM = ("The size '{size}' is not a width and a height: type it as 1024x768 (pixels), or empty it to use the "
             "Aspect ratio.")


def size_problem(text: str | None) -> str | None:
    """SIZE_FORM when the exact size box holds something other than WIDTHxHEIGHT (or nothing); else None."""
    size = parse_size(text)
    return SIZE_FORM.format(size=text.strip()) if size and not re.fullmatch(r"\d+x\d+", size) else None


class ImageController:
    def __init__(self, link: EngineLink):
        self.link = link
        self.inflight = InFlight()

    def make(self, mode, prompt, refs, preset, target, aspect, size, steps, guidance, seed, preview_every,
             gallery_state, image_guidance=None, count=1, mask=None, request: gr.Request | None = None,
             progress=gr.Progress()):
        """Stream (preview/result image, mask, overlay, status, gallery, gallery state, files). `image_guidance`
        goes with an Edit or a Segment, when the engine's card offers it (the Preview's; a 2.0 engine has none).
        `count` pictures (1..MAX_PICTURES) are made one after another: each goes to the gallery and the downloads
        as soon as it is done (a Stop or a failure later keeps it), the status says which picture is being made.
        `mask`: the Mask box's file, sent with an Edit only (the engine refuses one without alpha, of another size,
        opaque everywhere: said on the status line)."""
        task = MODES.get(mode, "generate")
        images = [p for p in map(_file_path, refs or []) if p]
        mask = _file_path(mask) if task == "edit" and mask else None
        # each task sends only what it uses (controls left from another task changed or broke it): Generate no
        # pictures, Segment the first one (the box says so), the preset only with Edit
        unused = task == "generate" and bool(images)
        images = [] if task == "generate" else images[:1] if task == "segment" else images
        gallery_state = list(gallery_state or [])
        # a request refused here leaves the last picture, its mask, overlay and downloads as they were (a press with
        # no prompt wiped the picture just made and its PNG)
        kept = (gr.skip(),) * 3
        if task == "generate" and not (prompt or "").strip():
            yield *kept, "Describe the picture first.", gr.update(), gallery_state, gr.skip()
            return
        if task in ("edit", "segment") and not images:
            yield *kept, f"{mode} needs a reference image: upload one first.", gr.update(), gallery_state, gr.skip()
            return
        if task in ("edit", "segment"):  # "'image[0]' is not a recognised image" named no file
            limits = engine_limits(self.link)
            if problem := next(filter(None, (media_problem(p, "image", limits) for p in images + [mask] if p)), None):
                yield *kept, problem, gr.update(), gallery_state, gr.skip()
                return
        if task == "edit" and not (prompt or "").strip():
            hint = EDIT_PROMPT_HINTS.get(preset, EDIT_PROMPT_HINTS["(none)"])
            yield *kept, hint, gr.update(), gallery_state, gr.skip()
            return
        if task == "segment" and not (target or "").strip():
            yield *kept, "Say what to segment (e.g. 'the cup').", gr.update(), gallery_state, gr.skip()
            return
        if problem := seed_problem(seed) or size_problem(size):
            yield *kept, problem, gr.update(), gallery_state, gr.skip()
            return
        seed = chosen_seed(seed)
        seed = random.randint(0, DRAWN_SEED_MAX) if seed is None else seed
        settings = {"mode": mode, "prompt": prompt or "", "preset": preset, "target": target or "", "aspect": aspect,
                    "size": size or "", "steps": int(steps), "guidance": float(guidance), "seed": seed}
        image_guidance = self.sent_image_guidance(task, image_guidance)
        if image_guidance is not None:
            settings[IMAGE_GUIDANCE] = image_guidance
        count = max(1, min(int(count or 1), MAX_PICTURES))
        session = session_of(request)
        cancel = self.inflight.begin(session, TAB)
        if cancel.is_set():  # Stop pressed since Make it was (the press announced)
            self.inflight.end(session, TAB, cancel)
            yield *kept, STOPPED_BEFORE_START, gr.update(), gallery_state, gr.skip()
            return
        shown, final, made, latest, files, seen = None, None, [], (None, None, None), [], ""
        try:
            pictures = [Path(p).read_bytes() for p in images]
            if pictures:  # kept once, with every picture made from them (the copies the kept request made)
                settings[REFERENCES] = [_copy_kept(p) for p in images]
            mask_bytes = Path(mask).read_bytes() if mask else None
            if mask_bytes is not None:
                settings[MASK] = _copy_kept(mask)
            stream = self.link.client.imagine(
                (target if task == "segment" else prompt) or "", task=task, images=pictures,
                size=parse_size(size), aspect=None if parse_size(size) or aspect == AUTO_ASPECT else aspect,
                steps=int(steps), guidance=float(guidance), seed=seed, preview_every=int(preview_every) or None,
                preset=PRESETS.get(preset) if task == "edit" else None, image_guidance=image_guidance, n=count,
                mask=mask_bytes, cancel=cancel)
            for event in stream:
                if isinstance(event, QueuePosition):  # the last picture and its downloads stay until a new one comes
                    yield *kept, queue_line(event), gr.update(), gallery_state, gr.skip()
                elif isinstance(event, Progress):
                    if event.total:
                        progress(event.done / event.total, desc=_stage(event, count))
                elif isinstance(event, ImagePreview):
                    shown = _pil(event.image)
                    where = " · ".join(filter(None, (_which(event.index, count),
                                                     f"step {event.step} of {event.total_steps}")))
                    seen = " · " + UNFINISHED_PREVIEW.format(step=event.step, total=event.total_steps)
                    progress(event.step / max(event.total_steps, 1), desc=where)
                    yield shown, None, None, f"{GENERATING} {where}", gr.update(), gallery_state, None
                elif isinstance(event, ImageDone):
                    made.append(event)
                    latest = _keep_result(event, task, settings, seed, gallery_state, files)
                    if len(made) < count:  # the next one is being made: this one is shown, kept and downloadable
                        yield *latest, f"{GENERATING} {_which(len(made), count)}", _gallery(gallery_state), \
                            gallery_state, files
                elif isinstance(event, (Done, Error)):
                    final = event
                    break
        except Exception as e:  # noqa: BLE001
            final = failure(e)
        finally:
            self.inflight.end(session, TAB, cancel)
        if isinstance(final, Done) and made:
            seeds = ", ".join(str(m.seed if m.seed is not None else seed) for m in made)
            size = f"{made[-1].width}x{made[-1].height}"
            status = f"{figures_line(final)} · seed{'s' * (len(made) > 1)} {seeds} · {size}"
            notes = dict.fromkeys(m.note for m in made if m.note)  # (the same note of each picture said once)
            if notes:
                status += " · " + " · ".join(notes)
            if unused:
                status += f" · {REFS_NOT_USED}"
            info = self.link.status().info
            if info is not None and info.is_demo:
                status += f" · {DEMO_PICTURE}"
            yield *latest, status, _gallery(gallery_state), gallery_state, files
            return
        # a run refused or stopped before any preview leaves the last picture and its downloads as they were
        pictures, downloads = (kept, gr.skip()) if shown is None else ((shown, None, None), None)
        if isinstance(final, Done):  # cancelled before the image was finished
            yield *pictures, figures_line(final) + seen, gr.update(), gallery_state, downloads
            return
        final = named_files(final or Error("the engine ended without an image", code="engine_error"), images, mask)
        gr.Warning(f"Image failed: {error_text(final)}")
        if made:  # the pictures made before it failed stay shown, in the gallery and downloadable
            yield *latest, error_line(final), _gallery(gallery_state), gallery_state, files
            return
        yield *pictures, error_line(final) + seen, gr.update(), gallery_state, downloads

    def sent_image_guidance(self, task: str, value) -> float | None:
        """The Image guidance slider's value when it goes with this request: an Edit or a Segment (both guided toward
        their reference picture) to an engine whose card offers it; else None (the server refuses it elsewhere)."""
        offered = task in REFERENCE_TASKS and value is not None and IMAGE_GUIDANCE in card_defaults(self.link)
        return float(value) if offered else None

    @staticmethod
    def restore_gallery(saved):
        """At page load: (the gallery's entries, the gallery) as the browser kept them (see kept_results)."""
        entries = kept_results(saved)
        return entries, _gallery(entries)

    @staticmethod
    def restore_gallery_in_page(saved: str | None):
        """restore_gallery for the page: the results kept in this browser come as JSON (STORED_RESULTS)."""
        return ImageController.restore_gallery(from_json(saved))

    @staticmethod
    def reuse(gallery_state, evt: gr.SelectData):
        """A gallery item clicked: its settings back into the controls (SETTINGS, then the image guidance and the
        reference pictures when they were sent; the slider and the upload box are left as they are otherwise)."""
        item = (gallery_state or [])[evt.index] if evt is not None and evt.index < len(gallery_state or []) else None
        if item is None:
            return [gr.update()] * (len(SETTINGS) + len(OPTIONAL_SETTINGS))
        s = item["settings"]
        kept = {k: s[k] if s.get(k) is not None else gr.update() for k in OPTIONAL_SETTINGS}
        if s["mode"] == MASK_MODE:  # an Edit made without a mask is made again without one
            kept[MASK] = s.get(MASK)
        return (*(s[k] for k in SETTINGS), *kept.values())

    def stop(self, request: gr.Request | None = None) -> None:
        if not self.inflight.cancel(session_of(request), TAB):
            gr.Info("Nothing is being made.")


def _file_path(f) -> str | None:
    """The path of a file an upload box gives (a path, a file object or Gradio's dict)."""
    return f if isinstance(f, str) else getattr(f, "name", None) or f.get("path")


def named_files(error: Error, images: list[str], mask: str | None) -> Error:
    """The engine's refusal with the wire's names of the pictures sent ('image[0]', 'mask') replaced by the files' own:
    "'image[1]': image aspect ratio 400.0 (1x400) is too extreme" named none of the files given."""
    names = {f"'image[{i}]'": Path(p).name for i, p in enumerate(images)} | ({"'mask'": Path(mask).name} if mask else {})
    message = error.message
    for sent_as, name in names.items():
        message = message.replace(sent_as, f"'{name}'")
    return Error(message, code=error.code) if message != error.message else error


def mask_box(mode: str) -> dict:
    """The Mask box is shown in Edit mode only (the one task that takes a mask)."""
    return gr.update(visible=mode == MASK_MODE)


def _which(index: int, count: int) -> str:
    """"picture 2 of 4" for the picture at `index` of several; nothing when one is made."""
    return f"picture {index + 1} of {count}" if count > 1 else ""


def _stage(event: Progress, count: int) -> str:
    """The progress bar's words: the stage, and which picture when several are made (the engine's message says)."""
    return f"{event.stage} ({event.message})" if count > 1 and event.message else event.stage


def _keep_result(result: ImageDone, task: str, settings: dict, seed: int, gallery_state: list,
                 files: list) -> tuple[str | None, str | None, str | None]:
    """A picture made: saved as PNGs (with its mask and overlay) added to `files`, kept in the gallery with its
    settings and its own seed; returns the (picture, mask, overlay) files to show."""
    kept = {**settings, "seed": result.seed if result.seed is not None else seed}
    # shown as the PNGs saved (the Result, Mask and Overlay download buttons gave 'image.webp', a lossy WebP:
    # a segmentation mask came back with grey edges), named for what was made and its seed
    stem = f"{task}-seed{kept['seed']}"
    shown = tuple(_save_png(data, name) if data is not None else None for data, name in
                  ((result.image, stem), (result.mask, f"{stem}-mask"), (result.overlay, f"{stem}-overlay")))
    files += [f for f in shown if f]
    gallery_state.append({"image": shown[0], "settings": kept})
    return shown


def _gallery(gallery_state: list) -> list[tuple[str, str]]:
    return [(g["image"], _caption(g["settings"])) for g in gallery_state]


def card_defaults(link: EngineLink) -> dict:
    """The image request defaults the engine's card says (`image_defaults`; empty when unknown)."""
    info = link.status().info
    return dict(getattr(info, "image_defaults", None) or {}) if info is not None else {}


def model_defaults(link: EngineLink) -> tuple:
    """Steps and Guidance start at the loaded model's own defaults, as its card says them (the Preview guides at
    5.0, 2.0 at 2.0): a slider fixed at 2.0 ran every Preview request at 2.0. Unchanged when the card says none.
    Image guidance is shown, at the card's default, only when the card offers it (the Preview's)."""
    defaults = card_defaults(link)
    offered = IMAGE_GUIDANCE in defaults
    return (*(gr.update(value=defaults[k]) if k in defaults else gr.update() for k in ("steps", "guidance")),
            gr.update(value=defaults[IMAGE_GUIDANCE], visible=True) if offered else gr.update(visible=False))


def follow_model_defaults(link: EngineLink, applied: dict | None) -> tuple:
    """(Steps, Guidance, Image guidance, the card's defaults now) at page load and when the engine changes: the
    model_defaults of the card when they are not those the page last `applied` (an engine restarted as the Preview,
    or back as 2.0: the Image guidance slider stayed as the page had found the engine, and the sliders at the other
    model's defaults, until a reload); the user's values stay when they are the same (the engine went away and came
    back as it was)."""
    defaults = card_defaults(link)
    if defaults == applied:
        return gr.update(), gr.update(), gr.update(), applied
    return (*model_defaults(link), defaults)


def kept_results(saved) -> list[dict]:
    """The gallery's entries the browser kept (KEPT_GALLERY_KEY) that can still be shown and
    reused: a PNG this studio saved (the browser holds what it gives back: a path anywhere else is not opened),
    still there (gone when the machine cleaned its temp folder), with its settings."""
    out = []
    for entry in saved if isinstance(saved, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("settings"), dict):
            continue
        path = _saved_here(entry.get("image"))
        if path is not None and path.suffix == ".png" and all(k in entry["settings"] for k in SETTINGS):
            settings = {k: entry["settings"][k] for k in SETTINGS}
            if entry["settings"].get(IMAGE_GUIDANCE) is not None:
                settings[IMAGE_GUIDANCE] = entry["settings"][IMAGE_GUIDANCE]
            references = entry["settings"].get(REFERENCES)
            references = [_saved_here(r) for r in references] if isinstance(references, list) else []
            if references and all(references):  # (all of them, or the edit would not be the same)
                settings[REFERENCES] = [str(r) for r in references]
            if entry["settings"].get(MASK) is not None and (mask := _saved_here(entry["settings"][MASK])):
                settings[MASK] = str(mask)
            out.append({"image": str(path), "settings": settings})
    return out


def merged_results(saved, entries) -> list[dict]:
    """What the browser keeps after a press in one tab: the results it kept (read afresh: another tab may have added
    some since this one loaded), then this tab's results not among them (by picture)."""
    kept = [e for e in (saved if isinstance(saved, list) else []) if isinstance(e, dict)]
    known = {e.get("image") for e in kept}
    return kept + [e for e in entries or [] if e.get("image") not in known]


def keep_results_in_page(entries, saved: str | None) -> str:
    """merged_results for the page, as the JSON WRITE_RESULTS_JS writes (STORED_RESULTS read just before)."""
    return json.dumps(merged_results(from_json(saved), entries))


def kept_image_request(mode, prompt, target, refs, mask) -> dict:
    """The Image tab's kept request (BrowserRequest.on_press): the mode, prompt and target, with copies of the
    reference pictures and the mask given (REFERENCES, MASK); a picture that could not be copied is named (NOT_KEPT)."""
    kept, not_kept = kept_request(mode, prompt, target, names=REQUEST_FIELDS), []

    def copied(path: str) -> str | None:
        try:
            return _copy_kept(path)
        except OSError:
            not_kept.append(Path(path).name)
            return None
    references = [c for c in map(copied, filter(None, map(_file_path, refs or []))) if c]
    mask_copy = copied(_file_path(mask)) if mask else None
    kept.update({k: v for k, v in ((REFERENCES, references), (MASK, mask_copy), (NOT_KEPT, not_kept)) if v})
    return kept


def restored_files(kept) -> tuple:
    """(the reference box's files, the Mask box's file, what did not come back, said) of a kept request: the copies
    still on this machine (_saved_here); a box with nothing kept for it is left as it is (gr.skip())."""
    kept = kept if isinstance(kept, dict) else {}
    lost = [str(n) for n in kept[NOT_KEPT]] if isinstance(kept.get(NOT_KEPT), list) else []

    def back(paths: list) -> list[str]:
        here = [(str(p), _saved_here(p)) for p in paths]
        lost.extend(Path(p).name for p, path in here if path is None)
        return [str(path) for _, path in here if path is not None]
    refs = back(kept[REFERENCES]) if isinstance(kept.get(REFERENCES), list) and kept[REFERENCES] else gr.skip()
    mask = back([kept[MASK]]) if isinstance(kept.get(MASK), str) else [gr.skip()]
    names = ", ".join(f"'{n}'" for n in lost)
    said = FILES_NOT_BACK.format(names=names, them="them" if len(lost) > 1 else "it") if lost else None
    return refs, (mask or [None])[0], said


def kept_before() -> tuple:
    """The BrowserStates of the keys studios before kept the request and the gallery under (KEYS_BEFORE, in that
    order), read by Gradio with this studio's browser_secret: made at the page's top level (one inside a tab not yet
    opened gives nothing at page load). No default value: one is never written back."""
    return tuple(gr.BrowserState(None, storage_key=k, secret=browser_secret()) for k in KEYS_BEFORE)


def carry_over(found: list, request_before, results_before, results: list, request: dict) -> tuple:
    """(the results gallery's entries, the request, the page's writes for CARRY_OVER_JS, what is said) at page load:
    the earlier studio's entries under the KEYS_BEFORE `found` in the browser, read (`request_before`,
    `results_before`: None when Gradio could not read them) and carried over once: its results after this studio's,
    its request when this studio kept none; each key found removed, and one that could not be read said."""
    found = [k for k in found if k in KEYS_BEFORE] if isinstance(found, list) else []
    results = [e for e in results if isinstance(e, dict)] if isinstance(results, list) else []
    request = request if isinstance(request, dict) else {}
    write, unread = {}, []
    if RESULTS_BEFORE_KEY in found:
        if not isinstance(results_before, list):
            unread.append(RESULTS_BEFORE_KEY)
        elif results_before:
            results = merged_results(results, results_before)
            write[KEPT_GALLERY_KEY] = json.dumps(results)
    if REQUEST_BEFORE_KEY in found:
        if not isinstance(request_before, dict):
            unread.append(REQUEST_BEFORE_KEY)
        elif not any(request.get(n) for n in REQUEST_FIELDS) and any(request_before.get(n) for n in REQUEST_FIELDS):
            request = request_before
            write[REQUEST_KEY] = json.dumps(request)
    what = " and ".join(KEYS_BEFORE[k] for k in unread)
    said = NOT_CARRIED_OVER.format(what=what, was="were" if len(unread) > 1 else "was") if unread else None
    return results, request, {"write": write, "remove": found}, said


def restore_at_load(saved: str | None, stored: str | None, found: str | None, request_before, results_before) -> tuple:
    """At page load: (the gallery's entries, the gallery, mode, prompt, target, reference pictures, mask, status, the
    page's writes) from what the browser kept (the gallery, the request, the earlier studio's: carry_over); the status
    says a request that was not finished, the pictures that did not come back and what could not be carried over."""
    results, request, writes, not_carried = carry_over(from_json(found), request_before, results_before,
                                                       from_json(saved), from_json(stored))
    entries, gallery = ImageController.restore_gallery(results)
    *fields, interrupted = restore_request(request, REQUEST_FIELDS, "Make it")
    refs, mask, not_back = restored_files(request)
    said = [n for n in (interrupted if isinstance(interrupted, str) else None, not_back, not_carried) if n]
    return entries, gallery, *fields, refs, mask, " ".join(said) if said else gr.skip(), json.dumps(writes)


def _caption(s: dict) -> str:
    """A result's caption in the gallery: what a click reuses first (the seed was cut off after a long prompt), then
    the prompt, an ellipsis where it is cut (it was cut at 60 characters without a mark)."""
    what = s["target"] if s["mode"] == "Segment" else s["prompt"]
    what = what if len(what) <= CAPTION_CHARS else what[:CAPTION_CHARS - 1].rstrip() + "…"
    mode = f"{s['mode']} · {MASKED}" if s.get(MASK) else s["mode"]
    return f"{mode} · seed {s['seed']} · {s['steps']} steps · {what}"


def refused_reference(name: str, is_video: bool) -> str:
    """What the reference box says of a file that is not a picture (app/static/uploads.js)."""
    what = "a video" if is_video else "not a picture"
    return f"'{name}' is {what}: a reference is a {IMAGE_FORMATS} file."


def refused_mask(name: str, is_video: bool) -> str:
    """What the Mask box says of a file that is not a picture (app/static/uploads.js)."""
    what = "a video" if is_video else "not a picture"
    return f"'{name}' is {what}: a mask is a PNG, transparent where to edit."


def build_image_tab(link: EngineLink, examples: list[str] | None = None,
                    before: tuple | None = None) -> ImageController:
    """Build the Image tab inside the current Tab. The gallery (KEPT_GALLERY_KEY) and the last request (REQUEST_KEY)
    are kept in the browser's localStorage, read by the page itself (a gr.BrowserState inside a tab not yet opened
    is not there at page load, and each tab wrote its own copy whole). `before`: kept_before(), made at the page's top
    level (a tab built alone makes its own)."""
    controller = ImageController(link)
    capability_note(link, IMAGE_OUT, "**This engine has no image generator**, so it cannot generate, edit or "
                                     "segment images.")
    with gr.Row():
        with gr.Column(scale=2):
            mode = gr.Radio(list(MODES), value="Generate", label="Task", elem_id="image-mode")
            prompt = gr.Textbox(label='Prompt (quoted text, e.g. a sign saying "OPEN", is drawn as text)', lines=3,
                                elem_id="image-prompt", placeholder="A red cup on a wooden table, morning light",
                                **runs_tab("Make it"))
            refs = gr.File(label="Reference image(s) for Edit / Segment (the first one is edited)",
                           file_count="multiple", file_types=["image"], **says_refused("image-refs"))
            edit_mask = gr.File(label=MASK_LABEL, file_types=["image"], visible=False,
                                **says_refused("image-mask-file"))
            if examples:
                gr.Examples([[[e]] for e in examples], [refs], label="Example images")
            with gr.Row():
                # 200 px: side by side on a phone, "Replace the background" was cut to "Replace the backgrou"
                preset = gr.Dropdown(list(PRESETS), value="(none)", label="Edit preset", info=PRESET_INFO,
                                     min_width=200)
                target = gr.Textbox(label="Segment: what to find", placeholder="the cup", elem_id="image-target",
                                    min_width=200, **runs_tab())
            with gr.Row():
                aspect = gr.Dropdown(ASPECTS, value=AUTO_ASPECT, label="Aspect ratio",
                                     info="Auto: square for Generate; Edit / Segment keep the reference's shape "
                                          "(another ratio crops it)")
                size = gr.Textbox(label="or exact size (WxH)", placeholder="1024x768", **runs_tab())
            with gr.Row():
                steps = gr.Slider(1, 50, value=30, step=1, label="Steps", elem_id="image-steps")
                guidance = gr.Slider(1.0, 10.0, value=2.0, step=0.1, label="Guidance")
                # shown when the engine's card offers it (follow_model_defaults: at page load and as the engine changes)
                image_guidance = gr.Slider(1.0, 10.0, value=2.0, step=0.1, label="Image guidance (Edit / Segment)",
                                           info="how strongly an edit or a segmentation is guided toward its "
                                                "reference (1 = off)",
                                           visible=False, elem_id="image-image-guidance")
            with gr.Row():
                seed = seed_box(elem_id="image-seed")
                dice = gr.Button("Random seed", scale=0, min_width=120)
                preview_every = gr.Slider(0, 10, value=5, step=1, label="Preview every k steps (0 = none)")
                count = gr.Slider(1, MAX_PICTURES, value=1, step=1, label="Pictures",
                                  info="made one after another, with seed, seed + 1, ...", elem_id="image-count")
            with gr.Row():
                go = run_button("Make it", "image-go")
                stop = gr.Button("Stop", variant="stop", elem_id="image-stop")
        with gr.Column(scale=3):
            # PNG, not Gradio's default lossy WebP (the previews; the result is shown as the PNG saved)
            picture = gr.Image(label="Result (previews while it is made)", type="pil", interactive=False, format="png",
                               buttons=toolbar("download", "fullscreen"),
                               elem_id="image-result")
            with gr.Row():
                mask = gr.Image(label="Mask", type="pil", interactive=False, elem_id="image-mask", format="png",
                                buttons=toolbar("download", "fullscreen"))
                overlay = gr.Image(label="Overlay", type="pil", interactive=False, elem_id="image-overlay",
                                   format="png", buttons=toolbar("download", "fullscreen"))
            status = gr.Markdown("", elem_id="image-figures")
            files = gr.File(label="Downloads (PNG)", file_count="multiple", elem_id="image-files")
            gallery = gr.Gallery(label="Results (click one to reuse its settings)", columns=4,
                                 buttons=toolbar("download", "download_all", "fullscreen"),
                                 height=220, elem_id="image-gallery")
    state = gr.State([])
    # a page reload emptied the gallery: the browser keeps its entries (every tab's, as JSON: STORED_RESULTS, read
    # afresh), written once each press ends
    kept = gr.Textbox(visible="hidden")
    # the request is kept in the browser when Make it is pressed, and marked finished once it is (while it is still
    # this tab's): a reload lost the prompt and the run without a word
    ask = BrowserRequest(REQUEST_KEY, REQUEST_FIELDS, "Make it", runs=(controller.inflight, TAB))
    ask.when_done(ask.on_press(go, [mode, prompt, target, refs, edit_mask], keep=kept_image_request).then(
        controller.make, [mode, prompt, refs, preset, target, aspect, size, steps, guidance, seed, preview_every,
                          state, image_guidance, count, edit_mask], [picture, mask, overlay, status, gallery, state,
                                                                     files],
        api_name="imagine", concurrency_limit=None,
        show_progress_on=[status])).then(  # the progress bar over the result hid the previews it is to show
        None, None, [kept], js=f"() => {STORED_RESULTS}", **HIDDEN_STEP).then(  # (a State has no value in the page)
        keep_results_in_page, [state, kept], [kept], **HIDDEN_STEP).then(None, [kept], None, js=WRITE_RESULTS_JS,
                                                                         **HIDDEN_STEP)
    # at page load: the gallery and the request kept (and once, those an earlier studio kept: carry_over)
    carried = gr.Textbox(visible="hidden")
    before = before if before is not None else kept_before()
    on_page_load(restore_at_load, [state, gallery, mode, prompt, target, refs, edit_mask, status, carried],
                 inputs=[kept, ask.stored, carried, *before],
                 js=f"(...kept) => [{STORED_RESULTS}, {ask.read}, {FOUND_BEFORE_JS}, ...kept.slice(3)]").then(
        None, [carried], None, js=CARRY_OVER_JS, **HIDDEN_STEP)
    applied = gr.State(None)  # the card's image defaults this page's sliders were last set to
    follow = (lambda seen: follow_model_defaults(link, seen), [steps, guidance, image_guidance, applied], [applied])
    on_page_load(*follow)
    on_engine_change(*follow)
    wire_stop(stop, controller.stop, api_visibility="private")
    check_on_upload(link, refs, "image", status)
    say_refused_files("image-refs", status, refused_reference)
    check_on_upload(link, edit_mask, "image", status)
    say_refused_files("image-mask-file", status, refused_mask)
    mode.change(mask_box, [mode], [edit_mask], queue=False, api_visibility="private")
    dice.click(lambda: random.randint(0, DRAWN_SEED_MAX), None, [seed], queue=False, api_visibility="private")
    gallery.select(controller.reuse, [state], [mode, prompt, preset, target, aspect, size, steps, guidance, seed,
                                              image_guidance, refs, edit_mask], api_visibility="private")
    return controller
