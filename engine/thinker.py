"""The Ming "thinker": builds the modules a checkpoint describes (on the meta device first, so
nothing is allocated until weights are read) and loads them through engine.loader.

Today this is the BailingMoeV2 LLM. The vision and audio encoders and their projectors live under
the prefixes `vision.`, `audio.`, `linear_proj.` and `linear_proj_audio.` of the same checkpoint;
until they are wired in, their tensors are reported as present-but-not-loaded, never silently
accepted as something else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.config import MingConfig
from engine.layers import Numerics
from engine.llm import BailingMoeV2ForCausalLM
from engine.loader import CheckpointFiles, check_unexpected, load_module, resolve_checkpoint

ENCODER_PREFIXES = ("vision.", "audio.", "linear_proj.", "linear_proj_audio.")


def build_llm(cfg: MingConfig, device: torch.device | str = "meta") -> BailingMoeV2ForCausalLM:
    with torch.device(device):
        return BailingMoeV2ForCausalLM(cfg.llm)


@dataclass
class LoadedModel:
    """A checkpoint ready to run: config, LLM, numerics, where it came from, and load figures."""

    config: MingConfig
    llm: BailingMoeV2ForCausalLM
    numerics: Numerics
    device: torch.device
    path: Path
    not_loaded: list[str] = field(default_factory=list)
    load_seconds: float = 0.0


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype '{name}' (use one of {sorted(table)})")
    return table[name]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model(path_or_id: str | Path, dtype: str | torch.dtype = "fp32", device: str | torch.device | None = None,
               numerics: Numerics | None = None, progress=None) -> LoadedModel:
    """Load a checkpoint directory (or hub id) in the upstream format.

    `numerics` defaults to the reference's own behaviour for the dtype (bf16: rounded rotary
    tables and bf16 router, spec §2.11); pass Numerics.intent(dtype) for the fp32-intent variant.
    """
    t0 = time.perf_counter()
    root = resolve_checkpoint(path_or_id)
    cfg = MingConfig.from_file(root)
    dt = parse_dtype(dtype)
    numerics = numerics or Numerics.reference(dt)
    dev = torch.device(device) if device is not None else default_device()
    files = CheckpointFiles.open(root)
    llm = build_llm(cfg)
    with files.reader() as reader:
        consumed = load_module(llm, reader, cfg.llm_weight_prefix, numerics.dtype, dev, progress=progress)
    not_loaded = check_unexpected(files, consumed, ENCODER_PREFIXES if cfg.is_composite else ())
    llm.eval()
    return LoadedModel(config=cfg, llm=llm, numerics=numerics, device=dev, path=root,
                       not_loaded=not_loaded, load_seconds=time.perf_counter() - t0)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
