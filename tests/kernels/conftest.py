"""Kernel tests run Triton kernels on CPU tensors through the Triton interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set here at import
time, before any test module imports ``engine.kernels.triton_impl``. If another test directory
imported those modules earlier in the same pytest process, they are reloaded so that their kernels
are re-decorated in interpreter mode.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

_TRITON_IMPL_PACKAGE = "engine.kernels.triton_impl"
for _name in sorted(name for name in sys.modules if name.startswith(_TRITON_IMPL_PACKAGE + ".")):
    importlib.reload(sys.modules[_name])
