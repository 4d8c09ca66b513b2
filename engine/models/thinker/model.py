"""The Ming "thinker": builds the modules a checkpoint describes (on the meta device first, so
nothing is allocated until weights are read) and loads them through engine.loader.

Components and their checkpoint prefixes: the BailingMoeV2 LLM (`model.` in the composite thinker,
none in a standalone LLM checkpoint), the ViT (`vision.`), its projector (`linear_proj.`), the
Whisper audio encoder (`audio.`) and its projector (`linear_proj_audio.`). Encoders exist when the
config has their sub-config.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import kernels
from engine.placement import quant
from engine.models.thinker.audio_encoder import AudioEncoderConfig, WhisperAudioEncoder
from engine.models.thinker.config import MingConfig, sub_config_errors
from engine.models.thinker.layers import Numerics
from engine.models.thinker.llm import BailingMoeV2ForCausalLM
from engine.kernels import huge_pages
from engine.kernels.dequant import quantize_int8_rows
from engine.loader import (CheckpointFiles, check_tensor, check_unexpected, checkpoint_entries, load_module,
                           resolve_checkpoint, return_freed_memory)
from engine.models.thinker.projectors import AudioProjector, VisionProjector
from engine.models.thinker.vision import VisionConfig, build_vision_encoder


def build_llm(cfg: MingConfig, device: torch.device | str = "meta") -> BailingMoeV2ForCausalLM:
    with torch.device(device):
        return BailingMoeV2ForCausalLM(cfg.llm)


@dataclass
class Encoders:
    """The optional encoder side of the thinker (None where the config has no sub-config)."""

    vision: nn.Module | None = None
    linear_proj: VisionProjector | None = None
    audio: WhisperAudioEncoder | None = None
    linear_proj_audio: AudioProjector | None = None

    def components(self) -> dict[str, nn.Module]:
        mods = {"vision.": self.vision, "linear_proj.": self.linear_proj, "audio.": self.audio,
                "linear_proj_audio.": self.linear_proj_audio}
        return {k: v for k, v in mods.items() if v is not None}


def build_encoders(cfg: MingConfig, device: torch.device | str = "meta",
                   rope_bf16_tables: bool | None = None) -> Encoders:
    enc = Encoders()
    depth = cfg.projector_depth
    with torch.device(device):
        if cfg.vision:
            with sub_config_errors(cfg.source, "vision_config"):
                vcfg = VisionConfig.from_dict(cfg.vision)
            enc.vision = build_vision_encoder(vcfg, rope_bf16_tables=rope_bf16_tables)
            enc.linear_proj = VisionProjector(vcfg.out_hidden_size, cfg.llm.hidden_size, depth)
        if cfg.audio:
            with sub_config_errors(cfg.source, "audio_config"):
                acfg = AudioEncoderConfig.from_dict(cfg.audio)
            enc.audio = WhisperAudioEncoder(acfg)
            enc.linear_proj_audio = AudioProjector.from_config(acfg, cfg.llm.hidden_size, depth)
    return enc


def build_thinker(cfg: MingConfig, device: torch.device | str = "meta") -> dict[str, nn.Module]:
    """Every component keyed by its checkpoint prefix."""
    return {cfg.llm_weight_prefix: build_llm(cfg, device), **build_encoders(cfg, device).components()}


@dataclass
class LoadedModel:
    """A checkpoint ready to run: config, LLM, numerics, where it came from, and load figures."""

    config: MingConfig
    llm: BailingMoeV2ForCausalLM
    numerics: Numerics
    device: torch.device
    path: Path
    encoders: Encoders = field(default_factory=Encoders)
    load_seconds: float = 0.0
    expert_dtype: str = "bf16"          # routed-expert storage: bf16 (= unquantised, model dtype), fp8, fp8-block, int8, int4
    moe_runtime: Any = None             # engine.placement.expert_runtime.MoERuntime when loaded with a placement plan


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


def _expert_banks(llm: BailingMoeV2ForCausalLM) -> dict[str, nn.Module]:
    """Routed-expert banks by module path (e.g. 'model.layers.1.mlp.experts')."""
    return {f"model.layers.{i}.mlp.experts": layer.mlp.experts
            for i, layer in enumerate(llm.model.layers) if layer.is_moe}


def _parent_of(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the module holding the submodule at dotted `path`, its name there); a top-level name's parent is root."""
    parent_path, _, leaf = path.rpartition(".")
    return root.get_submodule(parent_path), leaf


@contextmanager
def _without(root: nn.Module, paths: list[str]):
    """Temporarily detach the submodules at `paths` (so load_module skips them), then put them back."""
    taken = []
    for path in paths:
        parent, leaf = _parent_of(root, path)
        taken.append((parent, leaf, parent._modules.pop(leaf)))
    try:
        yield
    finally:
        for parent, leaf, mod in taken:
            parent._modules[leaf] = mod


def load_model(path_or_id: str | Path, dtype: str | torch.dtype = "fp32", device: str | torch.device | None = None,
               numerics: Numerics | None = None, progress=None, *, expert_dtype: str | None = None,
               plan=None, runtime_options=None, pack_cpu_experts: bool = True,
               linear_dtype: str = "bf16") -> LoadedModel:
    """Load a checkpoint directory (or hub id) in the upstream format.

    `numerics` defaults to the reference's own behaviour for the dtype (bf16: rounded rotary
    tables and bf16 router, spec §2.11); pass Numerics.intent(dtype) for the fp32-intent variant.

    `expert_dtype` ("bf16" | "fp8" | "fp8-block" | "int8" | "int4"; default: the plan's, else "bf16"):
    routed experts stay unquantised in the model dtype ("bf16", the historical path, unchanged), or are
    quantised one expert at a time while loading (engine.placement.quant: FP8 e4m3 with per-channel or
    128x128 block scales, int8 per channel, int4 with group scales).
    `plan` (an engine.placement.planner.Plan or engine.placement.expert_runtime.ExpertPlacement): routed experts are loaded onto
    the devices the plan gives them and executed by an engine.placement.expert_runtime.MoERuntime (returned as
    `moe_runtime`); `runtime_options` (RuntimeOptions) sets its device map, hot-expert cache and fetch
    threshold. Everything else is loaded on `device`.
    `pack_cpu_experts`: routed experts on CPU are re-laid out once for the CPU kernels (fp32 and bf16:
    oneDNN where it pays, see pack_for_cpu; int8: torch's weight-only kernel and the native decode pass;
    int4: the native kernels, read as stored (torch's int4 kernel where they are not built); fp8, which has
    no CPU kernel: re-quantised to int8 per row).
    `linear_dtype` "int8" (CPU only): the LLM's other linears (attention, dense MLP, shared experts,
    lm_head; not the routers) are quantised to int8 per output channel as they are read (half the bytes).
    `progress(done, total, name)` is called as each of the checkpoint's `total` tensors starts being read.
    """
    t0 = time.perf_counter()
    root = resolve_checkpoint(path_or_id)
    cfg = MingConfig.from_file(root)
    dt = parse_dtype(dtype)
    numerics = numerics or Numerics.reference(dt)
    expert_dtype = quant.check_expert_dtype(expert_dtype or getattr(plan, "expert_dtype", None) or "bf16")
    dev = torch.device(device) if device is not None else default_device()
    if linear_dtype not in ("bf16", "int8"):
        raise ValueError(f"unknown linear dtype {linear_dtype!r}: choose bf16 (as loaded) or int8")
    if linear_dtype == "int8" and dev.type != "cpu":
        raise ValueError("int8 linears run on the CPU only (torch's int8 weight-only CPU kernel)")
    files = CheckpointFiles.open(root)
    llm = build_llm(cfg)
    encoders = build_encoders(cfg, rope_bf16_tables=numerics.rope_bf16_tables)
    banks = _expert_banks(llm)
    custom_experts = bool(banks) and (expert_dtype != "bf16" or plan is not None)
    int8_paths = int8_linear_paths(llm) if linear_dtype == "int8" else []
    # plain experts the CPU kernels will pack: read with gate and up fused per expert, as those kernels read them
    cpu_packed = pack_cpu_experts and dev.type == "cpu"
    fused_banks = bool(banks) and not custom_experts and cpu_packed
    runtime = None
    consumed: set[str] = set()
    components = {cfg.llm_weight_prefix: llm, **encoders.components()}
    # a tensor no module takes is named before any is read (every read path takes checkpoint_entries' names);
    # a tied model's stored lm_head.weight is skipped: the reference re-ties after loading, the embedding table wins
    tied_head = cfg.llm_weight_prefix + "lm_head.weight"
    ignored = {tied_head} if cfg.llm.tie_word_embeddings else set()
    check_unexpected(files, ignored | {name for prefix, module in components.items()
                                       for name, _ in checkpoint_entries(module, prefix)})
    with files.reader(progress) as reader:  # progress: tensors read of the whole checkpoint
        for prefix, module in components.items():
            if module is llm and (custom_experts or int8_paths or fused_banks):
                # int8 linears quantised as they are read; routed experts by the runtime or quantised one by one
                consumed |= _read_int8_linears(llm, reader, prefix, numerics.dtype, int8_paths)
                with _without(llm, (list(banks) if custom_experts or fused_banks else []) + int8_paths):
                    consumed |= load_module(module, reader, prefix, numerics.dtype, dev)
                if fused_banks:
                    for name, bank in banks.items():
                        consumed |= _read_fused_bank(bank, reader, prefix + name, numerics.dtype)
                elif custom_experts and plan is not None:
                    from engine.placement.expert_runtime import MoERuntime
                    runtime, names = MoERuntime.load(llm, reader, prefix, plan, expert_dtype, numerics.dtype,
                                                     runtime_options)
                    consumed |= names
                elif custom_experts:
                    for name, bank in banks.items():
                        consumed |= quant.load_quantized_bank(bank, reader, prefix, name, expert_dtype, dev,
                                                              fuse_gate_up=cpu_packed)
            else:
                consumed |= load_module(module, reader, prefix, numerics.dtype, dev)
            module.eval()
    llm.tie_weights()
    check_unexpected(files, consumed | ignored)
    cpu_quantized = pack_cpu_experts and plan is None and expert_dtype != "bf16" and dev.type == "cpu"
    if cpu_quantized:
        for bank in banks.values():  # int8/int4 weight-only CPU kernels read the quantised bytes
            bank.pack_for_cpu(numerics.dtype)
    if pack_cpu_experts and (cpu_quantized or not custom_experts) and dev.type == "cpu":
        pack_for_cpu(llm)  # the other projections (and, for int8 experts, the shared expert's native pass)
    if runtime is not None and hasattr(plan, "layer_home"):
        place_non_expert_modules(llm, encoders, plan, runtime.device_map)
    return_freed_memory()  # the read blocks and quantisation temporaries, which the C heap would keep
    return LoadedModel(config=cfg, llm=llm, numerics=numerics, device=dev, path=root, encoders=encoders,
                       load_seconds=time.perf_counter() - t0, expert_dtype=expert_dtype, moe_runtime=runtime)


def int8_linear_paths(llm: BailingMoeV2ForCausalLM) -> list[str]:
    """The linears ``linear_dtype`` "int8" quantises, by module path: every ``nn.Linear`` of the decoder
    layers (attention, dense MLP, shared experts: the routers and routed experts are not ``nn.Linear``s)
    and lm_head. A 0-wide shared expert's (num_shared_experts = 0) stay as they are: nothing to quantise."""
    paths = [f"model.layers.{i}.{name}" for i, layer in enumerate(llm.model.layers)
             for name, mod in layer.named_modules() if type(mod) is nn.Linear and mod.weight.numel()]
    return paths + (["lm_head"] if type(llm.lm_head) is nn.Linear else [])


def int8_linears(llm: BailingMoeV2ForCausalLM) -> int:
    """``linear_dtype`` "int8" for a model already in memory (a load quantises them as it reads them): the
    linears of `int8_linear_paths` quantised to int8 per output channel, for the CPU's int8 kernels.
    Returns how many."""
    paths = int8_linear_paths(llm)
    for path in paths:
        parent, leaf = _parent_of(llm, path)
        setattr(parent, leaf, kernels.PackedLinear(getattr(parent, leaf), int8=True))
    return len(paths)


def _read_fused_bank(bank: nn.Module, reader, name: str, dtype: torch.dtype) -> set[str]:
    """A bank of plain routed experts (`name`: its checkpoint prefix, e.g. 'model.model.layers.1.mlp.experts')
    read one expert at a time into gate and up fused per expert ([E, 2I, H]) and down ([E, H, I]), so packing
    them for the CPU kernels makes no second copy of the layer (ExpertBank.set_fused; 4.3 GB per real layer
    in bf16). Returns the tensor names read."""
    experts, inter, hidden = bank.gate_proj.shape
    gate_up = huge_pages.empty((experts, 2 * inter, hidden), dtype)  # streamed every decode step: fewer TLB misses
    down = huge_pages.empty(tuple(bank.down_proj.shape), dtype)
    consumed: set[str] = set()
    for e in range(experts):
        for proj, dest in (("gate_proj", gate_up[e, :inter]), ("up_proj", gate_up[e, inter:]), ("down_proj", down[e])):
            full = f"{name}.{e}.{proj}.weight"
            check_tensor(reader, full, tuple(dest.shape))
            reader.read_into(full, dest)
            consumed.add(full)
    bank.set_fused(gate_up, down)
    return consumed


def _read_int8_linears(llm: BailingMoeV2ForCausalLM, reader, prefix: str, dtype: torch.dtype,
                       paths: list[str]) -> set[str]:
    """The linears at `paths` read from the checkpoint a block of rows at a time, each block cast to the load
    dtype and quantised as ``int8_linears`` would quantise the loaded weight (rows are quantised on their own:
    the same int8 values and scales), so the load never holds them unquantised: its peak stays at what it
    keeps (the real lm_head alone is 2.6 GB in fp32, 0.64 GB as int8). Returns the tensor names read."""
    consumed: set[str] = set()
    for path in paths:
        parent, leaf = _parent_of(llm, path)
        linear = getattr(parent, leaf)
        tied = path == "lm_head" and llm.config.tie_word_embeddings  # quantised from the embedding table
        weight_name = f"{prefix}{'model.word_embeddings' if tied else path}.weight"
        check_tensor(reader, weight_name, tuple(linear.weight.shape))
        q = huge_pages.empty(linear.weight.shape, torch.int8)  # streamed every decode step: fewer TLB misses
        scale = torch.empty(linear.out_features, dtype=torch.float32)
        for r0, block in reader.row_blocks(weight_name):
            rows = slice(r0, r0 + block.shape[0])
            # a widening cast is exact (the same quantised values without it); a narrowing one rounds as the load does
            widens = block.dtype.is_floating_point and torch.finfo(block.dtype).bits < torch.finfo(dtype).bits
            quantize_int8_rows(block if widens else block.to(dtype), out=(q[rows], scale[rows]))
        bias = None
        if linear.bias is not None:
            bias = torch.empty(linear.bias.shape, dtype=dtype)
            check_tensor(reader, f"{prefix}{path}.bias", tuple(bias.shape))
            reader.read_into(f"{prefix}{path}.bias", bias)
            consumed.add(f"{prefix}{path}.bias")
        setattr(parent, leaf, kernels.PackedLinear.from_int8(q, scale, dtype, bias))
        consumed.add(weight_name)
    return consumed


def pack_for_cpu(llm: BailingMoeV2ForCausalLM) -> bool:
    """fp32 or bf16 weights on the CPU laid out once for the CPU kernels; True when anything was.
    Where the native decode kernels are built (kernels.native): experts fused gate+up per expert in the
    checkpoint's plain layout (one native call per token's experts; experts already packed as int8 keep
    theirs, which the native call reads too) and every projection wrapped so that decode GEMVs run
    natively; fp32 and bf16 stay plain (torch's GEMMs for prefill). Without them: oneDNN packing where it
    pays (bf16 always, fp32 from kernels.ONEDNN_FP32_MIN_BYTES per matrix). Either way sums run in another
    order than the plain model's: results agree within fp rounding, not bit for bit. On a CPU without native bf16, bf16
    projections are wrapped all the same, so that their prefill GEMMs run in fp32 (kernels.cpu_linear;
    the experts' do through kernels.swiglu)."""
    params = next(llm.parameters())
    if params.device.type != "cpu" or params.dtype not in (torch.float32, torch.bfloat16) or \
            not (kernels.onednn_packing_available(params.dtype) or kernels.emulates_bf16(params)
                 or kernels.native.available()):
        return False
    packed = 0
    for bank in _expert_banks(llm).values():  # one layer at a time: the stacked copy is freed as we go
        if bank.packed is None and (kernels.onednn_packing_pays(bank.down_proj[0])
                                    or kernels.native_decode_applies(bank.down_proj)):
            bank.pack_for_cpu()
            packed += 1
    for layer in llm.model.layers:  # attention, dense and shared-expert projections too
        packed += kernels.pack_linears(layer)
        if layer.is_moe and kernels.native.available():
            layer.mlp.bind_cpu_shared()  # the shared expert in the routed experts' native pass
        if kernels.native.available():
            layer.bind_cpu_decode()  # one-token steps: each half of the layer in one native call
    packed += kernels.pack_linears(llm)  # lm_head
    return packed > 0


def place_non_expert_modules(llm: BailingMoeV2ForCausalLM, encoders: Encoders, plan, device_map) -> None:
    """Move everything but the routed experts where an engine.placement.planner.Plan puts it: each decoder
    layer's attention, norms, routers and shared expert on its home GPU (its KV cache follows it),
    final norm + lm_head on the head GPU, the embedding table and the encoders on a GPU or the host.
    Activations then travel between devices in the forward (engine.models.thinker.llm), never weights."""
    gpus = device_map.gpus
    for i, layer in enumerate(llm.model.layers):
        home = gpus[plan.layer_home[i]]
        for name, child in layer.named_children():
            if name == "mlp" and layer.is_moe:
                for sub_name, sub in child.named_children():
                    if sub_name != "experts":  # routed experts are the runtime's
                        sub.to(home)
            else:
                child.to(home)
    llm.model.norm.to(gpus[plan.head_home])
    llm.lm_head.to(gpus[plan.head_home])
    # a tied head is the embedding table itself (one Parameter): the table stays with the head it is
    embeddings = device_map.host if plan.embeddings == "cpu" else gpus[0]
    llm.model.word_embeddings.to(gpus[plan.head_home] if llm.config.tie_word_embeddings else embeddings)
    llm.tie_weights()  # a move that could not keep the Parameter shared (e.g. to the meta device) made a copy
    enc_device = device_map.host if plan.encoders == "cpu" else gpus[0]
    for module in encoders.components().values():
        module.to(enc_device)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
