"""Whisper audio encoder of the Ming-flash-omni thinker (openai-whisper `AudioEncoder` layout, spec §5.2).

Log-mel features [T, n_mels] → conv1 (k3, pad 1) + GELU → conv2 (k3, stride 2, pad 1) + GELU →
+ sinusoidal position rows 0..T₂−1 → n_layer pre-LN blocks (LayerNorm in fp32, full attention with no
mask, scale 1/sqrt(head_dim), key projection without bias) → `ln_post` → [T₂, n_state],
T₂ = ⌊(T−1)/2⌋ + 1.

State-dict keys equal the checkpoint names without the leading ``audio.`` (`conv1.*`, `conv2.*`,
`positional_embedding` — a persistent buffer the checkpoint stores —, `blocks.{i}.attn.{query,key,value,out}`,
`blocks.{i}.attn_ln`, `blocks.{i}.mlp.{0,2}`, `blocks.{i}.mlp_ln`, `ln_post`).

Several clips are encoded the reference way by `encode_padded`: zero-padded to the longest clip and run
as one batch with no attention mask (so a shorter clip's output depends on the padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.media.audio import whisper_encoder_frames

WHISPER_LN_EPS = 1e-5          # torch LayerNorm default, as openai-whisper uses
WHISPER_MAX_TIMESCALE = 10000  # sinusoid base
WHISPER_MLP_RATIO = 4          # n_mlp = 4·n_state in openai-whisper


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Typed view of a checkpoint's `audio_config` (whisper encoder sizes + projector conv)."""

    n_mels: int
    n_ctx: int
    n_state: int
    n_head: int
    n_layer: int
    ds_kernel_size: int = 3
    ds_stride: int = 2
    norm_query_embeds: bool = True

    @property
    def head_dim(self) -> int:
        return self.n_state // self.n_head

    @classmethod
    def from_dict(cls, d: dict) -> "AudioEncoderConfig":
        if not isinstance(d, dict) or "whisper_encoder_config" not in d:
            raise ValueError("audio_config must be a dict with a 'whisper_encoder_config' entry")
        w = d["whisper_encoder_config"] or {}
        missing = [k for k in ("n_mels", "n_ctx", "n_state", "n_head", "n_layer") if k not in w]
        if missing:
            raise ValueError(f"audio_config.whisper_encoder_config: missing keys {missing}")
        cfg = cls(
            n_mels=int(w["n_mels"]), n_ctx=int(w["n_ctx"]), n_state=int(w["n_state"]),
            n_head=int(w["n_head"]), n_layer=int(w["n_layer"]),
            ds_kernel_size=int(d.get("ds_kernel_size", 3)),
            ds_stride=int(d.get("ds_stride", 2)),
            norm_query_embeds=bool(d.get("norm_query_embeds", True)),
        )
        if cfg.n_state % cfg.n_head:
            raise ValueError(f"audio_config: n_state {cfg.n_state} not divisible by n_head {cfg.n_head}")
        if cfg.n_state % 2 or cfg.n_state < 4:
            raise ValueError(f"audio_config: n_state {cfg.n_state} must be even and >= 4 (sinusoids)")
        if cfg.ds_kernel_size < 1 or cfg.ds_stride < 1:
            raise ValueError("audio_config: ds_kernel_size and ds_stride must be positive")
        return cfg


def whisper_output_length(n_frames: int) -> int:
    """Encoder frames T₂ for T mel frames (conv2 has k 3, stride 2, pad 1): ⌊(T−1)/2⌋ + 1."""
    return whisper_encoder_frames(n_frames)


def sinusoids(length: int, channels: int, max_timescale: float = WHISPER_MAX_TIMESCALE) -> torch.Tensor:
    """Whisper's position table [length, channels]: sin(p·e^(−inc·k)) | cos(p·e^(−inc·k)), inc = ln(base)/(C/2−1)."""
    half = channels // 2
    inc = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-inc * torch.arange(half, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def _layer_norm_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                        norm.eps).to(x.dtype)


class WhisperAttention(nn.Module):
    """Multi-head self-attention; `key` has no bias; no mask; scale 1/sqrt(head_dim)."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_head, -1).transpose(1, 2)     # [B, H, T, hd]

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        o = F.scaled_dot_product_attention(q, k, v)                  # default scale 1/sqrt(hd)
        return self.out(o.transpose(1, 2).reshape(b, t, d))


class WhisperBlock(nn.Module):
    """Pre-LN block: x += out(attn(LN x)); x += mlp.2(GELU(mlp.0(LN x)))."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = WhisperAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state, eps=WHISPER_LN_EPS)
        n_mlp = n_state * WHISPER_MLP_RATIO
        self.mlp = nn.Sequential(nn.Linear(n_state, n_mlp), nn.GELU(), nn.Linear(n_mlp, n_state))
        self.mlp_ln = nn.LayerNorm(n_state, eps=WHISPER_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(_layer_norm_fp32(self.attn_ln, x))
        return x + self.mlp(_layer_norm_fp32(self.mlp_ln, x))


class WhisperAudioEncoder(nn.Module):
    """openai-whisper AudioEncoder sized by `AudioEncoderConfig`; see the module docstring.

    forward(mel): [T, n_mels] → [T₂, n_state]; a padded batch [B, T, n_mels] → [B, T₂, n_state];
    a list of clips [T_i, n_mels] → a list of [T₂_i, n_state] (with `pad_batch`, the default, encoded as
    one zero-padded batch like the reference; otherwise each clip alone).
    Inputs are cast to the parameters' dtype; LayerNorms run in fp32.
    """

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.config = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.n_state, cfg.n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(cfg.n_ctx, cfg.n_state), persistent=True)
        self.blocks = nn.ModuleList(WhisperBlock(cfg.n_state, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_post = nn.LayerNorm(cfg.n_state, eps=WHISPER_LN_EPS)

    @property
    def audio_emb_dim(self) -> int:
        return self.config.n_state

    def forward(self, mel: torch.Tensor | Sequence[torch.Tensor], *, pad_batch: bool = True,
                check: Callable[[], None] | None = None):
        """`check` is called between blocks (it may raise to stop: a cancelled request)."""
        if not isinstance(mel, torch.Tensor):
            clips = list(mel)
            if not pad_batch:
                return [self.forward(c, check=check) for c in clips]
            out, t2 = self.encode_padded(clips, check)
            return [out[i, :n] for i, n in enumerate(t2)]
        single = mel.dim() == 2
        x = mel.unsqueeze(0) if single else mel
        if x.dim() != 3 or x.shape[-1] != self.config.n_mels:
            raise ValueError(f"mel must be [T, {self.config.n_mels}] or [B, T, {self.config.n_mels}], "
                             f"got {list(mel.shape)}")
        t2 = whisper_output_length(x.shape[1])
        if t2 > self.config.n_ctx:
            raise ValueError(f"audio too long: {x.shape[1]} mel frames give {t2} encoder frames "
                             f"> n_ctx {self.config.n_ctx}")
        x = x.to(self.conv1.weight.dtype).transpose(1, 2)               # [B, n_mels, T]
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).transpose(1, 2)                       # [B, T₂, n_state]
        x = (x + self.positional_embedding[:t2]).to(x.dtype)
        for blk in self.blocks:
            if check is not None:
                check()
            x = blk(x)
        x = _layer_norm_fp32(self.ln_post, x)
        return x[0] if single else x

    def encode_padded(self, clips: Sequence[torch.Tensor],
                      check: Callable[[], None] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Reference batching: zero-pad clips [T_i, n_mels] to the longest, encode as one batch
        (no mask). Returns ([n, T₂max, n_state], [T₂_i])."""
        if not clips:
            raise ValueError("no audio clips given")
        lengths = [int(c.shape[0]) for c in clips]
        if min(lengths) < 1:
            raise ValueError("empty audio clip")
        if any(c.dim() != 2 for c in clips):
            raise ValueError("each clip must be [T, n_mels]")
        batch = torch.nn.utils.rnn.pad_sequence(list(clips), batch_first=True)
        return self.forward(batch, check=check), [whisper_output_length(n) for n in lengths]
