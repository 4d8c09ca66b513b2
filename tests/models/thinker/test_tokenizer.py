"""Tokenizer: special tokens by name, user text never parsed as specials, UTF-8-safe streaming."""

import pytest

from engine.models.thinker.tokenizer import MingTokenizer, TokenizerError


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return MingTokenizer(tiny_checkpoint)


def test_special_tokens_and_eos(tok):
    assert tok.token_id("<image>") == tok.token_id("<imagePatch>") + 1
    assert tok.eos_token == "<|role_end|>" and tok.eos_id == tok.token_id("<|role_end|>")


def test_template_parses_specials_but_user_text_does_not(tok):
    assert tok.encode("<role>") == [tok.token_id("<role>")]
    assert tok.encode_plain("<role>") == list(b"<role>")


def test_stream_decoder_never_splits_a_character(tok):
    text = "héllo 世界 🎉"
    dec = tok.stream_decoder()
    deltas = [dec.push(b) for b in text.encode("utf-8")] + [dec.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # the 4-byte emoji arrives as one delta, after its last byte
    assert "🎉" in deltas


def test_stream_decoder_replaces_invalid_bytes_and_skips_specials(tok):
    dec = tok.stream_decoder()
    out = "".join(dec.push(i) for i in [0xFF, ord("a"), tok.token_id("<image>"), 0xE4]) + dec.flush()
    assert out == "\ufffda\ufffd"


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        MingTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("")
    with pytest.raises(TokenizerError, match="empty"):
        MingTokenizer(tmp_path)
