"""Tiny random talker / AudioVAE folders at other configurations than engine.models.talker.tiny's, for
the reference comparisons: configs in upstream format, weights under the names and shapes the plain
references (reference_talker.py, reference_vae.py) derive from the upstream classes, written as one
safetensors file that our real loaders read."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

OMIT = object()  # a key given this value is left out of the written config


def drop_omitted(d: dict) -> dict:
    return {k: drop_omitted(v) if isinstance(v, dict) else v for k, v in d.items() if v is not OMIT}


def random_state(entries: dict[str, tuple[int, ...]], seed: int, fixed: dict | None = None) -> dict[str, torch.Tensor]:
    """Weights ~ N(0, 1/fan_in) (norm weights around 1, biases small) so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(entries.items()):
        if fixed and name in fixed:
            out[name] = fixed[name].clone().float()
            continue
        x = torch.randn(shape, generator=gen)
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm_final.weight") \
                or name.endswith(("q_norm.weight", "k_norm.weight")):
            x = 1.0 + 0.1 * x
        elif name.endswith("bias") or len(shape) == 1:
            x = 0.1 * x
        elif len(shape) >= 2:
            x = x / shape[-1] ** 0.5
        out[name] = x.contiguous()
    return out


def write_folder(folder: Path, configs: dict[str, dict], state: dict[str, torch.Tensor]) -> Path:
    """configs: relative path -> JSON object (OMIT values dropped); state -> model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel, content in configs.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(drop_omitted(content), indent=1, ensure_ascii=False) + "\n")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
