"""Backend selection: CPU tensors use the torch reference unless impl='triton' is explicit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.kernels import dispatch


def test_cpu_tensors_use_reference() -> None:
    x = torch.zeros(2, 4)
    assert not dispatch.use_triton("auto", x, None)
    assert not dispatch.use_triton("torch", x)


def test_explicit_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    assert dispatch.use_triton("triton", torch.zeros(1))
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
    assert dispatch.use_triton("triton", torch.zeros(1))  # an explicit impl wins over the env var


def test_cuda_tensors_pick_triton_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_like = torch.empty(1, device="meta")
    monkeypatch.setattr(type(cuda_like), "is_cuda", property(lambda self: True))
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    assert dispatch.use_triton("auto", cuda_like, None)
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "true")
    assert not dispatch.use_triton("auto", cuda_like)
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "0")
    assert dispatch.use_triton("auto", cuda_like)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert not dispatch.use_triton("auto", cuda_like)


def test_invalid_impl() -> None:
    with pytest.raises(ValueError):
        dispatch.use_triton("cuda", torch.zeros(1))  # type: ignore[arg-type]


def test_package_import_does_not_load_triton_kernels() -> None:
    code = "import sys, engine.kernels; print(any(m.startswith('engine.kernels.triton_impl') for m in sys.modules), 'triton' in sys.modules)"
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root)
    assert result.stdout.split() == ["False", "False"]


def test_building_a_thinker_or_talker_keeps_attention_off_cudnn(tiny_checkpoint, monkeypatch):
    """cuDNN's attention builds a plan per new shape (~60 ms a decode step on an H200 when the key length grows
    every token): a process that builds our language models runs attention on the other backends."""
    from engine.models.talker.backbone import Qwen2Backbone
    from engine.models.talker.config import Qwen2BackboneConfig
    from engine.models.thinker.config import MingConfig
    from engine.models.thinker.llm import BailingMoeV2ForCausalLM

    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for build in (lambda: BailingMoeV2ForCausalLM(MingConfig.from_file(tiny_checkpoint).llm),
                      lambda: Qwen2Backbone(Qwen2BackboneConfig.from_dict(
                          {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 8}, "test"))):
            torch.backends.cuda.enable_cudnn_sdp(True)
            with torch.device("meta"):
                build()
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
