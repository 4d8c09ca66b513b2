"""A deliberately plain AudioVAE for tests, written from the upstream 2.0 release's rules
(AudioVAE/modeling_audio_vae.py, vae_modules.py, istft.py at inclusionAI Ming 2a0c02a; the Preview's
e58533d is the same model without latent patching) and sharing nothing with engine.models.talker:
a raw config dict and a state dict in, waveforms / posterior parameters out. One-shot decode only
(streaming is checked against the one-shot decode elsewhere)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tests.models.talker.reference_qwen2 import qwen2_forward, qwen2_settings, qwen2_state_entries

# AudioVAEconfig.__init__ defaults and the keyword defaults AudioVAE.__init__ passes on.
VAE_CONFIG_DEFAULTS = {"sample_rate": 16000, "patch_size": -1}
ENCODER_HOP_DEFAULT = 320            # enc_kwargs.get('hop_size', 320)
ENCODER_AGGREGATOR_LAYERS = 4        # Encoder.__init__: config.num_hidden_layers = 4 for the aggregator


def vae_settings(config: dict) -> dict:
    c = {**VAE_CONFIG_DEFAULTS, **config}
    enc, dec = c["enc_kwargs"], c["dec_kwargs"]
    c["enc"] = qwen2_settings(enc["backbone"])
    c["dec"] = qwen2_settings(dec["backbone"])
    c["enc_hop"] = enc.get("hop_size", ENCODER_HOP_DEFAULT)
    return c


def vae_state_entries(c: dict) -> dict[str, tuple[int, ...]]:
    enc, dec = c["enc_kwargs"], c["dec_kwargs"]
    he, hdd = c["enc"]["hidden_size"], c["dec"]["hidden_size"]
    n_fft = 4 * dec["output_dim"]
    out = {**qwen2_state_entries(c["enc"], "encoder.encoder."),
           "encoder.fc1.weight": (he, enc["input_dim"]), "encoder.fc2.weight": (he, he), "encoder.fc2.bias": (he,),
           "encoder.fc3.weight": (2 * enc["latent_dim"], he), "encoder.fc3.bias": (2 * enc["latent_dim"],),
           "encoder.norm.weight": (he,), "encoder.norm.bias": (he,),
           **qwen2_state_entries(c["dec"], "decoder.decoder."),
           "decoder.fc1.weight": (hdd, dec["latent_dim"]), "decoder.fc1.bias": (hdd,),
           "decoder.head.out.weight": (n_fft + 2, hdd), "decoder.head.out.bias": (n_fft + 2,),
           "decoder.head.istft.window": (n_fft,)}
    if c["patch_size"] != -1:
        out["encoder.cls_embed"] = (1, 1, he)
        out.update(qwen2_state_entries({**c["enc"], "num_hidden_layers": ENCODER_AGGREGATOR_LAYERS}, "encoder.aggregator."))
    return out


def vae_buffers(c: dict) -> dict[str, torch.Tensor]:
    """Persistent buffers of the state dict: ISTFT's periodic Hann window (register_buffer("window"))."""
    return {"decoder.head.istft.window": torch.hann_window(4 * c["dec_kwargs"]["output_dim"])}


def encode(wav: torch.Tensor, sd: dict, c: dict) -> torch.Tensor:
    """Encoder.forward: [B, N] -> posterior parameters [B, T', 2 latent] (mean | scale)."""
    width, hop, patch = c["enc_kwargs"]["input_dim"], c["enc_hop"], c["patch_size"]
    frames_total = (wav.shape[-1] + hop - 1) // hop
    wav = F.pad(wav, (0, (frames_total - 1) * hop + width - wav.shape[-1]))
    x = wav.unfold(-1, width, hop)
    x = F.linear(F.linear(x, sd["encoder.fc1.weight"]), sd["encoder.fc2.weight"], sd["encoder.fc2.bias"])
    # with latent patching, the aggregator's `config.num_hidden_layers = 4` is set on the config object the
    # encoder's Qwen2Model holds too, whose forward loops over layers[:config.num_hidden_layers]
    run = ENCODER_AGGREGATOR_LAYERS if patch != -1 else None
    x = qwen2_forward(x, sd, "encoder.encoder.", c["enc"], run_layers=run)
    if patch != -1:
        b, t, d = x.shape
        x = F.pad(x, (0, 0, 0, (patch - t % patch) % patch)).reshape(-1, patch, d)
        x = torch.cat((x, sd["encoder.cls_embed"].expand(x.shape[0], -1, -1)), dim=1).reshape(b, -1, d)
        agg = {**c["enc"], "num_hidden_layers": ENCODER_AGGREGATOR_LAYERS}
        x = qwen2_forward(x, sd, "encoder.aggregator.", agg)
        x = x.reshape(-1, patch + 1, d)[:, -1:].reshape(b, -1, d)
    return F.linear(x, sd["encoder.fc3.weight"], sd["encoder.fc3.bias"])


def posterior(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OobleckDiagonalGaussianDistribution: (mean, std = softplus(scale) + 1e-4)."""
    mean, scale = params.transpose(1, 2).chunk(2, dim=1)
    return mean.transpose(1, 2), (F.softplus(scale) + 1e-4).transpose(1, 2)


def decode(latents: torch.Tensor, sd: dict, c: dict) -> torch.Tensor:
    """Decoder.low_level_reconstruct(use_cache=False): latents [B, T, latent] -> waveform [B, L]."""
    hop = c["dec_kwargs"]["output_dim"]
    n_fft = win = 4 * hop
    x = F.linear(latents, sd["decoder.fc1.weight"], sd["decoder.fc1.bias"])
    if c["patch_size"] != -1:
        x = F.interpolate(x.transpose(1, 2), scale_factor=c["patch_size"], mode="linear",
                          align_corners=False).transpose(1, 2)
    x = qwen2_forward(x, sd, "decoder.decoder.", c["dec"])
    pred = F.linear(x, sd["decoder.head.out.weight"], sd["decoder.head.out.bias"]).transpose(1, 2)
    mag, phase = pred.chunk(2, dim=1)
    mag = torch.clip(torch.exp(mag), max=1e2)
    spec = mag * (torch.cos(phase) + 1j * torch.sin(phase))
    window = torch.hann_window(win)
    frames = torch.fft.irfft(spec, n_fft, dim=1, norm="backward") * window[None, :, None]
    t = frames.shape[-1]
    size = (t - 1) * hop + win
    y = F.fold(frames, output_size=(1, size), kernel_size=(1, win), stride=(1, hop))[:, 0, 0, :]
    env = F.fold(window.square().expand(1, t, -1).transpose(1, 2), output_size=(1, size), kernel_size=(1, win),
                 stride=(1, hop)).squeeze()
    pad = (win - hop) // 2
    return y[:, pad:-pad] / env[pad:-pad]


def prompt_padding(c: dict, talker_patch: int) -> int:
    """register_prompt_wav's span: encoder hop * max(1, patch_size) * the talker's patch_size."""
    return c["enc_hop"] * max(1, c["patch_size"]) * talker_patch


def frame_num(n_samples: int, c: dict) -> int:
    frames = math.ceil(n_samples / c["enc_kwargs"]["input_dim"])
    return math.ceil(frames / c["patch_size"]) if c["patch_size"] != -1 else frames
