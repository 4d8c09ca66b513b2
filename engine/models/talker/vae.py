"""The AudioVAE (`talker/vae`, spec §7.8): waveform <-> 64-d latents at `sample_rate` (44.1 kHz for 2.0).

  * `Encoder` (`encoder.*`, prompt audio only): frames of `input_dim` samples with stride hop -> fc1
    (no bias) -> fc2 -> causal Qwen2 (with latent patching, its first 4 layers only) -> per group of `patch_size` frames a learned CLS through a
    4-layer causal Qwen2 aggregator run over the whole interleaved sequence -> fc3 -> (mean, scale); std = softplus(scale) + 1e-4.
  * `Decoder` (`decoder.*`): fc1 -> linear x`patch_size` upsampling (align_corners=False) -> causal Qwen2
    (KV-cached, sliding window per its config) -> ISTFT head (log-magnitude + phase, n_fft = 4 hop,
    periodic Hann, "same" padding).
  * `StreamingDecoder`: the same decode chunk by chunk with the three pieces of state (upsampler
    look-ahead, the Qwen2 KV cache, the ISTFT overlap buffers); the concatenated stream equals the
    one-shot decode up to rounding.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.loader import CheckpointFiles, check_unexpected, load_module
from engine.models.talker.backbone import DynamicKVCache, Qwen2Backbone, RotaryTable
from engine.models.talker.config import AudioVAEConfig

MAX_LOG_MAGNITUDE_EXP = 100.0  # |S| = min(exp(m), 100)
POSTERIOR_STD_FLOOR = 1e-4


class Encoder(nn.Module):
    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        b = cfg.encoder
        self.cfg = cfg
        self.fc1 = nn.Linear(cfg.enc_input_dim, b.hidden_size, bias=False)
        self.fc2 = nn.Linear(b.hidden_size, b.hidden_size)
        # Upstream builds the aggregator by setting num_hidden_layers = 4 on the config object the encoder's
        # Qwen2Model already holds, and Qwen2Model.forward runs layers[:config.num_hidden_layers]: with
        # latent patching the encoder runs its first 4 layers only (its deeper layers are loaded, unused).
        self.encoder = Qwen2Backbone(b, cfg.encoder_aggregator_layers if cfg.patch_size != -1 else None)
        self.fc3 = nn.Linear(b.hidden_size, 2 * cfg.latent_dim)
        self.norm = nn.LayerNorm(b.hidden_size)  # defined upstream, unused [V]
        if cfg.patch_size != -1:
            self.cls_embed = nn.Parameter(torch.zeros(1, 1, b.hidden_size))
            self.aggregator = Qwen2Backbone(b.with_layers(cfg.encoder_aggregator_layers))

    def frames(self, wav: torch.Tensor) -> torch.Tensor:
        """[B, N] -> [B, ceil(N / hop), input_dim]: windows of input_dim samples, stride hop, end zero-padded."""
        hop, width = self.cfg.enc_hop, self.cfg.enc_input_dim
        n = math.ceil(wav.shape[-1] / hop)
        need = (n - 1) * hop + width
        wav = F.pad(wav, (0, need - wav.shape[-1]))
        return wav.unfold(-1, width, hop)

    def forward(self, wav: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """[B, N] waveform -> posterior parameters [B, T', 2 * latent] (mean | scale)."""
        frames = self.frames(wav)
        h = self.encoder(self.fc2(self.fc1(frames)))
        if trace is not None:
            trace["frames"], trace["encoder_hidden"] = frames, h
        if self.cfg.patch_size != -1:
            p = self.cfg.patch_size
            b, t, d = h.shape
            groups = math.ceil(t / p)
            # one causal sequence [g0 frames, CLS, g1 frames, CLS, ...]; each CLS output summarises its group
            h = F.pad(h, (0, 0, 0, groups * p - t)).view(b, groups, p, d)
            h = torch.cat([h, self.cls_embed.to(h.dtype).expand(b, groups, 1, d)], dim=2)
            h = self.aggregator(h.reshape(b, groups * (p + 1), d)).view(b, groups, p + 1, d)[:, :, -1]
        return self.fc3(h)


@dataclass
class Posterior:
    mean: torch.Tensor
    std: torch.Tensor
    noise_dtype: torch.dtype = torch.float32  # the encoder's output dtype, the reference's draws' (mean/std are fp32)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * noise

    def seeded_noise(self, seed: int) -> torch.Tensor:
        """The reference's epsilon for `torch.manual_seed(seed)` (spec §7.4): its posterior is diffusers' Oobleck
        distribution, which draws with randn_tensor on the VAE's device in the encoder output's dtype (a CUDA
        stream is not the CPU's, and the CPU's bf16 draws are not its fp32 draws rounded at every size), so ours
        are drawn there, in `noise_dtype`; its mean is channel-major [B, latent, T'], so the Gaussian draws fill that layout,
        returned transposed to our time-major [B, T', latent]."""
        batch, frames, channels = self.mean.shape
        gen = torch.Generator(device=self.mean.device).manual_seed(int(seed))
        noise = torch.randn(batch, channels, frames, generator=gen, device=self.mean.device, dtype=self.noise_dtype)
        return noise.transpose(1, 2)


class ISTFTHead(nn.Module):
    """Linear(hidden -> n_fft + 2) -> log-magnitude / phase -> inverse STFT ("same" padding)."""

    def __init__(self, hidden: int, n_fft: int, hop: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.pad = (n_fft - hop) // 2
        self.out = nn.Linear(hidden, n_fft + 2)
        self.istft = nn.Module()
        self.istft.register_buffer("window", torch.hann_window(n_fft))

    def _window(self) -> torch.Tensor:
        """The Hann window in the head's dtype: the reference's buffer is cast with the model (bf16)."""
        return self.istft.window.to(self.out.weight.dtype)

    def spectrum_frames(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] -> windowed time-domain frames [B, T, n_fft] (before overlap-add), fp32.
        As in the reference, exp / clamp / cos / sin are taken in the head's dtype (bf16 rounds them),
        the complex spectrum, inverse FFT and window product in fp32."""
        mag, phase = self.out(x).chunk(2, dim=-1)
        mag = torch.clamp(torch.exp(mag), max=MAX_LOG_MAGNITUDE_EXP).float()
        spec = torch.complex(mag * torch.cos(phase).float(), mag * torch.sin(phase).float())
        return torch.fft.irfft(spec, n=self.n_fft, dim=-1) * self._window().float()

    def overlap_add(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Overlap-add [B, T, n_fft] frames with stride hop: (audio [B, (T-1) hop + n_fft] fp32, envelope
        [same] of the squared window, folded in the head's dtype as the reference does)."""
        b, t, n = frames.shape
        size = (t - 1) * self.hop + n
        audio = F.fold(frames.transpose(1, 2), output_size=(1, size), kernel_size=(1, n), stride=(1, self.hop))[:, 0, 0]
        wsq = self._window().square()[None, :, None].expand(1, n, t)
        env = F.fold(wsq, output_size=(1, size), kernel_size=(1, n), stride=(1, self.hop))[0, 0, 0]
        return audio, env

    def forward(self, x: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        if trace is not None:
            trace["head_out"] = self.out(x)
        audio, env = self.overlap_add(self.spectrum_frames(x))
        end = audio.shape[-1] - self.pad
        return audio[:, self.pad:end] / env[self.pad:end]


def upsample_linear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, T, D] -> [B, T * factor, D], linear, align_corners=False."""
    return F.interpolate(x.transpose(1, 2), scale_factor=factor, mode="linear", align_corners=False).transpose(1, 2)


class Decoder(nn.Module):
    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        b = cfg.decoder
        self.cfg = cfg
        self.fc1 = nn.Linear(cfg.dec_latent_dim, b.hidden_size)
        self.decoder = Qwen2Backbone(b)
        self.head = ISTFTHead(b.hidden_size, cfg.n_fft, cfg.dec_hop)

    def forward(self, latents: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """One-shot decode: latents [B, T, 64] -> waveform [B, T * samples_per_latent]."""
        h = self.fc1(latents)
        if self.cfg.patch_size != -1:
            h = upsample_linear(h, self.cfg.patch_size)
        if trace is not None:
            trace["upsampled"] = h
        h = self.decoder(h)
        if trace is not None:
            trace["decoder_hidden"] = h
        return self.head(h, trace)


class AudioVAE(nn.Module):
    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def posterior(self, wav: torch.Tensor, trace: dict | None = None) -> Posterior:
        params = self.encoder(wav, trace)
        if trace is not None:
            trace["posterior_params"] = params
        mean, scale = params.float().chunk(2, dim=-1)
        return Posterior(mean, F.softplus(scale) + POSTERIOR_STD_FLOOR, params.dtype)

    def decode(self, latents: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        return self.decoder(latents, trace)

    def stream(self) -> "StreamingDecoder":
        return StreamingDecoder(self.decoder)


@dataclass
class StreamState:
    """What a streaming decode carries between calls (spec §7.8 (a)-(c))."""

    held: torch.Tensor | None = None         # fc1 output of the newest chunk, held for look-ahead
    history_last: torch.Tensor | None = None  # the last fc1 frame of the chunk before it [B, D, 1]
    cache: DynamicKVCache | None = None
    audio_buffer: torch.Tensor | None = None  # overlap-added tail not yet complete [B, n_fft - hop]
    window_buffer: torch.Tensor | None = None
    to_drop: int | None = None                # leading `pad` samples still to drop (None: nothing emitted yet)
    decoder_calls: list[list[int]] = field(default_factory=list)


class StreamingDecoder:
    """`push(latents)` returns the waveform that is final so far; `push(latents, last=True)` flushes.

    The upsampler holds the newest chunk back until the next one arrives (its first frame is the
    look-ahead the linear interpolation needs), so the first push returns nothing. Without latent
    patching (patch_size -1) there is no upsampler: each chunk is decoded and emitted at once."""

    def __init__(self, decoder: Decoder):
        self.dec = decoder
        self.state = StreamState(cache=DynamicKVCache(decoder.cfg.decoder))

    # (a) upsampler
    def _upsample(self, h: torch.Tensor, nxt: torch.Tensor | None) -> torch.Tensor:
        f = self.dec.cfg.patch_size
        if f == -1:
            return h
        prev = self.state.history_last.transpose(1, 2) if self.state.history_last is not None else h[:, :1]
        after = nxt[:, :1] if nxt is not None else h[:, -1:]
        up = upsample_linear(torch.cat([prev, h, after], dim=1), f)
        return up[:, f:-f]

    # (b) the Qwen2 backbone with its KV cache
    def _backbone(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.state.cache
        window = self.dec.cfg.decoder.sliding_window
        past, n = cache.length, x.shape[1]
        # Calls are split where the cache first fills the sliding window, as the reference does.
        cut = window - 1 - past if window is not None and past < window - 1 < past + n else None
        pieces = [x] if cut is None else [x[:, :cut], x[:, cut:]]
        self.state.decoder_calls.append([p.shape[1] for p in pieces] + [0] * (2 - len(pieces)))
        return torch.cat([self.dec.decoder(p, cache) for p in pieces], dim=1)

    # (c) ISTFT overlap buffers
    def _istft(self, h: torch.Tensor, last: bool) -> torch.Tensor:
        head = self.dec.head
        audio, env = head.overlap_add(head.spectrum_frames(h))
        overlap = head.n_fft - head.hop
        st = self.state
        if st.audio_buffer is not None:
            audio = torch.cat([audio[:, :overlap] + st.audio_buffer, audio[:, overlap:]], dim=1)
            env = torch.cat([env[:overlap] + st.window_buffer, env[overlap:]])
        if st.to_drop is None:
            st.to_drop = head.pad
        # the newest (n_fft - hop) samples still overlap the next chunk; on the last chunk they are
        # final except the trailing `pad`
        tail = audio.shape[1] - overlap
        st.audio_buffer, st.window_buffer = audio[:, tail:], env[tail:]
        end = audio.shape[1] - head.pad if last else tail
        # a first chunk of one frame has only hop (< pad) final samples: the rest of the pad is
        # dropped from the next chunk's, not emitted
        start = min(st.to_drop, max(end, 0))
        st.to_drop -= start
        return audio[:, start:end] / env[start:end]

    def _flush_tail(self) -> torch.Tensor | None:
        """A final call without new frames: the overlap tail is final, less the trailing `pad`."""
        st, head = self.state, self.dec.head
        if st.audio_buffer is None:
            return None
        end = st.audio_buffer.shape[1] - head.pad
        start = min(st.to_drop or 0, max(end, 0))
        st.to_drop = (st.to_drop or 0) - start
        out = st.audio_buffer[:, start:end] / st.window_buffer[start:end]
        st.audio_buffer = st.window_buffer = None
        return out

    def _emit(self, h: torch.Tensor, last: bool) -> torch.Tensor:
        return self._istft(self._backbone(h), last)

    def push(self, latents: torch.Tensor | None, last: bool = False) -> torch.Tensor:
        """Feed latents [B, T, 64] (None or T = 0 on a bare final flush); returns the waveform
        [B, n] that is final so far (all of it when `last`)."""
        st = self.state
        h = self.dec.fc1(latents) if latents is not None and latents.shape[1] else None
        out = None
        if self.dec.cfg.patch_size == -1:
            # no upsampler, so nothing to look ahead for: each chunk is decoded and emitted at once
            if h is not None:
                out = self._emit(h, last)
            elif last:
                out = self._flush_tail()
        elif last:
            seq = [x for x in (st.held, h) if x is not None]
            st.held = None
            if seq:
                out = self._emit(self._upsample(torch.cat(seq, dim=1), None), last=True)
        elif h is not None and st.held is not None:
            out = self._emit(self._upsample(st.held, h), last=False)
            st.history_last = st.held[:, -1:].transpose(1, 2)
            st.held = h
        elif h is not None:
            st.held = h
        if out is None:
            st.decoder_calls.append([0, 0])
            batch = latents.shape[0] if latents is not None else 1
            return torch.zeros(batch, 0, dtype=torch.float32, device=self.dec.fc1.weight.device)
        return out


def load_audio_vae(folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> AudioVAE:
    folder = Path(folder)
    cfg = AudioVAEConfig.from_folder(folder)
    t0 = time.perf_counter()
    with torch.device("meta"):
        vae = AudioVAE(cfg)
    files = CheckpointFiles.open(folder)
    with files.reader() as reader:
        consumed = load_module(vae, reader, "", dtype, device, keep_fp32=("window",))
    check_unexpected(files, consumed)
    for backbone in (vae.encoder.encoder, getattr(vae.encoder, "aggregator", None), vae.decoder.decoder):
        if backbone is not None:
            backbone.rotary = RotaryTable(backbone.config.head_dim, backbone.config.rope_theta, dtype).to(device)
    vae.eval()
    vae.load_seconds = time.perf_counter() - t0
    return vae
