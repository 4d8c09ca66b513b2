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
