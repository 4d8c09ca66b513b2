"""The engine API that servers and UIs call: load a checkpoint (or the tiny demo default) and turn
chat requests into event streams. One request runs on the model at a time; others wait their turn
(the server adds queue positions, limits and sessions on top of this)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.events import Done, Error, Event
from engine.generate import generate
from engine.prompt import ChatMessage, PromptError, build_chat_prompt
from engine.sampling import GenerationParams
from engine.thinker import LoadedModel, count_parameters, load_model
from engine.tiny import ensure_tiny_checkpoint, is_demo_checkpoint
from engine.tokenizer import MingTokenizer

REAL_MODEL_HINT = "python launch.py --model inclusionAI/Ming-flash-omni-2.0   (or a local checkpoint directory)"


@dataclass
class EngineInfo:
    name: str
    path: str
    is_demo: bool
    release: str
    parameters: int
    dtype: str
    device: str
    load_seconds: float
    components: list[str]


class Engine:
    def __init__(self, model: LoadedModel, tokenizer: MingTokenizer, is_demo: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.is_demo = is_demo
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path_or_id: str | Path | None = None, dtype: str | None = None, device: str | None = None,
             progress=None) -> "Engine":
        """`path_or_id` None loads (and on first use generates) the tiny random demo checkpoint.
        dtype defaults to bf16 on GPU and fp32 on CPU."""
        path = ensure_tiny_checkpoint() if path_or_id is None else path_or_id
        dev = torch.device(device) if device else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
        model = load_model(path, dtype=dtype, device=dev, progress=progress)
        tokenizer = MingTokenizer(model.path)
        return cls(model, tokenizer, is_demo=is_demo_checkpoint(model.path))

    def info(self) -> EngineInfo:
        m = self.model
        return EngineInfo(name=m.path.name, path=str(m.path), is_demo=self.is_demo, release=m.config.release,
                          parameters=count_parameters(m.llm) + sum(count_parameters(x) for x in m.encoders.components().values()), dtype=str(m.numerics.dtype).replace("torch.", ""),
                          device=str(m.device), load_seconds=m.load_seconds,
                          components=["llm"] + [p.rstrip(".") for p in m.encoders.components()])

    def generate_ids(self, prompt_ids: list[int], params: GenerationParams,
                     cancel: threading.Event | None = None) -> Iterator[Event]:
        t_wait = time.perf_counter()
        with self._lock:
            waited = time.perf_counter() - t_wait
            for ev in generate(self.model, self.tokenizer, prompt_ids, params, cancel):
                if isinstance(ev, Done):
                    ev.stats.queue_wait_s = waited
                yield ev

    def chat(self, messages: list[ChatMessage | dict], params: GenerationParams | None = None,
             cancel: threading.Event | None = None, system_prompt: str | None = None,
             thinking: bool = False) -> Iterator[Event]:
        """Stream the assistant's reply to a conversation: TextDelta events, then Done (or Error)."""
        try:
            prompt = build_chat_prompt(messages, self.tokenizer, system_prompt=system_prompt, thinking=thinking)
        except PromptError as e:
            yield Error(str(e), code="invalid_request")
            return
        yield from self.generate_ids(prompt.ids, params or GenerationParams(), cancel)
