"""The numpy silero-vad network against the package's own TorchScript model, on our espeak-ng speech."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from engine.media.audio import load_audio
from engine.models.vad.silero import CONTEXT, WINDOW, SileroVad, model_path
from tests.paths import REPO

pytest.importorskip("silero_vad")


def _speech_with_silence() -> np.ndarray:
    speech = load_audio(REPO / "app/assets/speech/what_is_this_zh.wav").numpy()
    rng = np.random.default_rng(0)
    quiet = (0.003 * rng.standard_normal(8000)).astype(np.float32)
    return np.concatenate([quiet, speech, quiet])


def test_numpy_network_matches_the_packages_torchscript_model():
    audio = _speech_with_silence()
    n = len(audio) // WINDOW
    vad = SileroVad.from_package()
    h, c = vad.initial_state()
    context = np.zeros(CONTEXT, np.float32)
    ours = []
    for k in range(n):
        window = np.concatenate([context, audio[k * WINDOW:(k + 1) * WINDOW]])
        p, h, c = vad.probability(window, h, c)
        context = window[-CONTEXT:]
        ours.append(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        reference = torch.jit.load(str(model_path())).eval()
    with torch.inference_mode():
        theirs = [reference(torch.from_numpy(audio[k * WINDOW:(k + 1) * WINDOW].copy())[None], 16000).item()
                  for k in range(n)]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)  # fp32, different summation order
    ours = np.array(ours)
    assert ours[: 8000 // WINDOW].max() < 0.2, "quiet noise taken for speech"
    assert (ours > 0.5).mean() > 0.5, "the spoken sentence is not detected"


def test_the_model_is_loaded_once_and_shared():
    assert SileroVad.from_package() is SileroVad.from_package()
