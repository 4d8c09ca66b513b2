"""Next-token choice: greedy, or sampling with repetition penalty, temperature, top-k and top-p
(applied in that order, as Hugging Face generate does), reproducible with a seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def validate(self) -> "GenerationParams":
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer (got {self.max_new_tokens!r})")
        if not 0 <= self.temperature <= 100:
            problems.append(f"temperature must be in [0, 100] (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (got {self.top_k})")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of already-seen tokens by `penalty` (CTRL rule)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


class Sampler:
    def __init__(self, params: GenerationParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device="cpu")
            if params.seed is not None:
                self.generator.manual_seed(int(params.seed))
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> int:
        """logits [V] (fp32) -> chosen id. `seen`: ids of prompt + generated tokens."""
        p = self.params
        logits = apply_repetition_penalty(logits.float(), seen.to(logits.device), p.repetition_penalty)
        if p.greedy:
            return int(logits.argmax())
        logits = filter_top_k_top_p(logits / p.temperature, p.top_k, p.top_p)
        probs = logits.softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))
