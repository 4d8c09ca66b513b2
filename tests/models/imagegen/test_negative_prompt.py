"""A negative prompt (spec §8.2): the Preview conditions its negative CFG branch on it (the same chat template,
query tokens, thinker pass, connector and projection as the positive; the glyph rows stay zeros, §8.4); 2.0's
pipeline guides against zeros whatever the negative prompt (§8.6), so a 2.0 engine refuses one by name."""

from __future__ import annotations

import pytest
import torch

from engine.events import Done, Error, ImageDone
from engine.imagine import main as imagine_cli
from engine.models.imagegen.condition import condition_from_prompt

# Both conditions are computed by the same fp32 CPU ops on the same tokens; the batched caption MLP input is
# compared before any batching, so they agree to fp32 rounding at most.
CONDITION_ATOL = 1e-6
QUOTED = 'A sign saying "OPEN"'  # quoted text: the condition carries ByT5 glyph rows after the query tokens


def _captured_conditions(engine, prompt: str, **kw) -> tuple[torch.Tensor, bytes]:
    """The conditions the Preview's caption MLP received (one batch of CFG branches: [negative, positive] for a
    generation) and the picture made."""
    seen = []
    hook = engine.image_generator.caption_mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    try:
        events = list(engine.imagine(prompt, steps=2, seed=7, size="32x32", **kw))
    finally:
        hook.remove()
    assert isinstance(events[-1], Done), events[-1]
    assert len(seen) == 1 and seen[0].shape[0] == 2, [s.shape for s in seen]
    return seen[0], next(e for e in events if isinstance(e, ImageDone)).image


def _words_condition(engine, words: str) -> torch.Tensor:
    """The condition of `words` alone as a user turn (spec §8.2-§8.3): [1, 256-ish, C] fp32."""
    gen, model = engine.image_generator, engine.model
    prompt = engine.processor.build([{"role": "user", "content": [{"type": "text", "text": words}]}])
    with torch.inference_mode():
        return condition_from_prompt(model.llm, model.numerics, gen.query_head, gen.connector, prompt.ids).condition


def test_the_previews_negative_branch_is_the_negative_prompts_condition(preview_engine):
    plain, plain_png = _captured_conditions(preview_engine, QUOTED)
    assert not plain[0].any()  # no negative prompt: zeros (spec §8.2)
    neg, neg_png = _captured_conditions(preview_engine, QUOTED, negative_prompt="blurry, watermark")
    expected = _words_condition(preview_engine, "blurry, watermark")[0]
    n = expected.shape[0]
    assert neg.shape[1] > n  # the glyph rows follow the query tokens' rows
    torch.testing.assert_close(neg[0, :n], expected, atol=CONDITION_ATOL, rtol=0)
    assert not neg[0, n:].any()  # the negative branch's glyph rows are zeros (spec §8.4)
    torch.testing.assert_close(neg[1], plain[1], atol=CONDITION_ATOL, rtol=0)  # the positive is untouched
    assert (neg[0, :n] - neg[1, :n]).abs().max() > 1e-3  # not the positive prompt's condition
    assert neg_png != plain_png


def test_the_token_count_includes_the_negative_prompts_pass(preview_engine):
    """The thinker reads the negative prompt with its own query blocks: the request's prompt_tokens count both."""
    def prompt_tokens(**kw):
        done = list(preview_engine.imagine("a cat", steps=1, seed=1, size="32x32", **kw))[-1]
        assert isinstance(done, Done), done
        return done.stats.prompt_tokens
    gen = preview_engine.image_generator
    chat = preview_engine.processor.build([{"role": "user", "content": [{"type": "text", "text": "blurry"}]}])
    query_tokens = sum(s * s + 2 for s in gen.head_config.scales)
    assert prompt_tokens(negative_prompt="blurry") == prompt_tokens() + len(chat.ids) + query_tokens


def test_a_blank_negative_prompt_is_no_negative_prompt(preview_engine):
    plain, plain_png = _captured_conditions(preview_engine, "a cat")
    blank, blank_png = _captured_conditions(preview_engine, "a cat", negative_prompt="  ")
    assert not blank[0].any() and blank_png == plain_png


def test_an_edits_null_branches_take_the_negative_prompt(preview_engine):
    """An edit's 4-branch CFG [null/zero ref, null/ref, text/zero ref, text/ref]: both null branches get it."""
    import numpy as np
    photo = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    seen = []
    hook = preview_engine.image_generator.caption_mlp.register_forward_hook(
        lambda m, args, out: seen.append(args[0].clone()))
    try:
        events = list(preview_engine.imagine("make it blue", images=[photo], steps=1, seed=3, size="32x32",
                                             negative_prompt="red"))
    finally:
        hook.remove()
    assert isinstance(events[-1], Done), events[-1]
    batch = seen[0]
    expected = _words_condition(preview_engine, "red")[0]
    assert batch.shape[0] == 4
    for branch in (0, 1):
        torch.testing.assert_close(batch[branch, :expected.shape[0]], expected, atol=CONDITION_ATOL, rtol=0)


@pytest.mark.parametrize("value, words", [(5, "must be text"), (["no"], "must be text"),
                                          ("x" * 32_001, "at most 32,000")])
def test_bad_negative_prompts_are_refused_by_name(preview_engine, value, words):
    err = list(preview_engine.imagine("a cat", steps=1, negative_prompt=value))[-1]
    assert isinstance(err, Error) and err.code == "invalid_request" and words in err.message, err


def test_a_negative_prompt_past_the_context_is_refused(preview_engine, monkeypatch):
    import dataclasses
    cfg = preview_engine.model.config
    monkeypatch.setattr(preview_engine.model, "config",
                        dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, max_position_embeddings=400)))
    err = list(preview_engine.imagine("a cat", steps=1, negative_prompt="blurry " * 300))[-1]
    assert isinstance(err, Error) and "the negative prompt is" in err.message and "context" in err.message, err


def test_2_0_refuses_a_negative_prompt_rather_than_ignore_it(tiny_engine):
    """2.0's Z-Image pipeline guides against an all-zero caption whatever the negative prompt (spec §8.6): the
    request is refused, saying so; a blank one is no negative prompt and is made."""
    err = list(tiny_engine.imagine("a cat", steps=1, size="32x32", negative_prompt="dogs"))[-1]
    assert isinstance(err, Error) and err.code == "invalid_request", err
    assert "Preview" in err.message and "ignored" in err.message
    assert isinstance(list(tiny_engine.imagine("a cat", steps=1, size="32x32", negative_prompt=""))[-1], Done)


def test_cli_takes_a_negative_prompt(preview_engine, tmp_path, capsys):
    root = str(preview_engine.image_generator.root)
    args = ["--model", root, "--prompt", "a cat", "--steps", "1", "--seed", "2", "--size", "32x32"]
    assert imagine_cli(args + ["--out", str(tmp_path / "plain.png")]) == 0
    assert imagine_cli(args + ["--negative-prompt", "blurry", "--out", str(tmp_path / "neg.png")]) == 0
    assert (tmp_path / "plain.png").read_bytes() != (tmp_path / "neg.png").read_bytes()
    capsys.readouterr()
