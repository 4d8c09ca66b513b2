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
