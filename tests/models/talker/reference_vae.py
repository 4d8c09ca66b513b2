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


def _upsample_stream(x: torch.Tensor, state: dict | None, is_last: bool, factor: int):
    """StreamingLinearUpsample.forward: holds each chunk until the next one gives its look-ahead frame."""
    up = lambda y: F.interpolate(y, scale_factor=factor, mode="linear", align_corners=False)  # noqa: E731
    if state is None:
        state = {"prev_chunk": None, "history_last": None, "is_first": True}
    if state["is_first"] and is_last:
        return up(x.transpose(1, 2)).transpose(1, 2), None
    chunks = []
    if state["is_first"]:
        state["prev_chunk"], state["is_first"] = x, False
        if not is_last:
            return None, state
    if state["prev_chunk"] is not None:
        p = state["prev_chunk"].transpose(1, 2)
        look = x[:, :1, :].transpose(1, 2)
        if state["history_last"] is None:
            out = up(torch.cat([p, look], dim=2))[:, :, :p.size(2) * factor]
        else:
            out = up(torch.cat([state["history_last"], p, look], dim=2))[:, :, factor:factor + p.size(2) * factor]
        chunks.append(out.transpose(1, 2))
        state["history_last"], state["prev_chunk"] = p[:, :, -1:], x
    if is_last:
        p = state["prev_chunk"].transpose(1, 2)
        chunks.append(up(torch.cat([state["history_last"], p], dim=2))[:, :, factor:].transpose(1, 2))
        state = None
    return torch.cat(chunks, dim=1), state


def _buffer_process(x: torch.Tensor, buffer, pad: int, buffer_len: int, last: bool):
    """ISTFT.__buffer_process(streaming=True)."""
    if buffer is None:
        x = x[:, pad:]
    else:
        x = torch.cat([x[:, :buffer_len] + buffer, x[:, buffer_len:]], dim=1)
    buffer = x[:, -buffer_len:]
    return (x[:, :-pad] if last else x[:, :-buffer_len]), buffer


def stream_decode(chunks: list[torch.Tensor], sd: dict, c: dict) -> list[dict]:
    """token2wav(stream=True): Decoder.low_level_reconstruct(use_cache=True) per latent chunk, the last
    with last_chunk=True. Per call: wav, the KV length after it (get_seq_length), the decoder call
    lengths ([fill, rest] when the sliding-window split happens, else [n, 0]), the ISTFT audio / window
    buffers and the upsampler's history_last. The cached Qwen2 is the whole sequence re-run."""
    hop = c["dec_kwargs"]["output_dim"]
    win = 4 * hop
    pad, buffer_len, window = (win - hop) // 2, win - hop, torch.hann_window(win)
    window_size = c["dec"]["sliding_window"]   # decoder.config.sliding_window
    up_state, audio_buf, win_buf, seen, out = None, None, None, None, []
    for i, lat in enumerate(chunks):
        last = i == len(chunks) - 1
        x = F.linear(lat, sd["decoder.fc1.weight"], sd["decoder.fc1.bias"])
        past = 0 if seen is None else seen.shape[1]
        if c["patch_size"] != -1:
            x, up_state = _upsample_stream(x, up_state, last, c["patch_size"])
            if x is None:
                out.append({"wav": torch.zeros(lat.shape[0], 0), "kv": past, "calls": [0, 0],
                            "history_last": up_state["history_last"]})
                continue
        n = x.shape[1]
        split = window_size is not None and past < window_size - 1 and past + n >= window_size
        calls = [window_size - 1 - past, n - (window_size - 1 - past)] if split else [n, 0]
        seen = x if seen is None else torch.cat([seen, x], dim=1)
        h = qwen2_forward(seen, sd, "decoder.decoder.", c["dec"])[:, -n:]
        pred = F.linear(h, sd["decoder.head.out.weight"], sd["decoder.head.out.bias"]).transpose(1, 2)
        mag, phase = pred.chunk(2, dim=1)
        spec = torch.clip(torch.exp(mag), max=1e2) * (torch.cos(phase) + 1j * torch.sin(phase))
        frames = torch.fft.irfft(spec, win, dim=1, norm="backward") * window[None, :, None]
        t = frames.shape[-1]
        size = (t - 1) * hop + win
        y = F.fold(frames, output_size=(1, size), kernel_size=(1, win), stride=(1, hop))[:, 0, 0, :]
        env = F.fold(window.square().expand(1, t, -1).transpose(1, 2), output_size=(1, size), kernel_size=(1, win),
                     stride=(1, hop)).squeeze(0).squeeze(0)
        y, audio_buf = _buffer_process(y, audio_buf, pad, buffer_len, last)
        env, win_buf = _buffer_process(env, win_buf, pad, buffer_len, last)
        out.append({"wav": y / env.squeeze(), "kv": seen.shape[1], "calls": calls, "audio_buffer": audio_buf,
                    "window_buffer": win_buf, "history_last": None if up_state is None else up_state["history_last"]})
    return out
