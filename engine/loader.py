"""Finding and reading checkpoints: a local directory or a hub id (resolved with huggingface_hub),
safetensors only, read tensor by tensor through memory maps so a 200 GB checkpoint never sits in
RAM at once. Every problem (missing/corrupt shard, missing/unexpected/mis-shaped tensor) raises
`CheckpointError` naming the file and the tensor."""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.errors import MingError
from engine.kernels import huge_pages

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files of a hub snapshot the engine reads: the thinker, the talker (*.onnx: talker/campplus.onnx) and the image
# generator, whose ByT5 glyph encoder is stored as PyTorch pickles (byt5/byt5_model/*.pt, byt5/byt5_mapper/*.pt:
# spec §1.2). ("*" matches "/" too, so each pattern reaches into the sub-folders.)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "am.mvn", "*.onnx", "byt5/*.pt"]
# Large tensors are read this many bytes (as stored) at a time, straight into their destination: a load never
# holds a whole tensor twice (the real embedding table is 1.3 GB in bf16, 2.6 GB more as fp32).
READ_BLOCK_BYTES = 64 << 20
# What to do when the tensors are not the ones config.json describes.
MISMATCH_FIX = ("the weights do not match what config.json describes (a config.json of the other release, 2.0 or "
                "Preview, or of another model beside these shards?): download the whole checkpoint again")
_STACKED_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_proj|up_proj|down_proj)$")


class CheckpointError(MingError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""

    code = "checkpoint_error"


def resolve_checkpoint(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub id ("org/name") downloaded with huggingface_hub
    (honours HF_HUB_OFFLINE and the local cache)."""
    if not str(path_or_id).strip():  # --model "" (an unset shell variable): Path("") is the current folder
        raise CheckpointError("the checkpoint is an empty name: give a checkpoint directory or a hub id such as "
                              "inclusionAI/Ming-flash-omni-2.0")
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: expected a checkpoint directory, found a file")
    text = str(path_or_id)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=HUB_PATTERNS))
        except Exception as e:  # network, auth, missing repo: say what happened (and that no folder has that name)
            raise CheckpointError(f"{text}: no such local directory ({p.absolute()}), and it could not be fetched "
                                  f"from the Hugging Face hub as a model id: {e}") from e
    raise CheckpointError(f"{text}: no such directory, and not a hub id of the form 'org/name'")


@dataclass
class CheckpointFiles:
    """The safetensors shards of a checkpoint and which shard holds each tensor."""

    root: Path
    weight_map: dict[str, str]  # tensor name -> shard file name (relative to root)

    @classmethod
    def open(cls, root: str | Path) -> "CheckpointFiles":
        root = Path(root)
        index = root / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from e
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: not a valid safetensors index ('weight_map' must map each tensor "
                                      "name to its shard's file name)")
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard or shard in (".", ".."):  # '../x', '/etc/x': a file outside the folder
                    raise CheckpointError(f"{index}: shard {shard!r} is not a file name in the checkpoint folder "
                                          "(a safetensors index names its shards beside it)")
                if not (root / shard).is_file():
                    raise CheckpointError(f"{root / shard}: shard listed in {INDEX_FILE} is missing")
            _check_index_against_shards(root, weight_map)
            return cls(root, dict(weight_map))
        shards = [root / SINGLE_FILE] if (root / SINGLE_FILE).is_file() else sorted(root.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{root}: no {INDEX_FILE} and no *.safetensors files")
        weight_map: dict[str, str] = {}
        for shard in shards:
            for name in _shard_keys(shard):
                if name in weight_map:
                    raise CheckpointError(f"{shard}: tensor '{name}' also appears in {weight_map[name]}")
                weight_map[name] = shard.name
        return cls(root, weight_map)

    def names(self) -> list[str]:
        return list(self.weight_map)

    def reader(self, progress=None) -> "TensorReader":
        return TensorReader(self, progress)


def _check_index_against_shards(root: Path, weight_map: dict[str, str]) -> None:
    """Every shard's header (a read of its first bytes) against the index, before any tensor is read: a shard
    that is truncated or corrupt, a tensor the index puts in a shard that does not hold it, and a tensor a shard
    holds that the index does not list (an index and shards of different downloads) are errors naming both."""
    listed: dict[str, set[str]] = {}
    every = set(weight_map)
    for name, shard in weight_map.items():
        listed.setdefault(shard, set()).add(name)
    for shard, names in sorted(listed.items()):
        stored = set(_shard_keys(root / shard))
        absent, unlisted = sorted(names - stored), sorted(stored - every)
        fix = "the index and the shards are from different downloads: download the checkpoint again"
        if absent:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise CheckpointError(f"{root / shard}: tensor '{absent[0]}'{more} is listed in {INDEX_FILE} for this "
                                  f"shard but not stored in it; {fix}")
        if unlisted:
            more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
            raise CheckpointError(f"{root / shard}: holds tensor '{unlisted[0]}'{more} that {INDEX_FILE} does not "
                                  f"list; {fix}")


def _shard_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from e


class LoadProgressPrinter:
    """A load's `progress` callback that prints "loading tensors: done/total (X%)" every 10 % to `stream`
    (default stdout); silent for checkpoints of under `min_tensors` tensors, which load in moments."""

    def __init__(self, stream=None, prefix: str = "  ", suffix: str = "", min_tensors: int = 200):
        self.stream, self.prefix, self.suffix, self.min_tensors = stream, prefix, suffix, min_tensors
        self.shown = -1

    def __call__(self, done: int, total: int, name: str) -> None:
        if total < self.min_tensors:
            return
        tenth = done * 10 // total
        if tenth > self.shown:
            self.shown = tenth
            print(f"{self.prefix}loading tensors: {done}/{total} ({tenth * 10}%){self.suffix}",
                  file=self.stream or sys.stdout, flush=True)


# Bytes per element of safetensors' dtype names (for sizing blocks; an unknown name counts as 4).
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# The stored dtypes a floating-point parameter is read from (cast to the load dtype as it is copied). Anything
# else (FP8, integers) holds quantised or foreign values that a plain cast would silently turn into a wrong model.
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")
_TORCH_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def stored_dtype_name(t: torch.Tensor) -> str:
    """safetensors' name of a tensor's dtype (F32, BF16, ...; others by torch's name), for readers of state dicts."""
    return _TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))


class TensorReader:
    """Opens shards on demand (memory-mapped) and reads one tensor at a time. `progress`, when given, is
    called as progress(tensors read, tensors in the checkpoint, name) as each tensor starts being read:
    one count over the whole load, whichever module or expert path reads it."""

    def __init__(self, files: CheckpointFiles, progress=None):
        self.files = files
        self._stack = ExitStack()
        self._open: dict[str, object] = {}
        self._progress = progress
        self.tensors_read = 0

    def _reading(self, name: str) -> None:
        self.tensors_read += 1
        if self._progress is not None:
            self._progress(self.tensors_read, len(self.files.weight_map), name)

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._open.clear()

    def _handle(self, shard: str):
        if shard not in self._open:
            path = self.files.root / shard
            try:
                self._open[shard] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:
                raise CheckpointError(f"{path}: cannot open shard ({e})") from e
        return self._open[shard]

    def shape(self, name: str) -> tuple[int, ...]:
        shard = self.files.weight_map[name]
        try:
            return tuple(self._handle(shard).get_slice(name).get_shape())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.files.root / shard}: tensor '{name}' unreadable ({e})") from e

    def dtype(self, name: str) -> str:
        """The tensor's dtype as stored, by safetensors' name (F32, BF16, F8_E4M3, I32, ...)."""
        shard = self.files.weight_map[name]
        try:
            return self._handle(shard).get_slice(name).get_dtype()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.files.root / shard}: tensor '{name}' unreadable ({e})") from e

    def get(self, name: str) -> torch.Tensor:
        shard = self.files.weight_map[name]
        self._reading(name)
        try:
            return self._handle(shard).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.files.root / shard}: tensor '{name}' unreadable or truncated ({e})") from e

    def row_blocks(self, name: str, max_bytes: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """The tensor as (first row, block of rows) of at most `max_bytes` (default READ_BLOCK_BYTES) as
        stored, at least one row; a tensor of under two dimensions, or one that fits, in one block."""
        max_bytes = READ_BLOCK_BYTES if max_bytes is None else max_bytes
        shard = self.files.weight_map[name]
        self._reading(name)
        try:
            sl = self._handle(shard).get_slice(name)
            shape = tuple(sl.get_shape())
            row_bytes = _DTYPE_BYTES.get(sl.get_dtype(), 4) * (math.prod(shape[1:]) if shape else 1)
            if len(shape) < 2 or shape[0] * row_bytes <= max_bytes:
                yield 0, self._handle(shard).get_tensor(name)
                return
            step = max(1, max_bytes // row_bytes)
            for r0 in range(0, shape[0], step):
                yield r0, sl[r0:r0 + step]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.files.root / shard}: tensor '{name}' unreadable or truncated ({e})") from e

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy the tensor into `out` (its shape; any dtype and device) a block of rows at a time."""
        for r0, block in self.row_blocks(name):
            if block.shape == out.shape:
                out.copy_(block)
            else:
                out[r0:r0 + block.shape[0]].copy_(block)


@dataclass(frozen=True)
class Source:
    """Where one slice of a model parameter comes from in the checkpoint."""

    name: str
    index: int | None = None  # slice along dim 0 of a stacked parameter, or the whole parameter


def checkpoint_sources(param_name: str, shape: tuple[int, ...]) -> list[Source]:
    """Our parameter name -> the checkpoint tensors it is made of. Routed experts are stacked
    ([E, ...]) in our modules but stored one per expert upstream: `experts.{e}.<proj>.weight`."""
    m = _STACKED_EXPERT.match(param_name)
    if m:
        return [Source(f"{m['prefix']}.{e}.{m['proj']}.weight", e) for e in range(shape[0])]
    return [Source(param_name)]


def checkpoint_entries(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every checkpoint tensor name and shape a module consumes (for inspect and name checks)."""
    for name, t in list(module.named_parameters()) + list(_persistent_buffers(module)):
        for src in checkpoint_sources(name, tuple(t.shape)):
            shape = tuple(t.shape[1:]) if src.index is not None else tuple(t.shape)
            yield prefix + src.name, shape


def _persistent_buffers(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    for mod_name, mod in module.named_modules():
        for b_name, buf in mod._buffers.items():
            if buf is not None and b_name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{b_name}" if mod_name else b_name), buf


def _set_tensor(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def return_freed_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``): a load frees many blocks under
    glibc's mmap threshold (read blocks, quantisation temporaries), which the heap would otherwise keep — on a
    2-layer real-width checkpoint 0.13 GB more than the model (bench/load_peak.py). False where there is no
    glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def check_tensor(reader: TensorReader, name: str, shape: tuple[int, ...], floating: bool = True) -> None:
    """CheckpointError naming the shard unless the checkpoint has tensor `name` with `shape`, stored (for a
    `floating` destination) as fp32, fp16 or bf16: an FP8 or integer tensor is a quantised checkpoint, whose
    values a cast would silently get wrong (its scales are other tensors)."""
    if name not in reader.files.weight_map:
        raise CheckpointError(f"{reader.files.root}: tensor '{name}' is missing from the checkpoint; {MISMATCH_FIX}")
    where = reader.files.root / reader.files.weight_map[name]
    got = reader.shape(name)
    if got != shape:
        raise CheckpointError(f"{where}: tensor '{name}' has shape {list(got)}, expected {list(shape)}")
    stored = reader.dtype(name)
    if floating and stored not in WEIGHT_DTYPES:
        raise CheckpointError(f"{where}: tensor '{name}' is stored as {stored}, expected {', '.join(WEIGHT_DTYPES[:3])}: "
                              "quantised checkpoints are not read; load the bf16 checkpoint (--expert-dtype "
                              "fp8 / int8 / int4 quantises the experts while loading)")


def load_module(module: nn.Module, reader: TensorReader, prefix: str, dtype: torch.dtype,
                device: torch.device | str, keep_fp32: tuple[str, ...] = ("expert_bias",),
                progress=None) -> set[str]:
    """Materialise every parameter/persistent buffer of `module` (built on any device, e.g. meta)
    from checkpoint tensors `prefix + name`, cast to `dtype` on `device`. Returns the checkpoint
    names consumed. Raises CheckpointError on a missing or mis-shaped tensor."""
    consumed: set[str] = set()
    items = list(module.named_parameters()) + list(_persistent_buffers(module))
    for i, (name, t) in enumerate(items):
        target_dtype = torch.float32 if name.endswith(keep_fp32) else dtype
        if not t.is_floating_point():
            target_dtype = t.dtype
        out = huge_pages.empty(t.shape, target_dtype, device)  # CPU decode streams the weights: fewer TLB misses
        for src in checkpoint_sources(name, tuple(t.shape)):
            full = prefix + src.name
            check_tensor(reader, full, tuple(t.shape[1:]) if src.index is not None else tuple(t.shape),
                         floating=t.is_floating_point())
            reader.read_into(full, out if src.index is None else out[src.index])
            consumed.add(full)
        _set_tensor(module, name, out)
        if progress is not None:
            progress(i + 1, len(items), name)
    return consumed


def check_unexpected(files: CheckpointFiles, consumed: set[str]) -> None:
    """Any checkpoint tensor no module consumed is an error naming the shard and the tensor."""
    unknown = [n for n in files.names() if n not in consumed]
    if unknown:
        shard = files.weight_map[unknown[0]]
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise CheckpointError(f"{files.root / shard}: unexpected tensor '{unknown[0]}'{more}; {MISMATCH_FIX}")
