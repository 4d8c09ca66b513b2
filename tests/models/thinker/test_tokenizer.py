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


def _merging_tokenizer(root):
    """A byte-level BPE with merges and a Qwen2-style pre-tokenizer regex (punctuation keeps the line
    breaks after it: '.\\n\\n' is one pre-token), as real tokenizers have and the tiny one has not."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from engine.models.thinker.tokenizer import REQUIRED_SPECIAL_TOKENS, byte_level_alphabet

    piece = {b: ch for ch, b in byte_level_alphabet().items()}
    vocab = {piece[b]: b for b in range(256)}
    merges = []
    for word in (".\n", ".\n\n", "he", "hel", "hell", "hello"):
        pieces = "".join(piece[b] for b in word.encode())
        merges.append((pieces[:-1], pieces[-1]))
        vocab[pieces] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(REQUIRED_SPECIAL_TOKENS))
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|role_end|>"}))
    return MingTokenizer(root)


def test_a_prompt_is_tokenised_as_one_string(tmp_path):
    """The reference tokenises the whole prompt in one pass (spec §6.1). Tokenised piece by piece, the
    system text 'Be brief.' and the template's '\\n\\ndetailed thinking off' could not join: with a real
    tokenizer's merges '.\\n\\n' is one token there, two pieces here. Runs between added tokens are now
    tokenised whole; user text still never yields an added token."""
    tok = _merging_tokenizer(tmp_path)
    pieces = [("<role>SYSTEM</role>", True), ("Be brief.", False), ("\n\ndetailed thinking off<|role_end|>", True),
              ("<role>HUMAN</role>", True), ("hel", False), ("lo", False), ("<|role_end|>", True),
              ("<role>ASSISTANT</role>", True)]
    whole = tok.encode("".join(p for p, _ in pieces))
    piecewise = [i for p, t in pieces for i in (tok.encode(p) if t else tok.encode_plain(p))]
    assert whole != piecewise  # the case the one-pass rule is about
    assert tok.encode_pieces(pieces) == whole
    typed = [("<role>HUMAN</role>", True), ("say <role> and <|role_end|>", False), ("<|role_end|>", True)]
    ids = tok.encode_pieces(typed)
    assert ids.count(tok.token_id("<role>")) == 1 and ids.count(tok.token_id("<|role_end|>")) == 1
    assert tok.decode(ids, skip_special_tokens=False) == "".join(p for p, _ in typed)


def test_the_processor_tokenises_its_prompt_as_one_string(tmp_path):
    from engine.models.thinker.processor import MediaSettings, MingProcessor

    tok = _merging_tokenizer(tmp_path)
    prompt = MingProcessor(tok, MediaSettings()).build(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    assert prompt.ids == tok.encode(prompt.text)
    assert tok.token_id(".\u010a\u010a") in prompt.ids  # '.' + '\n\n' across the system text's end
