"""Quoted text in a prompt -> ByT5 glyph embeddings appended to the image condition (spec §8.4).

* `glyph_text_from_prompt`: the processor's extraction of the text to render (`Text "<span>". `);
* `GlyphEncoder`: the ByT5 tokenizer (transformers' ByT5Tokenizer plus the glyph font/colour tokens),
  the T5 encoder (transformers' T5Stack; weights `byt5_model/base.pt` with the
  `module.text_tower.encoder.` prefix stripped, overwritten by `byt5_model/byt5_model.pt`) and the
  `T5EncoderBlockByT5Mapper` (transformers' T5Block / T5LayerNorm under the checkpoint's names
  `blocks.<i>`, `layer_norm`, `channel_mapper`, `final_layer_norm`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from engine.loader import load_module, stored_dtype_name
from engine.models.imagegen.config import ByT5Settings, ImageGenError

# get_text_from_prompt, 2.0 values (spec §8.4): single quotes become double quotes when every
# '…' span weighs less than this (ideographs U+4E00..U+9FFF count 3), and a lone span is dropped when one of
# these words comes before the first quote.
SHORT_SPAN_WEIGHT = 20
CJK_WEIGHT = 3
REMOVE_KEYWORDS = ("remove", "delete", "erase")
# The Preview's processor (processing_bailingmm2.py check_single_quotes / get_text_from_prompt): spans weigh
# less than 60, and the remove words are remove / delete / clear.
PREVIEW_SHORT_SPAN_WEIGHT = 60
PREVIEW_REMOVE_KEYWORDS = ("remove", "delete", "clear")
# No DOTALL: as in the reference, a quoted span never runs over a line break.
QUOTE_PATTERNS = (re.compile(r'"(.*?)"'), re.compile(r"‘(.*?)’"), re.compile(r"“(.*?)”"))
OPENING_QUOTES = ('"', "‘", "“")
# Only the CJK Unified Ideographs block weighs CJK_WEIGHT (the reference's check_single_quotes tests
# '\u4e00' <= ch <= '\u9fff'); kana, hangul and the other ideograph blocks count 1 like any character.
_CJK = re.compile(r"[\u4e00-\u9fff]")
# Glyph font tokens keep a language prefix for these codes (`<cn-font-3>`), `<font-i>` otherwise.
FONT_LANGUAGE_PREFIXES = ("en", "cn", "jp", "kr")
# The reference drops this prefix from the keys of byt5_model/base.pt (spec §8.4).
BASE_CKPT_PREFIX = "module.text_tower.encoder."


def _weight(span: str) -> int:
    return sum(CJK_WEIGHT if _CJK.match(ch) else 1 for ch in span)


def glyph_text_from_prompt(prompt: str, preview: bool = False) -> str:
    """The text the reference renders through ByT5: the LAST quoted span (pattern order "…", ‘…’,
    “…”) as `Text "<span>". `, or "" when there is none. Short '…' spans count as quotes; a single
    span after a remove/delete/erase instruction is not rendered. `preview`: the Preview processor's
    limits (spans shorter than 60; remove/delete/clear)."""
    short = PREVIEW_SHORT_SPAN_WEIGHT if preview else SHORT_SPAN_WEIGHT
    remove = PREVIEW_REMOVE_KEYWORDS if preview else REMOVE_KEYWORDS
    text = prompt
    if text.count("'") and text.count("'") % 2 == 0:
        spans = re.findall(r"'(.*?)'", text, re.S)
        if all(_weight(s) < short for s in spans):
            text = text.replace("'", '"')
    spans = [m for pattern in QUOTE_PATTERNS for m in pattern.findall(text)]
    if not spans:
        return ""
    if len(spans) == 1:
        first = min((i for i in (text.find(q) for q in OPENING_QUOTES) if i >= 0), default=len(text))
        head = text[:first].lower()
        if any(k in head for k in remove):
            return ""
    return f'Text "{spans[-1]}". '


def glyph_special_tokens(settings: ByT5Settings) -> list[str]:
    """Colour tokens `<color-i>`, then font tokens (`<xx-font-i>` for the known language codes when
    multilingual, `<font-i>` otherwise), in the annotation files' order."""
    if not settings.special_token:
        return []
    tokens: list[str] = []

    def table(rel: str | None) -> dict:
        if not rel:
            return {}
        path = settings.folder / rel
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ImageGenError(f"{path}: cannot read the glyph table ({e})") from e
        return data if isinstance(data, dict) else {str(i): v for i, v in enumerate(data)}

    if settings.color_special_token:
        tokens += [f"<color-{idx}>" for idx in table(settings.color_ann_path).values()]
    if settings.font_special_token:
        for code, idx in table(settings.font_ann_path).items():
            lang = code[:2]
            if settings.multilingual and code[2:3] == "-" and lang in FONT_LANGUAGE_PREFIXES:
                tokens.append(f"<{lang}-font-{idx}>")
            else:
                tokens.append(f"<font-{idx}>")
    return tokens


class ByT5Mapper(nn.Module):
    """`T5EncoderBlockByT5Mapper`: T5 encoder blocks (relative bias in the first) with the padding
    mask, T5 RMS norm, Linear(d_model -> sdxl_channels), T5 RMS norm."""

    def __init__(self, t5_config, num_layers: int, out_channels: int):
        super().__init__()
        from transformers.models.t5.modeling_t5 import T5Block, T5LayerNorm

        self.blocks = nn.ModuleList(T5Block(t5_config, has_relative_attention_bias=i == 0) for i in range(num_layers))
        self.layer_norm = T5LayerNorm(t5_config.d_model, eps=t5_config.layer_norm_epsilon)
        self.channel_mapper = nn.Linear(t5_config.d_model, out_channels)
        self.final_layer_norm = T5LayerNorm(out_channels, eps=t5_config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        bias = None
        for block in self.blocks:
            x, bias, _ = block(x, attention_mask=mask, position_bias=bias)
        return self.final_layer_norm(self.channel_mapper(self.layer_norm(x)))


class _StateReader:
    """A state dict read through engine.loader.load_module (same shape checks and errors)."""

    def __init__(self, state: dict[str, torch.Tensor], path: Path):
        self.state = state
        self.files = SimpleNamespace(weight_map={k: path.name for k in state}, root=path.parent)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> str:
        return stored_dtype_name(self.state[name])

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]

    def read_into(self, name: str, out: torch.Tensor) -> None:
        out.copy_(self.state[name])


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ImageGenError(f"{path}: missing (ByT5 glyph weights)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ImageGenError(f"{path}: cannot read ({e})") from e
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ImageGenError(f"{path}: expected a state dict")
    return dict(data)


class GlyphEncoder(nn.Module):
    """ByT5 tokenizer + T5 encoder + mapper: rendered text -> [B, max_length, C] (padding rows zero)."""

    def __init__(self, settings: ByT5Settings, tokenizer, t5_config):
        super().__init__()
        from transformers.models.t5.modeling_t5 import T5Stack

        self.settings = settings
        self.tokenizer = tokenizer
        self.encoder = T5Stack(t5_config)
        self.mapper = ByT5Mapper(t5_config, settings.mapper_layers, settings.sdxl_channels)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.settings.max_length,
                             add_special_tokens=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def forward(self, texts: list[str]) -> SimpleNamespace:
        ids, mask = self.tokenize(texts)
        dev = self.encoder.embed_tokens.weight.device
        ids, mask = ids.to(dev), mask.to(dev)
        dtype = self.encoder.embed_tokens.weight.dtype
        enc_out = self.encoder(input_ids=ids, attention_mask=mask.to(dtype)).last_hidden_state
        mapped = self.mapper(enc_out, mask)
        return SimpleNamespace(input_ids=ids, attention_mask=mask, encoder_out=enc_out, mapper_out=mapped,
                               embeds=mapped * mask.unsqueeze(-1).to(mapped.dtype))

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype, device: torch.device | str) -> "GlyphEncoder":
        from transformers import ByT5Tokenizer, T5Config

        settings = ByT5Settings.from_folder(folder)
        ckpt = settings.folder / settings.ckpt_path
        try:
            tokenizer = ByT5Tokenizer.from_pretrained(str(ckpt), local_files_only=True)  # (never the hub)
            t5_config = T5Config.from_pretrained(str(ckpt), local_files_only=True)
        except Exception as e:
            raise ImageGenError(f"{ckpt}: cannot load the ByT5 tokenizer/config ({e})") from e
        extra = glyph_special_tokens(settings)
        if extra:
            tokenizer.add_tokens(extra, special_tokens=True)
        model_dir = settings.folder / "byt5_model"
        state = {k[len(BASE_CKPT_PREFIX):] if k.startswith(BASE_CKPT_PREFIX) else k: v
                 for k, v in _torch_state(model_dir / "base.pt").items()}
        final = model_dir / "byt5_model.pt"
        if final.is_file():
            state.update(_torch_state(final))
        rows = state.get("embed_tokens.weight")
        if rows is None or rows.shape[0] != len(tokenizer):
            raise ImageGenError(f"{model_dir}: the ByT5 embedding has {None if rows is None else rows.shape[0]} rows "
                                f"but the tokenizer with its glyph tokens has {len(tokenizer)}")
        t5_config.vocab_size = len(tokenizer)
        t5_config.is_decoder = False
        t5_config.use_cache = False
        t5_config._attn_implementation = "eager"
        with torch.device("meta"):
            glyph = cls(settings, tokenizer, t5_config)
        load_module(glyph.encoder, _StateReader(state, final if final.is_file() else model_dir / "base.pt"), "",
                    dtype, device)
        mapper_path = settings.folder / "byt5_mapper" / "byt5_mapper.pt"
        load_module(glyph.mapper, _StateReader(_torch_state(mapper_path), mapper_path), "", dtype, device)
        return glyph.eval()
