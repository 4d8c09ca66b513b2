"""Shared test setup: no GPU, no network, and the tiny checkpoint generated once per session.

TRITON_INTERPRET must be set before any Triton kernel module is imported (it is read when
@triton.jit decorates), so it is set here, first. The studio cache points at a temporary folder so
tests never touch (or depend on) the user's cache.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_CACHE = tempfile.mkdtemp(prefix="ming-test-cache-")
os.environ["MING_STUDIO_CACHE"] = _CACHE

import pytest  # noqa: E402




@pytest.fixture
def fp32_activations():
    """The native kernels' int4 and int8 weights meet fp32 activations in this test (tests/activations.py)."""
    from tests.activations import quantized_activations

    with quantized_activations("float"):
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    from engine.tiny import ensure_tiny_checkpoint
    return ensure_tiny_checkpoint(_CACHE)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from engine.runtime import Engine
    return Engine.load(tiny_checkpoint, dtype="fp32", device="cpu")


@pytest.fixture
def scripted_tokens(monkeypatch):
    """`script(ids, after_last=None)`: from then on every reply generated draws `ids` in turn, whatever the logits (a
    reply the tiny random model would not give by itself: a character split over tokens and cut by the token limit
    ...); `after_last()` is called once the last of them is drawn (e.g. to cancel the reply there)."""
    import torch

    from engine.sampling import Sampler

    def script(ids: list[int], after_last=None) -> None:
        class Scripted(Sampler):  # (its log probabilities, when asked, are still the model's)
            def __init__(self, params, vocab_size, batch=1, device="cpu"):
                super().__init__(params, vocab_size, batch, device)
                self.left = list(ids)

            def choose(self, logits):
                chosen = self.left.pop(0)
                if not self.left and after_last is not None:
                    after_last()
                return torch.tensor([chosen], device=logits.device)

        monkeypatch.setattr("engine.generate.Sampler", Scripted)

    return script


@pytest.fixture(scope="session")
def preview_checkpoint(tmp_path_factory) -> Path:
    """A tiny Preview checkpoint (`engine.tiny --release preview`), written once per session."""
    from engine.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("preview-imagegen") / "p", release="preview")


@pytest.fixture(scope="session")
def preview_engine(preview_checkpoint):
    """A tiny Preview engine (`engine.tiny --release preview`): its image generator is the SD3-style DiT."""
    from engine.runtime import Engine

    return Engine.load(preview_checkpoint, dtype="fp32", device="cpu")
