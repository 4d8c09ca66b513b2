"""Several speakers in one talker prompt (spec §7.2, §7.3), re-derived plainly: one CAM++ vector per prompt
wav, speaker i gets the slot right after the i-th `<|vision_start|>` (the `<|vision_pad|>` that follows
'  speaker_i:'), and that slot holds spk_head(vector i) = W v_i + b. The vectors may come as [n, 192], as a
stack of [1, 192] vectors [n, 1, 192], or as one batch row [1, n, 192]; all three mean the same speakers."""

import pytest
import torch

from engine.models.talker.config import TalkerConfigError
from engine.models.talker.model import load_talker
from engine.models.talker.prompt import TASK_PROMPTS, build_prompt
from engine.models.talker.tokenizer import TalkerTokenizer

# fp32 Linear against the same product written out: one rounding order apart
SLOT_ATOL = 1e-5


@pytest.fixture(scope="module")
def talker(tiny_talker_dir):
    return load_talker(tiny_talker_dir)


@pytest.fixture(scope="module")
def tok(tiny_talker_dir):
    return TalkerTokenizer(tiny_talker_dir / "llm")


def layouts(vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    n, width = vectors.shape
    return {"[n, 192]": vectors, "[n, 1, 192]": vectors[:, None], "[1, n, 192]": vectors[None]}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_speaker_i_fills_the_slot_after_the_ith_vision_start(talker, tok, n):
    vectors = torch.randn(n, 192, generator=torch.Generator().manual_seed(n))
    prompt = build_prompt(tok, TASK_PROMPTS["speech"], "Hello there.", n_speakers=n)
    vision_start, pad = tok.token_id("<|vision_start|>"), tok.token_id("<|vision_pad|>")
    starts = [i for i, t in enumerate(prompt.ids) if t == vision_start]
    assert prompt.speaker_slots == [s + 1 for s in starts] and len(starts) == n
    assert all(prompt.ids[s] == pad for s in prompt.speaker_slots)
    assert [prompt.text.index(f"  speaker_{i}:") for i in range(1, n + 1)] == \
        sorted(prompt.text.index(f"  speaker_{i}:") for i in range(1, n + 1))

    weight, bias = talker.spk_head.weight.detach(), talker.spk_head.bias.detach()
    want_slots = torch.stack([weight @ vectors[i] + bias for i in range(n)])
    with torch.no_grad():
        tokens = talker.model.embed_tokens(torch.tensor([prompt.ids]))[0]
        for layout, spk in layouts(vectors).items():
            assert talker.speaker_vectors(spk).shape == (n, 192), layout
            embeds = talker.speaker_embedding(spk)
            x = talker.embed_prompt(prompt.ids, prompt.speaker_slots, embeds, [], None)[0]
            torch.testing.assert_close(x[prompt.speaker_slots], want_slots, atol=SLOT_ATOL, rtol=0, msg=layout)
            others = [i for i in range(len(prompt.ids)) if i not in prompt.speaker_slots]
            assert torch.equal(x[others], tokens[others]), layout


def test_vectors_of_another_width_are_refused_by_name(talker):
    for bad in (torch.randn(2, 191), torch.randn(192, 2), torch.tensor(1.0), torch.empty(0, 192)):
        with pytest.raises(TalkerConfigError, match="192 values"):
            talker.speaker_embedding(bad)
