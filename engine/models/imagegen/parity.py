"""Parity runners for the image-generation reference fixtures (`python -m engine.parity CASE...`):

* `imagegen_cond` — the raw prompt (and edit image) through our processor, the thinker pass with the
  learned queries, the connector and the L2-normalised condition;
* `imagegen_dit`  — every run of the case (text-to-image, edit, dynamic shifting): initial noise from
  the seed, schedule, per-step DiT outputs and latents, VAE decode and the uint8 image, all produced
  by our loop end to end (never re-fed the reference's intermediates);
* `imagegen_byt5` — the glyph text extraction, ByT5 ids, encoder, mapper and the appended condition
  (the model, mlp/ and connector/ of the sibling `imagegen_cond` case).

Which runner applies is decided by the case's folders (transformer/, byt5/, connector/), so held-out
cases of the same kinds run whatever they are called.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.models.imagegen.condition import Connector, condition_from_prompt, load_caption_mlp, load_query_head
from engine.models.imagegen.config import QueryHeadConfig, wrapper_switches
from engine.models.imagegen.diffusion import (CfgOptions, caption_features, decode_latents, denoise,
                                              encode_reference, latent_shape, make_scheduler, seeded_noise,
                                              vae_scale_factor)
from engine.models.imagegen.glyph import GlyphEncoder, glyph_text_from_prompt

# Tolerances where a case's meta.json suggests none (README: hidden states 1e-4, projector outputs 1e-5).
HIDDEN_ATOL = 1e-4
CONDITION_ATOL = 1e-5
EMBED_ATOL = 1e-6
PIXEL_ATOL = 1e-6
# The conditioning case whose model, mlp/ and connector/ a ByT5 case uses when its runs name none.
DEFAULT_CONDITION_CASE = "imagegen_cond"


def _tol(meta: dict, key: str, default: float) -> float:
    value = (meta.get("suggested_tolerances") or {}).get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _cond_components(case_dir: Path, device: str):
    from engine.models.thinker.model import load_model
    loaded = load_model(case_dir, dtype="fp32", device=device)
    head, _ = load_query_head(case_dir / "mlp", torch.float32, device)
    connector = Connector.load(case_dir / "connector", torch.float32, device)
    return loaded, head, connector


_RAW_IMAGE = re.compile(r"(?P<sub>.+)\.raw_image(?P<number>\d*)")  # a sub-case's input image(s), numbered from 0


def sub_case_images(inputs: dict[str, torch.Tensor], name: str) -> list:
    """The input images [H, W, 3] uint8 of conditioning sub-case `name`, in prompt order: `<name>.raw_image`
    (one image, or a stack [n, H, W, 3]), then `<name>.raw_image<i>` by number (raw_image10 after raw_image9)."""
    found = []
    for key, value in inputs.items():
        m = _RAW_IMAGE.fullmatch(key)
        if m and m["sub"] == name:
            number = int(m["number"]) if m["number"] else -1
            found += [(number, i, img) for i, img in enumerate(value if value.dim() == 4 else [value])]
    return [img.numpy() for _, _, img in sorted(found, key=lambda item: item[:2])]


def run_cond_case(case_dir: Path, device: str = "cpu") -> list:
    """Kind imagegen, conditioning: prompt -> processor -> thinker with queries -> connector."""
    from engine.runtime import Engine
    from engine.tools.parity import Comparer, InputNotRecorded, _processor_for, conversation_from_prompt, load_inputs

    meta = json.loads((case_dir / "meta.json").read_text())
    inputs = load_inputs(case_dir)
    outputs = load_file(str(case_dir / "outputs.safetensors"))
    loaded, head, connector = _cond_components(case_dir, device)
    tok, processor = _processor_for(case_dir, loaded)
    engine = Engine(loaded, tok, is_demo=False)
    cmp = Comparer(case_dir.name, {**{f"processor.{k}": v for k, v in inputs.items() if not _RAW_IMAGE.fullmatch(k)},
                                   **outputs})
    for sub in meta["cases"]:
        name = sub["name"]
        media = {"image": sub_case_images(inputs, name), "audio": [], "video": []}
        placed = sub["prompt_text"].count("<IMAGE>")
        if placed > len(media["image"]):
            missing = InputNotRecorded(f"{name}.raw_image (the prompt places {placed} image(s), the case records "
                                       f"{len(media['image'])})")
            cmp.input_missing(missing, (f"{name}.", f"processor.{name}."), f"{name}.*")
            continue
        messages, system, thinking = conversation_from_prompt(sub["prompt_text"], media)
        prompt = processor.build(messages, system_prompt=system, thinking=thinking)
        ids = torch.tensor([prompt.ids])
        cmp.exact(f"processor.{name}.input_ids", ids)
        cmp.exact(f"processor.{name}.attention_mask", torch.ones_like(ids))
        if prompt.images:
            cmp.close(f"processor.{name}.pixel_values", prompt.pixel_values, PIXEL_ATOL)
            cmp.exact(f"processor.{name}.image_grid_thw", prompt.image_grid_thw)
        with torch.inference_mode():
            mm = engine.encode_media(prompt) if prompt.images else None
            tr = condition_from_prompt(loaded.llm, loaded.numerics, head, connector, prompt.ids,
                                       mm.image_embeds if mm is not None else None, prompt.image_grid_thw)
        key = f"{name}."
        cmp.exact(key + "appended_input_ids", tr.layout.input_ids)
        cmp.exact(key + "appended_attention_mask", torch.ones_like(tr.layout.input_ids))
        cmp.exact(key + "gen_mask", tr.layout.gen_mask)
        cmp.exact(key + "llm_image_grid_thw", tr.layout.image_grid_thw)
        cmp.close(key + "llm_query_and_image_embeds", tr.slot_embeds, EMBED_ATOL)
        cmp.close(key + "llm_inputs_embeds", tr.inputs_embeds, EMBED_ATOL)
        cmp.exact(key + "position_ids", tr.position_ids)
        cmp.exact(key + "image_mask", tr.image_mask.long())
        cmp.close(key + "last_scale_hidden", tr.last_scale_hidden, HIDDEN_ATOL)
        cmp.close(key + "connector_out", tr.connector_out, HIDDEN_ATOL)
        cmp.close(key + "condition_embeds", tr.condition, CONDITION_ATOL)
        cmp.exact(key + "negative_condition_embeds", torch.zeros_like(tr.condition))
        if mm is not None and key + "input_image_embeds" in outputs:
            cmp.close(key + "input_image_embeds", mm.image_embeds, CONDITION_ATOL)
    return cmp.rows + cmp.missing()


def recorded_cfg_options(meta: dict, run: dict) -> CfgOptions:
    """The pipeline's cfg_truncation / cfg_normalization a DiT run records (the run's own, else the
    case's), the pipeline defaults where neither does (spec §8.6)."""
    pick = {}
    for field in ("truncation", "normalization"):
        key = f"cfg_{field}"
        if key in run or key in meta:
            pick[field] = run[key] if key in run else meta[key]
    return CfgOptions(**pick)


def _close_steps(cmp, name: str, per_step: list[torch.Tensor], atol: float) -> None:
    """Per-step [branches, ...] tensors stacked; when CFG truncation ran some steps on the positive branch
    alone, each step is compared on the branches it ran (the rest of the row is left out)."""
    widest = max(t.shape[0] for t in per_step)
    if all(t.shape[0] == widest for t in per_step):
        cmp.close(name, torch.stack(per_step), atol)
        return
    got = per_step[0].new_zeros((len(per_step), widest, *per_step[0].shape[1:]))
    select = torch.zeros(got.shape, dtype=torch.bool, device=got.device)
    for i, t in enumerate(per_step):
        got[i, : t.shape[0]] = t
        select[i, : t.shape[0]] = True
    cmp.close(name, got, atol, select=select)


def run_dit_case(case_dir: Path, device: str = "cpu") -> list:
    """Kind imagegen, diffusion: our scheduler setup, CFG Euler loop and VAE against every run."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel

    from engine.tools.parity import Comparer, InputNotRecorded, load_inputs

    meta = json.loads((case_dir / "meta.json").read_text())
    inputs = load_inputs(case_dir)
    cmp = Comparer(case_dir.name, load_file(str(case_dir / "outputs.safetensors")))
    transformer = ZImageTransformer2DModel.from_pretrained(str(case_dir), subfolder="transformer",
                                                           torch_dtype=torch.float32, local_files_only=True).eval().to(device)
    vae = AutoencoderKL.from_pretrained(str(case_dir), subfolder="vae", torch_dtype=torch.float32,
                                        local_files_only=True).eval().to(device)
    # The DiT wrapper reads mlp/config.json's switches and only the `mlp.*` tensors of mlp/ (ZImageLoss's
    # mlp_state_dict): a case may ship those alone, the whole query head, or no weights at all.
    mlp_dir = case_dir / "mlp"
    mlp_cfg = json.loads((mlp_dir / "config.json").read_text()) if (mlp_dir / "config.json").is_file() else {}
    caption_mlp = load_caption_mlp(mlp_dir, torch.float32, device) if list(mlp_dir.glob("*.safetensors")) else None
    identity, norm = wrapper_switches(mlp_cfg, has_caption_weights=caption_mlp is not None)
    if identity:
        caption_mlp = None
    elif caption_mlp is None:
        raise ValueError(f"{mlp_dir / 'config.json'}: use_identity_mlp is false but mlp/ ships no caption MLP "
                         "weights (mlp.fc1 ...) to run")
    head = QueryHeadConfig(scales=(1,), llm_hidden=0, connector_hidden=0, c_dim=transformer.config.cap_feat_dim,
                           dit_type=str(mlp_cfg.get("dit_type") or "zimage"), use_identity_mlp=identity,
                           text_encoder_norm=norm)
    t_lat = _tol(meta, "step_latents_* / final_latents", HIDDEN_ATOL)
    t_dit = _tol(meta, "step_dit_out", HIDDEN_ATOL)
    t_sched = _tol(meta, "timesteps / sigmas / mu", 1e-6)
    t_dec = _tol(meta, "decoded", 1e-3)
    for run, r in meta["runs"].items():
        k = f"{run}."
        try:
            inputs.require(k + "condition_embeds", *([k + "ref_pixels"] if r.get("reference_image") else []))
        except InputNotRecorded as e:
            cmp.input_missing(e, (k,), k + "*")
            continue
        folder = case_dir / r["scheduler_folder"]
        scheduler_config = json.loads((folder / "scheduler_config.json").read_text())
        cond = inputs[k + "condition_embeds"][0].to(device)
        shape = latent_shape(int(r["height"]), int(r["width"]), transformer.config.in_channels, vae_scale_factor(vae))
        latents, step_noise = seeded_noise(int(r["seed"]), shape, device)
        cmp.exact(k + "init_latents", latents)
        scheduler, mu = make_scheduler(scheduler_config, int(r["steps"]), shape[2:], device=device)
        cmp.close(k + "timesteps", scheduler.timesteps, t_sched)
        cmp.close(k + "sigmas", scheduler.sigmas, t_sched)
        cmp.close(k + "mu", torch.tensor(mu, dtype=torch.float32), t_sched)
        with torch.inference_mode():
            caption = caption_features(cond.float(), head, caption_mlp)
            negative = caption_features(torch.zeros_like(cond).float(), head, caption_mlp)
        ref = None
        if r.get("reference_image"):
            with torch.inference_mode():
                ref = encode_reference(vae, inputs[k + "ref_pixels"].to(device))
            cmp.close(k + "ref_latents", ref, t_lat)
        steps = list(denoise(transformer, scheduler, latents, caption, negative,
                             float(r["guidance_scale"]), ref, recorded_cfg_options(meta, r), step_noise))
        # The caption features of the branches the first DiT call ran: [positive, negative] with CFG, the
        # positive alone without (guidance <= 1, or truncated from the start).
        cmp.close(k + "cap_feats", torch.stack([caption, negative][: steps[0].dit_out.shape[0]]), t_dit)
        cmp.close(k + "step_latents_in", torch.stack([s.latents_in for s in steps]), t_lat)
        cmp.close(k + "step_latents_out", torch.stack([s.latents_out for s in steps]), t_lat)
        cmp.close(k + "step_model_output", torch.stack([s.model_output for s in steps]), t_dit)
        _close_steps(cmp, k + "step_dit_t", [s.dit_t for s in steps], t_sched)
        _close_steps(cmp, k + "step_dit_out", [s.dit_out for s in steps], t_dit)
        final = steps[-1].latents_out
        cmp.close(k + "final_latents", final, t_lat)
        with torch.inference_mode():
            z, decoded, image = decode_latents(vae, final)
        cmp.close(k + "vae_decode_in", z, t_lat)
        cmp.close(k + "decoded", decoded, t_dec)
        cmp.close(k + "image_uint8", torch.from_numpy(image).long(), 1.0)
    return cmp.rows + cmp.missing()


def condition_case_folder(meta: dict) -> str:
    """The sibling conditioning case a ByT5 case builds on: the folder its runs name in `condition_case`
    ('<folder>/<run>'), the public set's 'imagegen_cond' when none is named."""
    named = {str(r["condition_case"]).split("/")[0] for r in (meta.get("runs") or {}).values() if r.get("condition_case")}
    if len(named) > 1:
        raise ValueError(f"the runs' condition_case name {len(named)} folders ({', '.join(sorted(named))}); one is used")
    return named.pop() if named else DEFAULT_CONDITION_CASE


def recorded_glyph_text(run: dict) -> str:
    """A ByT5 run's `image_gen_text`: the first of the list generate() was given, or the string itself
    ('' when it records none)."""
    value = run.get("image_gen_text") or ""
    return value if isinstance(value, str) else str(value[0])


def glyph_condition(condition: torch.Tensor | None, glyph: GlyphEncoder, text: str):
    """(condition with the glyph embeddings appended, the glyph output): an empty glyph text is not encoded
    (spec §8.4), the condition stays its query tokens alone and there is no glyph output (None). No condition
    (its prompt's ids not recorded): (None, the glyph output)."""
    if not text:
        return condition, None
    g = glyph([text])
    return (None if condition is None else torch.cat([condition, g.embeds.to(condition.dtype)], dim=1)), g


def run_byt5_case(case_dir: Path, device: str = "cpu") -> list:
    """Kind imagegen, glyphs: text extraction, ByT5 ids/encoder/mapper, the appended condition."""
    from engine.tools.parity import Comparer, InputNotRecorded, ParityRow, load_inputs

    meta = json.loads((case_dir / "meta.json").read_text())
    inputs = load_inputs(case_dir)
    outputs = load_file(str(case_dir / "outputs.safetensors"))
    cmp = Comparer(case_dir.name, outputs)
    for prompt, expected in (meta.get("get_text_from_prompt") or {}).items():
        got = glyph_text_from_prompt(prompt)
        cmp.rows.append(ParityRow(case_dir.name, f"get_text_from_prompt({prompt[:32]!r})", 0.0 if got == expected else 1.0,
                                  "exact", got == expected, "" if got == expected else f"got {got!r}"))
    cond_dir = case_dir.parent / condition_case_folder(meta)
    loaded, head, connector = _cond_components(cond_dir, device)
    glyph = GlyphEncoder.load(case_dir / "byt5", torch.float32, device)
    cond_meta = json.loads((cond_dir / "meta.json").read_text())
    prompts = {c["name"]: c["prompt_text"] for c in cond_meta.get("cases", [])}
    atol = _tol(meta, "byt5_encoder_out / byt5_mapper_out / condition_embeds", CONDITION_ATOL)
    for run, r in meta["runs"].items():
        k = f"{run}."
        text = recorded_glyph_text(r)
        if str(r.get("image_gen_text_source", "")).startswith("derived"):
            # the processor reads it from the whole chat text it is given (system prompt included)
            source = prompts.get(str(r.get("condition_case", "")).split("/")[-1], "")
            got = glyph_text_from_prompt(source)
            cmp.rows.append(ParityRow(case_dir.name, k + "image_gen_text", 0.0 if got == text else 1.0, "exact",
                                      got == text, "" if got == text else f"got {got!r}"))
            text = got
        ids = inputs.get(k + "input_ids")  # the condition's prompt; the glyph rows need only the text
        with torch.inference_mode():
            query = (condition_from_prompt(loaded.llm, loaded.numerics, head, connector, ids[0].tolist()).condition
                     if ids is not None else None)
            cond, g = glyph_condition(query, glyph, text)
        glyph_rows = [k + n for n in ("byt5_input_ids", "byt5_attention_mask", "byt5_encoder_out", "byt5_mapper_out",
                                      "byt5_prompt_embeds")]
        if g is None:
            cmp.not_comparable(glyph_rows, "the glyph text is empty: it is not encoded (spec §8.4)")
        else:
            cmp.exact(glyph_rows[0], g.input_ids)
            cmp.exact(glyph_rows[1], g.attention_mask)
            for row, got in zip(glyph_rows[2:], (g.encoder_out, g.mapper_out, g.embeds)):
                cmp.close(row, got, atol)
        if cond is None:
            cmp.input_missing(InputNotRecorded(k + "input_ids"), (k + "condition_embeds", k + "negative_condition"))
            continue
        cmp.close(k + "condition_embeds", cond, atol)
        cmp.exact(k + "negative_condition_embeds", torch.zeros_like(cond))
    return cmp.rows + cmp.missing()


def run_imagegen_case(case_dir: Path, device: str = "cpu") -> list:
    if (case_dir / "transformer").is_dir():
        return run_dit_case(case_dir, device)
    if (case_dir / "byt5").is_dir():
        return run_byt5_case(case_dir, device)
    return run_cond_case(case_dir, device)
