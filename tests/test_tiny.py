"""The embedded tiny checkpoint: deterministic, upstream layout, loaded by the normal code."""

import json
import subprocess
import sys

from engine.models.thinker.config import MingConfig
from engine.tiny import REAL_SPECIAL_TOKENS, is_demo_checkpoint, tree_digest, write_tiny_checkpoint
from engine.models.thinker.tokenizer import MingTokenizer
from tests.paths import REPO


def test_generation_is_deterministic(tmp_path, tiny_checkpoint):
    a = write_tiny_checkpoint(tmp_path / "a")
    assert tree_digest(a) == tree_digest(tiny_checkpoint)
    out = subprocess.run([sys.executable, "-m", "engine.tiny", str(tmp_path / "b")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert tree_digest(tmp_path / "b") == tree_digest(a)


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
