"""Next-token choice on the device: greedy, the repetition-penalty rule, top-k / top-p, seeded draws
that follow the distribution, and the log probabilities reported with the choice."""

import pytest
import torch

from engine.sampling import (MAX_TOP_LOGPROBS, GenerationParams, Sampler, apply_repetition_penalty,
                             filter_top_k_top_p)


def test_repetition_penalty_follows_the_ctrl_rule_once_per_seen_token():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    seen_ids = torch.tensor([[0, 1, 1, 4]])  # token 1 twice: penalised once, as HF's gather/scatter does
    seen = torch.zeros(1, 5, dtype=torch.bool).scatter_(1, seen_ids, True)
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, -4.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_presence_and_frequency_penalties_follow_openais_rule_over_the_replys_own_tokens():
    """OpenAI's presence_penalty / frequency_penalty were refused by the server (a client sending them got a 400);
    they are honoured as OpenAI defines them: logit - frequency x uses - presence x (used at all), counting the
    reply's tokens only (the prompt's do not count), greedy too."""
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0]])
    s = Sampler(GenerationParams(frequency_penalty=0.4), vocab_size=4)
    s.observe(torch.tensor([[0, 0, 0]]))  # (the prompt: not counted)
    assert [s(logits).item() for _ in range(4)] == [0, 0, 1, 0]  # 3.0 > 2.6 > 2.5 > 2.2 ... 2.2 > 2.1
    assert s.uses.tolist() == [[3.0, 1.0, 0.0, 0.0]]
    s = Sampler(GenerationParams(presence_penalty=1.25), vocab_size=4)
    assert [s(logits).item() for _ in range(4)] == [0, 1, 2, 0]  # once used, each is 1.25 lower, however often
    close = torch.tensor([[3.0, 2.8, 0.0, 0.0]])
    for presence, drawn in ((0.0, [0, 1, 0]), (-0.4, [0, 0, 1])):  # (negative: a used token comes back sooner)
        s = Sampler(GenerationParams(frequency_penalty=0.5, presence_penalty=presence), vocab_size=4)
        assert [s(close).item() for _ in range(3)] == drawn
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(ValueError, match=name):
            GenerationParams(**{name: 2.5}).validate()


def test_logit_bias_is_added_to_the_named_tokens_before_the_choice():
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0]])
    assert Sampler(GenerationParams(logit_bias={3: 100.0}), vocab_size=4)(logits).item() == 3  # (forced, greedy)
    assert Sampler(GenerationParams(logit_bias={0: -100.0, 1: -0.6}), vocab_size=4)(logits).item() == 2
    drawn = Sampler(GenerationParams(temperature=1.0, seed=3, logit_bias={0: -100.0}), vocab_size=4, batch=500)
    assert 0 not in drawn(logits.expand(500, -1)).tolist()  # (banned from a draw too)
    with pytest.raises(ValueError, match="tokens are 0 to 3"):
        GenerationParams(logit_bias={4: 1.0}).validate(vocab_size=4)
    with pytest.raises(ValueError, match=r"logit_bias values must be in \[-100, 100\]"):
        GenerationParams(logit_bias={1: 101.0}).validate()


def test_top_k_and_top_p_keep_the_expected_sets():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda t: torch.isfinite(t).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(filter_top_k_top_p(logits, 2, 1.0)) == [0, 1]
    assert kept(filter_top_k_top_p(logits, 0, 0.7)) == [0, 1]  # 0.5 < 0.7 <= 0.75
    assert kept(filter_top_k_top_p(logits, 0, 0.3)) == [0]  # the best token always stays
    assert kept(filter_top_k_top_p(logits, 3, 0.99)) == [0, 1, 2]


def test_greedy_is_argmax_and_records_the_history():
    s = Sampler(GenerationParams(repetition_penalty=1.5), vocab_size=6, batch=2)
    s.observe(torch.tensor([[1, 2], [3, 3]]))
    ids = s(torch.tensor([[0.0, 5.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0, 0.0, 3.0]]))
    assert ids.tolist() == [1, 5]  # row 1: 4/1.5 < 3
    assert s.seen.nonzero().tolist() == [[0, 1], [0, 2], [1, 3], [1, 5]]


def test_seeded_draws_reproduce_and_follow_the_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    logits = torch.log(probs).expand(20000, -1)
    params = GenerationParams(temperature=1.0, seed=11)
    a = Sampler(params, vocab_size=5, batch=20000)(logits)
    b = Sampler(params, vocab_size=5, batch=20000)(logits)
    c = Sampler(GenerationParams(temperature=1.0, seed=12), vocab_size=5, batch=20000)(logits)
    assert torch.equal(a, b) and not torch.equal(a, c)
    freq = torch.bincount(a, minlength=5).float() / a.numel()
    assert (freq - probs).abs().max() < 0.015 and freq[4] == 0


def test_extreme_temperature_and_top_p_stay_near_greedy_instead_of_nan():
    """A temperature or top_p the server accepts but fp32 cannot hold (1e-40 / 1e-300 / 1e-50 underflow to
    0 or overflow logits / t to inf) made every probability NaN and the draw token 0 whatever the logits;
    near 0 both mean the best token (ties drawn among the best), as top-1 (HF's min_tokens_to_keep=1)."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, -1.0, 0.5]]).expand(64, -1)
    for kw in ({"temperature": 1e-40}, {"temperature": 1e-300}, {"temperature": 5e-324},
               {"temperature": 1.0, "top_p": 1e-50}, {"temperature": 1e-300, "top_p": 1e-300}):
        ids = Sampler(GenerationParams(seed=3, **kw), vocab_size=6, batch=64)(logits)
        assert set(ids.tolist()) <= {1, 3}, kw  # the two tied best logits, never token 0
        if "top_p" not in kw:
            assert set(ids.tolist()) == {1, 3}, kw  # a tie is still a draw
    assert Sampler(GenerationParams(temperature=1.0, top_p=1e-50, seed=3), 4)(
        torch.tensor([[0.0, 0.2, 5.0, 0.1]])).item() == 2


def test_top_p_zero_keeps_only_the_most_likely_token_even_at_temperature_one():
    """OpenAI takes top_p 0; as HF's min_tokens_to_keep=1 it keeps the best token alone: every draw is the
    argmax, and nothing divides by zero (no NaN probabilities, a finite best logit)."""
    logits = torch.randn(512, 50, generator=torch.Generator().manual_seed(0))
    kept = filter_top_k_top_p(logits, 0, 0.0)
    assert torch.isfinite(kept).sum(-1).eq(1).all() and not kept.softmax(-1).isnan().any()
    ids = Sampler(GenerationParams(temperature=1.0, top_p=0.0, seed=4), vocab_size=50, batch=512)(logits)
    assert torch.equal(ids, logits.argmax(-1))
    assert GenerationParams(top_p=0.0).validate().top_p == 0.0
    for bad in (-0.1, 1.5, float("nan")):
        try:
            GenerationParams(top_p=bad).validate()
        except ValueError as e:
            assert "top_p" in str(e)
        else:
            raise AssertionError(f"top_p {bad} accepted")


def test_parameters_the_python_api_gets_wrong_are_refused_or_read_as_meant():
    """stop="END" (one string, as OpenAI's and HF's stop fields take it) was read as its characters, so the
    reply stopped at the first 'E', 'N' or 'D'; a NaN repetition_penalty (NaN <= 0 is false) turned every
    seen token's logit into NaN and greedy picked one of them; top_k 2.5 failed inside torch.topk."""
    assert GenerationParams(stop="END").validate().stop == ["END"]
    for kw, word in (({"repetition_penalty": float("nan")}, "repetition_penalty"), ({"top_k": 2.5}, "top_k"),
                     ({"top_k": True}, "top_k")):
        try:
            GenerationParams(**kw).validate()
        except ValueError as e:
            assert word in str(e)
        else:
            raise AssertionError(f"{kw} accepted")


def test_logprobs_are_the_raw_distributions_whatever_the_draw_was_shaped_by():
    """The chosen token's logprob and the top alternatives are the log-softmax of the logits as given, not of what
    the penalty, the temperature and top-k reshaped for the draw; only asked for, they are computed."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0], [0.0, 4.0, 1.5, 1.0, -2.0]])
    params = GenerationParams(temperature=0.3, top_k=3, repetition_penalty=2.0, seed=5, logprobs=True, top_logprobs=3)
    s = Sampler(params, vocab_size=5, batch=2)
    s.observe(torch.tensor([[4], [1]]))
    got = s.sample(logits)
    raw = logits.log_softmax(-1)
    assert got.logprob.tolist() == pytest.approx(raw.gather(1, got.ids.view(-1, 1)).view(-1).tolist())
    assert got.top_ids.tolist() == [[4, 0, 1], [1, 2, 3]]
    assert got.top_logprobs.view(-1).tolist() == pytest.approx(raw.topk(3).values.view(-1).tolist())
    assert len(Sampler(GenerationParams(), vocab_size=5).sample(logits[:1]).tensors()) == 1  # the ids alone
    greedy = Sampler(GenerationParams(logprobs=True), vocab_size=5, batch=2).sample(logits)
    assert greedy.top_ids.shape == (2, 0) and greedy.logprob.tolist() == pytest.approx(raw.max(-1).values.tolist())


def test_top_logprobs_is_bounded_and_needs_logprobs():
    assert GenerationParams(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS).validate()
    for kw in ({"logprobs": True, "top_logprobs": MAX_TOP_LOGPROBS + 1}, {"logprobs": True, "top_logprobs": -1},
               {"logprobs": True, "top_logprobs": 2.5}, {"top_logprobs": 2}):
        with pytest.raises(ValueError, match="top_logprobs"):
            GenerationParams(**kw).validate()
