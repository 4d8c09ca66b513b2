"""Greedy KV-cache decode of a whole batch after its prefill, as Hugging Face's `generate` runs it (the
reference's generate path, spec §2.8, §2.9, §6.5): each step takes every row's argmax; with EOS stopping on,
a row that has emitted an EOS id is finished and from then on emits, and is fed, the pad token, and the loop
ends when every row is finished or after `max_new_tokens`. The parity harness (engine.tools.parity) decodes
its batched cases with it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.models.thinker.config import LLMConfig
from engine.models.thinker.kv_cache import KVCache
from engine.models.thinker.layers import Numerics
from engine.models.thinker.llm import BailingMoeV2ForCausalLM
from engine.models.thinker.positions import decode_positions


@dataclass(frozen=True)
class BatchStopping:
    """`eos_ids` end a row (empty: EOS stopping off, every row runs `max_new_tokens`); `pad_id` is what a
    finished row emits and is fed."""

    eos_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def for_config(cls, cfg: LLMConfig, eos_ids: tuple[int, ...] | None = None,
                   pad_id: int | None = None) -> "BatchStopping":
        """HF's choice: the generation config's EOS ids (the model config's unless given) and pad id, which
        is the model config's `pad_token_id`, or the first EOS id when the config has none."""
        eos = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
        pad = pad_id if pad_id is not None else cfg.pad_token_id
        if pad is None:
            if not eos:
                raise ValueError("EOS stopping needs a pad token: the config has neither pad_token_id nor eos_token_id")
            pad = eos[0]
        return cls(eos_ids=eos, pad_id=int(pad))

    @classmethod
    def off(cls) -> "BatchStopping":
        return cls(eos_ids=(), pad_id=0)


@dataclass
class GreedyBatch:
    """tokens [B, n]; logits [B, n, V] (step t's chose tokens[:, t]); positions: the decode position ids
    [3, B, 1] of each forward step (n - 1 of them); traces: each step's forward trace when asked for."""

    tokens: torch.Tensor
    logits: torch.Tensor
    positions: list[torch.Tensor]
    traces: list[dict] = field(default_factory=list)


def greedy_decode_batch(llm: BailingMoeV2ForCausalLM, numerics: Numerics, cache: KVCache, last_logits: torch.Tensor,
                        rope_deltas: torch.Tensor, max_new_tokens: int, stopping: BatchStopping,
                        trace: bool = False) -> GreedyBatch:
    """Decode after a prefill whose last-position logits are `last_logits` [B, V] (cache filled, rope
    deltas [B, 1] from the prompt's rope index)."""
    b, dev = last_logits.shape[0], last_logits.device
    eos = torch.tensor(stopping.eos_ids, dtype=torch.long, device=dev)
    unfinished = torch.ones(b, dtype=torch.bool, device=dev)
    tokens, logits, positions, traces = [], [last_logits], [], []
    for step in range(max_new_tokens):
        nxt = torch.where(unfinished, logits[-1].argmax(-1), stopping.pad_id)
        tokens.append(nxt)
        unfinished &= ~torch.isin(nxt, eos)
        if step == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        pos = decode_positions(cache.length, rope_deltas)
        positions.append(pos)
        step_trace: dict | None = {} if trace else None
        out = llm(llm.model.embed(nxt.view(b, 1)), pos, numerics, torch.ones(b, 1, dtype=torch.long, device=dev), cache,
                  trace=step_trace)
        logits.append(out[:, -1])
        if step_trace is not None:
            traces.append(step_trace)
    if not tokens:
        return GreedyBatch(last_logits.new_zeros(b, 0, dtype=torch.long), last_logits.new_zeros(b, 0, last_logits.shape[-1]),
                           [], [])
    return GreedyBatch(torch.stack(tokens, dim=1), torch.stack(logits[:len(tokens)], dim=1), positions, traces)
