"""TalkerPipeline product rules that follow the reference driver (spec §7.5, §7.9)."""

import torch

import engine.models.talker.pipeline as pl
from engine.models.talker.generate import Patch
from engine.models.talker.text import Fragment

N_PATCHES = 30


def _endless(*args, **kwargs):
    """A talker that never fires its stop head before the last of N_PATCHES patches."""
    for step in range(N_PATCHES):
        yield Patch(torch.full((1, 4, 64), 0.1), 0.0, step == N_PATCHES - 1, step)


def test_only_the_first_fragment_is_capped_by_the_character_rate(tiny_pipeline, monkeypatch):
    """The characters-per-second cut-off stops taking chunks of the streamed fragment; upstream streams
    only the first fragment, so the later ones run until the stop head (or the loop bound) ends them."""
    monkeypatch.setattr(pl, "generate_patches", _endless)
    report = pl.SynthesisReport()
    frags = [Fragment("短句。", "短句。"), Fragment("第二句。", "第二句。"), Fragment("三。", "三。")]
    list(tiny_pipeline.synthesize(pl.SpeechRequest(text="x"), report=report, fragments=frags))
    assert report.capped == [0]
    first = report.patches - 2 * N_PATCHES
    assert 0 < first < N_PATCHES  # the first fragment stopped early, the other two ran all their patches


def test_a_vae_of_another_latent_width_is_refused_with_the_talker(tiny_talker_dir, tmp_path):
    import json
    import shutil

    import pytest

    folder = tmp_path / "talker"
    shutil.copytree(tiny_talker_dir, folder)
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    cfg["enc_kwargs"]["latent_dim"] = cfg["dec_kwargs"]["latent_dim"] = 32
    (folder / "vae" / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    from engine.models.talker import tiny
    from engine.models.talker.config import AudioVAEConfig
    from engine.models.talker.vae import AudioVAE
    with torch.device("cpu"):
        vae = AudioVAE(AudioVAEConfig.from_dict(cfg))
    save_file(tiny._random_state(vae, torch.Generator().manual_seed(1)), str(folder / "vae" / "model.safetensors"))
    with pytest.raises(pl.TalkerError, match="latent_dim"):
        pl.TalkerPipeline.load(folder)


def test_character_voice_without_a_voice_uses_the_zero_speaker_slot(tiny_pipeline):
    """The reference runs IP (character voice) instructions, like free-text style, with
    use_zero_spk_emb: one speaker slot holding a zero vector; a given voice is used as it is."""
    from engine.models.talker.prompt import Instruction

    ip = Instruction.parse({"ip": "水浒传_武松"})
    cond = tiny_pipeline.effective_conditioning(pl.SpeechRequest(text="x", instruct=ip))
    assert cond.zero_speaker and cond.n_speakers == 1
    style = Instruction.parse({"style": "低沉的男声"})
    assert tiny_pipeline.effective_conditioning(pl.SpeechRequest(text="x", instruct=style)).zero_speaker
    voice = pl.Conditioning(speaker=torch.zeros(1, 192))
    kept = tiny_pipeline.effective_conditioning(pl.SpeechRequest(text="x", instruct=ip, conditioning=voice))
    assert kept is voice and not kept.zero_speaker
    plain = tiny_pipeline.effective_conditioning(pl.SpeechRequest(text="x", instruct=Instruction.parse({"emotion": "happy"})))
    assert plain.n_speakers == 0


def test_a_long_text_starts_speaking_before_the_rest_of_it_is_read(tiny_pipeline, monkeypatch):
    """A 10,000-character text was segmented and normalised whole before its first fragment was spoken (~0.5-1 s on
    a busy CPU, before any audio); the fragments are now made as they are spoken: the first audio leaves while the
    rest of the text is unread, and every fragment is still spoken in order."""
    import engine.models.talker.text as text_rules

    read = []
    normalize = text_rules.normalize
    monkeypatch.setattr(text_rules, "normalize", lambda piece: read.append(piece) or normalize(piece))
    for text in ("This is sentence number one, with a few words. " * 200, "word " * 1999):  # (one long segment)
        read.clear()
        _, fragments, _ = tiny_pipeline.plan(pl.SpeechRequest(text=text))
        first = next(iter(fragments))  # what synthesize speaks first
        assert first.source.startswith(text[:20]) and 0 < len(read) < 10, len(read)
        assert [first.source, *(f.source for f in fragments)] == [f.source for f in text_rules.segment_text(text)]
