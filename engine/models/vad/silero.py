"""The silero-vad network (v6, 16 kHz) in numpy, one 32 ms window per call.

The weights are read once from the TorchScript model the `silero-vad` package ships
(silero_vad/data/silero_vad.jit: found without importing the package, whose __init__ calls
torch.set_num_threads(1) for the whole process). Inference is numpy: a window is a few small
matrix products, and torch's thread pool would make them 10x slower on a loaded machine.

Per window (64 samples of context + 512 new samples at 16 kHz):
reflect-pad 64 on the right -> STFT as a conv (`stft.forward_basis_buffer`, 258 x 256, hop 128)
-> magnitude of the 129 bins -> four conv(k 3, pad 1) + ReLU blocks (`encoder.{0..3}.reparam_conv`,
strides 1, 2, 2, 1) -> LSTM cell (`decoder.rnn`, 128) -> ReLU -> 1x1 conv (`decoder.decoder.2`)
-> sigmoid: the speech probability. The recurrent state (h, c) belongs to the caller.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engine.errors import MingError

SAMPLE_RATE = 16000
WINDOW = 512  # new samples per call (32 ms)
CONTEXT = 64  # samples of the previous window seen again
HIDDEN = 128
STRIDES = (1, 2, 2, 1)  # the encoder's conv strides


class VadUnavailable(MingError):
    """The silero-vad package (or its model file) is missing or unreadable."""

    code = "turn_detection_unavailable"


def model_path() -> Path:
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise VadUnavailable("server-side turn detection needs the silero-vad package (pip install "
                             "silero-vad==6.2.3); without it use push-to-talk (turn_detection null)")
    path = Path(spec.origin).parent / "data" / "silero_vad.jit"
    if not path.is_file():
        raise VadUnavailable(f"the silero-vad package has no model file at {path}; reinstall silero-vad==6.2.3")
    return path


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _conv3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """Conv1d, kernel 3, padding 1: x [C, T] -> [O, T']."""
    cols = sliding_window_view(np.pad(x, ((0, 0), (1, 1))), 3, axis=1)[:, ::stride]  # [C, T', 3]
    cols = cols.transpose(0, 2, 1).reshape(-1, cols.shape[1])  # [C*3, T']
    return weight.reshape(weight.shape[0], -1) @ cols + bias[:, None]


class SileroVad:
    """Stateless network: `probability(window, h, c) -> (p, h, c)`; thread-safe."""

    _shared: "SileroVad | None" = None
    _lock = threading.Lock()

    def __init__(self, weights: dict[str, np.ndarray]):
        self.w = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
        basis = self.w["stft.forward_basis_buffer"][:, 0, :]  # [258, 256]: real rows, then imaginary rows
        self.bins = basis.shape[0] // 2
        self.filter_length = basis.shape[1]
        self.hop = self.filter_length // 2
        self.basis_real, self.basis_imag = basis[: self.bins], basis[self.bins:]

    @classmethod
    def from_package(cls) -> "SileroVad":
        """The network of the installed silero-vad package, loaded once per process."""
        with cls._lock:
            if cls._shared is None:
                import torch  # noqa: PLC0415  (only to read the TorchScript file)

                path = model_path()
                try:
                    with warnings.catch_warnings():  # "torch.jit.load is deprecated": it is the package's format
                        warnings.simplefilter("ignore", DeprecationWarning)
                        net = torch.jit.load(str(path), map_location="cpu")._model
                except (RuntimeError, OSError, AttributeError) as e:
                    raise VadUnavailable(f"could not load the silero-vad model {path}: {e}") from None
                tensors = dict(net.named_parameters()) | dict(net.named_buffers())
                cls._shared = cls({k: v.detach().numpy() for k, v in tensors.items()})
            return cls._shared

    @staticmethod
    def initial_state() -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(HIDDEN, np.float32), np.zeros(HIDDEN, np.float32)

    def probability(self, samples: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """Speech probability of one window: `samples` = CONTEXT + WINDOW float32 at 16 kHz."""
        w = self.w
        x = np.pad(np.asarray(samples, np.float32).reshape(-1), (0, CONTEXT), mode="reflect")
        frames = sliding_window_view(x, self.filter_length)[:: self.hop].T  # [256, 4]
        real, imag = self.basis_real @ frames, self.basis_imag @ frames
        y = np.sqrt(real * real + imag * imag)  # [129, 4]
        for i, stride in enumerate(STRIDES):
            y = np.maximum(_conv3(y, w[f"encoder.{i}.reparam_conv.weight"], w[f"encoder.{i}.reparam_conv.bias"],
                                  stride), 0.0)
        y = y[:, 0]
        gates = (w["decoder.rnn.weight_ih"] @ y + w["decoder.rnn.bias_ih"]
                 + w["decoder.rnn.weight_hh"] @ h + w["decoder.rnn.bias_hh"])
        i, f, g, o = np.split(gates, 4)  # PyTorch's LSTMCell order: input, forget, cell, output
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        logit = w["decoder.decoder.2.weight"][0, :, 0] @ np.maximum(h, 0.0) + w["decoder.decoder.2.bias"][0]
        return float(_sigmoid(logit)), h.astype(np.float32), c.astype(np.float32)
