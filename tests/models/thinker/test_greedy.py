"""Batched greedy decode with EOS stopping as Hugging Face's generate runs it (engine.models.thinker.greedy):
a finished row emits and is fed the pad token, the loop ends when every row is finished."""

import pytest
import torch

from engine.models.thinker.greedy import BatchStopping, greedy_decode_batch
from engine.models.thinker.layers import Numerics
from engine.models.thinker.model import load_model
from engine.models.thinker.positions import PositionTokens, rope_index
from engine.tools.parity import case_stopping

FP32 = Numerics()
STEPS = 6
PROMPTS = torch.tensor([[0, 0, 10, 20, 30, 40, 50], [1, 2, 3, 4, 5, 6, 7]])  # row 0 left-padded
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than these ops on a busy CPU
    yield load_model(tiny_checkpoint, dtype="fp32", device="cpu").llm
    torch.set_num_threads(threads)


def _decode(llm, stopping: BatchStopping, ids=PROMPTS, mask=MASK):
    with torch.inference_mode():
        pos, deltas = rope_index(ids, PositionTokens.from_config(llm.config), attention_mask=mask)
        cache = llm.new_cache(ids.shape[0], FP32, "cpu")
        logits = llm(llm.model.embed(ids), pos, FP32, mask, cache)
        return greedy_decode_batch(llm, FP32, cache, logits[:, -1], deltas, STEPS, stopping)


def test_a_finished_row_is_fed_and_emits_the_pad_token_until_every_row_has_finished(llm):
    """The harness fed a row that had emitted EOS its own top token where HF's generate feeds (and emits)
    the pad token; its later decode logits then differed from the reference's. Row 0 stops at its second
    token here: afterwards it emits the pad, its logits are those of the prompt followed by EOS and pads,
    row 1 decodes as it would alone, and the loop ends once row 1 has emitted an EOS too."""
    free = _decode(llm, BatchStopping.off())
    assert free.tokens.shape == (2, STEPS)
    eos = int(free.tokens[0, 1])
    row1 = free.tokens[1].tolist()
    # a step >= 3 where row 1 emits a token new to it (not row 0's EOS): a second EOS id, so that row 0 is fed pads
    later = [t for t in range(3, STEPS) if row1[t] != eos and row1[t] not in row1[:t]]
    assert eos not in row1[:later[-1] if later else 0] and later, "the tiny model's tokens no longer suit this test"
    row1_end = row1[later[-1]]
    stopping = BatchStopping.for_config(llm.config, eos_ids=(eos, row1_end))
    pad = llm.config.pad_token_id
    assert pad is not None and stopping.pad_id == pad

    got = _decode(llm, stopping)
    n = later[-1] + 1
    assert got.tokens.shape == (2, n)  # ended when row 1 finished, before STEPS
    assert got.tokens[1].tolist() == free.tokens[1, :n].tolist()
    assert got.tokens[0].tolist() == free.tokens[0, :2].tolist() + [pad] * (n - 2)
    # row 0's logits after its EOS: the prompt, its two tokens, then fed pads (one forward, no cache)
    seq = torch.cat([PROMPTS[0, 2:], got.tokens[0, :n - 1]]).view(1, -1)
    with torch.inference_mode():
        full = llm(llm.model.embed(seq), rope_index(seq, PositionTokens.from_config(llm.config))[0], FP32)
    prompt_len = PROMPTS.shape[1] - 2
    torch.testing.assert_close(got.logits[0], full[0, prompt_len - 1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.logits[1], free.logits[1, :n], atol=1e-4, rtol=1e-4)


def test_a_case_records_whether_its_generate_stopped_on_eos(llm):
    cfg = llm.config
    assert case_stopping({"generation": {"eos_stopping": "disabled (all 8 steps recorded)"}}, cfg).eos_ids == ()
    assert case_stopping({}, cfg).eos_ids == ()
    on = case_stopping({"generation": {"eos_stopping": True}}, cfg)
    assert on == BatchStopping(tuple(cfg.eos_token_ids), cfg.pad_token_id)
    assert case_stopping({"generation": {"eos_stopping": "enabled", "eos_token_id": [7], "pad_token_id": 9}},
                         cfg) == BatchStopping((7,), 9)


@pytest.mark.parametrize("meta, want", [
    ({"generation": {"eos_stopping": "false"}}, None),
    ({"generation": {"eos_stopping": "no (all steps recorded)"}}, None),
    ({"generation": {"eos_stopping": 1}}, ()),
    ({"generation_config": {"max_new_tokens": 8, "eos_token_id": 7}}, (7,)),
    ({"generate_kwargs": {"eos_token_id": [7, 8], "pad_token_id": 9}}, (7, 8)),
    ({"generation": {"max_new_tokens": 8, "eos_token_id": None}}, None),
    ({"hf_generate_crosscheck": {"note": "generate(**inputs, max_new_tokens=8, eos_token_id=None)"}}, None),
    ({"hf_generate_crosscheck": {"note": "generate(**inputs, max_new_tokens=8, eos_token_id=[7])"}}, (7,)),
    ({"hf_generate_crosscheck": {"note": "generate(x, max_new_tokens=8, eos_token_id=(7, 8))"}}, (7, 8)),
    ({"hf_generate_crosscheck": {"note": "generate(x, eos_token_id=7, pad_token_id=9)"},
      "generation": {"eos_stopping": "disabled"}}, None),
])
def test_a_case_s_eos_stopping_is_read_from_every_record_of_its_generate_call(llm, meta, want):
    """None: stopping off; () : on with the config's ids; else on with these ids."""
    got = case_stopping(meta, llm.config)
    expected = None if want is None else tuple(llm.config.eos_token_ids) if want == () else want
    assert (got.eos_ids or None) == expected
