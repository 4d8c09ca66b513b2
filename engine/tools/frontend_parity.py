"""Parity of the media front ends against the reference fixture cases ``frontend_image``,
``frontend_audio`` and ``frontend_video`` (``shared/fixtures/ming_ref``).

`run_frontend_case` feeds every input of a case through our code and compares each output
tensor that the case's ``meta.json`` lists; a tensor we cannot produce is reported as a failed
row, never skipped. Which call produced a tensor is read from its name (``<input>.direct.*``,
``<input>.chat.*``, ``<input>.maxpix<N>.*``, ...) and, for multi-input calls, from the inputs its
``meaning`` names, so cases with other inputs or sizes work the same way.

Default tolerances (meta.json's own are used when it has them): integers, grids, uint8 frames and
token ids exact; pixel values 1e-6; mel filters 1e-7; log-mel features 1e-4. The log-mel bound is
loose because the reference's FFT rounding is not reproducible across CPUs: torch's MKL FFT takes
a different code path with AVX-512 than with SSE4.2, and the log10 amplifies relative rounding in
bins near the -8 dynamic-range floor (1.1e-5 on an AVX-512 machine, 1.2e-7 under
``MKL_ENABLE_INSTRUCTIONS=SSE4_2``).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file

from engine.media.audio import AudioFrontendConfig, mel_filters, pack_audio_features, prepare_audio
from engine.media.image import (
    ImageInputs,
    ImageProcessorConfig,
    fetch_image,
    image_token_count,
    prepare_images,
    preprocess_images,
)
from engine.media.errors import MediaError
from engine.media.video import VideoOptions, VideoSamplingConfig, prepare_video, prepare_video_preview

FRONTEND_CASES = ("frontend_image", "frontend_audio", "frontend_video")

DEFAULT_TOLERANCES = {
    "int": 0.0,
    "pixel_values": 1e-6,
    "mel_filters": 1e-7,
    "audio_feats": 1e-4,
    "float": 1e-6,
}


@dataclass
class ParityRow:
    """One compared tensor: the largest absolute difference and whether it is within tolerance."""

    case: str
    tensor: str
    max_abs_diff: float
    tolerance: float
    ok: bool
    note: str = ""


def _tolerance(name: str, dtype: str, meta: dict) -> float:
    given = meta.get("tolerances") or meta.get("tolerance") or {}
    if isinstance(given, dict):
        if name in given and isinstance(given[name], (int, float)):
            return float(given[name])
        for key, value in given.items():
            if isinstance(value, (int, float)) and name.endswith(key):
                return float(value)
    if not dtype.startswith("float"):
        return DEFAULT_TOLERANCES["int"]
    for key in ("pixel_values", "mel_filters", "audio_feats"):
        if key in name:
            return DEFAULT_TOLERANCES[key]
    return DEFAULT_TOLERANCES["float"]


def _compare(case: str, name: str, ours, ref: np.ndarray, tol: float, note: str = "") -> ParityRow:
    if isinstance(ours, torch.Tensor):
        ours = ours.detach().cpu().numpy()
    ours = np.asarray(ours)
    if ours.shape != ref.shape:
        return ParityRow(case, name, math.inf, tol, False,
                         f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}" + (f"; {note}" if note else ""))
    if ref.size == 0:
        return ParityRow(case, name, 0.0, tol, True, note)
    diff = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
    return ParityRow(case, name, diff, tol, bool(diff <= tol), note)


def _missing(case: str, name: str, tol: float, why: str) -> ParityRow:
    return ParityRow(case, name, math.inf, tol, False, f"not produced: {why}")


def _crash_note(exc: Exception) -> str:
    """A failed row's note for an exception: an input the case left out is named as such."""
    from engine.tools.parity import InputNotRecorded

    return str(exc) if isinstance(exc, InputNotRecorded) else f"{type(exc).__name__}: {exc}"


def _recorded_input_names(meta: dict, inputs: dict) -> dict[str, None]:
    """The inputs a case lists in meta.json and those it holds (meta.json's order first), recorded or not."""
    listed = [t["name"] for t in meta.get("tensors", []) if t.get("file") == "inputs.safetensors"]
    return dict.fromkeys([*listed, *inputs])


def _output_tensors(meta: dict) -> list[dict]:
    return [t for t in meta.get("tensors", []) if t.get("file") == "outputs.safetensors"]


NOT_RECORDED = "not recorded"  # the note of an output meta.json lists that outputs.safetensors lacks


def _recorded_outputs(case: str, meta: dict, outputs: dict, rows: list[ParityRow]) -> list[dict]:
    """The output specs of meta.json whose tensor the case holds; each one it left out is a row noted
    "not recorded" (neither ok nor failed: run_case counts it apart)."""
    held = []
    for spec in _output_tensors(meta):
        if spec["name"] in outputs:
            held.append(spec)
        else:
            rows.append(ParityRow(case, spec["name"], math.nan,
                                  _tolerance(spec["name"], spec.get("dtype", ""), meta), True, NOT_RECORDED))
    return held


def _named_inputs(meaning: str, inputs: dict) -> list[str]:
    """Input names a tensor's meaning mentions, in the order they appear."""
    found = []
    for name in inputs:
        for match in re.finditer(re.escape(name) + r"(?![A-Za-z0-9_])", meaning):
            found.append((match.start(), name))
    return [name for _, name in sorted(found)]


# --------------------------------------------------------------------------- image


def reference_release(meta: dict) -> str | None:
    """The release whose processor code produced a case, from meta.json's ``environment.upstream``
    ("... Ming-flash-omni 2.0 release tree ..."); None when it does not say (then the processor config
    decides, as for a checkpoint's own file)."""
    upstream = str((meta.get("environment") or {}).get("upstream", ""))
    if re.search(r"\b2\.0\b", upstream):
        return "2.0"
    if re.search(r"preview", upstream, re.IGNORECASE):
        return "preview"
    return None


def _image_case(case_dir: Path, meta: dict, inputs: dict, outputs: dict) -> list[ParityRow]:
    case = case_dir.name
    # The processor settings come from the case; the code path (Stage A bounds, smart-resize variant) is
    # that of the release that ran it, whatever its patch size (a 2.0 run with 14-pixel patches is not Preview).
    config = ImageProcessorConfig.from_json_file(case_dir / "config.json", release=reference_release(meta))
    known = _recorded_input_names(meta, inputs)  # (one left out of the file fails its rows, naming it)
    cache: dict[tuple, object] = {}

    def memo(key: tuple, fn: Callable[[], object]):
        if key not in cache:
            cache[key] = fn()
        return cache[key]

    def direct(names: tuple[str, ...], **kw) -> ImageInputs:
        return memo(("direct", names, tuple(sorted(kw.items()))),
                    lambda: preprocess_images([inputs[n] for n in names], config, **kw))

    def chat(names: tuple[str, ...], **kw) -> ImageInputs:
        return memo(("chat", names, tuple(sorted(kw.items()))),
                    lambda: prepare_images([inputs[n] for n in names], config, **kw))

    def token_path(group: str, ref: np.ndarray) -> str:
        """The path a bare ``<group>.llm_tokens`` counts: the one whose stored grids give the stored count
        (thin images: the chat path's Stage A clamps a side to 32 where the processor alone rounds it to 0)."""
        for path in ("direct", "chat"):
            grids = outputs.get(f"{group}.{path}.image_grid_thw")
            if grids is not None and [image_token_count(g, config.merge_size) for g in grids.tolist()] == ref.tolist():
                return path
        return "direct"

    rows = []
    for spec in _recorded_outputs(case_dir.name, meta, outputs, rows):
        name, ref = spec["name"], outputs[spec["name"]]
        tol = _tolerance(name, spec["dtype"], meta)
        parts = name.split(".")
        field = parts[-1]
        try:
            if parts[0] in known:
                names = (parts[0],)
            else:  # a multi-image call: the inputs are named in some tensor meaning of its group
                group_meanings = [t.get("meaning", "") for t in _output_tensors(meta)
                                  if t["name"].split(".")[0] == parts[0]]
                named = [tuple(_named_inputs(m, known)) for m in [spec.get("meaning", "")] + group_meanings]
                names = next((n for n in named if n), ())
                if not names:
                    rows.append(_missing(case, name, tol, "its meaning names no input image"))
                    continue
            # "<inputs>.<call>.<field>" or "<inputs>.<field>"; a call is "direct" or "chat", with the
            # processor's (direct) or the message's (chat) pixel bounds as maxpix<N> / minpix<N>
            call = parts[1] if len(parts) > 2 else (token_path(parts[0], ref) if field == "llm_tokens" else "direct")
            path, bounds, unknown = "direct", {}, []
            for word in call.split("_"):
                bound = re.fullmatch(r"(max|min)pix(\d+)", word)
                if word in ("direct", "chat"):
                    path = word
                elif bound:
                    bounds[f"{bound.group(1)}_pixels"] = int(bound.group(2))
                else:
                    unknown.append(word)
            if unknown:
                rows.append(_missing(case, name, tol, f"unknown call kind {call!r}"))
                continue
            if field == "fetch_image_uint8":
                ours = np.asarray(fetch_image(inputs[names[0]], config.release, **bounds))
                rows.append(_compare(case, name, ours, ref, tol, "Stage A (fetch_image)"))
                continue
            result = (chat if path == "chat" else direct)(names, **bounds)
            if field == "llm_tokens":
                rows.append(_compare(case, name, np.array(result.num_tokens, dtype=np.int64), ref, tol,
                                     "" if len(parts) > 2 else f"tokens of the {path} path's grids"))
            elif field == "pixel_values":
                rows.append(_compare(case, name, result.pixel_values, ref, tol))
            elif field == "image_grid_thw":
                rows.append(_compare(case, name, result.grid_thw, ref, tol))
            else:
                rows.append(_missing(case, name, tol, f"unknown field {field!r}"))
        except Exception as exc:  # a crash is a failed row, not a skipped one
            rows.append(_missing(case, name, tol, _crash_note(exc)))

    # chat-path pixel values are stored once when bit-identical to the direct path: check them too
    for input_name, statement in (meta.get("chat_vs_direct") or {}).items():
        key = f"{input_name}.direct.pixel_values"
        if input_name in inputs and key in outputs and "identical" in statement:
            tol = DEFAULT_TOLERANCES["pixel_values"]
            try:
                rows.append(_compare(case, f"{input_name}.chat.pixel_values", chat((input_name,)).pixel_values,
                                     outputs[key], tol, "chat path vs the stored direct pixel_values"))
            except Exception as exc:
                rows.append(_missing(case, f"{input_name}.chat.pixel_values", tol, f"{type(exc).__name__}: {exc}"))
    return rows


# --------------------------------------------------------------------------- audio


_RATE_IN_WORDS = re.compile(r"(\d+(?:\.\d+)?)\s*(kHz|Hz)\b")
_CALL_PAIR = re.compile(r"\(\s*([A-Za-z_]\w*)\s*,\s*(\d+)\s*\)")


def call_input_rates(meaning: str, inputs: dict) -> dict[str, int]:
    """The rate each input was handed to the processor with, where an output's meaning writes the call
    (``BailingMM2AudioProcessor([(wave_main,16000)], ...)``): {input name: rate}."""
    return {m.group(1): int(m.group(2)) for m in _CALL_PAIR.finditer(meaning) if m.group(1) in inputs}


def recorded_input_rate(spec: dict, case_rate: int | None, default: int | None,
                        call_rate: int | None = None) -> int | None:
    """The sample rate one input waveform was recorded at: its tensor record's ``sample_rate`` /
    ``sampling_rate``, else the rate the processor call was given (``call_rate``, `call_input_rates`),
    else a rate its meaning states ("... float32 44.1 kHz mono ..."), else the case config's
    ``sampling_rate`` (the shipped preprocessor config's key is the processor's own 16 kHz, so it only
    speaks for inputs that say nothing themselves), else `default`."""
    for key in ("sample_rate", "sampling_rate"):
        if spec.get(key) is not None:
            return int(spec[key])
    if call_rate is not None:
        return int(call_rate)
    match = _RATE_IN_WORDS.search(str(spec.get("meaning", "")))
    if match:
        value = float(match.group(1)) * (1000 if match.group(2) == "kHz" else 1)
        if value >= 1000 and abs(value - round(value)) < 1e-6:
            return int(round(value))
    if case_rate is not None:
        return int(case_rate)
    return default


def _audio_case(case_dir: Path, meta: dict, inputs: dict, outputs: dict) -> list[ParityRow]:
    case = case_dir.name
    with open(case_dir / "config.json", encoding="utf-8") as fh:
        cfg_dict = json.load(fh)
    config = AudioFrontendConfig.from_dict(cfg_dict)
    # the rate each waveform was recorded at (`recorded_input_rate`: its own record, the rate the call
    # that made an output gave it, its meaning, the config's sampling_rate, else 16 kHz); the front end
    # itself always resamples to 16 kHz
    case_rate = cfg_dict.get("sampling_rate")
    input_specs = {t["name"]: t for t in meta.get("tensors", []) if t.get("file") == "inputs.safetensors"}
    known = _recorded_input_names(meta, inputs)  # (one left out of the file fails the rows that use it, naming it)

    def dtype_kind(name: str) -> str:  # an input left out of the file: the kind of the dtype meta.json lists
        held = inputs.get(name)
        if held is not None:
            return held.dtype.kind
        listed = str(input_specs[name].get("dtype", ""))
        return "f" if "float" in listed else "i" if "int" in listed else "V"

    floats = [n for n in known if dtype_kind(n) == "f"]
    ints = [n for n in known if dtype_kind(n) in "iu"]

    def clips_for(group: str, meaning: str) -> list[str]:
        if f"wave_{group}" in known:
            return [f"wave_{group}"]
        named = _named_inputs(meaning, known)
        if named:
            return named
        if group.startswith("int") and ints:
            return ints[:1]
        if group.startswith("two") or "clips" in group:
            return floats
        return floats[:1]

    cache: dict[tuple, tuple] = {}

    # every output of a call names the call's inputs and rates in its meaning, or only some of them do
    group_meanings: dict[str, str] = {}
    for t in _output_tensors(meta):
        group = t["name"].split(".")[0]
        group_meanings[group] = group_meanings.get(group, "") + " " + str(t.get("meaning", ""))

    def features(names: list[str], group: str, meaning: str):
        called = {**call_input_rates(group_meanings.get(group, ""), inputs), **call_input_rates(meaning, inputs)}
        rates = tuple(recorded_input_rate(input_specs.get(n, {}), case_rate, 16000, called.get(n)) for n in names)
        key = (tuple(names), rates)
        if key not in cache:
            cache[key] = pack_audio_features([prepare_audio(inputs[n], r, config) for n, r in zip(names, rates)])
        return cache[key]

    rows = []
    for spec in _recorded_outputs(case_dir.name, meta, outputs, rows):
        name, ref = spec["name"], outputs[spec["name"]]
        tol = _tolerance(name, spec["dtype"], meta)
        try:
            match = re.fullmatch(r"whisper_mel_filters_(\d+)", name)
            if match:
                n_mels = int(match.group(1))
                rows.append(_compare(case, name, mel_filters(config.sample_rate, config.n_fft, n_mels), ref, tol))
                continue
            group, field = name.split(".", 1)
            meaning = spec.get("meaning", "")
            feats, lengths, tokens = features(clips_for(group, meaning), group, meaning)
            if group == "tuple_call" and field == "encoder_feats_lengths":
                rows.append(_compare(case, name, lengths, ref, tol,
                                     "reference quirk: a bare (wave, sr) tuple reports mel frames, not tokens"))
            elif field == "audio_feats":
                rows.append(_compare(case, name, feats, ref, tol))
            elif field == "audio_feats_lengths":
                rows.append(_compare(case, name, lengths, ref, tol))
            elif field == "encoder_feats_lengths":
                rows.append(_compare(case, name, tokens, ref, tol))
            else:
                rows.append(_missing(case, name, tol, f"unknown field {field!r}"))
        except Exception as exc:
            rows.append(_missing(case, name, tol, _crash_note(exc)))
    return rows


# --------------------------------------------------------------------------- video


def tiny_tokenize(text: str, token_map: dict) -> list[int]:
    """Ids under the fixtures' tiny byte-level tokenizer: special tokens at their tiny ids
    (meta.json ``token_map``), every other UTF-8 byte as its own id 0..255."""
    specials = sorted(token_map, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
    ids: list[int] = []
    pos = 0
    for match in (pattern.finditer(text) if pattern else []):
        ids.extend(text[pos:match.start()].encode("utf-8"))
        ids.append(int(token_map[match.group()]["tiny_id"]))
        pos = match.end()
    ids.extend(text[pos:].encode("utf-8"))
    return ids


def recorded_video_options(*records: dict) -> VideoOptions:
    """The message's video options a case recorded: ``message_video_options`` of the first record
    that holds it (config.json, then meta.json). A key the reference's video path neither reads nor
    is known to leave unread is refused (MediaError): no option is dropped silently."""
    for record in records:
        if record.get("message_video_options") is not None:
            return VideoOptions.from_message(record["message_video_options"], strict=True)
    return VideoOptions()


def _video_image_config(cfg_dict: dict, meta: dict, release: str | None = None) -> ImageProcessorConfig:
    """The image processor a video case ran: the preprocessor keys it records (config.json, or meta.json's
    ``processor_settings`` as mm cases keep them), else the release's shipped values."""
    recorded = {**(meta.get("processor_settings") or {}), **cfg_dict}
    return ImageProcessorConfig.from_dict(recorded, release=release or reference_release(meta) or "2.0")


_FRAME_FILE = re.compile(r"[\w.-]+\.(?:png|jpe?g|bmp|webp|gif|tiff?)\b", re.IGNORECASE)


def frame_file_orders(meta: dict, frame_names: list[str]) -> list[list[str]]:
    """The orders the reference may have read a case's frames in: it wrote them as files into a
    directory and read them back in ``sorted(os.listdir)`` order. Where every frame's file name is
    recorded (a ``filename`` / ``file_name`` / ``path`` key, or a file name in its meaning) that order
    is known; otherwise both namings stay possible, ``frame{i}.png`` (frame10 before frame2) and a
    zero-padded one (time order), and they differ from 11 frames on."""
    specs = {t["name"]: t for t in meta.get("tensors", []) if t.get("file") == "inputs.safetensors"}
    files = {}
    for name in frame_names:
        spec = specs.get(name, {})
        given = next((spec[k] for k in ("filename", "file_name", "path") if spec.get(k)), None)
        match = None if given else _FRAME_FILE.search(str(spec.get("meaning", "")))
        if given or match:
            files[name] = Path(str(given)).name if given else match.group()
    if len(files) == len(frame_names) and len(set(files.values())) == len(files):
        return [sorted(frame_names, key=lambda n: files[n])]
    return [[frame_names[i] for i in order] for order in numbered_file_orders(len(frame_names))]


def numbered_file_orders(n: int) -> list[list[int]]:
    """The orders ``sorted(os.listdir)`` reads n frame files numbered 0..n-1 in: zero-padded names keep
    time order, plain ones (frame{i}.png, {i}.jpg) put 10 before 2. One order below 11 frames."""
    numeric = list(range(n))
    plain = sorted(numeric, key=lambda i: f"{i}.")
    return [numeric] if plain == numeric else [numeric, plain]


def _max_diff(ours, ref: np.ndarray | None) -> float:
    if ref is None:
        return math.inf
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    if ours.shape != ref.shape:
        return math.inf
    return float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0


def _video_case(case_dir: Path, meta: dict, inputs: dict, outputs: dict) -> list[ParityRow]:
    case = case_dir.name
    with open(case_dir / "config.json", encoding="utf-8") as fh:
        cfg_dict = json.load(fh)
    frame_names = sorted((n for n in inputs if re.fullmatch(r"frame\d+", n)), key=lambda n: int(n[5:]))
    rows = []
    # the Preview's processor (no frame timestamps, its own sampler; spec §4.2 Preview), else 2.0's
    preview = reference_release(meta) == "preview" or not cfg_dict.get(
        "use_interleaved_frame_timestamp", meta.get("use_interleaved_frame_timestamp", True))

    def run(order: list[str]):
        options = recorded_video_options(cfg_dict, meta)
        with tempfile.TemporaryDirectory() as tmp:
            for k, name in enumerate(order):  # the reference read the frames back from image files in a directory
                Image.fromarray(inputs[name]).save(Path(tmp) / f"{k:06d}.png")
            if preview:
                return prepare_video_preview(tmp, _video_image_config(cfg_dict, meta, "preview"), options=options)
            return prepare_video(tmp, _video_image_config(cfg_dict, meta), VideoSamplingConfig(), options=options)

    orders, order_note = frame_file_orders(meta, frame_names), ""
    try:
        inputs.require(*(n for n in _recorded_input_names(meta, inputs) if re.fullmatch(r"frame\d+", n)))
        candidates = [(order, run(order)) for order in orders]
        if len(candidates) > 1:
            # the file names are not recorded: the reference's own frames (its output) show which order it read
            def distance(item):
                video, ref = item[1], outputs.get("fetch_video.frames")
                frames = video.frames[:len(ref)] if preview and ref is not None else video.frames
                return (_max_diff(frames, ref), _max_diff(video.pixel_values, outputs.get("pixel_values_videos")))
            best = min(candidates, key=distance)
            shown = any(math.isfinite(d) for d in distance(best))
            order_note = ("frame order " + ("frame0, frame1, ..." if best[0] == orders[0] else
                                            "of files named frame{i}.png (frame10 before frame2)")
                          + (", as the reference's stored frames show" if shown else
                             " assumed: the case records neither the file names nor its frames"))
            candidates = [best]
        video, error = candidates[0][1], None
    except Exception as exc:
        video, error = None, _crash_note(exc)

    prompt = None
    if video is not None and "prompt_text_before_expansion" in meta:
        prompt = meta["prompt_text_before_expansion"].replace("<VIDEO>", video.prompt_text(), 1)
        if "expanded_prompt" in meta:
            same = prompt == meta["expanded_prompt"]
            rows.append(ParityRow(case, "expanded_prompt (text)", 0.0 if same else 1.0, 0.0, same,
                                  "string equality with meta.json expanded_prompt"))

    for spec in _recorded_outputs(case_dir.name, meta, outputs, rows):
        name, ref = spec["name"], outputs[spec["name"]]
        tol = _tolerance(name, spec["dtype"], meta)
        if video is None:
            rows.append(_missing(case, name, tol, error))
            continue
        if name == "fetch_video.frames":
            # the Preview's fetch_video returns the frames before the processor pads them to an even count
            frames = video.frames[:len(ref)] if preview and len(video.frames) > len(ref) else video.frames
            rows.append(_compare(case, name, frames, ref, tol))
        elif name == "fetch_video.resmp_ts":
            rows.append(_compare(case, name, video.frame_timestamps, ref, tol))
        elif name == "pixel_values_videos":
            rows.append(_compare(case, name, video.pixel_values, ref, tol))
        elif name == "video_grid_thw":
            rows.append(_compare(case, name, video.grid_thw, ref, tol))
        elif name == "input_ids":
            if prompt is None or "token_map" not in meta:
                rows.append(_missing(case, name, tol, "meta.json lacks the prompt text or token_map"))
            else:
                ids = np.array([tiny_tokenize(prompt, meta["token_map"])], dtype=np.int64)
                rows.append(_compare(case, name, ids, ref, tol, "expanded prompt under the tiny byte tokenizer"))
        else:
            rows.append(_missing(case, name, tol, "unknown tensor"))
    if order_note:
        for row in rows:
            row.note = f"{row.note}; {order_note}" if row.note else order_note
    return rows


# --------------------------------------------------------------------------- entry points

_RUNNERS = {"frontend_image": _image_case, "frontend_audio": _audio_case, "frontend_video": _video_case}


def run_frontend_case(case_dir: Path) -> list[ParityRow]:
    """Run our front end on a fixture case folder and compare every stored output tensor."""
    case_dir = Path(case_dir)
    with open(case_dir / "meta.json", encoding="utf-8") as fh:
        meta = json.load(fh)
    kind = meta.get("case", case_dir.name)
    runner = _RUNNERS.get(kind) or _RUNNERS.get(case_dir.name)
    if runner is None:
        raise ValueError(f"{case_dir} is not a front-end case (expected one of {', '.join(FRONTEND_CASES)})")
    from engine.tools.parity import load_inputs

    inputs = load_inputs(case_dir, load_file)
    outputs = load_file(str(case_dir / "outputs.safetensors"))
    rows = runner(case_dir, meta, inputs, outputs)
    if all(r.ok and r.note.startswith(NOT_RECORDED) for r in rows):
        rows.append(ParityRow(case_dir.name, "-", math.nan, 0.0, False,
                              "nothing comparable: the case records none of the outputs its meta.json lists"))
    return rows


def format_rows(rows: list[ParityRow]) -> str:
    """Plain-text table of parity rows."""
    lines = [f"{'case':<16} {'tensor':<48} {'max_abs_diff':>12} {'tol':>8}  ok"]
    for r in rows:
        lines.append(f"{r.case:<16} {r.tensor:<48} {r.max_abs_diff:>12.3g} {r.tolerance:>8.1g}  "
                     f"{'yes' if r.ok else 'NO'}{'  (' + r.note + ')' if r.note else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.tools.frontend_parity [FIXTURE_ROOT]``: print the table; exit 1 on failure."""
    import argparse

    default_root = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "ming_ref"
    ap = argparse.ArgumentParser(prog="python -m engine.tools.frontend_parity",
                                 description="Compare the media front ends with the reference fixtures; exit 1 on "
                                             "a failure or when no case is found.")
    ap.add_argument("root", nargs="?", type=Path, default=default_root,
                    help="the fixtures folder holding the case folders (default: %(default)s)")
    root = ap.parse_args(argv).root
    rows = [row for name in FRONTEND_CASES if (root / name).is_dir() for row in run_frontend_case(root / name)]
    if not rows:
        print(f"no front-end cases found under {root}")
        return 1
    print(format_rows(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    from engine.command import run_command

    raise SystemExit(run_command(main))
