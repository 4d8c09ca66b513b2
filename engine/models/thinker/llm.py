"""BailingMoeV2 language model ("thinker" LLM of Ming-flash-omni), as plain PyTorch modules whose
names mirror the checkpoint: fused-QKV GQA attention with q/k RMSNorm and partial 3-D rotary,
dense first layers, MoE layers with a MultiRouter, final norm and lm_head (spec §2)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.kernels import decode_attention
from engine.models.thinker.config import LLMConfig
from engine.models.thinker.kv_cache import KVCache
from engine.models.thinker.layers import MoEBlock, Numerics, RMSNorm, SwiGLUMLP, VideoRotary, native_weight, rotated_channels


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

    def forward(self, x: torch.Tensor, step: "StepInputs", cache: KVCache | None, layer_idx: int) -> torch.Tensor:
        b, q_len, _ = x.shape
        qkv = self.query_key_value(x).view(b, q_len, self.n_heads + 2 * self.n_kv, self.head_dim)
        # Head-major split: all query heads, then key heads, then value heads (spec §2.4).
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=2)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k).transpose(1, 2)
        v = v.transpose(1, 2)
        q = kernels.apply_rotary(q, step.cos, step.sin)
        k = kernels.apply_rotary(k, step.cos, step.sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v, step.write_at, step.read_upto)
        if q_len == 1 and self.n_kv != self.n_heads:
            # One token: the query heads sharing a KV head are that head's queries, so the attention is
            # plain multi-query over n_kv heads (no GQA expansion; GPUs keep their fused kernels with a mask).
            group = self.n_heads // self.n_kv
            grouped = q.reshape(b, self.n_kv, group, self.head_dim)
            if decode_attention.applies(q, k.shape[-2]):  # a long window on a GPU: two GEMMs (see that module)
                out = decode_attention.grouped_decode_attention(grouped, k, v, step.mask)
            else:
                out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=step.mask)
            return self.dense(out.reshape(b, 1, self.n_heads * self.head_dim))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, is_causal=step.causal and step.mask is None,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.dense(out.transpose(1, 2).reshape(b, q_len, self.n_heads * self.head_dim))


@dataclass
class StepInputs:
    """What every layer of one device needs for a step: rotary tables, the attention mask (None: plain
    causal when `causal`, else everything), and where the step writes / reads the KV cache (see
    engine.models.thinker.kv_cache: `write_at` an int for host steps, a [q] slot tensor for device steps)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    write_at: int | torch.Tensor | None = None
    read_upto: int | None = None
    host_slot: int | None = None  # a device step's slot as a host number, where the cache keeps one (CPU)
    _fp32_tables: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def fp32_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin as contiguous fp32, made once per step (the native decode layers read them)."""
        if self._fp32_tables is None:
            self._fp32_tables = (self.cos.float().contiguous(), self.sin.float().contiguous())
        return self._fp32_tables

    def to(self, device: torch.device) -> "StepInputs":
        move = (lambda t: t if t is None or isinstance(t, int) or _is_causal_bias(t) else t.to(device))  # noqa: E731
        return StepInputs(move(self.cos), move(self.sin), move(self.mask), self.causal, move(self.write_at),
                          self.read_upto)


def _is_causal_bias(t: torch.Tensor) -> bool:
    """A CausalBias (a GPU prefill chunk's mask); its module is imported only where one is made (importing it
    imports torch._dynamo: as long again as torch's own import, at every command's start)."""
    bias = sys.modules.get("torch.nn.attention.bias")
    return bias is not None and isinstance(t, bias.CausalBias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size, self.rotary_dim = cfg.hidden_size, rotated_channels(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoEBlock(cfg) if self.is_moe else SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size)
        self.cpu_decode: tuple[kernels.native.AttentionDecode, kernels.native.MlpDecode] | None = None

    def bind_cpu_decode(self) -> bool:
        """After the CPU packing (engine.models.thinker.model.pack_for_cpu): where this layer's attention
        projections take the native decode GEMV (plain fp32/bf16, or int8 linears), bind the whole layer to
        the native decode kernels (its attention half and its MLP half, router and experts included, one
        call each; see :meth:`_cpu_decode_slot` for the steps that use them). True when bound."""
        self.cpu_decode = None
        attn, mlp = self.attention, self.mlp
        if attn.q_norm.eps != attn.k_norm.eps or self.input_layernorm.eps != self.post_attention_layernorm.eps:
            return False
        projections = [native_weight(m) for m in (attn.query_key_value, attn.dense)]
        if any(p is None for p in projections) or not all(isinstance(m, kernels.PackedLinear) and m.native is not None
                                                          for m in (attn.query_key_value, attn.dense)):
            return False
        dtype = self.input_layernorm.weight.dtype
        (qkv, qkv_scale), (o, o_scale) = projections
        try:
            attention = kernels.native.AttentionDecode(
                input_norm=self.input_layernorm.weight, post_norm=self.post_attention_layernorm.weight,
                eps=self.input_layernorm.eps, qkv=qkv, o=o, qkv_scale=qkv_scale, o_scale=o_scale,
                q_norm=attn.q_norm.weight, k_norm=attn.k_norm.weight, head_eps=attn.q_norm.eps,
                n_heads=attn.n_heads, n_kv=attn.n_kv, head_dim=attn.head_dim, rotary_dim=self.rotary_dim)
            swiglu = mlp.active_shared if self.is_moe else mlp
            shared = shared_scales = None
            if swiglu is not None:
                weights = [native_weight(m) for m in (swiglu.gate_proj, swiglu.up_proj, swiglu.down_proj)]
                if any(w is None for w in weights) or len({w[0].dtype for w in weights}) != 1:
                    return False
                shared = tuple(w for w, _ in weights)
                shared_scales = None if weights[0][1] is None else tuple(s for _, s in weights)
            if self.is_moe:
                table = None if mlp.experts.packed is None else mlp.experts.packed.native_table()
                if table is None:
                    return False
                gate = mlp.gate
                mlp_decode = kernels.native.MlpDecode(
                    dtype, self.hidden_size, shared=shared, shared_scales=shared_scales, router_weight=gate.weight,
                    expert_bias=gate.expert_bias, table=table, n_group=gate.n_group, topk_group=gate.topk_group,
                    top_k=gate.top_k, scaling=gate.scaling)
            else:
                mlp_decode = kernels.native.MlpDecode(dtype, self.hidden_size, shared=shared, shared_scales=shared_scales)
        except ValueError:
            return False
        self.cpu_decode = (attention, mlp_decode)
        return True

    def _cpu_decode_slot(self, x: torch.Tensor, residual: torch.Tensor | None, step: "StepInputs",
                         cache: KVCache | None, numerics: Numerics) -> int | None:
        """The KV slot when the bound native kernels run this step, else None: one token of one sequence (a
        host step, or a device step on the CPU: engine.generate's decode loop) that attends to every cached
        slot (no mask), with the layer's own experts (no expert runtime) and a router they can round as
        ``numerics`` says (the bf16 router: bf16 weights)."""
        if not (x.shape[0] == 1 and x.shape[1] == 1 and x.dtype == self.cpu_decode[0].dtype and cache is not None
                and step.mask is None and step.cos.shape[-1] == self.rotary_dim
                and (not numerics.router_bf16 or self.cpu_decode[1].can_route_in_bf16)
                and (residual is None or residual.dtype == x.dtype)
                and (not self.is_moe or self.mlp.experts.runtime is None)
                and cache.k[self.layer_idx].device.type == "cpu"):
            return None
        slot = _host_slot(step)
        return slot if slot is not None and step.read_upto == slot + 1 else None

    @property
    def device(self) -> torch.device:
        """Where this layer's attention (and its KV cache) lives; placement plans may differ per layer."""
        return self.input_layernorm.weight.device

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, step: StepInputs, cache: KVCache | None,
                numerics: Numerics, image_mask: torch.Tensor | None = None, audio_mask: torch.Tensor | None = None,
                trace: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm layer (spec §2.3) on the residual stream kept as a pair: the layer's input is
        `x + residual` (just `x` for the first layer), its output is (mlp_out, new residual), so each
        residual add is fused into the RMSNorm that follows it."""
        slot = None
        if self.cpu_decode is not None and trace is None and image_mask is None and audio_mask is None:
            slot = self._cpu_decode_slot(x, residual, step, cache, numerics)
        if slot is not None:
            attention, mlp = self.cpu_decode
            cos, sin = step.fp32_tables()
            h, residual = attention(x, residual, cos, sin, cache.k[self.layer_idx], cache.v[self.layer_idx], slot)
            out = mlp(h, router_bf16=numerics.router_bf16)
            # None: the token's expert choice ties at its boundary; torch's router decides it, as the reference's does
            return (out if out is not None else self.mlp(h, numerics)), residual
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.attention(h, step, cache, self.layer_idx), residual)
        if self.is_moe:
            routers = trace.setdefault("routers", {}).setdefault(self.layer_idx, []) if trace is not None else None
            return self.mlp(h, numerics, image_mask, audio_mask, routers), residual
        return self.mlp(h), residual


def _host_slot(step: StepInputs) -> int | None:
    """The one KV slot a step writes, as a host int: a host step's `write_at`, or a device step's slot as
    the cache keeps it on the host for CPU devices (KVCache.cpu_slots); None otherwise."""
    return step.write_at if isinstance(step.write_at, int) else step.host_slot


def attention_mask_4d(key_mask: torch.Tensor, q_len: int, dtype: torch.dtype,
                      sliding_window: int | None = None) -> torch.Tensor:
    """Additive [B, 1, q, kv] mask: causal, bottom-right aligned (within `sliding_window` when set), plus key
    padding. Masked slots get the dtype's minimum (not -inf) so fully padded rows stay finite."""
    kv = key_mask.shape[1]
    allowed = causal_mask(q_len, kv, key_mask.device, sliding_window).unsqueeze(0) & key_mask.bool().unsqueeze(1)
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

    def segments(self) -> list[tuple[torch.device, list[DecoderLayer]]]:
        """Runs of consecutive layers on one device (one run unless a placement plan split the model)."""
        return [(dev, list(run)) for dev, run in groupby(self.layers, key=lambda layer: layer.device)]

    def run_layers(self, layers: list[DecoderLayer], x: torch.Tensor, residual: torch.Tensor | None,
                   step: StepInputs, cache: KVCache | None, numerics: Numerics,
                   image_mask: torch.Tensor | None = None, audio_mask: torch.Tensor | None = None,
                   trace: dict | None = None, after_layer: Callable[[], None] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers of one device on the residual-stream pair (x, residual), both already on that device;
        `after_layer` is called after each (see forward)."""
        for layer in layers:
            x, residual = layer(x, residual, step, cache, numerics, image_mask, audio_mask, trace)
            if trace is not None:
                trace.setdefault("layer_output", []).append(x + residual)
            if after_layer is not None:
                after_layer()
        return x, residual

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """norm(x + residual): the final-norm hidden states (what lm_head and the image generator read)."""
        dev = self.norm.weight.device
        if residual is None:
            return self.norm(x.to(dev))
        return self.norm(x.to(dev), residual.to(dev))[0]

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, numerics: Numerics,
                step_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                image_mask: torch.Tensor | None = None, audio_mask: torch.Tensor | None = None,
                trace: dict | None = None, after_layer: Callable[[], None] | None = None) -> torch.Tensor:
        """A host step (a whole prompt, one chunk of it, or one token) -> final-norm hidden [B, q, H].

        inputs_embeds [B, q, H], position_ids [3, B, q], step_mask [B, q] (1 = real token; None = no
        padding). With a cache, the q tokens follow the `cache.length` cached ones (causal, bottom-right
        aligned, spec §2.4). `after_layer()` is called after every decoder layer (no host sync): an
        exception it raises abandons the step with the cache's length not advanced but some of the step's
        slots written, so the caller then resets or drops the cache (a cancelled prefill's is freed)."""
        b, q_len, _ = inputs_embeds.shape
        x = inputs_embeds.to(numerics.dtype)
        past = cache.length if cache is not None else 0
        if step_mask is not None and bool(step_mask.bool().all()):
            step_mask = None  # no padding after all: the plain causal path
        if cache is not None:
            cache.reserve(q_len)
            if step_mask is not None:
                cache.note_padding(step_mask)
            key_mask = cache.key_mask[:, : past + q_len] if cache.padded else None
        else:
            key_mask = step_mask
        causal = q_len > 1
        sliding = self.config.sliding_window
        if sliding is not None and past + q_len <= sliding:
            sliding = None  # every key is within the window
        if key_mask is not None:
            mask = attention_mask_4d(key_mask, q_len, x.dtype, sliding)
        elif sliding is not None:
            mask = causal_mask(q_len, past + q_len, x.device, sliding)
        elif causal and past:  # a chunk after cached tokens: causal, bottom-right aligned
            # (on GPUs as a CausalBias, which SDPA runs in its flash kernel: a materialised mask with GQA
            # would fall back to the math kernel and its [heads, q, kv] scores)
            if x.device.type == "cpu":
                mask = causal_mask(q_len, past + q_len, x.device)
            else:
                from torch.nn.attention.bias import causal_lower_right
                mask = causal_lower_right(q_len, past + q_len)
        else:
            mask = None
        cos, sin = self.rotary_emb(position_ids, numerics)
        step = StepInputs(cos, sin, mask, causal, past if cache is not None else None,
                          past + q_len if cache is not None else None)
        if trace is not None:
            trace["inputs_embeds"] = x
        residual = None
        for dev, layers in self.segments():  # activations move to the layers, weights stay put
            x, residual = x.to(dev), None if residual is None else residual.to(dev)
            x, residual = self.run_layers(layers, x, residual, step.to(dev), cache, numerics,
                                          _to(image_mask, dev), _to(audio_mask, dev), trace, after_layer)
        if cache is not None:
            cache.advance(q_len)
        return self.final_norm(x, residual)

    def device_step_inputs(self, cache: KVCache, device: torch.device, window: int,
                           numerics: Numerics) -> StepInputs:
        """StepInputs of a one-token device step on `device` (see engine.models.thinker.kv_cache): the
        token's slot is `cache.positions[device]`, its position that slot + rope_delta on all three
        axes (spec §2.9), attention reads `window` slots, masked beyond the slot and at padding."""
        slot = cache.positions[device]
        position = slot + cache.on("rope_deltas", device).view(-1)  # [B]
        cos_table, sin_table = self.rotary_emb.decode_tables(device, numerics)
        cos, sin = cos_table[position].unsqueeze(1), sin_table[position].unsqueeze(1)  # [B, 1, rot]
        key_mask = cache.on("key_mask", device)
        sliding = self.config.sliding_window
        if not cache.static and not cache.padded and window == cache.length + 1 and (sliding is None or window <= sliding):
            mask = None  # every cached slot and the new one: nothing to mask (a graph always masks)
        else:
            slots = torch.arange(window, device=device)
            mask = slots <= slot  # [window]
            if sliding is not None:
                mask = mask & (slots > slot - sliding)
            if key_mask is not None:
                mask = mask & key_mask[:, :window]
            mask = mask.view(-1, 1, 1, window)
        return StepInputs(cos, sin, mask, False, slot, window, host_slot=cache.cpu_slots.get(device))

    def step_segment(self, device: torch.device, layers: list[DecoderLayer], x: torch.Tensor,
                     residual: torch.Tensor | None, cache: KVCache, numerics: Numerics,
                     window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One device's layers of a device step (see forward_step); advances that device's slot."""
        x, residual = x.to(device), None if residual is None else residual.to(device)
        step = self.device_step_inputs(cache, device, window, numerics)
        x, residual = self.run_layers(layers, x, residual, step, cache, numerics)
        cache.advance_slot(device)
        return x, residual

    def forward_step(self, input_ids: torch.Tensor, cache: KVCache, numerics: Numerics, window: int) -> torch.Tensor:
        """One decode token per row as a device step -> final-norm hidden [B, 1, H]. input_ids [B, 1]
        on the embedding's device; nothing is read back to the host, so the step can be captured in a
        CUDA graph (one per `window`). Advances each device's slot (`cache.positions`); the caller
        advances the host's count (`cache.advance(1)`)."""
        x, residual = self.embed(input_ids), None
        for dev, layers in self.segments():
            x, residual = self.step_segment(dev, layers, x, residual, cache, numerics, window)
        return self.final_norm(x, residual)


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def causal_mask(q_len: int, kv_len: int, device: torch.device, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean [q, kv] causal mask, bottom-right aligned (query i sees keys j <= i + kv - q), and with
    `sliding_window` only the keys less than that far back (j > i + kv - q - sliding_window)."""
    i = torch.arange(q_len, device=device).view(-1, 1) + (kv_len - q_len)
    j = torch.arange(kv_len, device=device).view(1, -1)
    allowed = j <= i
    return allowed if sliding_window is None else allowed & (j > i - sliding_window)


class AudioSpan(NamedTuple):
    """One audio placeholder run (spec §5.4): `slots` `<audioPatch>` positions from `start` (the processor's
    count; None: as many as `embeds` rows) and the encoder's rows for it, one row a slot; the audio router
    covers every slot (spec §2.7: the spans of audio_placeholder_loc_lens). Rows and slots that disagree (a
    processor counting with another projector conv than the model's) are refused, never partly filled."""

    start: int
    embeds: torch.Tensor
    slots: int | None = None

    @property
    def length(self) -> int:
        return self.embeds.shape[0] if self.slots is None else int(self.slots)


@dataclass
class MultimodalInputs:
    """Encoder features to write into placeholder slots at prefill (spec §2.2, §5.4).

    image_embeds: [n_image_tokens, H] in order over the batch, for `<imagePatch>` slots.
    video_embeds: [n_frame_tokens, H] for `<framePatch>` slots.
    audio_spans: per batch row, a list of AudioSpan (or plain (start, embeds [n, H]) pairs: n slots).
    """

    image_embeds: torch.Tensor | None = None
    video_embeds: torch.Tensor | None = None
    audio_spans: list[list[AudioSpan | tuple[int, torch.Tensor]]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.image_embeds is None and self.video_embeds is None and not any(self.audio_spans)


class MultimodalInputError(ValueError):
    """Placeholder tokens and supplied features do not agree."""


class BailingMoeV2ForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        kernels.dispatch.keep_attention_off_cudnn()  # its per-shape plans cost a decode step ~60 ms (see there)
        self.config = cfg
        self.model = BailingMoeV2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings`` lm_head's weight is the embedding table itself (one Parameter, so
        the checkpoint needs no ``lm_head.weight``), as the reference's PreTrainedModel ties them; called
        again after loading, which replaces the table's Parameter. An lm_head already packed stays as is."""
        if self.config.tie_word_embeddings and type(self.lm_head) is nn.Linear:
            self.lm_head.weight = self.model.word_embeddings.weight

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
            for span in spans:
                start, feats, length = span[0], span[1], AudioSpan(*span).length
                end = start + length
                if start < 0 or end > input_ids.shape[1]:
                    raise MultimodalInputError(f"audio span {start}..{end} outside the sequence of row {b}")
                if feats.shape[0] != length:
                    raise MultimodalInputError(f"audio span at {start} of row {b}: {length} <audioPatch> slots but "
                                               f"the audio encoder gave {feats.shape[0]} rows")
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
        return self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final-norm hidden states (lm_head lives with the final norm)."""
        return self.lm_head(hidden).float()

    def new_cache(self, batch: int, numerics: Numerics, device: torch.device | str | None = None,
                  capacity: int = 256, static: bool = False) -> KVCache:
        """A KV cache with each layer's part on that layer's device (`device` only overrides
        when every layer lives on one device). `static`: fixed buffers (see KVCache)."""
        cfg = self.config
        devices = [layer.device for layer in self.model.layers]
        if device is not None and len(set(devices)) == 1:
            devices = [torch.device(device)] * len(devices)
        return KVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim,
                       numerics.dtype, devices, capacity, static=static)
