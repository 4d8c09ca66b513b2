"""Our AudioVAE (the real loader, from files) against tests/models/talker/reference_vae.py, a plain
re-derivation of the upstream forward, at many tiny configurations the fixtures never use: VAE patch,
hops (odd, encoder hop != frame width, omitted), latent widths, backbone depth / heads / head_dim /
activation / RoPE theta / sliding windows, omitted keys, a batch of odd-length waveforms; the streamed
decode joins to the reference's one-shot decode.
fp32 throughout; tolerance 1e-5 relative to each output's scale."""

import copy

import pytest
import torch

from engine.models.talker.audio import left_pad_to_multiple
from engine.models.talker.vae import load_audio_vae
from tests.models.talker import reference_vae as ref
from tests.models.talker.variants import OMIT, drop_omitted, random_state, write_folder

REL_TOL = 1e-5


def _backbone(layers, **over):
    d = {"vocab_size": 1, "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": layers,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0, "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 4096,
         "max_window_layers": layers, "attention_dropout": 0.0, "tie_word_embeddings": False}
    d.update(over)
    return d


BASE = {"architectures": ["AudioVAE"], "sample_rate": 44100, "patch_size": 4,
        "enc_kwargs": {"input_dim": 16, "hop_size": 16, "latent_dim": 64, "backbone": _backbone(4)},
        "dec_kwargs": {"output_dim": 16, "latent_dim": 64,
                       "backbone": _backbone(2, use_sliding_window=True, sliding_window=24, max_window_layers=1)},
        "torch_dtype": "float32"}


def _variant(patch=None, enc=None, dec=None, enc_bb=None, dec_bb=None, top=None):
    c = copy.deepcopy(BASE)
    if patch is not None:
        c["patch_size"] = patch
    c["enc_kwargs"].update(enc or {})
    c["dec_kwargs"].update(dec or {})
    c["enc_kwargs"]["backbone"].update(enc_bb or {})
    c["dec_kwargs"]["backbone"].update(dec_bb or {})
    c.update(top or {})
    return c


VARIANTS = {
    "fixture_like": _variant(),
    "encoder_5_layers": _variant(enc_bb={"num_hidden_layers": 5, "max_window_layers": 5}),
    "encoder_6_layers_sliding": _variant(enc_bb={"num_hidden_layers": 6, "use_sliding_window": True,
                                                 "sliding_window": 6, "max_window_layers": 2}),
    "no_latent_patching_defaults": _variant(patch=OMIT, enc={"input_dim": 40, "hop_size": OMIT},
                                            dec={"output_dim": 20}, top={"sample_rate": OMIT}),
    "preview_like_5_layers": _variant(patch=-1, enc={"input_dim": 20, "hop_size": 20}, dec={"output_dim": 20},
                                      enc_bb={"num_hidden_layers": 5}),
    "patch3_odd_hop_latent32": _variant(patch=3, enc={"input_dim": 15, "hop_size": 15, "latent_dim": 32},
                                        dec={"output_dim": 15, "latent_dim": 32},
                                        enc_bb={"head_dim": 8, "hidden_act": "gelu_pytorch_tanh",
                                                "num_key_value_heads": None},
                                        dec_bb={"head_dim": 4, "rope_theta": 500000.0, "hidden_act": "relu",
                                                "num_attention_heads": 6, "num_key_value_heads": 3}),
    "patch2_all_sliding": _variant(patch=2, enc={"input_dim": 24, "hop_size": 12},
                                   enc_bb={"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 0},
                                   dec_bb={"sliding_window": 5, "max_window_layers": 0, "num_hidden_layers": 3}),
    "omitted_backbone_keys": _variant(enc_bb={"rms_norm_eps": OMIT, "rope_theta": OMIT, "hidden_act": OMIT,
                                              "use_sliding_window": OMIT, "sliding_window": OMIT,
                                              "max_window_layers": OMIT},
                                      dec_bb={"rms_norm_eps": 1e-5, "max_window_layers": OMIT,
                                              "use_sliding_window": OMIT}),
    "explicit_layer_types": _variant(dec_bb={"num_hidden_layers": 3, "sliding_window": 7,
                                             "layer_types": ["sliding_attention", "full_attention",
                                                             "sliding_attention"]}),
    "patch1": _variant(patch=1, enc={"input_dim": 8, "hop_size": 8}, dec={"output_dim": 8}),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/models/talker/conftest.py)


def _close(ours, theirs, what):
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(theirs.shape)}"
    if not theirs.numel():
        return
    err = (ours.float() - theirs.float()).abs().max().item()
    scale = max(theirs.abs().max().item(), 1.0)
    assert err <= REL_TOL * scale, f"{what}: max |ours - reference| = {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_audio_vae_matches_the_reference(tmp_path, name):
    config = drop_omitted(VARIANTS[name])
    c = ref.vae_settings(config)
    state = random_state(ref.vae_state_entries(c), seed=len(name), fixed=ref.vae_buffers(c))
    head_bias = state["decoder.head.out.bias"]
    head_bias[: head_bias.shape[0] // 2] -= 1.0  # keep exp(log-magnitude) well under its clip
    vae = load_audio_vae(write_folder(tmp_path / name, {"config.json": VARIANTS[name]}, state))
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 5, c["dec_kwargs"]["latent_dim"], generator=gen)
    talker_patch = 2
    span = ref.prompt_padding(c, talker_patch)
    wavs = 0.3 * torch.randn(2, 3 * span - 5, generator=gen)  # odd length, not a multiple of the span
    padded = left_pad_to_multiple(wavs, vae.config.encoder_samples_per_latent * talker_patch)
    assert padded.shape[-1] % span == 0 and padded.shape[-1] - wavs.shape[-1] < span
    with torch.inference_mode():
        oneshot = ref.decode(latents, state, c)
        _close(vae.decode(latents), oneshot, "decode")
        # streamed in uneven chunks (token2wav(stream=True)), the pieces join to the one-shot decode
        stream, pieces, start = vae.stream(), [], 0
        for i, n in enumerate((1, 3, 1)):
            pieces.append(stream.push(latents[:, start:start + n], last=i == 2))
            start += n
        _close(torch.cat(pieces, dim=1), oneshot, "streamed decode")
        post = vae.posterior(padded)
        mean, std = ref.posterior(ref.encode(padded, state, c))
        _close(post.mean, mean, "posterior mean")
        _close(post.std, std, "posterior std")
    assert post.mean.shape[1] == ref.frame_num(padded.shape[-1], c) or c["enc_hop"] != c["enc_kwargs"]["input_dim"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_audio_vae_streaming_state_matches_the_reference(tmp_path, name):
    """token2wav(stream=True) chunk by chunk: each call's waveform, KV length, decoder call split, ISTFT
    overlap buffers and upsampler history (what a parity case records per call) at every configuration."""
    config = drop_omitted(VARIANTS[name])
    c = ref.vae_settings(config)
    state = random_state(ref.vae_state_entries(c), seed=len(name) + 1, fixed=ref.vae_buffers(c))
    state["decoder.head.out.bias"][: state["decoder.head.out.bias"].shape[0] // 2] -= 1.0
    vae = load_audio_vae(write_folder(tmp_path / name, {"config.json": VARIANTS[name]}, state))
    latents = torch.randn(1, 11, c["dec_kwargs"]["latent_dim"], generator=torch.Generator().manual_seed(3))
    sizes = (2, 3, 2, 4)
    chunks = list(latents.split(sizes, dim=1))
    theirs = ref.stream_decode(chunks, state, c)
    stream = vae.stream()
    with torch.inference_mode():
        for i, (chunk, want) in enumerate(zip(chunks, theirs)):
            got = stream.push(chunk, last=i == len(chunks) - 1)
            st = stream.state
            _close(got, want["wav"], f"call {i} waveform")
            assert st.cache.length == want["kv"], f"call {i}: KV length {st.cache.length} != {want['kv']}"
            assert st.decoder_calls[-1] == want["calls"], f"call {i}: decoder calls {st.decoder_calls[-1]}"
            if "audio_buffer" in want:
                _close(st.audio_buffer, want["audio_buffer"], f"call {i} audio buffer")
                _close(st.window_buffer[None], want["window_buffer"], f"call {i} window buffer")
            if want["history_last"] is not None:
                _close(st.history_last, want["history_last"], f"call {i} upsampler history")
