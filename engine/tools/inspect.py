"""`python -m engine.inspect CONFIG_OR_CHECKPOINT_DIR`: build the model on the meta device (no
memory is allocated) and print parameter counts and bytes per component and dtype, plus the
per-expert and per-layer sizes that placement decisions are made of.

`--check-finite` also reads every floating-point weight of the checkpoint's safetensors files (the thinker's and
those of the talker and image generator in sub-folders), a block of rows at a time, and names each tensor holding
NaN or ±inf: a corrupt or badly converted download loads without complaint and only answers garbage, and a model
load does not look at the values (that would read 238 GB once more)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.command import EXIT_CODES_HELP
from engine.errors import EXIT_FAILED, EXIT_INPUT, MingError
from engine.models.thinker.config import MingConfig
from engine.loader import WEIGHT_DTYPES, CheckpointError, CheckpointFiles, checkpoint_entries
from engine.models.thinker.model import build_thinker

# Stored dtype of the released weights (config torch_dtype); routers' expert_bias is kept in fp32
# by our loader, so it is counted at 4 bytes.
FP32_TENSORS = ("expert_bias",)
STORED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


ENCODER_COMPONENTS = {"vision.": "vision encoder", "linear_proj.": "vision projector",
                      "audio.": "audio encoder", "linear_proj_audio.": "audio projector"}


def _component(name: str) -> str:
    """Group a checkpoint tensor name into a component."""
    for prefix, component in ENCODER_COMPONENTS.items():
        if name.startswith(prefix):
            return component
    if "word_embeddings" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    if ".attention." in name:
        return "attention"
    if ".mlp.experts." in name:
        return "routed experts"
    if ".mlp.shared_experts." in name:
        return "shared experts"
    if ".mlp.gate." in name or ".mlp.image_gate." in name or ".mlp.audio_gate." in name:
        return "routers"
    if ".mlp." in name:
        return "dense mlp"
    return "norms"


@dataclass
class Inventory:
    """Parameter counts and bytes, per component and per dtype."""

    params: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    nbytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_dtype: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tensors: int = 0

    def add(self, component: str, numel: int, dtype: torch.dtype) -> None:
        size = numel * torch.empty((), dtype=dtype).element_size()
        self.params[component] += numel
        self.nbytes[component] += size
        self.by_dtype[str(dtype).replace("torch.", "")] += size
        self.tensors += 1

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())


def inventory(cfg: MingConfig, dtype: torch.dtype) -> tuple[Inventory, Inventory]:
    """(LLM inventory, encoders inventory) of every checkpoint tensor of the thinker."""
    llm, enc = Inventory(), Inventory()
    for prefix, module in build_thinker(cfg, "meta").items():
        buffers = {prefix + n for n, _ in module.named_buffers()}
        for name, shape in checkpoint_entries(module, prefix=prefix):
            target = enc if prefix in ENCODER_COMPONENTS else llm
            component = _component(name) + (" (stored buffer)" if name in buffers else "")
            target.add(component, math.prod(shape), torch.float32 if name.endswith(FP32_TENSORS) else dtype)
    return llm, enc


def expert_sizes(cfg: MingConfig, dtype: torch.dtype) -> dict[str, int]:
    c = cfg.llm
    el = torch.empty((), dtype=dtype).element_size()
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    attn = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim * c.hidden_size \
        + c.num_attention_heads * c.head_dim * c.hidden_size + 2 * c.head_dim
    routers = (3 if c.uses_multi_router else 1) * c.num_experts * c.hidden_size
    shared = 3 * c.hidden_size * c.moe_intermediate_size * c.num_shared_experts
    moe_layer = attn + 2 * c.hidden_size + routers + shared + c.num_experts * expert
    active = attn + 2 * c.hidden_size + routers + shared + c.num_experts_per_tok * expert
    return {"params_per_expert": expert, "bytes_per_expert": expert * el,
            "params_per_moe_layer": moe_layer, "bytes_per_moe_layer": moe_layer * el,
            "params_active_per_moe_layer": active}


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.2f} MB"


def report(path: Path) -> dict:
    cfg = MingConfig.from_file(path)
    dtype = STORED_DTYPES.get(cfg.torch_dtype or "bfloat16", torch.bfloat16)
    inv, enc = inventory(cfg, dtype)
    sizes = expert_sizes(cfg, dtype)
    c = cfg.llm
    dense_active = inv.total_params - inv.params["routed experts"] - inv.params["embeddings"] - inv.params["lm_head"]
    active = dense_active + c.num_moe_layers * c.num_experts_per_tok * sizes["params_per_expert"]
    return {"config": str(cfg.source), "release": cfg.release, "dtype": str(dtype).replace("torch.", ""),
            "llm_total_params": inv.total_params, "llm_total_bytes": inv.total_bytes,
            "components": {k: {"params": inv.params[k], "bytes": inv.nbytes[k]} for k in sorted(inv.params)},
            "encoders": {k: {"params": enc.params[k], "bytes": enc.nbytes[k]} for k in sorted(enc.params)},
            "total_params": inv.total_params + enc.total_params - sum(
                v for k, v in enc.params.items() if k.endswith("(stored buffer)")), "total_bytes": inv.total_bytes + enc.total_bytes,
            "tensors": inv.tensors + enc.tensors,
            "bytes_by_dtype": {k: inv.by_dtype.get(k, 0) + enc.by_dtype.get(k, 0)
                               for k in set(inv.by_dtype) | set(enc.by_dtype)},
            "llm_active_params_per_token_excl_embeddings": active,
            "layers": c.num_hidden_layers, "moe_layers": c.num_moe_layers, "experts_per_layer": c.num_experts,
            **sizes}


def format_report(r: dict) -> str:
    lines = [f"{r['config']}  (release {r['release']}, weights {r['dtype']})", "",
             f"{'component':<30}{'parameters':>18}{'bytes':>16}"]
    for k, v in r["components"].items():
        lines.append(f"{k:<30}{v['params']:>18,}{_gb(v['bytes']):>16}")
    lines.append(f"{'LLM total':<30}{r['llm_total_params']:>18,}{_gb(r['llm_total_bytes']):>16}")
    for k, v in r["encoders"].items():
        lines.append(f"{k:<30}{v['params']:>18,}{_gb(v['bytes']):>16}")
    lines.append(f"{'thinker total':<30}{r['total_params']:>18,}{_gb(r['total_bytes']):>16}  "
                 f"(parameters; bytes include stored buffers; {r['tensors']:,} tensors)")
    lines += ["", "not counted: talker and image generator (separate sub-folders, not built yet)",
              "bytes by dtype: " + ", ".join(f"{k} {_gb(v)}" for k, v in r["bytes_by_dtype"].items()),
              f"layers {r['layers']} ({r['moe_layers']} MoE) x {r['experts_per_layer']} experts",
              f"per expert: {r['params_per_expert']:,} params, {r['bytes_per_expert'] / 2**20:.1f} MiB",
              f"per MoE layer: {r['params_per_moe_layer']:,} params, {_gb(r['bytes_per_moe_layer'])}",
              f"active per token (excl. embeddings/lm_head): {r['llm_active_params_per_token_excl_embeddings']:,}"]
    return "\n".join(lines)


NON_FINITE_SHOWN = 20  # tensors named one a line by --check-finite (a whole bad shard holds thousands)


@dataclass(frozen=True)
class NonFiniteTensor:
    """A checkpoint tensor holding NaN or ±inf."""

    file: Path
    name: str
    nan: int
    inf: int

    def line(self) -> str:
        return f"{self.file}: tensor '{self.name}' holds {self.nan:,} NaN and {self.inf:,} ±inf values"


def _non_finite_counts(files: CheckpointFiles) -> Iterator[tuple[str, int, int]]:
    """(name, NaN count, ±inf count) of each floating-point tensor of one checkpoint folder."""
    with files.reader() as reader:
        for name in files.names():
            if reader.dtype(name) not in WEIGHT_DTYPES:  # integers and FP8 codes: not checked
                continue
            nan = inf = 0
            for _, block in reader.row_blocks(name):
                nan += int(torch.isnan(block).sum())
                inf += int(torch.isinf(block).sum())
            yield name, nan, inf


def non_finite_tensors(root: Path, log=None) -> tuple[int, list[NonFiniteTensor]]:
    """Every floating-point tensor of the safetensors checkpoints in `root` and its sub-folders: (tensors checked,
    those holding NaN or ±inf). CheckpointError for a folder without weights or a shard that cannot be read."""
    folders = sorted({p.parent for p in root.rglob("*.safetensors")})
    if not folders:
        raise CheckpointError(f"{root}: no *.safetensors files to check")
    checked, found = 0, []
    for folder in folders:
        files = CheckpointFiles.open(folder)
        if log is not None:
            log(f"checking the values of {len(files.weight_map):,} tensors in {folder} ...")
        for name, nan, inf in _non_finite_counts(files):
            checked += 1
            if nan or inf:
                found.append(NonFiniteTensor(folder / files.weight_map[name], name, nan, inf))
    return checked, found


def _check_finite(path: Path, as_json: bool) -> tuple[dict, int]:
    """The --check-finite part of the report and the exit code: EXIT_FAILED when a tensor is not finite."""
    root = path if path.is_dir() else path.parent
    checked, found = non_finite_tensors(root, log=None if as_json else lambda line: print(line, file=sys.stderr))
    part = {"tensors_checked": checked, "non_finite": [{"file": str(t.file), "tensor": t.name, "nan": t.nan,
                                                        "inf": t.inf} for t in found]}
    if not as_json:
        for t in found[:NON_FINITE_SHOWN]:
            print(f"error: {t.line()}", file=sys.stderr)
        if len(found) > NON_FINITE_SHOWN:
            print(f"error: ... and {len(found) - NON_FINITE_SHOWN:,} more tensors (--json lists them all)",
                  file=sys.stderr)
        print(f"{checked:,} floating-point tensors checked: "
              + (f"{len(found):,} hold NaN or ±inf (a corrupt download: fetch those files again)" if found else
                 "all values finite"))
    return part, EXIT_FAILED if found else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.inspect", description=__doc__.splitlines()[0],
                                 epilog=EXIT_CODES_HELP + f" With --check-finite, {EXIT_FAILED} = a weight is NaN or ±inf.")
    ap.add_argument("path", type=Path, help="config.json or a checkpoint directory")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--check-finite", action="store_true",
                    help="also read every weight of the checkpoint (minutes for the real model) and name each tensor "
                         "holding NaN or ±inf")
    args = ap.parse_args(argv)
    code = 0
    try:
        r = report(args.path)
        if not args.json:
            print(format_report(r), flush=True)
        if args.check_finite:
            r["check_finite"], code = _check_finite(args.path, args.json)
    except (MingError, OSError, ValueError) as e:  # no such folder, a config.json that is not a Ming model's
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    if args.json:
        print(json.dumps(r, indent=2))
    return code


if __name__ == "__main__":
    from engine.command import run_command

    sys.exit(run_command(main))
