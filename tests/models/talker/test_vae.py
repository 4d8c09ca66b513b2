"""AudioVAE: streamed decode equals one-shot decode (any chunking), encoder posterior shapes."""

import pytest
import torch

from engine.models.talker.audio import left_pad_to_multiple
from engine.models.talker.vae import load_audio_vae

STREAM_ATOL = 1e-4


@pytest.fixture(scope="module")
def vae(tiny_talker_dir):
    return load_audio_vae(tiny_talker_dir / "vae")


@pytest.mark.parametrize("chunks", [[1] * 6, [2, 1, 3], [6], [1, 5]])
def test_streaming_equals_one_shot(vae, chunks):
    torch.manual_seed(0)
    latents = torch.randn(1, 4 * sum(chunks), 64)
    with torch.inference_mode():
        one = vae.decode(latents)
        stream, pieces, offset = vae.stream(), [], 0
        for i, n in enumerate(chunks):
            pieces.append(stream.push(latents[:, 4 * offset: 4 * (offset + n)], last=i == len(chunks) - 1))
            offset += n
    streamed = torch.cat(pieces, dim=1)
    assert streamed.shape == one.shape == (1, latents.shape[1] * vae.config.samples_per_latent)
    assert (streamed - one).abs().max() <= STREAM_ATOL
    assert pieces[0].shape[1] == (0 if len(chunks) > 1 else one.shape[1])  # the first push only primes the upsampler


def test_final_flush_without_new_latents(vae):
    latents = torch.randn(1, 8, 64)
    with torch.inference_mode():
        s = vae.stream()
        a = s.push(latents[:, :4])
        b = s.push(latents[:, 4:])
        c = s.push(None, last=True)
        one = vae.decode(latents)
    assert (torch.cat([a, b, c], 1) - one).abs().max() <= STREAM_ATOL


def test_prompt_encoding_shapes(vae):
    span = vae.config.samples_per_latent * 4
    wav = left_pad_to_multiple(torch.randn(1, span + 123) * 0.1, span)
    assert wav.shape[1] == 2 * span and (wav[0, :span - 123] == 0).all()
    with torch.inference_mode():
        post = vae.posterior(wav)
    assert post.mean.shape == (1, 8, 64) and (post.std > 0).all()


def _variant_vae(folder, patch_size: int, hop: int):
    """A random AudioVAE folder with engine.models.talker.tiny's config at another VAE patch and hop."""
    import json

    from safetensors.torch import save_file

    from engine.models.talker import tiny
    from engine.models.talker.config import AudioVAEConfig
    from engine.models.talker.vae import AudioVAE

    cfg = tiny.tiny_vae_config()
    cfg["patch_size"] = patch_size
    cfg["enc_kwargs"].update(input_dim=hop, hop_size=hop)
    cfg["dec_kwargs"]["output_dim"] = hop
    folder.mkdir(parents=True)
    with torch.device("cpu"):
        module = AudioVAE(AudioVAEConfig.from_dict(cfg))
    save_file(tiny._random_state(module, torch.Generator().manual_seed(5)), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return load_audio_vae(folder)


@pytest.mark.parametrize("patch_size", [-1, 1])
def test_streaming_one_frame_chunks_equals_one_shot(tmp_path, patch_size):
    """Without latent upsampling a one-latent chunk is one decoder frame, whose final samples (hop) are
    fewer than the leading `pad` (1.5 hop) to drop: the stream came out pad - hop samples too long."""
    vae = _variant_vae(tmp_path / "vae", patch_size, hop=16)
    torch.manual_seed(1)
    latents = torch.randn(1, 7, 64)
    with torch.inference_mode():
        one = vae.decode(latents)
        stream = vae.stream()
        pieces = [stream.push(latents[:, i:i + 1], last=i == latents.shape[1] - 1) for i in range(latents.shape[1])]
    streamed = torch.cat(pieces, dim=1)
    assert streamed.shape == one.shape == (1, 7 * 16)
    assert (streamed - one).abs().max() <= STREAM_ATOL


def test_streaming_without_latent_patching_emits_each_chunk_at_once(tmp_path):
    """With patch_size -1 (the Preview VAE: no latent upsampling) upstream's decoder has no upsampler to
    hold a chunk back for look-ahead: every call runs the backbone and emits its chunk at once (the first
    less the leading pad, each later one T * hop samples; the last also flushes the overlap tail less
    the trailing pad). Holding a chunk back gave an empty first chunk and every chunk one step late."""
    vae = _variant_vae(tmp_path / "vae", -1, hop=16)
    head = vae.decoder.head
    torch.manual_seed(2)
    chunks = [3, 2, 4]
    latents = torch.randn(1, sum(chunks), 64)
    with torch.inference_mode():
        one = vae.decode(latents)
        stream, pieces, kv, offset = vae.stream(), [], [], 0
        for i, n in enumerate(chunks):
            pieces.append(stream.push(latents[:, offset:offset + n], last=i == len(chunks) - 1))
            kv.append(stream.state.cache.length)
            offset += n
    hop, overlap = 16, head.n_fft - head.hop
    assert [p.shape[1] for p in pieces] == [3 * hop - head.pad, 2 * hop, 4 * hop + overlap - head.pad]
    assert kv == [3, 5, 9]
    assert stream.state.decoder_calls == [[3, 0], [2, 0], [4, 0]]
    streamed = torch.cat(pieces, dim=1)
    assert (streamed - one).abs().max() <= STREAM_ATOL
    assert (pieces[0] - one[:, :pieces[0].shape[1]]).abs().max() <= STREAM_ATOL


def test_streaming_without_latent_patching_bare_final_flush(tmp_path):
    vae = _variant_vae(tmp_path / "vae", -1, hop=16)
    torch.manual_seed(3)
    latents = torch.randn(1, 5, 64)
    with torch.inference_mode():
        one = vae.decode(latents)
        s = vae.stream()
        parts = [s.push(latents[:, :2]), s.push(latents[:, 2:]), s.push(None, last=True)]
    assert parts[2].shape[1] == vae.decoder.head.n_fft - vae.decoder.head.hop - vae.decoder.head.pad
    assert (torch.cat(parts, 1) - one).abs().max() <= STREAM_ATOL


def test_prompt_latents_pad_to_encoder_frames(tmp_path, tiny_talker_dir):
    """The prompt span is encoder hop_size * VAE patch * talker patch (spec §7.4). With an encoder hop
    of 8 and a decoder hop of 16, a 300-sample clip pads to 384 samples (12 latents), not to 512."""
    from engine.models.talker import tiny
    from engine.models.talker.model import load_talker
    from engine.models.talker.pipeline import TalkerPipeline
    from engine.models.talker.tokenizer import TalkerTokenizer

    cfg = tiny.tiny_vae_config()
    cfg["enc_kwargs"].update(input_dim=16, hop_size=8)
    cfg["dec_kwargs"]["output_dim"] = 16
    folder = _random_vae_folder(tmp_path, cfg, seed=6)
    pipe = TalkerPipeline(tiny_talker_dir, load_talker(tiny_talker_dir), load_audio_vae(folder),
                          TalkerTokenizer(tiny_talker_dir / "llm"))
    lat = pipe.prompt_latents(torch.randn(300) * 0.1, seed=0)
    assert lat.shape == (1, 12, 64)


def test_vae_latent_width_comes_from_its_config(tmp_path):
    """The AudioVAE reads enc_kwargs.latent_dim / dec_kwargs.latent_dim (only the talker hard-codes 64):
    a 32-wide VAE encodes to 32-d posteriors and decodes 32-d latents, streamed as one-shot."""
    from engine.models.talker import tiny

    cfg = tiny.tiny_vae_config()
    cfg["enc_kwargs"].update(input_dim=16, hop_size=16, latent_dim=32)
    cfg["dec_kwargs"].update(output_dim=16, latent_dim=32)
    folder = _random_vae_folder(tmp_path, cfg, seed=9)
    vae = load_audio_vae(folder)
    assert vae.encoder.fc3.weight.shape[0] == 64 and vae.decoder.fc1.weight.shape[1] == 32
    with torch.inference_mode():
        post = vae.posterior(torch.randn(1, 16 * 4 * 6) * 0.1)
        assert post.mean.shape == (1, 6, 32)
        lat = torch.randn(1, 8, 32)
        one = vae.decode(lat)
        s = vae.stream()
        streamed = torch.cat([s.push(lat[:, :4]), s.push(lat[:, 4:], last=True)], 1)
    assert one.shape == (1, 8 * 64) and (streamed - one).abs().max() <= STREAM_ATOL


def test_istft_head_in_bf16_rounds_as_the_reference():
    """In a bf16 VAE the reference takes exp / clip / cos / sin of the head output in bf16, builds the
    complex spectrum in complex64, multiplies by its bf16 window and folds the bf16 squared window into
    a bf16 envelope; the fp32 path we took instead was ~1e-3 off (relative)."""
    import torch.nn.functional as F

    from engine.models.talker.vae import ISTFTHead

    torch.manual_seed(4)
    hop, n_fft, t = 16, 64, 9
    head = ISTFTHead(32, n_fft, hop)
    with torch.no_grad():
        head.out.weight.normal_(0, 0.3)
        head.out.bias.normal_(0, 0.3)
    head = head.to(torch.bfloat16)
    x = torch.randn(1, t, 32).bfloat16()
    with torch.no_grad():
        got = head(x)
        out = head.out(x)
        m, p = out.transpose(1, 2).chunk(2, dim=1)
        spec = torch.clip(torch.exp(m), max=1e2) * (torch.cos(p) + 1j * torch.sin(p))
        w = head.istft.window  # bf16 after .to(bfloat16), as the reference's buffer
        frames = torch.fft.irfft(spec, n_fft, dim=1) * w[None, :, None]
        size = (t - 1) * hop + n_fft
        y = F.fold(frames, output_size=(1, size), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0, :]
        env = F.fold(w.square().expand(1, t, -1).transpose(1, 2), output_size=(1, size), kernel_size=(1, n_fft),
                     stride=(1, hop)).squeeze()
        pad = (n_fft - hop) // 2
        want = y[:, pad:-pad] / env[pad:-pad]
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _random_vae_folder(tmp_path, cfg: dict, seed: int):
    """tmp_path/vae: an AudioVAE of `cfg` with random weights (the talker tiny's initialiser), as a checkpoint."""
    import json

    from safetensors.torch import save_file

    from engine.models.talker import tiny
    from engine.models.talker.config import AudioVAEConfig
    from engine.models.talker.vae import AudioVAE

    folder = tmp_path / "vae"
    folder.mkdir()
    with torch.device("cpu"):
        module = AudioVAE(AudioVAEConfig.from_dict(cfg))
    save_file(tiny._random_state(module, torch.Generator().manual_seed(seed)), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_a_seeded_prompt_draws_the_reference_noise(tiny_pipeline):
    """Spec §7.4: the prompt latents are mean + std * eps, eps drawn after torch.manual_seed(seed). The reference's
    posterior (diffusers' Oobleck distribution) holds its mean channel-major, [1, latent, T'], and draws eps in
    that layout, so a clone seeded as upstream was must take the draws in that order, not time-major."""
    wave = torch.randn(600, generator=torch.Generator().manual_seed(1)) * 0.1
    latents = tiny_pipeline.prompt_latents(wave, seed=606)
    span = tiny_pipeline.vae.config.encoder_samples_per_latent * tiny_pipeline.talker.config.patch_size
    with torch.inference_mode():
        post = tiny_pipeline.vae.posterior(left_pad_to_multiple(wave.reshape(1, -1), span))
    frames, channels = post.mean.shape[1:]
    assert frames > 1
    torch.manual_seed(606)
    eps = torch.randn(1, channels, frames).transpose(1, 2)
    torch.testing.assert_close(latents, post.mean + post.std * eps, atol=1e-6, rtol=0)
