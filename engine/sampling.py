"""Next-token choice: greedy, or sampling with repetition penalty, temperature, top-k and top-p
(applied in that order, as Hugging Face generate does), reproducible with a seed; before them OpenAI's logit_bias,
then its presence and frequency penalties (over the reply's own tokens, greedy too); and, when asked, the
log probabilities of the chosen tokens and of the best alternatives (`Sampler.sample`).

Everything runs on the logits' device and nothing is read back to the host: the tokens seen so far
(for the repetition penalty) are a [B, V] mask on the device, and a sample is drawn as
``argmax(p / q)`` with ``q ~ Exp(1)`` per vocabulary entry (an exact draw from the categorical
distribution ``p``, without the host round trip of ``torch.multinomial``). The noise comes from the
sampler's own seeded generator on that device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20  # the most alternatives per token `top_logprobs` may ask for (OpenAI's bound)
MAX_OPENAI_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI's bound)
MAX_LOGIT_BIAS = 100.0  # a logit_bias value lies in [-100, 100] (OpenAI's bound: -100 bans a token, 100 forces it)


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    # OpenAI's: subtracted from the logit of each token the reply has used (presence: once; frequency: per use)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # OpenAI's logit_bias: token id -> value added to its logit before anything else ([-100, 100])
    logit_bias: dict[int, float] = field(default_factory=dict)
    # max_new_tokens is a ceiling nobody asked for (a default, realtime's "inf"): a prompt leaving less room in
    # the context is answered up to the context's end (finish_reason "length") rather than refused
    fit_context: bool = False
    # report each chosen token's log probability, with its `top_logprobs` best alternatives (0..MAX_TOP_LOGPROBS)
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def room_needed(self) -> int:
        """The fewest new tokens the prompt must leave room for in the model's context."""
        return 1 if self.fit_context else self.max_new_tokens

    def validate(self, vocab_size: int | None = None) -> "GenerationParams":
        """Self, or ValueError naming every setting out of range; `vocab_size`: logit_bias ids must be below it."""
        problems = []
        past = [t for t in self.logit_bias if isinstance(t, int) and vocab_size is not None and t >= vocab_size]
        if past:
            problems.append(f"logit_bias names token {max(past)}; this model's tokens are 0 to {vocab_size - 1}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer (got {self.max_new_tokens!r})")
        if not 0 <= self.temperature <= 100:
            problems.append(f"temperature must be in [0, 100] (got {self.temperature})")
        if not 0 <= self.top_p <= 1:  # (0: the most likely token only, as OpenAI takes it)
            problems.append(f"top_p must be in [0, 1] (got {self.top_p})")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (got {self.top_k!r})")
        if not self.repetition_penalty > 0:  # (NaN too)
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_OPENAI_PENALTY <= getattr(self, name) <= MAX_OPENAI_PENALTY:  # (NaN too)
                problems.append(f"{name} must be in [-{MAX_OPENAI_PENALTY:g}, {MAX_OPENAI_PENALTY:g}] "
                                f"(got {getattr(self, name)})")
        if (isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int)
                or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            problems.append(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] (got {self.top_logprobs!r})")
        elif self.top_logprobs and not self.logprobs:
            problems.append("top_logprobs needs logprobs on")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.logit_bias):
            problems.append("logit_bias keys must be token ids (integers >= 0)")
        if not all(-MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS for v in self.logit_bias.values()):  # (NaN too)
            problems.append(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if isinstance(self.stop, str):  # one stop string, as OpenAI's and HF's stop fields take it, not its characters
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of already-seen tokens by `penalty` (CTRL rule).
    `seen`: [B, V] bool mask of the tokens seen (each counts once, as HF's gather/scatter form does)."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def apply_presence_frequency(logits: torch.Tensor, uses: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties: logit - frequency x uses - presence x (uses > 0); `uses`: [B, V] how many times each token
    came in the reply so far (the prompt's tokens do not count, as in OpenAI's and vLLM's definitions)."""
    return logits - uses * frequency - (uses > 0).to(logits.dtype) * presence


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature (HF's TemperatureLogitsWarper), finite for any temperature > 0: the row's best
    logit is moved to 0 first (softmax does not change) and 1 / temperature is held to the dtype's range,
    so a temperature of 1e-40 is near-greedy rather than inf - inf = NaN everywhere."""
    scale = min(1.0 / temperature, torch.finfo(logits.dtype).max)
    return (logits - logits.amax(dim=-1, keepdim=True)) * scale


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest set reaching top_p; the best token always stays (HF's min_tokens_to_keep=1), also
        # for a top_p of 0 or below the dtype's smallest number (1e-50 is 0 in fp32): the best token alone
        remove = probs.cumsum(-1) - probs >= top_p
        remove[..., 0].fill_(False)  # (fill_, not `= False`: no host scalar lifted onto the device)
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


@dataclass
class Sampled:
    """One step's choice, on the device: `ids` [B] int64; with logprobs asked, `logprob` [B] fp32 of each chosen
    id and the `top_ids` / `top_logprobs` [B, k] of the k most likely tokens, best first (k = 0: empty)."""

    ids: torch.Tensor
    logprob: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """What the host reads of the step: the ids, then the log probabilities when asked."""
        extra = [] if self.logprob is None else [self.logprob, self.top_ids, self.top_logprobs]
        return [self.ids, *extra]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, top: int) -> Sampled:
    """The model's log probabilities of `ids` [B] and of its `top` most likely tokens: the log-softmax of the raw
    logits [B, V], before logit_bias, the penalties, temperature, top-k and top-p (as OpenAI reports them: the model's
    distribution, not the one the token was drawn from)."""
    logp = logits.float().log_softmax(dim=-1)
    best = logp.topk(top, dim=-1)
    return Sampled(ids, logp.gather(-1, ids.view(-1, 1)).squeeze(-1), best.indices, best.values)


class Sampler:
    """Chooses the next token of each row on the logits' device (see module doc).

    ``sampler(logits)`` -> [B] int64 ids, and records them as seen (and used, for the OpenAI penalties);
    ``sampler.sample(logits)`` -> `Sampled`, with the log probabilities when the params ask for them (computed
    only then). Call
    ``observe(prompt_ids)`` first when the repetition penalty applies."""

    def __init__(self, params: GenerationParams, vocab_size: int, batch: int = 1,
                 device: torch.device | str = "cpu"):
        self.params = params
        self.device = torch.device(device)
        self.seen = (torch.zeros(batch, vocab_size, dtype=torch.bool, device=self.device)
                     if params.repetition_penalty != 1.0 else None)
        self.uses = (torch.zeros(batch, vocab_size, dtype=torch.float32, device=self.device)
                     if params.presence_penalty or params.frequency_penalty else None)
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)
            self.bias[torch.tensor(list(params.logit_bias), device=self.device)] = torch.tensor(
                list(params.logit_bias.values()), dtype=torch.float32, device=self.device)
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=self.device)
            if params.seed is not None:
                self.generator.manual_seed(int(params.seed))
            else:
                self.generator.seed()

    def observe(self, ids: torch.Tensor) -> None:
        """Mark ids [B] or [B, L] (on the sampler's device) as seen."""
        if self.seen is not None:
            self.seen.scatter_(1, ids.view(self.seen.shape[0], -1), True)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> ids [B] (int64), on the device."""
        p = self.params
        logits = logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        if self.uses is not None:
            logits = apply_presence_frequency(logits, self.uses, p.presence_penalty, p.frequency_penalty)
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, p.repetition_penalty)
        if p.greedy:
            return logits.argmax(dim=-1)
        probs = filter_top_k_top_p(apply_temperature(logits, p.temperature), p.top_k, p.top_p).softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        # a zero draw would turn a removed token (p = 0) into 0/0: keep q strictly positive
        return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        ids = self.choose(logits)
        self.observe(ids)
        if self.uses is not None:  # (the reply's tokens only: `observe` also takes the prompt's)
            self.uses.scatter_add_(1, ids.view(-1, 1), torch.ones_like(ids, dtype=self.uses.dtype).view(-1, 1))
        return ids

    def sample(self, logits: torch.Tensor) -> Sampled:
        """The next ids (as calling the sampler), with their log probabilities when `params.logprobs`."""
        ids = self(logits)
        if not self.params.logprobs:
            return Sampled(ids)
        return token_logprobs(logits, ids, self.params.top_logprobs)
