"""Parity against the upstream reference: `python -m engine.parity CASE_DIR [CASE_DIR ...]`.

Each case folder is in the ming_ref format (config.json, model.safetensors, inputs/outputs
safetensors, meta.json). Weights go through our normal loading code; every output tensor the case
holds is compared and printed as a table (case, tensor, max abs diff, tolerance, ok). The exit
status is non-zero when anything is out of tolerance or a case kind is not supported yet.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.media.audio import AudioFrontendConfig, audio_token_count
from engine.media.errors import MediaError
from engine.media.image import ImageProcessorConfig, fetch_image, image_token_count
from engine.media.video import VideoOptions, video_prompt_text
from engine.models.thinker.greedy import BatchStopping, greedy_decode_batch
from engine.models.thinker.layers import Router
from engine.models.thinker.llm import AudioSpan, MultimodalInputs
from engine.models.thinker.config import UPSTREAM_SPATIAL_MERGE_SIZE, LLMConfig, MingConfig
from engine.models.thinker.positions import PositionTokens, rope_index
from engine.models.thinker.processor import MediaSettings, MingProcessor, image_prompt_text
from engine.models.thinker.projectors import encode_audio_wrapped
from engine.runtime import Engine, device_problem
from engine.models.thinker.model import load_model
from engine.models.thinker.tokenizer import AUDIO_END, AUDIO_PATCH, AUDIO_START, MingTokenizer

DEVICE = "cpu"  # where parity runs load the models (`--device`); the reference outputs stay on the CPU


@dataclass
class ParityRow:
    case: str
    tensor: str
    max_abs_diff: float
    tolerance: float | str
    ok: bool
    note: str = ""


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


NOT_RECORDED = "not recorded"  # the note of a row for an output the harness compares but the case left out


class Comparer:
    """Collects rows; `expected` tensors come from the case, `got` from our engine. A name the case does
    not hold is a row noted "not recorded" (counted apart, neither ok nor failed), never a KeyError;
    `held_only`: it is skipped without a row (optional diagnostics of the llm cases)."""

    def __init__(self, case: str, outputs: dict[str, torch.Tensor], held_only: bool = False):
        self.case = case
        self.outputs = outputs
        self.held_only = held_only
        self.rows: list[ParityRow] = []
        self.compared: set[str] = set()

    def _skips(self, name: str) -> bool:
        if name in self.outputs:
            return False
        if not self.held_only:
            self.not_recorded(name)
        return True

    def not_recorded(self, name: str, why: str = "") -> None:
        self.rows.append(ParityRow(self.case, name, float("nan"), "-", True, NOT_RECORDED + (f": {why}" if why else "")))

    def close(self, name: str, got: torch.Tensor, atol: float, select: torch.Tensor | None = None) -> None:
        if self._skips(name):
            return
        exp = self.outputs[name]
        got = got.detach().to(exp.device)
        if got.shape != exp.shape:
            self.rows.append(ParityRow(self.case, name, float("inf"), atol, False,
                                       f"shape {list(got.shape)} vs {list(exp.shape)}"))
        else:
            if select is not None:
                select = select.to(exp.device)
                got, exp = got[select], exp[select]
            d = _max_diff(got, exp)
            self.rows.append(ParityRow(self.case, name, d, atol, d <= atol))
        self.compared.add(name)

    def exact(self, name: str, got: torch.Tensor, select: torch.Tensor | None = None, note: str = "") -> None:
        if self._skips(name):
            return
        exp = self.outputs[name]
        got = got.detach().to(exp.device)
        if got.shape != exp.shape:
            ok, d, note = False, float("inf"), f"shape {list(got.shape)} vs {list(exp.shape)}"
        else:
            if select is not None:
                select = select.to(exp.device)
                got, exp = got[select], exp[select]
            d = _max_diff(got.long() if not got.is_floating_point() else got, exp.long() if not exp.is_floating_point() else exp)
            ok = d == 0
        self.rows.append(ParityRow(self.case, name, d, "exact", ok, note))
        self.compared.add(name)

    def not_comparable(self, names: list[str], why: str) -> None:
        """A failed row for each of `names` the case holds that we cannot reproduce, saying why."""
        for name in names:
            if name in self.outputs:
                self.rows.append(ParityRow(self.case, name, float("nan"), "-", False, f"not comparable: {why}"))
                self.compared.add(name)

    def input_missing(self, error: InputNotRecorded, prefixes: tuple[str, ...] = ("",), label: str = "-") -> None:
        """A failed row, naming the missing input, for each output starting with one of `prefixes` that nothing
        compared yet (they cannot be computed without it); one row `label` when the case holds none of them."""
        names = [n for n in self.outputs if n.startswith(prefixes) and n not in self.compared]
        for name in names or [label]:
            self.rows.append(ParityRow(self.case, name, float("nan"), "-", False, str(error)))
            self.compared.add(name)

    def missing(self) -> list[ParityRow]:
        """Rows for the outputs the case holds that nothing compared, and a failed row when no row compares
        anything (every output the harness compares left out)."""
        rows = [ParityRow(self.case, n, float("nan"), "-", False, "not compared (unsupported output)")
                for n in self.outputs if n not in self.compared]
        if all(is_not_recorded(r) for r in self.rows):
            rows.append(ParityRow(self.case, "-", float("nan"), "-", False,
                                  "nothing comparable: the case records none of the outputs the harness compares"))
        return rows


INPUT_NOT_RECORDED = "input not recorded"  # the note of a row a missing input leaves uncomputable


class InputNotRecorded(KeyError):
    """An input a computation needs that the case's inputs.safetensors does not hold."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"{INPUT_NOT_RECORDED}: {self.name}"


class CaseInputs(dict):
    """A case's recorded inputs: indexing a name the case does not hold raises InputNotRecorded naming it
    (`.get` and `in` still answer for optional inputs)."""

    def __missing__(self, name: str):
        raise InputNotRecorded(name)

    def require(self, *names: str) -> None:
        """Raise InputNotRecorded for the first of `names` the case does not hold."""
        for name in names:
            if name not in self:
                raise InputNotRecorded(name)


def load_inputs(case_dir: Path, loader: Callable = load_file) -> CaseInputs:
    """inputs.safetensors of a case (`loader`: safetensors' torch or numpy load_file); no file is no inputs."""
    path = Path(case_dir) / "inputs.safetensors"
    return CaseInputs(loader(str(path)) if path.is_file() else {})


def is_not_recorded(row: ParityRow) -> bool:
    return row.ok and row.note.startswith(NOT_RECORDED)


def _router_margin(router: Router, logits: torch.Tensor) -> torch.Tensor:
    """min(group-selection gap, expert-selection gap) on the biased scores (tie-risk diagnostic)."""
    biased = torch.sigmoid(logits.float()) + router.expert_bias.float()
    n, e = biased.shape
    grouped = biased.view(n, router.n_group, e // router.n_group)
    gscores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1).sort(dim=-1, descending=True).values
    group_gap = (gscores[:, router.topk_group - 1] - gscores[:, router.topk_group]
                 if router.topk_group < router.n_group else torch.full((n,), float("inf"), device=logits.device))
    keep = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1).topk(router.topk_group, dim=-1).indices
    mask = torch.zeros(n, router.n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
    cand = biased.masked_fill(~mask.unsqueeze(-1).expand_as(grouped).reshape(n, e), float("-inf"))
    srt = cand.sort(dim=-1, descending=True).values
    k = router.top_k
    expert_gap = srt[:, k - 1] - srt[:, k] if k < srt.shape[1] else torch.full((n,), float("inf"), device=logits.device)
    return torch.minimum(group_gap, expert_gap)


def _sorted_route(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(dim=-1)
    return ids.gather(-1, order), weights.gather(-1, order)


def _tolerances(meta: dict) -> dict[str, float]:
    tol = meta.get("suggested_tolerance", {})
    return {"logits": float(tol.get("logits_atol", 1e-4)), "hidden": float(tol.get("hidden_atol", 1e-4)),
            "router_weights": float(tol.get("router_weights_atol", 1e-5))}


GENERATION_RECORDS = ("generation", "generation_config", "generate_kwargs")  # meta.json dicts of generate's settings
_OFF_TEXT = re.compile(r"(disabled|off|false|no|none|0)\b", re.I)  # an `eos_stopping` text that says it was off
_CALL_ARG = re.compile(r"\b(eos_token_id|pad_token_id)\s*=\s*(None|\[[\d,\s]*\]|\([\d,\s]*\)|\d+)")


def _generation_record(meta: dict) -> dict:
    """generate()'s settings as the case records them: its `generation` / `generation_config` /
    `generate_kwargs` dicts, and the `eos_token_id=` / `pad_token_id=` arguments of the generate call an
    `hf_generate_crosscheck` note quotes (a recorded dict wins over a quoted call)."""
    record: dict = {}
    note = str((meta.get("hf_generate_crosscheck") or {}).get("note", ""))
    for key, value in _CALL_ARG.findall(note):
        ids = [int(i) for i in re.findall(r"\d+", value)]
        record[key] = None if value == "None" else ids if value[0] in "[(" else ids[0]
    for key in reversed(GENERATION_RECORDS):
        if isinstance(meta.get(key), dict):
            record.update(meta[key])
    return record


def _flag_on(flag) -> bool:
    """A recorded switch: true, or a text not saying disabled/off/false/no/none/0."""
    if isinstance(flag, str):
        return not _OFF_TEXT.match(flag.strip())
    return bool(flag)


def _stopping_enabled(record: dict) -> bool:
    """`eos_stopping` when recorded; without it, as HF's generate: on exactly when the call named EOS ids."""
    if "eos_stopping" not in record:
        return record.get("eos_token_id") not in (None, [], ())
    return _flag_on(record["eos_stopping"])


def case_sampling(meta: dict) -> str | None:
    """How a case's generate sampled, or None when it decoded greedily: its `do_sample` (a generation record or
    the quoted generate call). Without one it is HF's default, greedy: a temperature / top_p recorded beside no
    do_sample (a generation_config's defaults) leaves generate greedy, as HF's generate does (it warns)."""
    record = _generation_record(meta)
    note = str((meta.get("hf_generate_crosscheck") or {}).get("note", ""))
    quoted = re.search(r"\bdo_sample\s*=\s*(\w+)", note)
    flag = record.get("do_sample", quoted.group(1) if quoted else None)
    return "do_sample=true" if flag is not None and _flag_on(flag) else None


def case_stopping(meta: dict, cfg: LLMConfig) -> BatchStopping:
    """The EOS stopping a case's generate ran with (off when the case does not say it was on), with the
    `eos_token_id` / `pad_token_id` it records and otherwise the config's, as HF's generation config takes
    them."""
    record = _generation_record(meta)
    if not _stopping_enabled(record):
        return BatchStopping.off()
    eos = record.get("eos_token_id")
    eos_ids = None if eos in (None, [], ()) else tuple(int(i) for i in eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return BatchStopping.for_config(cfg, eos_ids, record.get("pad_token_id"))


def _compare_llm_run(cmp: Comparer, loaded, ids: torch.Tensor, mask: torch.Tensor, mm: MultimodalInputs | None,
                     image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
                     tol: dict[str, float], stopping: BatchStopping, sampling: str | None = None) -> None:
    """Prefill with a trace, then greedy KV-cache decode as generate() runs it (engine.models.thinker.greedy);
    compare every LLM-side output the case holds. A case whose generate sampled (`sampling`, case_sampling)
    has its decode outputs reported not comparable: its draws are not reproduced, and a greedy decode of it
    would pass or fail by chance."""
    llm, numerics, cfg = loaded.llm, loaded.numerics, loaded.config.llm
    dev = loaded.device  # inputs go where the model runs; Comparer brings results back to the CPU
    ids, mask = ids.to(dev), mask.to(dev)
    image_grid_thw = image_grid_thw.to(dev) if image_grid_thw is not None else None
    video_grid_thw = video_grid_thw.to(dev) if video_grid_thw is not None else None
    outputs = cmp.outputs
    valid = mask.bool()
    b = ids.shape[0]
    logits_atol, hidden_atol, weights_atol = tol["logits"], tol["hidden"], tol["router_weights"]
    with torch.inference_mode():
        position_ids, deltas = rope_index(ids, PositionTokens.from_config(cfg), image_grid_thw, video_grid_thw, mask)
        embeds, image_mask, audio_mask = llm.prepare_inputs(ids, mm)
        cache = llm.new_cache(b, numerics)  # each layer's part on that layer's device
        cache.rope_deltas = deltas
        trace: dict = {}
        logits = llm(embeds, position_ids, numerics, mask, cache, image_mask, audio_mask, trace=trace)

        cmp.exact("position_ids", position_ids)
        cmp.exact("rope_deltas", deltas)
        cmp.close("inputs_embeds", trace["inputs_embeds"], hidden_atol, valid)
        for i, h in enumerate(trace["layer_output"]):
            if f"layer_output.{i}" in outputs:
                cmp.close(f"layer_output.{i}", h, hidden_atol, valid)
        cmp.close("last_hidden_state", trace["last_hidden_state"], hidden_atol, valid)
        cmp.close("logits", logits, logits_atol, valid)
        if "image_mask" in outputs:
            cmp.exact("image_mask", image_mask if image_mask is not None else torch.zeros_like(ids), valid)
        if "audio_mask" in outputs:
            cmp.exact("audio_mask", audio_mask if audio_mask is not None else torch.zeros_like(ids), valid)
        for layer_idx, traces in trace.get("routers", {}).items():
            t = traces[0]
            key = f"router.layer{layer_idx}"
            sid, sw = _sorted_route(t.ids, t.weights)
            cmp.exact(f"{key}.topk_ids", sid, valid, note="as sets per token")
            cmp.close(f"{key}.topk_weights", sw, weights_atol, valid)
            cmp.exact(f"{key}.gate_used", t.gate_used, valid)
            for gate, lg in t.logits.items():
                if f"{key}.logits.{gate}" in outputs:
                    cmp.close(f"{key}.logits.{gate}", lg, logits_atol, valid)
            if f"{key}.margin" in outputs:
                mlp = llm.model.layers[layer_idx].mlp
                routers = {0: mlp.gate, 1: getattr(mlp, "image_gate", mlp.gate), 2: getattr(mlp, "audio_gate", mlp.gate)}
                names = {0: "text", 1: "image", 2: "audio"}
                flat_used = t.gate_used.reshape(-1)
                margin = torch.empty(flat_used.shape, device=flat_used.device)
                for code, router in routers.items():
                    sel = flat_used == code
                    if sel.any():
                        margin[sel] = _router_margin(router, t.logits[names[code]].reshape(flat_used.shape[0], -1)[sel])
                cmp.close(f"{key}.margin", margin.view(t.gate_used.shape), logits_atol, valid)

        # Greedy KV-cache decode exactly as generate() runs it (a finished row is fed and emits the pad token).
        # With EOS stopping on the recorded width is where every row had finished or max_new_tokens: decoding
        # up to it ends at the same step either way.
        if sampling:
            cmp.not_comparable([n for n in outputs if n == "generated_ids" or n.startswith("decode_")],
                               f"sampled ({sampling}); the harness reproduces greedy decoding only")
            return
        max_new = outputs["generated_ids"].shape[1] if "generated_ids" in outputs else 0
        decoded = greedy_decode_batch(llm, numerics, cache, logits[:, -1], deltas, max_new, stopping, trace=True)
        dec_routes: dict[int, list] = {}
        for dtrace in decoded.traces:
            for layer_idx, traces in dtrace.get("routers", {}).items():
                dec_routes.setdefault(layer_idx, []).append(traces[0])
        if max_new:
            positions = decoded.positions
            cmp.exact("generated_ids", decoded.tokens)
            dl = decoded.logits
            cmp.close("decode_logits", dl, logits_atol)
            if "decode_position_ids" in outputs:
                cmp.exact("decode_position_ids", torch.stack(positions))
            if "decode_argmax_margin" in outputs:
                top2 = dl.topk(2, dim=-1).values
                cmp.close("decode_argmax_margin", top2[..., 0] - top2[..., 1], logits_atol)
            for layer_idx, steps in dec_routes.items():
                key = f"decode_router.layer{layer_idx}"
                sid, sw = _sorted_route(torch.cat([s.ids for s in steps], dim=1), torch.cat([s.weights for s in steps], dim=1))
                cmp.exact(f"{key}.topk_ids", sid, note="as sets per token")
                cmp.close(f"{key}.topk_weights", sw, weights_atol)
                cmp.exact(f"{key}.gate_used", torch.cat([s.gate_used for s in steps], dim=1))


AUDIO_SPAN_INPUTS = ("query_embeds_audio", "query_embeds_audio_lengths", "placeholder_audio_loc_lens")


def llm_case_inputs(case_dir: Path, tokens: PositionTokens | None = None) -> tuple[
        torch.Tensor, torch.Tensor, MultimodalInputs, torch.Tensor | None, torch.Tensor | None]:
    """(ids, mask, multimodal inputs, image_grid_thw, video_grid_thw) of an `llm` case: token ids plus
    ready-made embeddings for the image/video slots and the audio spans. InputNotRecorded names an input the
    case needs and left out: its ids, the rest of a partly recorded audio set, and (given the model's `tokens`)
    the embeddings and grid of each kind of patch its ids hold."""
    inputs = load_inputs(case_dir)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    if any(name in inputs for name in AUDIO_SPAN_INPUTS):
        inputs.require(*AUDIO_SPAN_INPUTS)
    if tokens is not None:
        for kind, patch in (("image", tokens.image_patch), ("video", tokens.video_patch)):
            if (ids == patch).any():
                inputs.require(f"query_embeds_{kind}", f"{kind}_grid_thw")
    audio_spans: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(ids.shape[0])]
    if "query_embeds_audio" in inputs:
        feats, lens, locs = inputs["query_embeds_audio"], inputs["query_embeds_audio_lengths"], inputs["placeholder_audio_loc_lens"]
        for r in range(ids.shape[0]):
            offset = 0
            for j in range(locs.shape[1]):
                start, n = int(locs[r, j, 0]), int(locs[r, j, 1])
                if n:
                    audio_spans[r].append(AudioSpan(start, feats[r, offset: offset + int(lens[r, j])], n))
                offset += int(lens[r, j])
    mm = MultimodalInputs(image_embeds=inputs.get("query_embeds_image"), video_embeds=inputs.get("query_embeds_video"),
                          audio_spans=audio_spans)
    return ids, mask, mm, inputs.get("image_grid_thw"), inputs.get("video_grid_thw")


def run_llm_case(case_dir: Path) -> list[ParityRow]:
    """Kind `llm`: a standalone BailingMoeV2 checkpoint fed token ids and ready-made embeddings."""
    meta = json.loads((case_dir / "meta.json").read_text())
    cmp = Comparer(case_dir.name, load_file(str(case_dir / "outputs.safetensors")), held_only=True)
    tokens = PositionTokens.from_config(MingConfig.from_file(case_dir).llm)  # (inputs checked before the load)
    ids, mask, mm, image_grid_thw, video_grid_thw = llm_case_inputs(case_dir, tokens)
    loaded = load_model(case_dir, dtype="fp32", device=DEVICE)
    _compare_llm_run(cmp, loaded, ids, mask, mm, image_grid_thw, video_grid_thw, _tolerances(meta),
                     case_stopping(meta, loaded.config.llm), case_sampling(meta))
    return cmp.rows + cmp.missing()


PLACEHOLDERS = {"<IMAGE>": "image", "<AUDIO>": "audio", "<VIDEO>": "video"}
_TURN = re.compile(r"<role>(SYSTEM|HUMAN|ASSISTANT)</role>(.*?)(?:<\|role_end\|>|$)", re.S)
_THINKING = re.compile(r"\n\ndetailed thinking (on|off)$")


def conversation_from_prompt(text: str, media: dict[str, list]) -> tuple[list[dict], str | None, bool]:
    """Recover (messages, system prompt, thinking) from a reference prompt string whose media are
    still `<IMAGE>`/`<AUDIO>`/`<VIDEO>` placeholders; `media[kind]` supplies sources in order."""
    queues = {k: list(v) for k, v in media.items()}
    messages, system, thinking = [], None, False
    for role, body in _TURN.findall(text):
        if role == "SYSTEM":
            m = _THINKING.search(body)
            thinking = bool(m and m.group(1) == "on")
            system = body[: m.start()] if m else body
            continue
        if role == "ASSISTANT":
            if body:
                messages.append({"role": "assistant", "content": body})
            continue
        parts = []
        for piece in re.split(r"(<IMAGE>|<AUDIO>|<VIDEO>)", body):
            if piece in PLACEHOLDERS:
                kind = PLACEHOLDERS[piece]
                if not queues.get(kind):
                    raise ValueError(f"the prompt has more {piece} placeholders than the case has {kind} inputs")
                source = queues[kind].pop(0)
                # a dict is a whole element: the source under its kind plus the message's options
                parts.append({"type": kind, **source} if isinstance(source, dict) else {"type": kind, kind: source})
            elif piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": "user", "content": parts})
    return messages, system, thinking


def _processor_for(case_dir: Path, loaded=None):
    """The tokenizer and processor a case was run with: meta.json's `processor_settings` (the reference
    processor's own settings, preprocessor_config.json keys) when it records them."""
    tok = MingTokenizer(case_dir)
    cfg = loaded.config if loaded is not None else None
    meta_path = case_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    recorded = meta.get("processor_settings")
    if cfg is not None:
        settings = MediaSettings.for_checkpoint(case_dir, cfg, recorded)
    else:  # no model: the processor of the release whose tree made the case (its recorded settings, if any)
        release = "preview" if "preview" in str((meta.get("environment") or {}).get("upstream", "")).lower() else "2.0"
        image = (ImageProcessorConfig.from_dict(recorded, release=release) if recorded
                 else ImageProcessorConfig.for_release(release))
        audio = AudioFrontendConfig.from_dict(recorded) if recorded else AudioFrontendConfig()
        interleaved = release != "preview" and bool((recorded or {}).get("use_interleaved_frame_timestamp", True))
        settings = MediaSettings(image=image, audio=audio, interleaved_video=interleaved)
    return tok, MingProcessor(tok, settings)


_RAW_MEDIA = re.compile(r"raw\.(image|audio|video)(\d+)")
_RAW_VIDEO_FRAME = re.compile(r"raw\.video(\d+)[._]frame(\d+)")
_RAW_FETCHED_IMAGE = re.compile(r"raw\.image(\d+)_resized_by_fetch_image")


@dataclass
class CaseMedia:
    """The raw media of an `mm` case in prompt order: images [H, W, 3] uint8, audio waveforms, videos
    (a list of [H, W, 3] uint8 frames each, from ``raw.video<i>`` [T, H, W, 3] or
    ``raw.video<i>.frame<j>`` / ``raw.video<i>_frame<j>``), Stage-A images the reference recorded
    (``raw.image<i>_resized_by_fetch_image``, by position in ``images``), and the raw inputs we cannot
    place."""

    images: list
    audios: list
    videos: list[list]
    fetched_images: dict[int, tuple[str, torch.Tensor]]
    unknown: list[str]
    audio_names: list[str] = field(default_factory=list)  # the raw input name of each of `audios`


def case_media(inputs: dict[str, torch.Tensor]) -> CaseMedia:
    """Sort a case's ``raw.*`` inputs; numbered items keep their numbers' order (raw.image10 after
    raw.image9)."""
    found: dict[str, dict[int, torch.Tensor]] = {"image": {}, "audio": {}, "video": {}}
    frames: dict[int, dict[int, torch.Tensor]] = {}
    fetched: dict[int, torch.Tensor] = {}
    unknown = []
    for key, value in inputs.items():
        if not key.startswith("raw."):
            continue
        if m := _RAW_MEDIA.fullmatch(key):
            found[m.group(1)][int(m.group(2))] = value
        elif m := _RAW_VIDEO_FRAME.fullmatch(key):
            frames.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
        elif m := _RAW_FETCHED_IMAGE.fullmatch(key):
            fetched[int(m.group(1))] = value
        else:
            unknown.append(key)
    videos: dict[int, list] = {}
    for i, video in found["video"].items():
        if video.dim() == 4 and video.shape[-1] == 3:
            videos[i] = [f.numpy() for f in video]
        else:
            unknown.append(f"raw.video{i} (shape {list(video.shape)}, expected [T, H, W, 3])")
    for i, numbered in frames.items():
        if i in videos:
            unknown.append(f"raw.video{i} given both whole and frame by frame")
        else:
            videos[i] = [numbered[j].numpy() for j in sorted(numbered)]
    image_numbers = sorted(found["image"])
    for i in [i for i in fetched if i not in found["image"]]:
        unknown.append(f"raw.image{i}_resized_by_fetch_image (no raw.image{i})")
    return CaseMedia(images=[found["image"][i].numpy() for i in image_numbers],
                     audios=[found["audio"][i] for i in sorted(found["audio"])],
                     videos=[videos[i] for i in sorted(videos)],
                     fetched_images={image_numbers.index(i): (f"raw.image{i}_resized_by_fetch_image", v)
                                     for i, v in fetched.items() if i in found["image"]},
                     unknown=sorted(unknown),
                     audio_names=[f"raw.audio{i}" for i in sorted(found["audio"])])


def require_placed_media(prompt_text: str, raw: CaseMedia) -> None:
    """InputNotRecorded when the prompt places more media of a kind than the case's raw inputs hold (nothing of
    an `mm` case can be computed without its whole prompt)."""
    for placeholder, kind in PLACEHOLDERS.items():
        wanted, held = prompt_text.count(placeholder), len(getattr(raw, f"{kind}s"))
        if wanted > held:
            raise InputNotRecorded(f"raw.{kind}<i> (the prompt places {wanted} {kind}(s), the case records {held})")


def _video_parts(meta: dict, videos: list[list]) -> list[dict]:
    """The video elements of an `mm` case's message: frames plus the recorded ``message_video_options``
    (one dict for every video, or a list with one per video), checked strictly."""
    recorded = meta.get("message_video_options")
    per_video = recorded if isinstance(recorded, list) else [recorded] * len(videos)
    if len(per_video) != len(videos):
        raise ValueError(f"message_video_options lists {len(per_video)} videos, the case has {len(videos)}")
    parts = []
    for frames, options in zip(videos, per_video):
        VideoOptions.from_message(options, strict=True)
        parts.append({**(options or {}), "video": frames})
    return parts


def reference_frame_orders(processor: MingProcessor, parts: list[dict],
                           reference: torch.Tensor | None) -> list[dict]:
    """The video elements with their frames in the order the reference read them. It read a video's
    frames from files in a directory (sorted(os.listdir)); from 11 frames on, plain names (frame10
    before frame2) and zero-padded ones (time order) differ and the case does not say which it wrote:
    the order whose patches the reference's own ``pixel_values_videos`` holds is kept."""
    from engine.tools.frontend_parity import numbered_file_orders

    if reference is None or all(len(numbered_file_orders(len(p["video"]))) == 1 for p in parts):
        return parts
    out, offset = [], 0
    for part in parts:
        best = None
        for order in numbered_file_orders(len(part["video"])):
            candidate = {**part, "video": [part["video"][i] for i in order]}
            pixels = processor._video(candidate, candidate["video"]).pixel_values
            diff = _max_diff(pixels, reference[offset:offset + pixels.shape[0]])
            if best is None or diff < best[0]:
                best = (diff, candidate, pixels.shape[0])
        out.append(best[1])
        offset += best[2]
    return out


def run_mm_case(case_dir: Path) -> list[ParityRow]:
    """Kind `mm`: raw images, audio and videos through our processor, encoders and LLM, end to end."""
    meta = json.loads((case_dir / "meta.json").read_text())
    inputs = load_inputs(case_dir)
    outputs = load_file(str(case_dir / "outputs.safetensors"))
    tol = meta.get("suggested_tolerance", {})
    raw = case_media(inputs)
    require_placed_media(meta["prompt_text_before_expansion"], raw)  # (before the load)
    loaded = load_model(case_dir, dtype="fp32", device=DEVICE)
    _, processor = _processor_for(case_dir, loaded)
    # each waveform's rate as the case records it (its tensor record, else meta.json's), else the Whisper
    # front end's 16 kHz; the processor resamples to 16 kHz as the reference does
    rates = [_input_rate(meta, name, _recorded_rate(meta), processor.settings.audio.sample_rate)
             for name in raw.audio_names]
    media = {"image": raw.images, "audio": [(a, r) for a, r in zip(raw.audios, rates)],
             "video": reference_frame_orders(processor, _video_parts(meta, raw.videos), inputs.get("pixel_values_videos"))}
    messages, system, thinking = conversation_from_prompt(meta["prompt_text_before_expansion"], media)
    prompt = processor.build(messages, system_prompt=system, thinking=thinking)

    # Processor outputs are checked as outputs of ours against the reference's recorded inputs.
    cmp = Comparer(case_dir.name, {**{f"processor.{k}": v for k, v in inputs.items() if not k.startswith("raw.")},
                                   **outputs})
    cmp.rows += [ParityRow(case_dir.name, key, float("nan"), "-", False, "raw input the harness cannot place")
                 for key in raw.unknown]
    for pos, (name, fetched) in sorted(raw.fetched_images.items()):
        cmp.outputs[name] = fetched
        ours = np.array(fetch_image(raw.images[pos], processor.settings.image.release))
        cmp.exact(name, torch.from_numpy(ours), note="our fetch_image (Stage A)")
    ids = torch.tensor([prompt.ids])
    cmp.exact("processor.input_ids", ids)
    cmp.exact("processor.attention_mask", torch.ones_like(ids))
    if prompt.images:
        cmp.close("processor.pixel_values", prompt.pixel_values, float(tol.get("pixel_values_atol", 1e-6)))
        cmp.exact("processor.image_grid_thw", prompt.image_grid_thw)
    if prompt.videos:
        cmp.close("processor.pixel_values_videos", prompt.pixel_values_videos, float(tol.get("pixel_values_atol", 1e-6)))
        cmp.exact("processor.video_grid_thw", prompt.video_grid_thw)
    packed = prompt.packed_audio()
    if packed is not None:
        # FFT rounding differs between CPU instruction sets (log10 magnifies it near the floor).
        cmp.close("processor.audio_feats", packed[0], max(float(tol.get("audio_feats_atol", 1e-5)), 1e-4))
        cmp.exact("processor.audio_feats_lengths", packed[1])
        cmp.exact("processor.audio_placeholder_loc_lens", torch.tensor([[list(s) for s in prompt.audio_spans]]))

    engine = Engine(loaded, processor.tokenizer, is_demo=False)
    enc = loaded.encoders
    with torch.inference_mode():
        mm = engine.encode_media(prompt)
        if prompt.images and "vision_encoder_out" in outputs:
            dev = next(enc.vision.parameters()).device
            cmp.close("vision_encoder_out", enc.vision(prompt.pixel_values.to(dev), prompt.image_grid_thw.to(dev)),
                      float(tol.get("vision_embeds_atol", 1e-5)))
        if mm.image_embeds is not None and "vision_embeds" in outputs:
            cmp.close("vision_embeds", mm.image_embeds, float(tol.get("vision_embeds_atol", 1e-5)))
        if mm.video_embeds is not None and "video_embeds" in outputs:
            cmp.close("video_embeds", mm.video_embeds, float(tol.get("vision_embeds_atol", 1e-5)))
        if packed is not None:
            dev = next(enc.audio.parameters()).device
            embeds, lengths, enc_out = encode_audio_wrapped(enc.audio, enc.linear_proj_audio,
                                                            *(t.to(dev) for t in packed))
            audio_atol = float(tol.get("audio_embeds_atol", 1e-5))
            if "audio_encoder_out" in outputs:
                cmp.close("audio_encoder_out", enc_out, audio_atol)
            if "audio_embeds" in outputs:
                cmp.close("audio_embeds", embeds, audio_atol)
            if "audio_embeds_lengths" in outputs:
                cmp.exact("audio_embeds_lengths", lengths)
    _compare_llm_run(cmp, loaded, ids, torch.ones_like(ids), mm, prompt.image_grid_thw, prompt.video_grid_thw,
                     _tolerances(meta), case_stopping(meta, loaded.config.llm), case_sampling(meta))
    return cmp.rows + cmp.missing()


MEDIA_USED = {"image": "image_used", "audio": "audio_used", "video": "video_used"}  # meta.json keys, by kind
_RATE_KEYS = ("sampling_rate", "sample_rate")  # where a case records an audio rate (config.json / meta.json)


class UnplacedMedium(ValueError):
    """A medium a `prompts` case names that the harness cannot find or load."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _input_names(case: Path) -> set[str]:
    path = case / "inputs.safetensors"
    if not path.is_file():
        return set()
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _recorded_rate(record: dict) -> int | None:
    for key in _RATE_KEYS:
        if record.get(key) is not None:
            return int(record[key])
    return None


def _input_rate(meta: dict, name: str, case_rate: int | None, default: int | None,
                words: bool = True) -> int | None:
    """The rate one input waveform of a case was recorded at: its tensor record's sample_rate key, else
    `case_rate`, else (with `words`) a rate the record's meaning states, else `default`
    (frontend_parity's rule)."""
    from engine.tools.frontend_parity import recorded_input_rate

    spec = next((t for t in meta.get("tensors", []) if t.get("file") == "inputs.safetensors"
                 and t.get("name") == name), {})
    if not words:
        spec = {k: v for k, v in spec.items() if k != "meaning"}
    return recorded_input_rate(spec, case_rate, default)


def _locate_medium(root: Path, text: str) -> tuple[Path, str]:
    """The sibling case and input tensor a `<kind>_used` record names: '... <case> <input> ...', or a bare
    input name held by exactly one sibling case."""
    words = re.findall(r"[\w.-]+", text)
    for case, name in zip(words, words[1:]):
        if (root / case).is_dir() and name in _input_names(root / case):
            return root / case, name
    bare = text.strip()
    holders = sorted(p for p in root.iterdir() if p.is_dir() and bare in _input_names(p)) if root.is_dir() else []
    if len(holders) == 1:
        return holders[0], bare
    where = f"several cases hold {bare!r}: {', '.join(p.name for p in holders)}" if holders else \
        f"no sibling case in {root} holds an input it names"
    raise UnplacedMedium(f"cannot place {text!r}: {where}")


def _load_medium(kind: str, text: str, root: Path, meta: dict):
    """One recorded medium as the processor takes it: an image [H, W, 3] uint8, or (waveform, rate) with
    the rate the prompts case or the source case records."""
    case, name = _locate_medium(root, text)
    tensor = load_file(str(case / "inputs.safetensors"))[name]
    if kind == "image":
        return tensor.numpy()
    if kind == "audio":
        source_meta = _read_json(case / "meta.json")
        case_rate = next((r for r in (_recorded_rate(meta), _recorded_rate(_read_json(case / "config.json")),
                                      _recorded_rate(source_meta)) if r is not None), None)
        rate = _input_rate(source_meta, name, case_rate, None, words=False)
        if rate is None:
            raise UnplacedMedium(f"no sampling rate recorded for {text!r} (meta.json or {case.name}/config.json "
                                 f"{' / '.join(_RATE_KEYS)})")
        return tensor, rate
    raise UnplacedMedium(f"cannot place {kind} {text!r}: the prompts harness places images and audio only")


def _fixture_media(case_dir: Path, meta: dict, sub: dict) -> dict[str, list]:
    """The media one `prompts` sub-case uses, in prompt order: its own or the case's `<kind>_used` records
    (one, repeated for every placeholder of its kind, or one per placeholder), read from the sibling cases
    they name. Anything it cannot place raises UnplacedMedium naming it."""
    media: dict[str, list] = {}
    for placeholder, kind in PLACEHOLDERS.items():
        wanted = sub["prompt_text"].count(placeholder)
        if not wanted:
            continue
        record = sub.get(MEDIA_USED[kind], meta.get(MEDIA_USED[kind]))
        if record is None:
            raise UnplacedMedium(f"{wanted} {placeholder} placeholder(s) but no {MEDIA_USED[kind]} recorded")
        records = [record] if isinstance(record, str) else list(record)
        if len(records) == 1:
            records = records * wanted
        if len(records) != wanted:
            raise UnplacedMedium(f"{wanted} {placeholder} placeholder(s) but {len(records)} {MEDIA_USED[kind]} "
                                 "records")
        loaded: dict[str, object] = {}
        for r in records:
            if r not in loaded:
                loaded[r] = _load_medium(kind, r, case_dir.parent, meta)
        media[kind] = [loaded[r] for r in records]
    return media


def run_prompts_case(case_dir: Path) -> list[ParityRow]:
    """Prompt strings and ids of chat, image, audio and ASR tasks built by our processor."""
    meta = json.loads((case_dir / "meta.json").read_text())
    outputs = load_file(str(case_dir / "outputs.safetensors"))
    cmp = Comparer(case_dir.name, outputs)
    _, processor = _processor_for(case_dir)
    for sub in meta["cases"]:
        name = sub["name"]
        try:
            media = _fixture_media(case_dir, meta, sub)
        except UnplacedMedium as e:
            cmp.rows.append(ParityRow(case_dir.name, f"{name}.media", float("nan"), "-", False, str(e)))
            continue
        messages, system, thinking = conversation_from_prompt(sub["prompt_text"], media)
        prompt = processor.build(messages, system_prompt=system, thinking=thinking, assistant_prefix=sub.get("lang_suffix"))
        if "expanded_text" not in sub:
            cmp.not_recorded(f"{name}.expanded_text")
        else:
            same = prompt.text == sub["expanded_text"]
            cmp.rows.append(ParityRow(case_dir.name, f"{name}.expanded_text", 0.0 if same else 1.0, "exact", same,
                                      "" if same else "prompt string differs"))
        cmp.exact(f"{name}.input_ids", torch.tensor([prompt.ids]))
        if f"{name}.audio_placeholder_loc_lens" in outputs:
            cmp.exact(f"{name}.audio_placeholder_loc_lens", torch.tensor([[list(s) for s in prompt.audio_spans]]))
        if f"{name}.image_grid_thw" in outputs:
            cmp.exact(f"{name}.image_grid_thw", prompt.image_grid_thw)
    cmp.rows += _expansion_rows(case_dir.name, meta, processor)
    return cmp.rows + cmp.missing()


def _expansion_rows(case: str, meta: dict, processor: MingProcessor) -> list[ParityRow]:
    """meta.json's `expansion_counts` table, each entry as our processor expands it (spec §6.2): an image
    entry's <imagePatch> count for its grid, an audio entry's <audioPatch> count for its mel frames
    (spec §5.4), a video entry's <framePatch> count for its grid, and each one's expanded string where
    recorded (a video's needs its timestamps in 2.0). An entry of another kind is a failed row."""
    rows = []
    merge = processor.settings.image.merge_size

    def row(label: str, got, want, note: str = "") -> None:
        ok = got == want
        diff = float(abs(got - want)) if isinstance(got, int) else (0.0 if ok else 1.0)
        rows.append(ParityRow(case, label, diff, "exact", ok, "" if ok else note or f"ours {got}, reference {want}"))

    for i, entry in enumerate(meta.get("expansion_counts") or []):
        if not isinstance(entry, dict):
            continue
        expanded = entry.get("expanded") if isinstance(entry.get("expanded"), str) else None
        if "image_grid_thw" in entry and "n_imagePatch" in entry:
            grid = [int(v) for v in entry["image_grid_thw"]]
            got = image_token_count(grid, merge)
            row(f"expansion_counts[{i}].n_imagePatch (grid {grid})", got, int(entry["n_imagePatch"]))
            if expanded is not None:
                row(f"expansion_counts[{i}].expanded (grid {grid})", image_prompt_text(got), expanded,
                    "expanded placeholder differs")
        elif "video_grid_thw" in entry and "n_framePatch" in entry:
            grids = entry["video_grid_thw"]
            grids = [[int(v) for v in g] for g in (grids if grids and isinstance(grids[0], list) else [grids])]
            label = f"expansion_counts[{i}].%s (video grid {grids})"
            row(label % "n_framePatch", sum(image_token_count(g, merge) for g in grids), int(entry["n_framePatch"]))
            stamps = next((entry[k] for k in ("timestamps", "video_timestamps_seconds") if k in entry), None)
            if expanded is not None:
                interleaved = processor.settings.interleaved_video
                if interleaved and stamps is None:
                    rows.append(ParityRow(case, label % "expanded", float("nan"), "exact", False,
                                          "no timestamps recorded for the interleaved expansion"))
                else:
                    split = [[1, h, w] for t, h, w in grids for _ in range(t)] if interleaved else grids
                    row(label % "expanded", video_prompt_text(stamps or [], split, merge, interleaved=interleaved),
                        expanded, "expanded placeholder differs")
        elif "mel_frames" in entry and "n_audioPatch" in entry:
            frames = int(entry["mel_frames"])
            label = f"expansion_counts[{i}].%s (mel_frames {frames})"
            try:
                got = audio_token_count(frames, processor.settings.audio.projector)
            except MediaError as e:
                rows.append(ParityRow(case, label % "n_audioPatch", float("nan"), "exact", False, str(e)))
                continue
            row(label % "n_audioPatch", got, int(entry["n_audioPatch"]))
            if expanded is not None:
                row(label % "expanded", AUDIO_START + AUDIO_PATCH * got + AUDIO_END, expanded,
                    "expanded placeholder differs")
        else:
            rows.append(ParityRow(case, f"expansion_counts[{i}]", float("nan"), "exact", False,
                                  f"entry not compared: keys {sorted(entry)}"))
    return rows


def run_rope_index_case(case_dir: Path) -> list[ParityRow]:
    """Each sub-case's position ids and deltas; a sub-case without an input it needs (its ids, the grids of the
    patches its ids hold) has its rows failed, naming the input."""
    meta = json.loads((case_dir / "meta.json").read_text())
    inputs = load_inputs(case_dir)
    outputs = load_file(str(case_dir / "outputs.safetensors"))
    cmp = Comparer(case_dir.name, outputs)
    # the 2.0 function's use_interleaved_frame_timestamp defaults to True; the Preview tree's has no such path
    preview = "preview" in str((meta.get("environment") or {}).get("upstream", "")).lower()
    for sub in meta["cases"]:
        name, c = sub["name"], sub["config"]
        interleaved = sub.get("use_interleaved_frame_timestamp", meta.get("use_interleaved_frame_timestamp", not preview))
        tokens = PositionTokens(image_patch=c["image_patch_token"], video_patch=c["video_patch_token"],
                                image_start=c["image_start_token"], video_start=c["video_start_token"],
                                interleaved_video=bool(interleaved) and not preview,
                                # the model hard-sets 2 on its own config (spec §1.4 item 7)
                                spatial_merge_size=c.get("spatial_merge_size", UPSTREAM_SPATIAL_MERGE_SIZE))
        get = lambda k: inputs.get(f"{name}.{k}")  # noqa: E731
        try:  # the inputs the sub-case lists as present, its ids, and the grids of the patches its ids hold
            ids = inputs[f"{name}.input_ids"]
            inputs.require(*(f"{name}.{key}" for key in sub.get("present_inputs") or []))
            inputs.require(*(f"{name}.{key}" for key, patch in (("image_grid_thw", tokens.image_patch),
                                                                ("video_grid_thw", tokens.video_patch))
                             if (ids == patch).any()))
        except InputNotRecorded as e:
            cmp.input_missing(e, (f"{name}.",), f"{name}.*")
            continue
        pos, deltas = rope_index(ids, tokens, get("image_grid_thw"), get("video_grid_thw"), get("attention_mask"),
                                 float(sub.get("scale_factor", 2.0)), get("second_per_grid_ts"))
        cmp.exact(f"{name}.position_ids", pos)
        cmp.exact(f"{name}.rope_deltas", deltas)
    return cmp.rows + cmp.missing()


def _frontend_runner() -> Callable[[Path], list] | None:
    try:
        from engine.tools.frontend_parity import run_frontend_case
    except ImportError:
        return None
    return run_frontend_case


def run_names_case(case_dir: Path) -> list[ParityRow]:
    """A `names` case (no weights): the full-size thinker of each subfolder's real config, built by our
    code on the meta device, must hold exactly upstream's state_dict entries with their shapes
    (names.txt; the rotary `inv_freq` buffers of nonpersistent_buffers.txt are computed, not stored),
    and the parameter totals of meta.json. Dtypes are not compared: upstream's are those of construction
    under bf16 (meta.json says the released files may differ)."""
    from engine.loader import checkpoint_entries
    from engine.models.thinker.model import build_thinker

    meta = json.loads((case_dir / "meta.json").read_text())
    rows = []
    for sub in meta.get("subfolders") or {}:
        folder, case = case_dir / sub, f"{case_dir.name}/{sub}"
        upstream = {}
        for line in (folder / "names.txt").read_text().splitlines():
            name, shape, _dtype = line.split("\t")
            upstream[name] = tuple(json.loads(shape))
        ours, have = {}, {}  # have: parameters (stored buffers left out, as upstream counts) per top-level prefix
        for prefix, module in build_thinker(MingConfig.from_file(folder / "config.json"), "meta").items():
            ours.update(checkpoint_entries(module, prefix=prefix))
            for name, param in module.named_parameters(prefix=prefix):
                top = name.split(".")[0]
                have[top] = have.get(top, 0) + param.numel()
        missing, extra = sorted(upstream.keys() - ours.keys()), sorted(ours.keys() - upstream.keys())
        reshaped = sorted(n for n in upstream.keys() & ours.keys() if upstream[n] != ours[n])

        def listed(names: list[str], what: str) -> str:
            return f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" if names else ""

        rows.append(ParityRow(case, f"names ({len(upstream)} entries)", float(len(missing) + len(extra)), "exact",
                              not missing and not extra, "; ".join(filter(None, [listed(missing, "missing"),
                                                                                   listed(extra, "not upstream's")]))))
        rows.append(ParityRow(case, "shapes", float(len(reshaped)), "exact", not reshaped,
                              listed([f"{n} {ours[n]} vs {upstream[n]}" for n in reshaped], "differ")))
        want = meta["summary"][sub]["parameters_per_top_level_prefix"]
        diff = sum(abs(have.get(k, 0) - v) for k, v in want.items()) + sum(v for k, v in have.items() if k not in want)
        rows.append(ParityRow(case, f"parameters ({sum(want.values()):,})", float(diff), "exact", diff == 0))
    if not rows:
        rows.append(ParityRow(case_dir.name, "-", float("nan"), "-", False, "meta.json names no subfolders"))
    return rows


def run_case(case_dir: Path) -> list[ParityRow]:
    """The rows of one case; an input it cannot run anything without is one failed row naming it."""
    try:
        return _run_case_kind(case_dir)
    except InputNotRecorded as e:
        return [ParityRow(case_dir.name, "-", float("nan"), "-", False, f"{e} (nothing computable without it)")]


def _run_case_kind(case_dir: Path) -> list[ParityRow]:
    meta_path = case_dir / "meta.json"
    if not meta_path.is_file():
        return [ParityRow(case_dir.name, "-", float("nan"), "-", False, f"no meta.json in {case_dir}")]
    meta = json.loads(meta_path.read_text())
    kind, name = meta.get("kind"), meta.get("case", case_dir.name)
    if kind == "llm":
        return run_llm_case(case_dir)
    if kind == "pure_function" and name == "rope_index":
        return run_rope_index_case(case_dir)
    if kind == "mm":
        return run_mm_case(case_dir)
    if kind == "frontend" and name == "prompts":
        return run_prompts_case(case_dir)
    if kind in ("talker", "audio_vae"):
        from engine.models.talker.parity import run_audio_vae_case, run_talker_case
        return (run_talker_case if kind == "talker" else run_audio_vae_case)(case_dir, Comparer, DEVICE)
    if kind == "imagegen":
        from engine.models.imagegen.parity import run_imagegen_case
        return run_imagegen_case(case_dir, DEVICE)
    if kind == "names":
        return run_names_case(case_dir)
    if kind == "frontend":
        runner = _frontend_runner()
        if runner is not None:
            return [ParityRow(r.case, r.tensor, r.max_abs_diff, r.tolerance, r.ok, r.note) for r in runner(case_dir)]
    return [ParityRow(case_dir.name, "-", float("nan"), "-", False, f"case kind '{kind}' is not supported yet")]


def format_table(rows: list[ParityRow]) -> str:
    head = ("case", "tensor", "max abs diff", "tolerance", "ok")
    body = [(r.case, r.tensor, f"{r.max_abs_diff:.3g}", str(r.tolerance),
             ("-" if is_not_recorded(r) else "ok" if r.ok else "FAIL") + (f"  ({r.note})" if r.note else ""))
            for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(5)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.parity", description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+", type=Path, help="case folders in the ming_ref format")
    ap.add_argument("--device", default="cpu", help="where the models run: cpu (default), cuda, cuda:1 ... "
                    "(fp32 either way; TF32 stays off so the tolerances keep their meaning)")
    args = ap.parse_args(argv)
    not_folders = [str(case) for case in args.cases if not case.is_dir()]
    if not_folders:  # (a mistyped path is no parity failure)
        ap.error(f"not a case folder: {', '.join(not_folders)}")
    problem = device_problem(args.device)
    if problem:  # (every case would fail with the same torch error)
        print(f"error: {problem}", file=sys.stderr)
        return 2
    global DEVICE
    DEVICE = args.device
    torch.backends.cuda.matmul.allow_tf32 = False  # fixtures are fp32: no TF32 matmuls or convolutions
    torch.backends.cudnn.allow_tf32 = False
    rows: list[ParityRow] = []
    for case in args.cases:
        try:
            rows += run_case(case)
        except Exception as e:  # a broken case must not hide the others
            rows.append(ParityRow(case.name, "-", float("nan"), "-", False, f"error: {type(e).__name__}: {e}"))
    print(format_table(rows))
    bad = sum(not r.ok for r in rows)
    absent = sum(is_not_recorded(r) for r in rows)
    print(f"\n{len(rows) - bad - absent} ok, {bad} not ok, {len(args.cases)} case(s)"
          + (f", {absent} output(s) not recorded" if absent else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    from engine.command import run_command

    sys.exit(run_command(main))
