"""Tiny thinker checkpoints at other sizes than the embedded one (engine.tiny): the same generator with
some config keys overridden, written as one safetensors file, for tests of sizes the fixtures never use."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from safetensors.torch import save_file

from engine.tiny import tiny_config, tiny_state_dict


OMIT = object()  # a key given this value is left out of the written config


def write_variant(out_dir: Path, llm: dict | None = None, vision: dict | None = None,
                  audio: dict | None = None, release: str = "2.0") -> Path:
    """A checkpoint folder whose config is engine.tiny's (of `release`) with `llm` / `vision` / `audio` keys
    replaced (or left out: OMIT)."""
    config = copy.deepcopy(tiny_config(release))
    for part, keys in (("llm_config", llm), ("vision_config", vision), ("audio_config", audio)):
        config[part].update(keys or {})
        for key in [k for k, v in config[part].items() if v is OMIT]:
            del config[part][key]
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tiny_state_dict(config), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
