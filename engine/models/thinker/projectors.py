"""Projectors from the vision/audio encoders into the LLM embedding space, and the L2 normalisation
(spec §4.5, §5.3), plus the high-level `encode_images` / `encode_audio` helpers.

* `VisionProjector` (`linear_proj`): Sequential(Linear(out_hidden→H), GELU, Linear(H→H), …) — with
  `mlp_depth` d there are d Linears at indices 0, 2, 4, … (odd indices are the exact GELUs).
* `AudioProjector` (`linear_proj_audio`): Sequential(Conv1d(n_state→H, k=ds_kernel_size,
  stride=ds_stride, pad=k//2), Transpose, [GELU, Linear(H→H)]×(d−1), Transpose); channel-first in and
  out like upstream, so the checkpoint names are `linear_proj_audio.0` and `.3` for d = 2.
* `l2_normalize`: v / max(‖v‖₂, 1e-12) per row.

The helpers return embeddings ready to scatter into `<imagePatch>`/`<framePatch>`/`<audioPatch>` slots.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.media.audio import TimeConv, audio_token_count
from engine.models.thinker.audio_encoder import AudioEncoderConfig, WhisperAudioEncoder

L2_EPS = 1e-12


class Transpose(nn.Module):
    """Swap two dimensions (a parameter-free Sequential step of `linear_proj_audio`)."""

    def __init__(self, dim0: int, dim1: int):
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(self.dim0, self.dim1)


def l2_normalize(x: torch.Tensor, eps: float = L2_EPS, *, fp32: bool = False) -> torch.Tensor:
    """x / max(‖x‖₂, eps) over the last dim. `fp32` computes in fp32 and casts back (the audio path
    runs under autocast, where the norm is fp32); otherwise it computes in x's dtype."""
    y = x.float() if fp32 else x
    y = y / y.norm(p=2, dim=-1, keepdim=True).clamp_min(eps)
    return y.to(x.dtype)


class VisionProjector(nn.Sequential):
    """`linear_proj`: Linear(in→H) followed by (GELU, Linear(H→H)) × (mlp_depth − 1)."""

    def __init__(self, in_dim: int, llm_hidden_size: int, mlp_depth: int = 2):
        if mlp_depth < 1:
            raise ValueError(f"mlp_depth must be >= 1, got {mlp_depth}")
        layers: list[nn.Module] = [nn.Linear(in_dim, llm_hidden_size)]
        for _ in range(1, mlp_depth):
            layers += [nn.GELU(), nn.Linear(llm_hidden_size, llm_hidden_size)]
        super().__init__(*layers)


class AudioProjector(nn.Sequential):
    """`linear_proj_audio`: [B, n_state, T₂] → [B, H, T₃] (channel-first, as upstream).

    T₃ = ⌊(T₂ + 2·⌊k/2⌋ − k)/stride⌋ + 1. `normalize_output` records `norm_query_embeds`.
    """

    def __init__(self, in_dim: int, llm_hidden_size: int, kernel_size: int, stride: int,
                 mlp_depth: int = 2, normalize_output: bool = True):
        if mlp_depth < 1:
            raise ValueError(f"mlp_depth must be >= 1, got {mlp_depth}")
        layers: list[nn.Module] = [
            nn.Conv1d(in_dim, llm_hidden_size, kernel_size=kernel_size, stride=stride,
                      padding=kernel_size // 2),
            Transpose(-1, -2),
        ]
        for _ in range(1, mlp_depth):
            layers += [nn.GELU(), nn.Linear(llm_hidden_size, llm_hidden_size)]
        layers.append(Transpose(-1, -2))
        super().__init__(*layers)
        self.kernel_size, self.stride = kernel_size, stride
        self.time_conv = TimeConv(kernel_size, stride)
        self.normalize_output = normalize_output

    @classmethod
    def from_config(cls, cfg: AudioEncoderConfig, llm_hidden_size: int, mlp_depth: int = 2) -> "AudioProjector":
        return cls(cfg.n_state, llm_hidden_size, cfg.ds_kernel_size, cfg.ds_stride, mlp_depth,
                   normalize_output=cfg.norm_query_embeds)

    def output_length(self, n_frames: int) -> int:
        return self.time_conv.output_length(n_frames)

    def project_time_major(self, x: torch.Tensor) -> torch.Tensor:
        """[..., T₂, n_state] (time-major) → [..., T₃, H]."""
        single = x.dim() == 2
        y = self.forward((x.unsqueeze(0) if single else x).transpose(-1, -2)).transpose(-1, -2)
        return y[0] if single else y


def projector_output_length(n_frames: int, kernel_size: int, stride: int) -> int:
    """Frames after the projector conv (padding k//2). The clip's token count is `audio_token_count` (one
    function, engine.media.audio's, which the processor uses too)."""
    return TimeConv(kernel_size, stride).output_length(n_frames)


# --------------------------------------------------------------------------------------------
# High-level helpers
# --------------------------------------------------------------------------------------------


def encode_images(vision: nn.Module, linear_proj: nn.Module, pixel_values: torch.Tensor,
                  grid_thw, check: Callable[[], None] | None = None) -> torch.Tensor:
    """pixel_values [N, C·tp·P·P] + grid_thw [n, 3] → unit-norm LLM embeddings [N/m², H].

    ViT → `linear_proj` → L2 normalisation (in the projector's dtype, as the reference does).
    Images (or video frames) follow each other in grid order. `check`: called between the ViT's
    blocks and attention calls (it may raise to stop).
    """
    feats = vision(pixel_values, grid_thw, check)
    proj_dtype = next(linear_proj.parameters()).dtype
    return l2_normalize(linear_proj(feats.to(proj_dtype)))


def encode_audio(audio_encoder: WhisperAudioEncoder, linear_proj_audio: AudioProjector,
                 mel: torch.Tensor | Sequence[torch.Tensor], *, pad_batch: bool = True,
                 normalize: bool | None = None):
    """Log-mel → unit-norm LLM audio embeddings.

    * `mel` [T, n_mels] (one clip) → [T₃, H].
    * `mel` a list of clips → a list of [T₃_i, H]. With `pad_batch` (default, the reference
      behaviour) the clips are zero-padded to the longest and encoded and projected as one batch with
      no attention mask, so a shorter clip sees the padding; `pad_batch=False` encodes each clip alone.

    `normalize` defaults to the projector's `normalize_output` (`norm_query_embeds`); the
    normalisation is computed in fp32 and cast back.
    """
    norm = linear_proj_audio.normalize_output if normalize is None else normalize

    def finish(y: torch.Tensor) -> torch.Tensor:
        return l2_normalize(y, fp32=True) if norm else y

    if isinstance(mel, torch.Tensor):
        if mel.dim() != 2:
            raise ValueError(f"one clip must be [T, n_mels], got {list(mel.shape)}; pass a list for several")
        enc = audio_encoder(mel)
        return finish(linear_proj_audio.project_time_major(enc.to(_dtype(linear_proj_audio))))
    clips = list(mel)
    if not pad_batch:
        return [encode_audio(audio_encoder, linear_proj_audio, c, normalize=norm) for c in clips]
    enc, t2 = audio_encoder.encode_padded(clips)
    proj = finish(linear_proj_audio.project_time_major(enc.to(_dtype(linear_proj_audio))))
    return [proj[i, :linear_proj_audio.output_length(n)] for i, n in enumerate(t2)]


def encode_audio_wrapped(audio_encoder: WhisperAudioEncoder, linear_proj_audio: AudioProjector,
                         audio_feats: torch.Tensor, audio_feats_lengths: torch.Tensor, *,
                         normalize: bool | None = None, check: Callable[[], None] | None = None):
    """The processor's "wrapped" layout, encoded exactly as the reference model does.

    audio_feats [B, L, n_mels] holds each sample's clips concatenated in time; audio_feats_lengths
    [B, N] their mel lengths (0 = no more clips in that row). All clips of the batch are padded into
    one encoder batch (no mask), projected, cut to T₃_i, re-concatenated per sample (zero-padded across
    samples) and L2-normalised.

    Returns (embeds [B, max Σ T₃, H], embeds_lengths [B, N] (0-padded), encoder_out [n_clips, T₂max, n_state]).
    """
    if audio_feats.dim() != 3 or audio_feats_lengths.dim() != 2 or audio_feats.shape[0] != audio_feats_lengths.shape[0]:
        raise ValueError("audio_feats must be [B, L, n_mels] and audio_feats_lengths [B, N]")
    norm = linear_proj_audio.normalize_output if normalize is None else normalize
    clips, owner = [], []
    for b in range(audio_feats.shape[0]):
        start = 0
        for n in audio_feats_lengths[b].tolist():
            if n <= 0:
                break
            if start + n > audio_feats.shape[1]:
                raise ValueError(f"audio_feats_lengths row {b} exceeds the feature length {audio_feats.shape[1]}")
            clips.append(audio_feats[b, start:start + n])
            owner.append(b)
            start += n
    if not clips:
        raise ValueError("audio_feats_lengths holds no clip")
    enc, t2 = audio_encoder.encode_padded(clips, check)
    proj = linear_proj_audio.project_time_major(enc.to(_dtype(linear_proj_audio)))
    t3 = [linear_proj_audio.output_length(n) for n in t2]
    per_sample: list[list[torch.Tensor]] = [[] for _ in range(audio_feats.shape[0])]
    lens: list[list[int]] = [[] for _ in range(audio_feats.shape[0])]
    for i, (b, n) in enumerate(zip(owner, t3)):
        per_sample[b].append(proj[i, :n])
        lens[b].append(n)
    rows = [torch.cat(p) if p else proj.new_zeros(0, proj.shape[-1]) for p in per_sample]
    embeds = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    if norm:
        embeds = l2_normalize(embeds, fp32=True)
    width = max(len(ln) for ln in lens)   # as the reference's re-wrap: most clips in one sample
    lengths = torch.tensor([ln + [0] * (width - len(ln)) for ln in lens], dtype=torch.long)
    return embeds, lengths, enc


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
