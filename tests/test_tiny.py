"""The embedded tiny checkpoint: deterministic, upstream layout, loaded by the normal code."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.models.thinker.config import MingConfig
from engine.tiny import REAL_SPECIAL_TOKENS, is_demo_checkpoint, tree_digest
from engine.models.thinker.tokenizer import MingTokenizer
from tests.paths import REPO


def test_generation_is_deterministic(tmp_path, tiny_checkpoint):
    """`python -m engine.tiny DIR` writes the very checkpoint the session's (written in this process) is."""
    out = subprocess.run([sys.executable, "-m", "engine.tiny", str(tmp_path / "b")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert tree_digest(tmp_path / "b") == tree_digest(tiny_checkpoint)


def test_upstream_layout_and_tokens(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "model.model.layers.1.mlp.experts.0.gate_proj.weight" in names
    assert "model.model.layers.1.mlp.image_gate.expert_bias" in names
    assert "model.lm_head.weight" in names and "model.model.word_embeddings.weight" in names
    cfg = MingConfig.from_file(tiny_checkpoint)
    tok = MingTokenizer(tiny_checkpoint)
    for name in REAL_SPECIAL_TOKENS:
        assert tok.token_id(name) < cfg.llm.vocab_size
    assert cfg.llm.image_patch_token == tok.token_id("<imagePatch>")
    assert cfg.llm.video_patch_token == tok.token_id("<framePatch>")
    assert cfg.llm.eos_token_ids == (tok.eos_id,)
    assert is_demo_checkpoint(tiny_checkpoint)



def test_random_replies_read_as_words_not_broken_bytes(tiny_engine):
    """A newcomer's first reply from the demo model: random words, no U+FFFD replacement characters."""
    from engine.events import Done
    from engine.sampling import GenerationParams

    for prompt, temperature in (("Hello!", 0.0), ("Describe a sunny day in Paris.", 0.0), ("你好", 0.8)):
        events = list(tiny_engine.chat([{"role": "user", "content": prompt}],
                                       GenerationParams(max_new_tokens=24, temperature=temperature, seed=3)))
        done = events[-1]
        assert isinstance(done, Done), done
        assert "\ufffd" not in done.text
        words = done.text.split()
        assert len(words) >= 6 and sum(w.isalpha() for w in words) >= 0.8 * len(words), done.text


def test_preview_format_tiny_checkpoint_loads_and_runs_text_image_and_audio(tmp_path, preview_checkpoint,
                                                                            preview_engine):
    """`python -m engine.tiny --release preview`: the Preview layout (Qwen2.5-VL ViT with window attention
    and full-attention blocks from its config, rope_theta 600000, no interleaved video timestamps,
    patch-14 / factor-28 processor, the Preview talker) loaded by the normal code, every implemented
    modality run on it (speech out: tests/models/talker/test_preview.py)."""
    import numpy as np

    from engine.events import Done
    from engine.models.thinker.vision import Qwen2_5_VisionTransformer
    from engine.sampling import GenerationParams

    out = subprocess.run([sys.executable, "-m", "engine.tiny", "--release", "preview", str(tmp_path / "p")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    root = tmp_path / "p"
    assert tree_digest(preview_checkpoint) == tree_digest(root)  # (the session's, written in this process)
    cfg = MingConfig.from_file(root)
    assert cfg.release == "preview" and cfg.llm.rope_theta == 600000
    assert not cfg.llm.use_interleaved_frame_timestamp and cfg.llm.video_start_token_is_image_end
    pre = json.loads((root / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["min_pixels"], pre["max_pixels"]) == (14, 78400, 2007040)
    assert "use_interleaved_frame_timestamp" not in pre
    names = set(json.loads((root / "model.safetensors.index.json").read_text())["weight_map"])
    assert "vision.blocks.0.mlp.gate_proj.weight" in names and "vision.merger.ln_q.weight" in names
    assert "vision.patch_embed.proj.bias" not in names and not any(n.startswith("vision.pos_embed") for n in names)
    # upstream's Preview linear_proj takes the ViT's hard-coded image_emb_dim 8192 (not out_hidden_size)
    assert json.loads((root / "config.json").read_text())["vision_config"]["out_hidden_size"] == 8192

    # the Preview's talker (spec §7.11): no speaker head / CAM++, a 16 kHz VAE without latent patching
    from safetensors import safe_open
    with safe_open(str(root / "talker" / "model.safetensors"), "pt") as f:
        talker_names = set(f.keys())
    assert "stop_head.weight" in talker_names and not any(n.startswith("spk_head") for n in talker_names)
    assert not (root / "talker" / "campplus.onnx").exists()
    vae_cfg = json.loads((root / "talker" / "vae" / "config.json").read_text())
    assert (vae_cfg["sample_rate"], vae_cfg["patch_size"]) == (16000, -1)

    engine = preview_engine  # loaded from the same checkpoint (same digest)
    assert engine.has_talker and engine.talker.preview and engine.talker.sample_rate == 16000, engine.talker_error
    vit = engine.model.encoders.vision
    assert isinstance(vit, Qwen2_5_VisionTransformer)
    assert 0 < len(vit.config.fullatt_block_indexes) and vit.config.window_merged >= 1
    p = GenerationParams(max_new_tokens=3)
    img = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]
    prompt = engine.processor.build(msgs)
    grid = prompt.image_grid_thw.tolist()[0]
    # Preview: factor 28 (Stage B bounds 78400..2007040 enlarge a 70x90 picture), patch 14
    assert grid[0] == 1 and grid[1] * grid[2] * 14 * 14 >= 78400
    assert prompt.text.count("<imagePatch>") == grid[1] * grid[2] // 4
    for messages in (msgs, [{"role": "user", "content": "Hello"}]):
        done = list(engine.chat(messages, p))[-1]
        assert isinstance(done, Done) and done.stats.new_tokens == 3, done
    t = np.arange(8000) / 16000
    done = list(engine.transcribe((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sample_rate=16000,
                                  params=p))[-1]
    assert isinstance(done, Done), done


def test_preview_format_tiny_checkpoint_takes_video(preview_engine):
    """Preview video (spec §4.2 Preview, §6.2, §3.4): its own sampler, one (t, h, w) grid encoded by the
    Qwen2.5 ViT, `<video><framePatch>…</video>\\n` without timestamps, frame tokens on 1-D positions."""
    import numpy as np

    from engine.events import Done
    from engine.models.thinker.positions import PositionTokens, rope_index
    from engine.sampling import GenerationParams

    engine = preview_engine
    frames = [np.random.default_rng(i).integers(0, 255, (60, 80, 3), dtype=np.uint8) for i in range(6)]
    img = np.random.default_rng(9).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "video", "video": frames},
                                         {"type": "text", "text": "What happens?"}]}]
    prompt = engine.processor.build(msgs)
    (t, h, w), = prompt.video_grid_thw.tolist()
    assert t == 3 and "seconds>" not in prompt.text
    assert f"<video>{'<framePatch>' * (t * h * w // 4)}</video>\nWhat happens?" in prompt.text
    ids = torch.tensor([prompt.ids])
    pos, _ = rope_index(ids, PositionTokens.from_config(engine.model.config.llm), prompt.image_grid_thw,
                        prompt.video_grid_thw)
    frame_at = [i for i, tok in enumerate(prompt.ids) if tok == engine.model.config.llm.video_patch_token]
    rows = pos[:, 0, frame_at]
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])            # 1-D, as the reference
    assert torch.equal(rows[0].diff(), torch.ones(len(frame_at) - 1, dtype=rows.dtype))
    done = list(engine.chat(msgs, GenerationParams(max_new_tokens=3)))[-1]
    assert isinstance(done, Done) and done.stats.new_tokens == 3, done


def test_a_process_that_finishes_second_keeps_the_first_ones_checkpoint(tmp_path, monkeypatch):
    """Two studios started together on an empty cache both generate the demo checkpoint: the one that finishes
    second must not delete the folder the first one published (and may be loading from) to put its own copy."""
    import engine.tiny as tiny

    path = tmp_path / tiny.TINY_NAME
    published = {}
    real_talker = tiny.write_tiny_talker

    def other_process_publishes_first(folder, *args, **kwargs):
        if not published:  # meanwhile, another process published its (identical) checkpoint and opened it
            published["inode"] = None
            published["inode"] = tiny.write_tiny_checkpoint(path).joinpath("config.json").stat().st_ino
        real_talker(folder, *args, **kwargs)

    monkeypatch.setattr(tiny, "write_tiny_talker", other_process_publishes_first)
    assert tiny.ensure_tiny_checkpoint(tmp_path) == path
    assert (path / "config.json").stat().st_ino == published["inode"]  # the first copy, still in place
    assert [p.name for p in tmp_path.iterdir()] == [tiny.TINY_NAME]  # and no temporary folder left behind


def test_a_cache_folder_that_cannot_be_written_is_named_with_what_to_do(tmp_path):
    from engine.loader import CheckpointError
    from engine.tiny import ensure_tiny_checkpoint

    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    with pytest.raises(CheckpointError, match=rf"cannot write the tiny demo checkpoint into {not_a_folder}.*MING_STUDIO_CACHE"):
        ensure_tiny_checkpoint(not_a_folder)


def test_engine_tiny_never_replaces_a_folder_that_is_not_a_tiny_checkpoint(tmp_path, tiny_checkpoint, capsys):
    """`python -m engine.tiny OUT_DIR` replaces what OUT_DIR holds: given a folder of the user's (`~`, `.`) or a
    file it refuses, saying why, and deletes nothing; a new path, an empty folder or an earlier tiny checkpoint
    are written."""
    from engine.tiny import main, out_dir_problem

    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    a_file = tmp_path / "a.txt"
    a_file.write_text("mine too")
    assert "not a tiny checkpoint" in out_dir_problem(folder)
    assert "is a file" in out_dir_problem(a_file)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert f"is a link to nothing ({tmp_path / 'gone'})" in out_dir_problem(tmp_path / "dangling")
    assert main([str(folder)]) == 2 and main([str(a_file)]) == 2
    assert "give a new or empty folder" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine" and a_file.read_text() == "mine too"
    (tmp_path / "empty").mkdir()
    assert out_dir_problem(tmp_path / "empty") is None and out_dir_problem(tmp_path / "new") is None
    assert out_dir_problem(tiny_checkpoint) is None


def test_engine_tiny_inside_a_file_is_refused_as_input(tmp_path, capsys):
    """OUT_DIR under a file (a.txt/tiny) exited 1 with 'File exists', the code of a write that failed on the way;
    it is a path refused before anything is written: 2, naming the file."""
    from engine.tiny import main

    (tmp_path / "a.txt").write_text("mine")
    assert main([str(tmp_path / "a.txt" / "deeper" / "tiny")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a.txt'} is a file, not a folder" in err and (tmp_path / "a.txt").read_text() == "mine"


def test_a_cache_left_incomplete_is_written_again_and_killed_writes_are_cleared(tmp_path):
    """A cached tiny checkpoint whose index names a shard that is not there (a start killed while an old copy
    was removed, a user deleting files) is rewritten, not loaded to fail every start; the temporary folders of
    writes killed outright are removed once stale, and a write still in progress is left alone."""
    import engine.tiny as tiny

    path = tiny.ensure_tiny_checkpoint(tmp_path)
    shard = sorted(path.glob("*.safetensors"))[0]
    shard.unlink()
    assert not tiny.is_complete_checkpoint(path)
    killed, in_progress = tmp_path / f"{tiny.TEMP_PREFIX}killed", tmp_path / f"{tiny.TEMP_PREFIX}writing"
    for temp in (killed, in_progress):
        temp.mkdir()
        (temp / "model-00001-of-00002.safetensors").write_bytes(b"half")
    stale = time.time() - tiny.STALE_TEMP_SECONDS - 60
    os.utime(killed, (stale, stale))
    assert tiny.ensure_tiny_checkpoint(tmp_path) == path and shard.is_file()
    assert tiny.is_complete_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([tiny.TINY_NAME, in_progress.name])


def test_a_write_interrupted_while_replacing_the_cache_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """Interrupted between moving the damaged copy aside and publishing the new one, a rewrite leaves no folder
    at the cache path (which the next start writes again), never a part of the old one."""
    import engine.tiny as tiny

    path = tmp_path / tiny.TINY_NAME
    path.mkdir()
    (path / "config.json").write_text("{}")  # a damaged copy: no index
    real_rename = os.rename

    def interrupted(src, dst):
        real_rename(src, dst)
        if Path(dst).name == "old":  # the old copy moved aside: then Ctrl+C
            raise KeyboardInterrupt

    monkeypatch.setattr(tiny.os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny.ensure_tiny_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(tiny.os, "rename", real_rename)
    assert tiny.is_complete_checkpoint(tiny.ensure_tiny_checkpoint(tmp_path))
