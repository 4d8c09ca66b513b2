"""Parity of the encoder side (ViT, whisper encoder, projectors, L2 normalisation) against an `mm`
reference case of the `ming_ref` fixtures.

`run_mm_encoder_parity(case_dir)` builds the encoders from the case's upstream-format config.json,
strictly loads the `vision.*`, `audio.*`, `linear_proj.*` and `linear_proj_audio.*` weights of its
model.safetensors, feeds the recorded processor outputs and compares every encoder-side output the
case records, with the tolerances its meta.json suggests.

Run as ``python -m engine.encoder_parity <case_dir>`` to print the table.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from engine.audio_encoder import AudioEncoderConfig, WhisperAudioEncoder
from engine.projectors import AudioProjector, VisionProjector, encode_audio_wrapped, encode_images
from engine.vision import VisionConfig, build_vision_encoder

# Output tensor → (meta.json suggested_tolerance key, fallback). Exact (0) for integer tensors.
_TOL_KEYS = {
    "vision_encoder_out": "vision_embeds_atol",
    "vision_embeds": "vision_embeds_atol",
    "video_encoder_out": "vision_embeds_atol",
    "video_embeds": "vision_embeds_atol",
    "audio_encoder_out": "audio_embeds_atol",
    "audio_embeds": "audio_embeds_atol",
    "audio_embeds_lengths": None,
}
_DEFAULT_TOL = 1e-5


@dataclass
class ParityRow:
    case: str
    tensor: str
    max_abs_diff: float
    tolerance: float
    ok: bool


@dataclass
class MMEncoders:
    """The four encoder-side modules of a thinker checkpoint."""

    vision: nn.Module | None
    linear_proj: VisionProjector | None
    audio: WhisperAudioEncoder | None
    linear_proj_audio: AudioProjector | None


def build_mm_encoders(config: dict, *, rope_bf16_tables: bool | None = None) -> MMEncoders:
    """Encoders sized from a composite (BailingMM2) config dict; modules are absent when their
    sub-config is."""
    llm_hidden = int(config["llm_config"]["hidden_size"])
    depth = int(config.get("mlp_depth") or 2)
    vision = proj = audio = proj_a = None
    if config.get("vision_config"):
        vcfg = VisionConfig.from_dict(config["vision_config"])
        vision = build_vision_encoder(vcfg, rope_bf16_tables=rope_bf16_tables)
        proj = VisionProjector(vcfg.out_hidden_size, llm_hidden, depth)
    if config.get("audio_config"):
        acfg = AudioEncoderConfig.from_dict(config["audio_config"])
        audio = WhisperAudioEncoder(acfg)
        proj_a = AudioProjector.from_config(acfg, llm_hidden, depth)
    return MMEncoders(vision, proj, audio, proj_a)


def load_mm_encoders(case_dir: Path, dtype: torch.dtype = torch.float32) -> MMEncoders:
    """Build from `<case_dir>/config.json` and strictly load the encoder subsets of model.safetensors."""
    case_dir = Path(case_dir)
    config = json.loads((case_dir / "config.json").read_text(encoding="utf-8"))
    enc = build_mm_encoders(config)
    weights = load_file(str(case_dir / "model.safetensors"))
    for prefix, module in (("vision.", enc.vision), ("linear_proj.", enc.linear_proj),
                           ("audio.", enc.audio), ("linear_proj_audio.", enc.linear_proj_audio)):
        if module is None:
            continue
        sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
        module.to(dtype).eval()
    return enc


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


def run_mm_encoder_parity(case_dir: Path) -> list[ParityRow]:
    """Compare our encoder-side outputs with every such output the `mm` case records."""
    case_dir = Path(case_dir)
    meta = json.loads((case_dir / "meta.json").read_text(encoding="utf-8"))
    case = str(meta.get("case", case_dir.name))
    tolerances = meta.get("suggested_tolerance") or {}
    inputs = load_file(str(case_dir / "inputs.safetensors"))
    outputs = load_file(str(case_dir / "outputs.safetensors"))
    recorded = [t["name"] for t in meta.get("tensors", []) if t.get("file") == "outputs.safetensors"]
    enc = load_mm_encoders(case_dir)

    ours: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for kind, pv_key, grid_key in (("vision", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
            if enc.vision is None or pv_key not in inputs or grid_key not in inputs:
                continue
            pv, grid = inputs[pv_key], inputs[grid_key]
            ours[f"{kind}_encoder_out"] = enc.vision(pv, grid)
            ours[f"{kind}_embeds"] = encode_images(enc.vision, enc.linear_proj, pv, grid)
        if enc.audio is not None and "audio_feats" in inputs and "audio_feats_lengths" in inputs:
            embeds, lengths, enc_out = encode_audio_wrapped(
                enc.audio, enc.linear_proj_audio, inputs["audio_feats"], inputs["audio_feats_lengths"])
            ours["audio_encoder_out"] = enc_out
            ours["audio_embeds"] = embeds
            ours["audio_embeds_lengths"] = lengths

    rows: list[ParityRow] = []
    for name in recorded:
        if name not in _TOL_KEYS or name not in outputs:
            continue
        ref = outputs[name]
        tol_key = _TOL_KEYS[name]
        if f"{name}_atol" in tolerances:               # a tensor-specific suggestion wins
            tol = float(tolerances[f"{name}_atol"])
        else:
            tol = 0.0 if tol_key is None else float(tolerances.get(tol_key, _DEFAULT_TOL))
        if name not in ours:
            rows.append(ParityRow(case, name, float("inf"), tol, False))
            continue
        got = ours[name]
        if not ref.is_floating_point():
            got = got.to(ref.dtype)
        diff = _max_abs_diff(got, ref)
        rows.append(ParityRow(case, name, diff, tol, diff <= tol))
    return rows


def format_rows(rows: list[ParityRow]) -> str:
    lines = [f"{'case':<8} {'tensor':<24} {'max_abs_diff':>14} {'tolerance':>10}  ok"]
    for r in rows:
        lines.append(f"{r.case:<8} {r.tensor:<24} {r.max_abs_diff:>14.3e} {r.tolerance:>10.1e}  {r.ok}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 2:
        sys.exit("usage: python -m engine.encoder_parity <mm_case_dir>")
    result = run_mm_encoder_parity(Path(sys.argv[1]))
    print(format_rows(result))
    sys.exit(0 if result and all(r.ok for r in result) else 1)
