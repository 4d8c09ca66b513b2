"""Typed configuration of the talker, parsed from the checkpoint's own files (spec §7.1, §7.8):

  * `talker/config.json`      -> `TalkerConfig` (BailingTalkerConfig: `flowmodel`, `aggregator`, `steps`,
                                 `patch_size`, `history_patch_size`, ...);
  * `talker/llm/config.json`  -> `Qwen2BackboneConfig` (the talker LLM);
  * `talker/vae/config.json`  -> `AudioVAEConfig` (its encoder / decoder `backbone` dicts are Qwen2 configs too).

Keys the reference does not read are kept only where they inform (e.g. `cfg_strength`). Anything we do
not implement (rope scaling, QK-norm in the DiT) is refused with a `TalkerConfigError`.

Both releases' talkers are upstream's `BailingTalker2` class; the release (the thinker config's, spec
§1.1) says which one a folder holds. The Preview's (spec §7.11) has no speaker head, keeps a history of
one patch (`history_patch_size` is not read) and takes its CFG strength from `cfg_strength`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import MingError
from engine.models.thinker.vision import _ACTIVATIONS as ACT2FN  # transformers' ACT2FN, as the reference's MLPs call it

# The reference hard-codes the latent width of the talker and its VAE (spec §7.1) [V].
LATENT_DIM = 64
# Width of a CAM++ speaker vector (the spk_head input).
SPEAKER_DIM = 192
# The talker releases (spec §7.11): which prompt layout, history and sampler a talker folder uses.
TALKER_RELEASES = ("2.0", "preview")
# BailingTalker2's static KV cache length and AR step bound (spec §7.5).
MAX_CACHE_LEN = 2048
MAX_STEPS = 1000
# Code defaults of the DiT / aggregator when the config omits a key (spec §7.1 table).
DIT_DEFAULTS = {"in_channels": LATENT_DIM, "hidden_size": 1024, "depth": 28, "num_heads": 16, "mlp_ratio": 4.0,
                "llm_cond_dim": 896}
AGGREGATOR_DEFAULTS = {"in_channels": LATENT_DIM, "hidden_size": 1152, "depth": 28, "num_heads": 16, "mlp_ratio": 4.0}
# transformers' Qwen2Config defaults, which upstream's `Qwen2Config.from_dict` fills in for keys a
# backbone dict omits: with `use_sliding_window` on, the window is 4096 and layers from index 28 slide.
QWEN2_DEFAULT_SLIDING_WINDOW = 4096
QWEN2_DEFAULT_MAX_WINDOW_LAYERS = 28
# The other Qwen2Config defaults (transformers 4.57) that `from_dict` fills for omitted keys.
QWEN2_DEFAULTS = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                  "max_position_embeddings": 32768}
# AudioVAEconfig's default sample rate and the encoder's default hop (`enc_kwargs.get('hop_size', 320)`).
VAE_DEFAULT_SAMPLE_RATE = 16000
VAE_DEFAULT_ENCODER_HOP = 320


class TalkerConfigError(MingError, ValueError):
    """A talker config that cannot describe a model we can run; the message names the file and key."""

    code = "invalid_config"


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise TalkerConfigError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TalkerConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TalkerConfigError(f"{path}: expected a JSON object")
    return data


def _positive_int(d: dict, key: str, where: str, default: Any = None) -> int:
    value = d.get(key, default)
    if value is None:
        raise TalkerConfigError(f"{where}: missing required key '{key}'")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value <= 0:
        raise TalkerConfigError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Qwen2BackboneConfig:
    """A Qwen2 decoder stack (talker LLM, VAE encoder / aggregator / decoder backbones).

    `layer_types[i]` is "full_attention" or "sliding_attention" with transformers 4.57's rule: a layer
    slides when `use_sliding_window` is on and i >= `max_window_layers` (or as `layer_types` lists)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    layer_types: tuple[str, ...]
    sliding_window: int | None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Qwen2BackboneConfig":
        q = QWEN2_DEFAULTS
        hidden = _positive_int(d, "hidden_size", where, q["hidden_size"])
        heads = _positive_int(d, "num_attention_heads", where, q["num_attention_heads"])
        # an omitted key takes Qwen2Config's default; an explicit null means one kv head per head
        kv = _positive_int(d, "num_key_value_heads", where, q["num_key_value_heads"]) \
            if "num_key_value_heads" not in d or d["num_key_value_heads"] is not None else heads
        layers = _positive_int(d, "num_hidden_layers", where, q["num_hidden_layers"])
        if heads % kv:
            raise TalkerConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        head_dim = d.get("head_dim") or hidden // heads
        if d.get("head_dim") is None and hidden % heads:
            raise TalkerConfigError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        scaling = d.get("rope_scaling")
        if scaling not in (None, {}) and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
            raise TalkerConfigError(f"{where}: rope_scaling {scaling} is not supported (only plain RoPE is implemented)")
        act = d.get("hidden_act", "silu")
        if act not in ACT2FN:  # Qwen2MLP runs ACT2FN[config.hidden_act]
            raise TalkerConfigError(f"{where}: hidden_act {act!r} is not supported ({', '.join(sorted(ACT2FN))})")
        window = d.get("sliding_window", QWEN2_DEFAULT_SLIDING_WINDOW) if d.get("use_sliding_window", False) else None
        if window is not None:
            window = _positive_int(d, "sliding_window", where, QWEN2_DEFAULT_SLIDING_WINDOW)
        types = d.get("layer_types")
        if types is None:
            mwl = int(d.get("max_window_layers", QWEN2_DEFAULT_MAX_WINDOW_LAYERS))
            types = ["sliding_attention" if window is not None and i >= mwl else "full_attention" for i in range(layers)]
        types = tuple(types)
        if len(types) < layers or any(t not in ("full_attention", "sliding_attention") for t in types):
            raise TalkerConfigError(f"{where}: layer_types {list(types)} does not describe {layers} layers")
        if window is None and "sliding_attention" in types[:layers]:
            raise TalkerConfigError(f"{where}: layer_types has sliding layers but no sliding_window is set")
        return cls(hidden_size=hidden, intermediate_size=_positive_int(d, "intermediate_size", where, q["intermediate_size"]),
                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=int(head_dim),
                   rope_theta=float(d.get("rope_theta", q["rope_theta"])),
                   rms_norm_eps=float(d.get("rms_norm_eps", q["rms_norm_eps"])),
                   vocab_size=_positive_int(d, "vocab_size", where, q["vocab_size"]), layer_types=types,
                   max_position_embeddings=int(d.get("max_position_embeddings", q["max_position_embeddings"])),
                   sliding_window=window, hidden_act=act,
                   bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))

    def with_layers(self, n: int) -> "Qwen2BackboneConfig":
        """The same stack with n layers; layer i keeps this config's `layer_types[i]` (the VAE
        encoder's aggregator is built that way upstream, so it needs n <= num_hidden_layers)."""
        if n > len(self.layer_types):
            raise TalkerConfigError(f"a {n}-layer stack cannot take its layer types from a {len(self.layer_types)}-layer backbone")
        return Qwen2BackboneConfig(**{**self.__dict__, "num_hidden_layers": n, "layer_types": self.layer_types[:n]})


@dataclass(frozen=True)
class DiTConfig:
    """The flow-matching DiT (`flowmodel`) or the aggregator (`aggregator`): both are stacks of
    DiT blocks (spec §7.6, §7.7). `llm_cond_dim` (DiT only) is the width of the LLM condition."""

    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float
    llm_cond_dim: int = 0
    pe_attn_head: int | None = None
    spk_dim: int | None = None
    qk_norm: str | None = None  # None or "rms_norm" (per-head RMSNorm of q and k before the rotary)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def attn_dim(self) -> int:
        """heads * head_dim: the q/k/v width, below hidden_size when heads do not divide it (as upstream)."""
        return self.head_dim * self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_dict(cls, d: dict, defaults: dict, where: str, condition: bool) -> "DiTConfig":
        merged = {**defaults, **{k: v for k, v in d.items() if v is not None}}
        hidden, heads = _positive_int(merged, "hidden_size", where), _positive_int(merged, "num_heads", where)
        if hidden < heads:
            raise TalkerConfigError(f"{where}: hidden_size {hidden} is smaller than num_heads {heads}")
        if (hidden // heads) % 2:
            raise TalkerConfigError(f"{where}: the head width {hidden // heads} must be even (rotary pairs)")
        qk_norm = d.get("qk_norm")
        if qk_norm not in (None, "rms_norm"):
            raise TalkerConfigError(f"{where}: qk_norm={qk_norm!r} is not supported (None or 'rms_norm', as upstream)")
        in_ch = _positive_int(merged, "in_channels", where)
        if in_ch != LATENT_DIM:
            raise TalkerConfigError(f"{where}: in_channels must be the latent width {LATENT_DIM}, got {in_ch}")
        pe = d.get("pe_attn_head")
        return cls(in_channels=in_ch, hidden_size=hidden, depth=_positive_int(merged, "depth", where), num_heads=heads,
                   mlp_ratio=float(merged.get("mlp_ratio", 4.0)),
                   llm_cond_dim=_positive_int(merged, "llm_cond_dim", where) if condition else 0,
                   pe_attn_head=None if pe is None else _positive_int(d, "pe_attn_head", where),
                   spk_dim=None if not d.get("spk_dim") else _positive_int(d, "spk_dim", where), qk_norm=qk_norm)


@dataclass(frozen=True)
class TalkerConfig:
    """`talker/config.json` plus the talker LLM's `llm/config.json`."""

    flow: DiTConfig
    aggregator: DiTConfig
    llm: Qwen2BackboneConfig
    steps: int = 10
    patch_size: int = 4
    history_patch_size: int = 32
    cfg_strength: float = 2.0  # 2.0 takes cfg per call; the Preview's CFM takes this one (spec §7.11)
    latent_dim: int = LATENT_DIM
    speaker_dim: int = SPEAKER_DIM
    release: str = "2.0"  # "preview": spec §7.11's prompt, history and sampler

    @property
    def preview(self) -> bool:
        return self.release == "preview"

    @classmethod
    def from_dicts(cls, talker: dict, llm: dict, where: str = "talker/config.json",
                   release: str = "2.0") -> "TalkerConfig":
        if release not in TALKER_RELEASES:
            raise TalkerConfigError(f"{where}: unknown talker release {release!r} (one of {', '.join(TALKER_RELEASES)})")
        arch = talker.get("architectures") or ["BailingTalker2"]
        if "BailingTalker2" not in arch:
            raise TalkerConfigError(
                f"{where}: architecture {arch} is not supported; only BailingTalker2 (the Ming-flash-omni 2.0 "
                "and Preview talker) is implemented")
        for key in ("flowmodel", "aggregator"):
            if not isinstance(talker.get(key, {}), dict):
                raise TalkerConfigError(f"{where}: '{key}' must be an object")
        llm_cfg = Qwen2BackboneConfig.from_dict(llm, where.replace("config.json", "llm/config.json"))
        flow = DiTConfig.from_dict(talker.get("flowmodel", {}), DIT_DEFAULTS, f"{where} flowmodel", condition=True)
        agg = DiTConfig.from_dict(talker.get("aggregator", {}), AGGREGATOR_DEFAULTS, f"{where} aggregator", condition=False)
        patch = _positive_int(talker, "patch_size", where, 4)
        cfg_strength = talker.get("cfg_strength", 2.0)
        if release == "preview" and (isinstance(cfg_strength, bool) or not isinstance(cfg_strength, (int, float))
                                     or not math.isfinite(cfg_strength) or cfg_strength < 0):
            # the Preview's sampler uses it (2.0 carries it unread)
            raise TalkerConfigError(f"{where}: 'cfg_strength' must be a finite number >= 0, got {cfg_strength!r}")
        # the Preview's history is the last patch (upstream's Preview loop keeps his_lat = gen_lat)
        history = patch if release == "preview" else _positive_int(talker, "history_patch_size", where, 32)
        cfg = cls(flow=flow, aggregator=agg, llm=llm_cfg, steps=_positive_int(talker, "steps", where, 10),
                  patch_size=patch, history_patch_size=history, cfg_strength=float(cfg_strength), release=release)
        if cfg.history_patch_size < cfg.patch_size:
            # upstream's history update has no case for a history shorter than one patch
            raise TalkerConfigError(f"{where}: history_patch_size {cfg.history_patch_size} is smaller than "
                                    f"patch_size {cfg.patch_size}; the latent history must hold at least one patch")
        return cfg

    @classmethod
    def from_folder(cls, folder: str | Path, release: str = "2.0") -> "TalkerConfig":
        folder = Path(folder)
        return cls.from_dicts(read_json(folder / "config.json"), read_json(folder / "llm" / "config.json"),
                              where=str(folder / "config.json"), release=release)


@dataclass(frozen=True)
class AudioVAEConfig:
    """`talker/vae/config.json` (AudioVAEconfig). The decoder emits hop = `output_dim` samples per frame
    (n_fft = 4 hop); the encoder reads frames of `input_dim` samples every `hop_size` (default 320,
    need not equal the decoder's hop); `patch_size` frames per latent (-1: no latent patching).
    An omitted `sample_rate` is AudioVAEconfig's default, 16000."""

    sample_rate: int
    patch_size: int
    enc_input_dim: int
    enc_hop: int
    dec_hop: int
    encoder: Qwen2BackboneConfig
    decoder: Qwen2BackboneConfig
    latent_dim: int = LATENT_DIM       # enc_kwargs.latent_dim: the posterior's width (fc3 gives 2x)
    dec_latent_dim: int = LATENT_DIM   # dec_kwargs.latent_dim: what the decoder's fc1 takes
    encoder_aggregator_layers: int = 4  # fixed upstream [V]

    @property
    def hop(self) -> int:
        return self.dec_hop

    @property
    def n_fft(self) -> int:
        return 4 * self.dec_hop

    @property
    def frames_per_latent(self) -> int:
        return max(1, self.patch_size)

    @property
    def samples_per_latent(self) -> int:
        """Decoded samples per latent."""
        return self.dec_hop * self.frames_per_latent

    @property
    def encoder_samples_per_latent(self) -> int:
        """Input samples the encoder reads per latent (the prompt padding unit, spec §7.4)."""
        return self.enc_hop * self.frames_per_latent

    @classmethod
    def from_dict(cls, d: dict, where: str = "talker/vae/config.json") -> "AudioVAEConfig":
        enc, dec = d.get("enc_kwargs"), d.get("dec_kwargs")
        if not isinstance(enc, dict) or not isinstance(dec, dict):
            raise TalkerConfigError(f"{where}: 'enc_kwargs' and 'dec_kwargs' objects are required")
        patch = d.get("patch_size", -1)
        if not isinstance(patch, int) or (patch != -1 and patch <= 0):
            raise TalkerConfigError(f"{where}: patch_size must be -1 or a positive integer, got {patch!r}")
        for side, kw in (("enc_kwargs", enc), ("dec_kwargs", dec)):
            _positive_int(kw, "latent_dim", f"{where} {side}", LATENT_DIM)
            if not isinstance(kw.get("backbone"), dict):
                raise TalkerConfigError(f"{where}: {side}.backbone (a Qwen2 config) is required")
        enc_hop = _positive_int(enc, "hop_size", f"{where} enc_kwargs", VAE_DEFAULT_ENCODER_HOP)
        dec_hop = _positive_int(dec, "output_dim", f"{where} dec_kwargs")
        return cls(sample_rate=_positive_int(d, "sample_rate", where, VAE_DEFAULT_SAMPLE_RATE), patch_size=patch,
                   enc_input_dim=_positive_int(enc, "input_dim", f"{where} enc_kwargs"), enc_hop=enc_hop, dec_hop=dec_hop,
                   latent_dim=_positive_int(enc, "latent_dim", where, LATENT_DIM),
                   dec_latent_dim=_positive_int(dec, "latent_dim", where, LATENT_DIM),
                   encoder=Qwen2BackboneConfig.from_dict(enc["backbone"], f"{where} enc_kwargs.backbone"),
                   decoder=Qwen2BackboneConfig.from_dict(dec["backbone"], f"{where} dec_kwargs.backbone"))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "AudioVAEConfig":
        folder = Path(folder)
        return cls.from_dict(read_json(folder / "config.json"), where=str(folder / "config.json"))
