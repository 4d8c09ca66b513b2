"""BailingMoeV2 language model ("thinker" LLM of Ming-flash-omni), as plain PyTorch modules whose
names mirror the checkpoint: fused-QKV GQA attention with q/k RMSNorm and partial 3-D rotary,
dense first layers, MoE layers with a MultiRouter, final norm and lm_head (spec §2)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.models.thinker.config import LLMConfig
from engine.models.thinker.kv_cache import KVCache
from engine.models.thinker.layers import MoEBlock, Numerics, RMSNorm, SwiGLUMLP, VideoRotary


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim,
                                         bias=cfg.use_qkv_bias)
        self.dense = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.use_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                causal: bool, cache: KVCache | None, layer_idx: int) -> torch.Tensor:
        b, q_len, _ = x.shape
        qkv = self.query_key_value(x).view(b, q_len, self.n_heads + 2 * self.n_kv, self.head_dim)
        # Head-major split: all query heads, then key heads, then value heads (spec §2.4).
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=2)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k).transpose(1, 2)
        v = v.transpose(1, 2)
        q = kernels.apply_rotary(q, cos, sin)
        k = kernels.apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.dense(out.transpose(1, 2).reshape(b, q_len, self.n_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoEBlock(cfg) if self.is_moe else SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size)

    @property
    def device(self) -> torch.device:
        """Where this layer's attention (and its KV cache) lives; placement plans may differ per layer."""
        return self.input_layernorm.weight.device

    def forward(self, x, cos, sin, mask, causal, cache, numerics, image_mask, audio_mask, trace):
        x = x + self.attention(self.input_layernorm(x), cos, sin, mask, causal, cache, self.layer_idx)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            routers = trace.setdefault("routers", {}).setdefault(self.layer_idx, []) if trace is not None else None
            return x + self.mlp(h, numerics, image_mask, audio_mask, routers)
        return x + self.mlp(h)


def attention_mask_4d(key_mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, q, kv] mask: causal, bottom-right aligned, plus key padding.
    Masked slots get the dtype's minimum (not -inf) so fully padded rows stay finite."""
    kv = key_mask.shape[1]
    i = torch.arange(q_len, device=key_mask.device).view(-1, 1)
    j = torch.arange(kv, device=key_mask.device).view(1, -1)
    allowed = (j <= i + (kv - q_len)).unsqueeze(0) & key_mask.bool().unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


class BailingMoeV2Model(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = VideoRotary(cfg)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.clamp(0, self.config.vocab_size - 1).to(self.word_embeddings.weight.device)
        return self.word_embeddings(ids)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, numerics: Numerics,
                step_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                image_mask: torch.Tensor | None = None, audio_mask: torch.Tensor | None = None,
                trace: dict | None = None) -> torch.Tensor:
        """inputs_embeds [B, q, H], position_ids [3, B, q], step_mask [B, q] (1 = real token)."""
        b, q_len, _ = inputs_embeds.shape
        x = inputs_embeds.to(numerics.dtype)
        if step_mask is None:
            step_mask = torch.ones(b, q_len, dtype=torch.long, device=x.device)
        key_mask = step_mask if cache is None or cache.attention_mask is None else torch.cat(
            [cache.attention_mask, step_mask.to(cache.attention_mask.device)], dim=1)
        padded = not bool(key_mask.bool().all())
        causal = q_len > 1
        mask = attention_mask_4d(key_mask, q_len, x.dtype) if padded or (causal and key_mask.shape[1] != q_len) else None
        if cache is not None:
            cache.reserve(q_len)
        cos, sin = self.rotary_emb(position_ids, numerics)
        if trace is not None:
            trace["inputs_embeds"] = x
        per_device: dict[torch.device, tuple] = {}
        for layer in self.layers:
            dev = layer.device
            if dev not in per_device:  # activations move to the layer, weights stay put
                per_device[dev] = tuple(None if t is None else t.to(dev)
                                        for t in (cos, sin, mask, image_mask, audio_mask))
            l_cos, l_sin, l_mask, l_image, l_audio = per_device[dev]
            x = layer(x.to(dev), l_cos, l_sin, l_mask, causal, cache, numerics, l_image, l_audio, trace)
            if trace is not None:
                trace.setdefault("layer_output", []).append(x)
        if cache is not None:
            cache.advance(q_len, step_mask)
        return self.norm(x.to(self.norm.weight.device))


@dataclass
class MultimodalInputs:
    """Encoder features to write into placeholder slots at prefill (spec §2.2, §5.4).

    image_embeds: [n_image_tokens, H] in order over the batch, for `<imagePatch>` slots.
    video_embeds: [n_frame_tokens, H] for `<framePatch>` slots.
    audio_spans: per batch row, a list of (start, embeds [n, H]) written at positions start..start+n-1.
    """

    image_embeds: torch.Tensor | None = None
    video_embeds: torch.Tensor | None = None
    audio_spans: list[list[tuple[int, torch.Tensor]]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.image_embeds is None and self.video_embeds is None and not any(self.audio_spans)


class MultimodalInputError(ValueError):
    """Placeholder tokens and supplied features do not agree."""


class BailingMoeV2ForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.model = BailingMoeV2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def prepare_inputs(self, input_ids: torch.Tensor, mm: MultimodalInputs | None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Embeddings with multimodal features inserted, and the MultiRouter masks (spec §2.7):
        masks exist only when features were supplied; image/video slots use the image gate."""
        embeds = self.model.embed(input_ids)
        if mm is None or mm.empty:
            return embeds, None, None
        cfg = self.config
        embeds = embeds.clone()
        for name, token, feats in (("image", cfg.image_patch_token, mm.image_embeds),
                                   ("video", cfg.video_patch_token, mm.video_embeds)):
            slots = input_ids == token
            n_slots = int(slots.sum())
            n_feats = 0 if feats is None else feats.shape[0]
            if n_slots != n_feats:
                raise MultimodalInputError(f"{name}: {n_slots} placeholder tokens but {n_feats} feature rows")
            if n_feats:
                embeds[slots.to(embeds.device)] = feats.to(embeds.device, embeds.dtype)
        audio_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for b, spans in enumerate(mm.audio_spans):
            for start, feats in spans:
                end = start + feats.shape[0]
                if start < 0 or end > input_ids.shape[1]:
                    raise MultimodalInputError(f"audio span {start}..{end} outside the sequence of row {b}")
                embeds[b, start:end] = feats.to(embeds.device, embeds.dtype)
                audio_mask[b, start:end] = True
        image_mask = (input_ids == cfg.image_patch_token) | (input_ids == cfg.video_patch_token)
        return embeds, image_mask, audio_mask

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, numerics: Numerics,
                step_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                image_mask: torch.Tensor | None = None, audio_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, trace: dict | None = None) -> torch.Tensor:
        """Returns fp32 logits of the last `logits_to_keep` positions (0 = all)."""
        hidden = self.model(inputs_embeds, position_ids, numerics, step_mask, cache, image_mask, audio_mask, trace)
        if trace is not None:
            trace["last_hidden_state"] = hidden
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden).float()  # lm_head lives with the final norm (engine.models.thinker.model placement)

    def new_cache(self, batch: int, numerics: Numerics, device: torch.device | str | None = None,
                  capacity: int = 256) -> KVCache:
        """A KV cache with each layer's part on that layer's device (`device` only overrides
        when every layer lives on one device)."""
        cfg = self.config
        devices = [layer.device for layer in self.model.layers]
        if device is not None and len(set(devices)) == 1:
            devices = [torch.device(device)] * len(devices)
        return KVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim,
                       numerics.dtype, devices, capacity)
