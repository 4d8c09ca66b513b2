"""The Preview talker (spec §7.11): its prompt (no chat template, no speaker slot), its one-patch
history, its sampler (CFG from the config, no noise term), and the Preview tiny checkpoint speaking
at 16 kHz through Engine.speak, cloning and the chat speech path."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from engine.events import AudioChunk, Done, Error
from engine.models.talker.cfm import SamplingParams
from engine.models.talker.config import TalkerConfig
from engine.models.talker.generate import NoiseSource, generate_patches
from engine.models.talker.model import build_talker, load_talker
from engine.models.talker.pipeline import SpeechRequest, TalkerPipeline
from engine.models.talker.prompt import build_preview_prompt
from engine.models.talker.tiny import tiny_llm_config, tiny_talker_config, write_tiny_talker
from engine.models.talker.tokenizer import PREVIEW_REQUIRED_TOKENS, TalkerTokenizer


@pytest.fixture(scope="module")
def preview_dir(preview_checkpoint):
    """The talker folder of the session's tiny Preview checkpoint (write_tiny_talker's, as a folder of its own)."""
    return preview_checkpoint / "talker"


@pytest.fixture(scope="module")
def preview_pipeline(preview_dir):
    return TalkerPipeline.load(preview_dir, release="preview")


def tone(seconds=1.5, rate=22050):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_prompt_is_transcript_text_endoftext_then_prompt_latents(preview_dir):
    """tokens(prompt_text) + tokens(text) + <|endoftext|>, each piece tokenised on its own, then the N_p
    prompt-latent embeddings appended: no system / user / assistant template, no speaker slot."""
    raw = Tokenizer.from_file(str(preview_dir / "llm" / "tokenizer.json"))
    tok = TalkerTokenizer(preview_dir / "llm", PREVIEW_REQUIRED_TOKENS)
    prompt = build_preview_prompt(tok, "Nice to meet you.", "感谢你的认可。", n_prompt_patches=3)
    expected = (raw.encode("感谢你的认可。", add_special_tokens=False).ids
                + raw.encode("Nice to meet you.", add_special_tokens=False).ids + [raw.token_to_id("<|endoftext|>")])
    assert prompt.ids == expected
    assert prompt.speaker_slots == [] and prompt.latent_slots == [len(expected), len(expected) + 1, len(expected) + 2]
    specials = {raw.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_pad|>", "<audio>")}
    assert not specials & set(prompt.ids)
    # without a reference: the text and <|endoftext|> only
    bare = build_preview_prompt(tok, "Nice to meet you.")
    assert bare.ids == expected[-len(bare.ids):] and bare.latent_slots == []

    talker = load_talker(preview_dir, release="preview")
    lat = torch.randn(3, talker.config.llm.hidden_size)
    with torch.no_grad():
        x = talker.embed_prompt(prompt.ids, prompt.speaker_slots, None, prompt.latent_slots, lat)
        tokens = talker.model.embed_tokens(torch.tensor([expected]))
    assert x.shape[1] == len(expected) + 3
    torch.testing.assert_close(x[:, :len(expected)], tokens)
    torch.testing.assert_close(x[0, len(expected):], lat)


def test_no_speaker_head_and_the_history_is_the_last_patch(preview_dir):
    """The Preview's BailingTalker2 has no spk_head (so its checkpoint has none) and conditions each
    patch on the previous patch only, starting from the last patch of the prompt latents."""
    talker_cfg = {**tiny_talker_config("preview"), "history_patch_size": 32}  # not read by the Preview
    cfg = TalkerConfig.from_dicts(talker_cfg, tiny_llm_config(), release="preview")
    assert cfg.history_patch_size == cfg.patch_size == 4
    assert not any(n.startswith("spk_head") for n, _ in build_talker(cfg, "meta").named_parameters())
    assert TalkerConfig.from_dicts(tiny_talker_config(), tiny_llm_config()).history_patch_size == 32  # 2.0 as before

    talker = load_talker(preview_dir, release="preview")
    assert talker.spk_head is None
    prompt_latents = torch.randn(1, 12, 64)
    trace: dict = {}
    embeds = torch.randn(1, 5, talker.config.llm.hidden_size)
    patches = list(generate_patches(talker, embeds, prompt_latents, SamplingParams(2.0, 0.25, 0.0), NoiseSource(3),
                                    trace=trace, min_steps=2))
    assert len(patches) >= 3
    torch.testing.assert_close(trace["his"][0], prompt_latents[:, -4:])
    for k in range(1, len(patches)):
        assert trace["his"][k].shape == (1, 4, 64)
        torch.testing.assert_close(trace["his"][k], trace["gen"][k - 1])


def test_sampler_takes_cfg_from_the_config_and_draws_only_the_start_noise(preview_dir, tmp_path):
    """CFG strength from talker/config.json (the Preview's CFM is built with it); y0 is the only draw
    per patch (no SDE noise), and a nonzero temperature is refused rather than ignored."""
    folder = tmp_path / "talker"
    import shutil
    shutil.copytree(preview_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "cfg_strength": 3.5}))
    pipe = TalkerPipeline.load(folder, release="preview")
    assert pipe._sampling(SpeechRequest(text="hi")) == SamplingParams(3.5, 0.25, 0.0)
    with pytest.raises(Exception, match="temperature"):
        pipe._sampling(SpeechRequest(text="hi", temperature=1.0))
    a, b = NoiseSource(7), NoiseSource(7)
    y0_0, sde = a.draw(0, 10, 4, 64, sde=False)
    y0_1, _ = a.draw(1, 10, 4, 64, sde=False)
    assert torch.count_nonzero(sde) == 0
    both = torch.randn(2, 4, 64, generator=b.generator)
    torch.testing.assert_close(torch.cat([y0_0, y0_1]), both)


def test_reference_latents_are_unpadded_and_cut_to_whole_patches(preview_pipeline):
    """16 kHz clip -> ceil(N / hop) VAE frames (one latent each, no latent patching) -> the trailing
    frames that do not fill a talker patch are dropped; no CAM++ vector."""
    clip = tone(1.3, 22050)
    cond = preview_pipeline.clone_conditioning([clip], [22050], "hello there")
    n16 = int(round(len(clip) * 16000 / 22050))
    frames = -(-n16 // 320)
    assert cond.speaker is None and cond.latents.shape == (1, frames // 4 * 4, 64)
    assert preview_pipeline.sample_rate == 16000


def test_preview_tiny_checkpoint_speaks_at_16khz(preview_engine):
    e = preview_engine
    assert e.talker is not None, e.talker_error
    assert not (e.model.path / "talker" / "campplus.onnx").exists()
    for kwargs in (dict(text="Hello there, how are you today?"),
                   dict(text="我们一起去公园散步吧。", ref_audio=tone(), ref_text="感谢你的认可。", sample_rate=22050)):
        evs = list(e.speak(seed=2, **kwargs))
        done = evs[-1]
        assert isinstance(done, Done), done
        chunks = [c for c in evs if isinstance(c, AudioChunk)]
        assert chunks and all(c.sample_rate == 16000 for c in chunks) and done.stats.audio_seconds > 0
        assert done.result["sample_rate"] == 16000
    info = e.save_voice("preview voice", tone(), ref_text="hello there", sample_rate=22050)
    done = list(e.speak("Reusing the saved voice.", voice="preview voice", seed=3))[-1]
    assert isinstance(done, Done) and info.speakers == 1
    e.delete_voice("preview voice")
    for kwargs in (dict(text="rain on a roof", task="sound"), dict(text="hi", instruct="emotion=happy")):
        err = list(e.speak(**kwargs))[-1]
        assert isinstance(err, Error) and err.code == "invalid_request" and "Preview" in err.message


def test_preview_chat_answers_in_speech(preview_engine):
    from engine.sampling import GenerationParams
    evs = list(preview_engine.chat([{"role": "user", "content": "Hello!"}],
                                   GenerationParams(max_new_tokens=12, seed=1), modalities=("text", "audio")))
    done = evs[-1]
    assert isinstance(done, Done), done
    chunks = [c for c in evs if isinstance(c, AudioChunk)]
    assert chunks and all(c.sample_rate == 16000 for c in chunks)


def test_speech_options_offer_only_what_the_preview_talker_does(preview_engine):
    """The Voice tab and API clients fill their controls from /v1/audio/speech/options: for the Preview it
    lists speech only, without instruction tables or music fields (each would be refused)."""
    from engine.server.speech_api import speech_options
    opts = speech_options(preview_engine)
    assert opts["tasks"] == ["tts"] and opts["sample_rate"] == 16000 and opts["instructions"] is False
    assert opts["dialects"] == opts["emotions"] == {} and opts["bgm_fields"] == opts["music_fields"] == []


def test_a_preview_folder_holding_a_speaker_head_still_loads(preview_dir, tmp_path):
    """A Preview talker folder with spk_head tensors (which its class does not have, so upstream's
    from_pretrained drops them) loads without them; any other stray tensor is still refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    from engine.loader import CheckpointError
    folder = tmp_path / "talker"
    shutil.copytree(preview_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    h = tiny_llm_config()["hidden_size"]
    save_file({**state, "spk_head.weight": torch.zeros(h, 192), "spk_head.bias": torch.zeros(h)},
              str(folder / "model.safetensors"))
    assert load_talker(folder, release="preview").spk_head is None
    save_file({**state, "stray.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="stray.weight"):
        load_talker(folder, release="preview")


def test_preview_text_is_segmented_at_sentence_ends_not_commas(preview_pipeline, tmp_path):
    """The Preview's driver (upstream modeling_bailing_talker.py of the Preview tree) closes a segment at
    ！？。!? only; 2.0's also at a comma. The Preview talker cut Chinese text at commas as 2.0 does."""
    from engine.models.talker.text import Segmenter
    text = "今天的天气非常好，我们一起去公园散步吧，然后再去吃晚饭。"
    two_o = TalkerPipeline.load(write_tiny_talker(tmp_path))
    assert [f.source for f in two_o.plan(SpeechRequest(text=text))[1]] == \
        ["今天的天气非常好，我们一起去公园散步吧，", "然后再去吃晚饭。"]
    assert [f.source for f in preview_pipeline.plan(SpeechRequest(text=text))[1]] == [text]
    seg = Segmenter(preview_pipeline.segment_closers)  # (the speak-while-thinking path segments as it streams)
    assert seg.feed(text) + seg.flush() == [text]


def test_a_cfg_below_1e_5_runs_no_unconditional_branch(preview_dir, one_thread):
    """The Preview's upstream CFM evaluates the DiT on the condition alone when cfg_strength < 1e-5 (v = v_c);
    ours ran the doubled batch anyway (and a Preview case at such a cfg stores no cfm_pred_uncond). At 1e-5 and
    above, and in 2.0 at any cfg, both branches run; the skipped branch changes the patch by at most cfg x
    (v_c - v_u) per step, nothing at cfg 0."""
    from engine.models.talker.cfm import runs_unconditional_branch
    from engine.models.talker.generate import PatchStep
    talker = load_talker(preview_dir, release="preview")
    cfg = talker.config
    batches = []
    talker.cfm.model.register_forward_hook(lambda _m, args, _out: batches.append(args[0].shape[0]))
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, 1, cfg.llm.hidden_size, generator=gen)
    his = torch.randn(1, cfg.history_patch_size, cfg.latent_dim, generator=gen)
    y0 = torch.randn(1, cfg.patch_size, cfg.latent_dim, generator=gen)
    sde = torch.zeros(cfg.steps, 1, cfg.patch_size, cfg.latent_dim)
    step, patches = PatchStep(talker), {}
    for strength, branches in ((0.0, 1), (5e-6, 1), (1e-5, 2), (2.0, 2)):
        batches.clear()
        trace: dict = {}
        with torch.inference_mode():
            patches[strength] = step(h, his, y0, sde, SamplingParams(strength, 0.25, 0.0), trace)[0]
        assert batches == [branches] * cfg.steps, strength
        assert ("pred_uncond" in trace) == (branches == 2) and len(trace["pred_cond"]) == cfg.steps
    torch.testing.assert_close(patches[5e-6], patches[1e-5], atol=1e-4, rtol=0)  # both ~ the conditional flow
    assert not torch.allclose(patches[0.0], patches[2.0], atol=1e-3)
    assert runs_unconditional_branch(0.0, preview=False)  # 2.0's CFM always runs both
