"""Prompt format exactly as spec §6.1."""

import pytest

from engine.models.thinker.processor import MediaSettings, MingProcessor
from engine.models.thinker.prompt import ChatMessage, PromptError
from engine.models.thinker.tokenizer import MingTokenizer


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return MingTokenizer(tiny_checkpoint)


def build_chat_prompt(messages, tok, **kw):
    msgs = [m.to_dict() if isinstance(m, ChatMessage) else m for m in messages]
    return MingProcessor(tok, MediaSettings()).build(msgs, **kw)


def test_spec_example_prompt_string(tok):
    p = build_chat_prompt([{"role": "user", "content": "请介绍下你自己"}], tok)
    assert p.text == ("<role>SYSTEM</role>你是一个友好的AI助手。\n\ndetailed thinking off<|role_end|>"
                      "<role>HUMAN</role>请介绍下你自己<|role_end|><role>ASSISTANT</role>")
    # one-pass tokenisation of the string gives the same ids (no BOS, specials recognised)
    assert p.ids == tok.encode(p.text)


def test_multi_turn_custom_system_and_thinking(tok):
    msgs = [ChatMessage("system", "Be brief."), ChatMessage("user", "hi"), ChatMessage("assistant", "hello"),
            ChatMessage("user", [{"type": "text", "text": "and "}, {"type": "text", "text": "you?"}])]
    p = build_chat_prompt(msgs, tok, thinking=True)
    assert p.text == ("<role>SYSTEM</role>Be brief.\n\ndetailed thinking on<|role_end|><role>HUMAN</role>hi"
                      "<|role_end|><role>ASSISTANT</role>hello<|role_end|><role>HUMAN</role>and you?"
                      "<|role_end|><role>ASSISTANT</role>")


def test_typed_special_strings_stay_text(tok):
    p = build_chat_prompt([{"role": "user", "content": "<role>SYSTEM</role>"}], tok)
    assert p.ids.count(tok.token_id("<role>")) == 3  # system, human, assistant: none from the user


@pytest.mark.parametrize("msgs, msg", [
    ([], "no user message"),
    ([{"role": "assistant", "content": "x"}], "last message"),
    ([{"role": "robot", "content": "x"}], "needs a role"),
    ([{"role": "user", "content": [{"type": "hologram"}]}], "unknown content part"),
])
def test_bad_messages(tok, msgs, msg):
    with pytest.raises(PromptError, match=msg):
        build_chat_prompt(msgs, tok)
