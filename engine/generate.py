"""The generation loop as a stream of events, and the command line
`python -m engine.generate --model DIR --prompt "..."`.

Three pieces, each usable on its own:

* `prefill`: the prompt through the model in chunks of `chunk_tokens` (a cancel is honoured between
  chunks and between a chunk's layers, so a dropped long prompt stops within one layer); returns the last
  position's logits and, when asked, the final-norm hidden states of the whole prompt (what the image
  generator reads).
* `DecodeStep`: one token per row in, next logits out, with nothing read back to the host
  (positions, masks, rotary tables and the KV cache slot live on the device); on CUDA it is replayed
  from a CUDA graph (engine.decode_graphs) when the model allows, else run eagerly.
* `TokenReader`: the one host sync per step, reading the sampled ids for detokenisation and stop
  checks (and, when asked, their log probabilities, computed on the device with the sampling and read
  with the ids: `LogprobReports` hands them out with the text). On CUDA it reads a step late (the next
  step is queued first, so the GPU never waits for the host); on the CPU at once.

`generate` strings them together for one prompt (batch 1): cancellation is checked between prefill
layers and between steps; stop strings never leak into the emitted text; text deltas never split a
UTF-8 character and come one per token (a "speak while thinking" consumer can follow them), and a reply cut at
its token limit or cancelled inside a character drops that character rather than end in U+FFFD; the KV cache is
freed however the loop ends.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch

from engine.decode_graphs import DecodeGraphs, decode_graphs_for
from engine.command import EXIT_CODES_HELP, text_argument
from engine.errors import EXIT_INPUT, LOAD_ERRORS, error_exit_code, load_failure
from engine.events import PREFILL_STAGE, Done, Error, Event, GenerationStats, Progress, TextDelta, TokenLogprob
from engine.models.thinker.kv_cache import KVCache
from engine.models.thinker.layers import Numerics
from engine.models.thinker.llm import BailingMoeV2ForCausalLM, MultimodalInputs
from engine.models.thinker.model import LoadedModel
from engine.models.thinker.positions import PositionTokens, rope_index
from engine.models.thinker.tokenizer import MingTokenizer
from engine.sampling import GenerationParams, Sampler

# Prompt tokens per prefill chunk: the size of the attention/MoE blocks (a cancel is also checked between a
# chunk's layers). On the CPU a 512-token chunk of the tiny model takes ~0.3 s.
DEFAULT_PREFILL_CHUNK = {"cpu": 512}
DEFAULT_PREFILL_CHUNK_GPU = 2048
# A long prompt's prefill reports how far it is at most this often (PrefillReports): a slow machine's chunk takes
# seconds and is reported each time; a GPU's takes milliseconds.
PREFILL_REPORT_EVERY_S = 0.5
# Initial KV capacity beyond the prompt when the cache may grow (eager decode); graphs use a fixed one.
INITIAL_DECODE_ROOM = 1024


def default_prefill_chunk(device: torch.device | str) -> int:
    return DEFAULT_PREFILL_CHUNK.get(torch.device(device).type, DEFAULT_PREFILL_CHUNK_GPU)


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


# ---------------------------------------------------------------------------------------------- prefill

class Cancelled(Exception):
    """Raised between the layers of a prefill chunk, or the blocks of a media encoder, when its
    request is cancelled."""


def stop_if_set(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise Cancelled


def step_ended(cancel: threading.Event | None) -> None:
    """Tells a cancel flag that counts decode steps (the server's CancelFlag: `step_ended`) that one more step's
    token has arrived; a plain threading.Event has nothing to count."""
    count = getattr(cancel, "step_ended", None)
    if count is not None:
        count()


@dataclass
class PrefillResult:
    """logits: [B, V] fp32 at each row's last prompt position (None when cancelled); hidden: the
    final-norm hidden states [B, L, H] of the prompt when asked; chunks: forwards run."""

    logits: torch.Tensor | None
    hidden: torch.Tensor | None = None
    cancelled: bool = False
    chunks: int = 0


class ChunkedPrefill:
    """A prompt's prefill one chunk at a time (what `prefill` runs, for a caller that reports between chunks):
    `step()` runs the next chunk, `done` counts the prompt tokens read of `total`, and `result()` is the
    PrefillResult once `finished`. Takes `prefill`'s arguments."""

    def __init__(self, llm: BailingMoeV2ForCausalLM, numerics: Numerics, cache: KVCache, embeds: torch.Tensor,
                 position_ids: torch.Tensor, *, step_mask: torch.Tensor | None = None,
                 image_mask: torch.Tensor | None = None, audio_mask: torch.Tensor | None = None,
                 chunk_tokens: int | None = None, cancel: threading.Event | None = None, keep_hidden: bool = False):
        self.chunk = chunk_tokens or default_prefill_chunk(embeds.device)
        if self.chunk < 1:
            raise ValueError(f"chunk_tokens must be >= 1 (got {self.chunk})")
        if embeds.shape[1] < 1:
            raise ValueError("an empty prompt has nothing to prefill")
        self.llm, self.numerics, self.cache, self.embeds, self.position_ids = llm, numerics, cache, embeds, position_ids
        self.masks = (step_mask, image_mask, audio_mask)
        self.cancel, self.keep_hidden = cancel, keep_hidden
        self.total, self.done, self.chunks = embeds.shape[1], 0, 0
        self.cancelled = False
        self.hidden_parts: list[torch.Tensor] = []  # each chunk's final-norm hidden states (the last one's always)

    @property
    def finished(self) -> bool:
        return self.cancelled or self.done >= self.total

    def step(self) -> None:
        """The next chunk into the cache (nothing once finished); a cancel seen before it or between its layers
        ends the prefill (`cancelled`)."""
        if self.finished:
            return
        if self.cancel is not None and self.cancel.is_set():
            self.cancelled = True
            return
        start, end = self.done, min(self.total, self.done + self.chunk)
        step_mask, image_mask, audio_mask = (None if m is None else m[..., start:end] for m in self.masks)
        try:
            h = self.llm.model(self.embeds[:, start:end], self.position_ids[..., start:end], self.numerics, step_mask,
                               self.cache, image_mask, audio_mask,
                               after_layer=None if self.cancel is None else partial(stop_if_set, self.cancel))
        except Cancelled:
            self.cancelled = True
            return
        self.done, self.chunks = end, self.chunks + 1
        if not self.keep_hidden:
            self.hidden_parts.clear()
        self.hidden_parts.append(h)

    def result(self) -> PrefillResult:
        if self.cancelled:
            return PrefillResult(None, None, cancelled=True, chunks=self.chunks)
        hidden = torch.cat(self.hidden_parts, dim=1) if self.keep_hidden else None
        return PrefillResult(self.llm.logits(self.hidden_parts[-1][:, -1]), hidden, chunks=self.chunks)


def prefill(llm: BailingMoeV2ForCausalLM, numerics: Numerics, cache: KVCache, embeds: torch.Tensor,
            position_ids: torch.Tensor, **options) -> PrefillResult:
    """Run a prompt (embeds [B, L, H] with multimodal features already in place, position_ids
    [3, B, L] of the whole prompt, optional `step_mask` / `image_mask` / `audio_mask` [B, L]) into `cache`, in
    chunks of `chunk_tokens` (default: per device, DEFAULT_PREFILL_CHUNK; `keep_hidden`: return the prompt's
    final-norm hidden states too). Positions, masks and the MultiRouter
    gate choice are per token, and attention is causal, so a chunk may end anywhere, inside an image
    or audio span too. `cancel` is checked before each chunk and between the layers of a chunk (a chunk of a
    large model on a CPU can take a minute, one of its layers a few seconds), and a cancelled prefill leaves `cache`
    partly written (drop or reset it). Call it in inference mode."""
    run = ChunkedPrefill(llm, numerics, cache, embeds, position_ids, **options)
    while not run.finished:
        run.step()
    return run.result()


@dataclass
class PrefillReports:
    """When a prompt's prefill says how far it is (Progress, PREFILL_STAGE, `done` of `total` prompt tokens): only
    for a prompt of more than one chunk (a shorter one is read at once), before its first chunk, then after a chunk
    when `every_s` has passed since the last report (a GPU reads a chunk in milliseconds: no flood of events)."""

    total: int
    chunk: int
    every_s: float
    last_at: float | None = None

    def due(self, done: int) -> Progress | None:
        now = time.perf_counter()
        if self.total <= self.chunk or (self.last_at is not None and now - self.last_at < self.every_s):
            return None
        self.last_at = now
        return Progress(PREFILL_STAGE, done, self.total)


# ---------------------------------------------------------------------------------------------- decode

class DecodeStep:
    """One decode token per row: `feed(ids)` sets the input ids [B] (device), `step()` returns the next
    logits [B, V] fp32 on the head's device. Nothing is read back to the host; with `graphs` the step
    is a CUDA graph replay (the cache must come from graphs.acquire), else an eager forward whose
    attention window is exactly the cached slots."""

    def __init__(self, llm: BailingMoeV2ForCausalLM, numerics: Numerics, cache: KVCache,
                 graphs: DecodeGraphs | None = None):
        self.llm, self.numerics, self.cache, self.graphs = llm, numerics, cache, graphs
        self.tokens = graphs.tokens(cache.batch) if graphs is not None else None
        self.embed_device = llm.model.word_embeddings.weight.device
        cache.start_device_steps()

    def feed(self, ids: torch.Tensor) -> None:
        # (asynchronous only towards a GPU: a non-blocking copy into host memory could be read too early)
        ids = ids.view(-1, 1).to(self.embed_device, non_blocking=self.embed_device.type == "cuda")
        if self.graphs is not None:
            self.tokens.copy_(ids)
        else:
            self.tokens = ids

    def step(self) -> torch.Tensor:
        cache = self.cache
        if self.graphs is not None:
            logits = self.graphs.run(cache, self.graphs.window(cache))
        else:
            cache.reserve(1)
            hidden = self.llm.model.forward_step(self.tokens, cache, self.numerics, cache.length + 1)
            logits = self.llm.logits(hidden[:, -1])
        cache.advance(1)
        return logits


class TokenReader:
    """Brings what a step sampled to the host: the decode loop's one sync per step. `push` takes the step's
    tensors (the ids [B], and the log probabilities when asked: `Sampled.tensors`); on CUDA they are copied to
    pinned host memory right after the step that made them, under one event that is waited for later (`wait`),
    so the next step can be queued first; elsewhere `wait` reads at once. `wait` -> each tensor as a list.
    (`batch`: the rows of each step; the pinned buffers take the shapes of the first push.)"""

    def __init__(self, device: torch.device, batch: int, depth: int = 2):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.slots = depth + 1
            self.buffers: list[list[torch.Tensor]] = []  # per slot, pinned: made at the first push (its shapes)
            self.events = [torch.cuda.Event() for _ in range(self.slots)]
            self.next = 0

    def push(self, *tensors: torch.Tensor):
        if not self.cuda:
            return tensors
        if not self.buffers:
            self.buffers = [[torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
                            for _ in range(self.slots)]
        i = self.next
        self.next = (i + 1) % self.slots
        for buffer, t in zip(self.buffers[i], tensors):
            buffer.copy_(t, non_blocking=True)
        self.events[i].record()
        return i

    def wait(self, handle) -> list[list]:
        if not self.cuda:
            return [t.tolist() for t in handle]
        self.events[handle].synchronize()
        return [buffer.tolist() for buffer in self.buffers[handle]]


class LogprobReports:
    """The log-probability entries of a batch-1 reply, each handed out with the text delta that carries the end
    of its token's text (a token with no text of its own, the start of a character, goes with the next text).
    A token whose text is never emitted (cut by a stop string, or a character cut at the token limit) is never
    reported, nor is a special token (the reply's text skips it: the entries spell the text they come with)."""

    def __init__(self, tokenizer: MingTokenizer):
        self.tokenizer = tokenizer
        self.decoded = 0  # characters the stream decoder has given so far
        self.emitted = 0  # characters sent as text deltas
        self.waiting: deque[tuple[int, TokenLogprob]] = deque()  # (end of the token's text, its entry)

    def entry(self, token_id: int, logprob: float) -> TokenLogprob:
        raw = self.tokenizer.piece_bytes(token_id)
        return TokenLogprob(raw.decode("utf-8", errors="replace"), list(raw), logprob)

    def add(self, read: list[list], decoded_text: str) -> None:
        """One step's read (`TokenReader.wait` of `Sampled.tensors`, row 0) and the text its token decoded to."""
        ids, logprob, top_ids, top_logprobs = read
        self.decoded += len(decoded_text)
        if ids[0] in self.tokenizer.special_ids:
            return
        token = self.entry(ids[0], logprob[0])
        token.top_logprobs = [self.entry(i, v) for i, v in zip(top_ids[0], top_logprobs[0])]
        self.waiting.append((self.decoded, token))

    def emit(self, text: str) -> list[TokenLogprob]:
        """The entries of the tokens whose text ends within `text`, the next delta sent."""
        self.emitted += len(text)
        out = []
        while self.waiting and self.waiting[0][0] <= self.emitted:
            out.append(self.waiting.popleft()[1])
        return out


# ---------------------------------------------------------------------------------------------- the loop

def context_error(prompt_tokens: int, params: GenerationParams, limit: int) -> Error | None:
    """context_length_exceeded when the prompt and the tokens asked for cannot fit the model's context; for a
    ceiling nobody asked for (`params.fit_context`), when the prompt leaves no room at all."""
    if params.fit_context and prompt_tokens >= limit:
        return Error(f"the prompt ({prompt_tokens} tokens) fills the model's context of {limit} tokens: no room is "
                     "left for a reply", code="context_length_exceeded")
    if not params.fit_context and prompt_tokens + params.max_new_tokens > limit:
        return Error(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                     f"model's context of {limit} tokens", code="context_length_exceeded")
    return None


def fit_to_context(params: GenerationParams, prompt_tokens: int, limit: int) -> GenerationParams:
    """`params` whose max_new_tokens nobody asked for (`fit_context`) cut to the room the prompt leaves in
    the context, so the reply ends there with finish_reason "length"; any other `params` as given
    (context_error first refuses what cannot fit)."""
    room = limit - prompt_tokens
    if params.fit_context and 0 < room < params.max_new_tokens:
        return replace(params, max_new_tokens=room)
    return params


def generate(model: LoadedModel, tokenizer: MingTokenizer, prompt_ids: list[int], params: GenerationParams,
             cancel: threading.Event | None = None, mm: MultimodalInputs | None = None,
             image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
             eos_ids: set[int] | None = None, t_start: float | None = None, prefill_chunk: int | None = None,
             cuda_graphs: bool | None = None, report_every_s: float = PREFILL_REPORT_EVERY_S) -> Iterator[Event]:
    """Stream the response to one prompt (batch 1) as TextDelta events and a final Done; a prompt longer than one
    prefill chunk first says how far its reading is (Progress, at most once per `report_every_s`: PrefillReports).
    With `params.logprobs` each TextDelta carries the entries of the tokens it completes (`LogprobReports`).
    `t_start`: when the request began (time to first token counts from there; default now).
    `prefill_chunk`: prompt tokens per prefill forward (default per device). `cuda_graphs`: replay the
    decode step from CUDA graphs (default: when the model allows, see engine.decode_graphs)."""
    llm, numerics, dev = model.llm, model.numerics, model.device
    cfg = model.config.llm
    try:
        params.validate(vocab_size=min(cfg.vocab_size, tokenizer.vocab_size))
    except ValueError as e:
        yield Error(str(e), code="invalid_request")
        return
    if not prompt_ids:
        yield Error("empty prompt", code="invalid_request")
        return
    too_long = context_error(len(prompt_ids), params, cfg.max_position_embeddings)
    if too_long is not None:
        yield too_long
        return
    params = fit_to_context(params, len(prompt_ids), cfg.max_position_embeddings)
    eos_ids = eos_ids if eos_ids is not None else set(cfg.eos_token_ids) | {tokenizer.eos_id}
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    decoder = tokenizer.stream_decoder()
    stopper = StopStringFilter(list(params.stop))
    text_parts: list[str] = []
    new_ids: list[int] = []
    reports = LogprobReports(tokenizer) if params.logprobs else None
    graphs = decode_graphs_for(llm, numerics) if cuda_graphs is not False else None
    head_device = llm.model.norm.weight.device  # lm_head lives with the final norm
    t0 = time.perf_counter() if t_start is None else t_start
    t_first = t_last = t0
    finish = "length"
    cache = None
    try:
        # inference_mode is thread-local: a web server may resume this generator on another thread
        # after each yield, so every compute step enters it afresh and no yield happens inside it.
        with torch.inference_mode():
            cache = (graphs.acquire(1) if graphs is not None else
                     llm.new_cache(1, numerics, dev, capacity=len(prompt_ids) +
                                   min(params.max_new_tokens, INITIAL_DECODE_ROOM)))
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=dev)
            positions, deltas = rope_index(ids, PositionTokens.from_config(cfg), image_grid_thw, video_grid_thw)
            embeds, image_mask, audio_mask = llm.prepare_inputs(ids, mm)
            cache.rope_deltas = deltas
            sampler = Sampler(params, cfg.vocab_size, 1, head_device)
            sampler.observe(ids.to(head_device))
            reading = ChunkedPrefill(llm, numerics, cache, embeds, positions, image_mask=image_mask,
                                     audio_mask=audio_mask, chunk_tokens=prefill_chunk, cancel=cancel)
        reports_due = PrefillReports(reading.total, reading.chunk, report_every_s)
        while not reading.finished:
            if (report := reports_due.due(reading.done)) is not None:
                yield report
            with torch.inference_mode():
                reading.step()
        with torch.inference_mode():
            pre = reading.result()
            if not pre.cancelled:
                step = DecodeStep(llm, numerics, cache, graphs)
                reader = TokenReader(head_device, 1)
                first = sampler.sample(pre.logits)
                step.feed(first.ids)
                pending = deque([reader.push(*first.tensors())])
        if pre.cancelled:
            finish = "cancelled"
        lookahead = not pre.cancelled and reader.cuda and params.max_new_tokens > 1
        launched = 0  # decode steps queued (step n makes token n)

        def launch() -> None:
            nonlocal launched
            with torch.inference_mode():
                sampled = sampler.sample(step.step())
                step.feed(sampled.ids)
                pending.append(reader.push(*sampled.tensors()))
            launched += 1

        if lookahead:
            launch()  # token 1 is computed while the host waits for token 0
        for n in range(0 if pre.cancelled else params.max_new_tokens):
            read = reader.wait(pending.popleft())
            step_ended(cancel)
            token = read[0][0]
            now = time.perf_counter()
            if n == 0:
                t_first = now
                stats.time_to_first_token_s = now - t0
            t_last = now
            if token in eos_ids:
                finish = "stop"
                break
            new_ids.append(token)
            piece = decoder.push(token)
            if reports is not None:
                reports.add(read, piece)
            delta = stopper.feed(piece)
            if delta:
                text_parts.append(delta)
                yield TextDelta(delta, None if reports is None else reports.emit(delta))
            if stopper.stopped:
                finish = "stop"
                break
            if n == params.max_new_tokens - 1:
                break
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if launched < min(n + 1 + lookahead, params.max_new_tokens - 1):
                launch()
        if not stopper.stopped:
            # a reply cut (token limit, cancel) drops a partial character; one the model ended keeps its U+FFFD
            tail = stopper.feed(decoder.flush(complete_only=finish in ("length", "cancelled")))
            tail += "" if stopper.stopped else stopper.flush()
            if tail:
                text_parts.append(tail)
                yield TextDelta(tail, None if reports is None else reports.emit(tail))
        stats.new_tokens = len(new_ids)
        stats.total_s = time.perf_counter() - t0
        n_decoded = max(0, len(new_ids) - 1)
        stats.decode_tokens_per_s = n_decoded / (t_last - t_first) if t_last > t_first else 0.0
        yield Done(text="".join(text_parts), finish_reason=finish, stats=stats, token_ids=new_ids)
    except Exception as e:  # the caller's stream ends with a clear error; the engine keeps serving
        yield Error(f"{type(e).__name__}: {e}")
    finally:
        if cache is not None and graphs is None:
            cache.free()  # (a graph's static cache stays with the graphs for the next request)


def _cli_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engine.generate",
                                 description="Stream a chat reply to stdout, then one line of figures.",
                                 epilog=EXIT_CODES_HELP)
    ap.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the tiny random demo model)")
    ap.add_argument("--prompt", required=True, help="the user message ('-': read it from stdin)")
    ap.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--presence-penalty", type=float, default=0.0,
                    help="OpenAI's, in [-2, 2]: subtracted once from the logit of each token the reply has used")
    ap.add_argument("--frequency-penalty", type=float, default=0.0,
                    help="OpenAI's, in [-2, 2]: subtracted from a token's logit per use in the reply")
    ap.add_argument("--logit-bias", type=logit_bias_entry, action="append", default=[], metavar="TOKEN_ID=BIAS",
                    help="OpenAI's logit_bias: add BIAS in [-100, 100] to that token's logit (100 forces it, -100 bans "
                         "it; repeatable)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                    help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--thinking", action="store_true", help="detailed thinking on")
    ap.add_argument("--expert-dtype", choices=["bf16", "fp8", "fp8-block", "int8", "int4"], default="bf16",
                    help="routed-expert weights as stored (bf16) or quantised while loading")
    ap.add_argument("--placement", choices=["auto", "single"], default="auto",
                    help="auto: on CUDA, spread a model too big for one GPU over the GPUs and host; single: all on --device")
    return ap


def logit_bias_entry(text: str) -> tuple[int, float]:
    """`--logit-bias TOKEN_ID=BIAS` -> (id, bias); the ranges are GenerationParams.validate's."""
    token, sep, bias = text.partition("=")
    try:
        if not sep or not token.strip().isdigit():
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS such as 1234=-100, got {text!r}") from None


def _cli_request(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, GenerationParams]:
    """The prompt (stdin's text for '-') and the sampling settings; what is wrong with them is a usage error
    (exit 2) before the model loads, not an error after it."""
    prompt = text_argument(ap, "--prompt", args.prompt)
    if not prompt.strip():
        ap.error("--prompt is empty" + (" (nothing came on stdin)" if args.prompt == "-" else ""))
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                              stop=args.stop, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, logit_bias=dict(args.logit_bias))
    try:
        params.validate()
    except ValueError as e:
        ap.error(str(e))
    return prompt, params


def main(argv: list[str] | None = None) -> int:
    from engine.runtime import Engine

    ap = _cli_parser()
    args = ap.parse_args(argv)
    prompt, params = _cli_request(ap, args)
    try:
        engine = Engine.load(args.model, dtype=args.dtype, device=args.device, expert_dtype=args.expert_dtype,
                             placement=args.placement, log=lambda line: print(f"[{line}]", file=sys.stderr))
    except LOAD_ERRORS as e:
        print(load_failure(args.model, e), file=sys.stderr)
        return EXIT_INPUT
    if engine.is_demo:
        print("[random demo weights: output is meaningless; use --model for the real checkpoint]", file=sys.stderr)
    code = 0
    for ev in engine.chat([{"role": "user", "content": prompt}], params, system_prompt=args.system,
                          thinking=args.thinking):
        if isinstance(ev, TextDelta):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        elif isinstance(ev, Progress) and ev.stage == PREFILL_STAGE:  # a long prompt: how far its reading is
            print(f"[reading the prompt: {ev.done:,} of {ev.total:,} tokens]", file=sys.stderr)
        elif isinstance(ev, Done):
            print()
            print(f"[{ev.stats.summary()}, finish {ev.finish_reason}]")
        elif isinstance(ev, Error):
            print(f"\nerror: {ev.message}", file=sys.stderr)
            code = error_exit_code(ev.code)
    return code


if __name__ == "__main__":
    from engine.command import run_command

    sys.exit(run_command(main))
