"""The generation loop (prefill, then one KV-cache decode step per token) as a stream of events,
and the command line `python -m engine.generate --model DIR --prompt "..."`.

Cancellation is checked between steps; stop strings never leak into the emitted text; text deltas
never split a UTF-8 character; the KV cache is freed however the loop ends.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Iterator

import torch

from engine.events import Done, Error, Event, GenerationStats, TextDelta
from engine.models.thinker.llm import MultimodalInputs
from engine.models.thinker.positions import PositionTokens, decode_positions, rope_index
from engine.sampling import GenerationParams, Sampler
from engine.models.thinker.model import LoadedModel
from engine.models.thinker.tokenizer import MingTokenizer


class StopStringFilter:
    """Holds back text that may be the start of a stop string; reports a completed match."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(i for i, _ in hits)
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate(model: LoadedModel, tokenizer: MingTokenizer, prompt_ids: list[int], params: GenerationParams,
             cancel: threading.Event | None = None, mm: MultimodalInputs | None = None,
             image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
             eos_ids: set[int] | None = None, t_start: float | None = None) -> Iterator[Event]:
    """Stream the response to one prompt (batch 1) as TextDelta events and a final Done.
    `t_start`: when the request began (time to first token counts from there; default now)."""
    try:
        params.validate()
    except ValueError as e:
        yield Error(str(e), code="invalid_request")
        return
    llm, numerics, dev = model.llm, model.numerics, model.device
    cfg = model.config.llm
    if not prompt_ids:
        yield Error("empty prompt", code="invalid_request")
        return
    limit = cfg.max_position_embeddings
    if len(prompt_ids) + params.max_new_tokens > limit:
        yield Error(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                    f"model's context of {limit} tokens", code="context_length_exceeded")
        return
    eos_ids = eos_ids if eos_ids is not None else set(cfg.eos_token_ids) | {tokenizer.eos_id}
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    sampler = Sampler(params)
    decoder = tokenizer.stream_decoder()
    stopper = StopStringFilter(list(params.stop))
    text_parts: list[str] = []
    new_ids: list[int] = []
    cache = llm.new_cache(1, numerics, dev, capacity=len(prompt_ids) + min(params.max_new_tokens, 1024))
    seen = torch.tensor(prompt_ids, dtype=torch.long)
    t0 = time.perf_counter() if t_start is None else t_start
    t_first = t_last = t0
    finish = "length"
    try:
        # inference_mode is thread-local: a web server may resume this generator on another thread
        # after each yield, so every compute step enters it afresh and no yield happens inside it.
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=dev)
            positions, deltas = rope_index(ids, PositionTokens.from_config(cfg), image_grid_thw, video_grid_thw)
            embeds, image_mask, audio_mask = llm.prepare_inputs(ids, mm)
            cache.rope_deltas = deltas
            logits = llm(embeds, positions, numerics, None, cache, image_mask, audio_mask, logits_to_keep=1)[0, -1]
        for step in range(params.max_new_tokens):
            with torch.inference_mode():
                token = sampler(logits, seen)
            now = time.perf_counter()
            if step == 0:
                t_first = now
                stats.time_to_first_token_s = now - t0
            t_last = now
            if token in eos_ids:
                finish = "stop"
                break
            new_ids.append(token)
            seen = torch.cat([seen, torch.tensor([token])])
            delta = stopper.feed(decoder.push(token))
            if delta:
                text_parts.append(delta)
                yield TextDelta(delta)
            if stopper.stopped:
                finish = "stop"
                break
            if step == params.max_new_tokens - 1:
                break
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            with torch.inference_mode():
                pos = decode_positions(cache.length, deltas)
                step_ids = torch.tensor([[token]], dtype=torch.long, device=dev)
                logits = llm(llm.model.embed(step_ids), pos, numerics, None, cache, logits_to_keep=1)[0, -1]
        if not stopper.stopped:
            tail = stopper.feed(decoder.flush())
            tail += "" if stopper.stopped else stopper.flush()
            if tail:
                text_parts.append(tail)
                yield TextDelta(tail)
        stats.new_tokens = len(new_ids)
        stats.total_s = time.perf_counter() - t0
        n_decoded = max(0, len(new_ids) - 1)
        stats.decode_tokens_per_s = n_decoded / (t_last - t_first) if t_last > t_first else 0.0
        yield Done(text="".join(text_parts), finish_reason=finish, stats=stats, token_ids=new_ids)
    except Exception as e:  # the caller's stream ends with a clear error; the engine keeps serving
        yield Error(f"{type(e).__name__}: {e}")
    finally:
        cache.free()


def main(argv: list[str] | None = None) -> int:
    from engine.runtime import Engine

    ap = argparse.ArgumentParser(prog="python -m engine.generate",
                                 description="Stream a chat reply to stdout, then one line of figures.")
    ap.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the tiny random demo model)")
    ap.add_argument("--prompt", required=True, help="the user message")
    ap.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--thinking", action="store_true", help="detailed thinking on")
    ap.add_argument("--expert-dtype", choices=["bf16", "fp8", "fp8-block", "int8", "int4"], default="bf16",
                    help="routed-expert weights as stored (bf16) or quantised while loading")
    ap.add_argument("--placement", choices=["auto", "single"], default="auto",
                    help="auto: on CUDA, spread a model too big for one GPU over the GPUs and host; single: all on --device")
    args = ap.parse_args(argv)

    engine = Engine.load(args.model, dtype=args.dtype, device=args.device, expert_dtype=args.expert_dtype,
                         placement=args.placement, log=lambda line: print(f"[{line}]", file=sys.stderr))
    if engine.is_demo:
        print("[random demo weights: output is meaningless; use --model for the real checkpoint]", file=sys.stderr)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                              stop=args.stop)
    code = 0
    for ev in engine.chat([{"role": "user", "content": args.prompt}], params, system_prompt=args.system,
                          thinking=args.thinking):
        if isinstance(ev, TextDelta):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        elif isinstance(ev, Done):
            print()
            print(f"[{ev.stats.summary()}, finish {ev.finish_reason}]")
        elif isinstance(ev, Error):
            print(f"\nerror: {ev.message}", file=sys.stderr)
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
