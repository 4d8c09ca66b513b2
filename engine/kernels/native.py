"""Native CPU decode kernels (``csrc/cpu_decode.c``): few-row linears, one token's routed + shared
experts, and decode-sized RMSNorm and rotary.

Decode on the CPU is a chain of GEMVs, and torch's GEMV reads weights well below the memory bandwidth
(bench/cpu_gemv.py: 11-19 GB/s of a 26-34 GB/s machine; oneDNN's pre-packed fp32 path 21-28 GB/s, and it
has no bf16 path on CPUs without native bf16). These kernels stream the checkpoint's own row-major
[out, in] weights (fp32 or bf16, no repacking) on torch's OpenMP threads.

The C source is compiled on first use (about a second) with the system C compiler for this CPU
(``-march=native``) into the studio cache (``$MING_STUDIO_CACHE`` or ``~/.cache/ming-omni-studio``,
folder ``kernels``, keyed by source, compiler, CPU and torch), then loaded with ctypes. Without a
compiler, when the build fails, or with ``MING_NATIVE_KERNELS=0`` (or ``MING_KERNELS_FORCE_REFERENCE=1``),
:func:`available` is False and callers keep torch's path, which stays the reference: results agree
within fp32 rounding (sums in another order), not bit for bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .dispatch import reference_forced

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_decode.c"
DISABLE_ENV = "MING_NATIVE_KERNELS"
CACHE_ENV = "MING_STUDIO_CACHE"  # the studio's cache (engine.tiny.default_cache_dir); kernels go in kernels/
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-std=c11")
BUILD_TIMEOUT_S = 180
# Linears of at most this many rows take the native kernel (each weight row is read once for all rows);
# larger blocks (prefill) are GEMMs, where torch's BLAS is the faster choice.
MAX_ROWS = 8
# RMSNorm and rotary of at most this many elements run natively (decode: a token's hidden state or its
# heads; ~10 torch ops each otherwise, whose fixed costs dominate at this size); larger ones are torch's.
SMALL_OP_MAX_ELEMENTS = 1 << 16
# Matrices smaller than this stay on torch's F.linear: they sit in cache (a model this small fits), where
# torch's ~6 us per call beats this path's ~12-20 us of Python, ctypes and tensor set-up (bench/cpu_gemv.py,
# "one matrix in cache": fp32 512x512 about even, bf16 512x512 native 1.3x faster).
BIND_MIN_BYTES = 512 << 10
MAX_TOP_K = 64  # the kernel sorts at most this many slots on its stack
_DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_failure: str | None = None


def _disabled() -> str | None:
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return f"{DISABLE_ENV}=0"
    if reference_forced():
        return "the torch reference is forced"
    return None


def cache_dir() -> Path:
    studio = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                       "ming-omni-studio")
    return Path(studio) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _build(cc: str, extra_flags: tuple[str, ...] = ()) -> Path:
    flags = (*CFLAGS, *extra_flags)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join((SOURCE.read_text(), cc, version, " ".join(flags), _cpu_identity(),
                                    torch.__version__)).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_decode-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ming_linear.argtypes = (p, i32, p, i32, p, i32, i64, i64, i64, i32)
    lib.ming_linear.restype = i32
    lib.ming_moe_decode.argtypes = (p, p, i64, i32, p, p, i64, p, i32, i64, i64, p, p, p, i64, i32, i32, p, p, i32)
    lib.ming_moe_decode.restype = i32
    lib.ming_rms_norm.argtypes = (p, p, p, p, p, i64, i64, ctypes.c_float, i32)
    lib.ming_rms_norm.restype = i32
    lib.ming_rotary.argtypes = (p, p, p, p, i64, i64, i64, i64, i64, i32)
    lib.ming_rotary.restype = None
    lib.ming_vector_floats.argtypes = ()
    lib.ming_vector_floats.restype = i32


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _failure
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cc = _compiler()
        if cc is None:
            _failure = "no C compiler (cc, gcc or clang) on PATH"
        else:
            try:
                lib = ctypes.CDLL(str(_build(cc)))
                _declare(lib)
                _lib = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _failure = f"building {SOURCE.name} failed: {e}"
        if _failure:
            log.warning("native CPU decode kernels unavailable (%s); using torch's path", _failure)
        return _lib


def build_with_vector_width(floats: int) -> ctypes.CDLL:
    """The kernels built with another vector width (4, 8 or 16 floats: the SSE, AVX and AVX-512 code
    paths' layouts; GCC splits wider vectors on a CPU without them), for tests that check every width's
    tails and bf16 permutation on one machine. Raises RuntimeError when it cannot be built."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler")
    lib = ctypes.CDLL(str(_build(cc, (f"-DMING_VECTOR_FLOATS={int(floats)}",))))
    _declare(lib)
    return lib


def available() -> bool:
    """True when the native kernels are built and loaded and not disabled (builds them on first call)."""
    if _disabled() is not None:
        return False
    return _load() is not None


def status() -> str:
    """One line for logs and benchmarks: what runs the CPU decode GEMVs and why."""
    reason = _disabled()
    if reason is not None:
        return f"torch ({reason})"
    lib = _load()
    if lib is None:
        return f"torch ({_failure})"
    return f"native ({lib.ming_vector_floats() * 32}-bit vectors, {torch.get_num_threads()} threads)"


def reset() -> None:
    """Forget the loaded library state (tests): the next call builds or loads again."""
    global _lib, _tried, _failure
    with _lock:
        _lib, _tried, _failure = None, False, None


def binds(weight: torch.Tensor, min_bytes: int | None = None) -> bool:
    """True when decode GEMVs of this [out, in] weight take the native kernel: a contiguous fp32/bf16 CPU
    matrix of at least ``min_bytes`` (default BIND_MIN_BYTES), and the kernels available."""
    min_bytes = BIND_MIN_BYTES if min_bytes is None else min_bytes
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in _DTYPES and not weight.is_mkldnn
            and weight.is_contiguous() and weight.numel() * weight.element_size() >= min_bytes
            and available())


def linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when :func:`linear` takes ``x @ weight.T``: the weight :func:`binds`, fp32/bf16 CPU x of at
    most MAX_ROWS rows."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and x.shape[-1] == weight.shape[-1]
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1] and not weight.requires_grad and binds(weight))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for few rows (check :func:`linear_applies` first); result in x's dtype.
    The unbound form of :class:`BoundLinear`, for weights used once (cpu_linear's callers)."""
    lib = _lib
    assert lib is not None, "call linear_applies() first"
    y = BoundLinear(weight, lib)(x)
    if y is None:
        raise ValueError(f"native linear takes 1..{MAX_ROWS} rows of fp32/bf16 CPU activations; got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    return y


class BoundLinear:
    """One plain [out, in] fp32/bf16 CPU weight bound to the native kernel once (see :func:`bind_linear`):
    its checks are made when binding, so a decode call costs little more than the kernel (torch's
    F.linear on a small matrix costs ~6 us; the checked :func:`linear` ~3x that in Python alone)."""

    __slots__ = ("weight", "lib", "ptr", "n", "k", "w_bf16")

    def __init__(self, weight: torch.Tensor, lib: ctypes.CDLL) -> None:
        self.weight, self.lib = weight, lib  # keeps the weight (and so the pointer) alive
        self.ptr, (self.n, self.k) = weight.data_ptr(), weight.shape
        self.w_bf16 = weight.dtype == torch.bfloat16

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [..., k] @ weight.T in x's dtype, or None when x is not for this kernel (more than MAX_ROWS
        rows, another dtype or device): the caller then runs torch's path."""
        rows = x.numel() // self.k
        if rows > MAX_ROWS or rows == 0 or x.dtype not in _DTYPES or x.device.type != "cpu":
            return None
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty((*x.shape[:-1], self.n), dtype=x.dtype)
        x_bf16 = x.dtype == torch.bfloat16
        code = self.lib.ming_linear(self.ptr, self.w_bf16, x.data_ptr(), x_bf16, y.data_ptr(), x_bf16,
                                    rows, self.n, self.k, torch.get_num_threads())
        if code == -1:
            raise MemoryError("native linear: out of memory for the converted activations")
        if code != 0:
            raise RuntimeError(f"native linear: the kernel refused {rows} rows (code {code})")
        return y


def bind_linear(weight: torch.Tensor, min_bytes: int | None = None) -> BoundLinear | None:
    """The native decode GEMV bound to this weight where it :func:`binds`, else None. Decided once:
    PackedLinear binds when loading."""
    if not binds(weight, min_bytes):
        return None
    assert _lib is not None
    return BoundLinear(weight.detach(), _lib)


# Weight kinds of the kernels (cpu_decode.c): fp32, bf16, int8 with one fp32 scale per row.
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


class ExpertTable:
    """Data pointers of every expert's gate, up [I, H] and down [H, I] matrices (contiguous CPU tensors of one
    dtype: fp32, bf16, or int8 with ``scales``: each matrix's fp32 per-row scales, [I], [I], [H], W = q *
    scale[row]), for :func:`moe_decode`. Views into larger tensors are fine (gate and up as the two
    halves of a fused [2I, H] matrix: ``ExpertTable.fused``); the tensors are kept alive here."""

    def __init__(self, gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor],
                 scales: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None) -> None:
        self.dtype = gate[0].dtype
        self.inter, self.hidden = gate[0].shape
        self.num_experts = len(gate)
        mats = (gate, up, down)
        if self.dtype not in _KINDS or any(len(m) != self.num_experts for m in mats) or any(
                t.dtype != self.dtype or not t.is_contiguous() or t.device.type != "cpu" for m in mats for t in m):
            raise ValueError("expert matrices must be contiguous CPU tensors of one dtype: fp32, bf16 or int8")
        shapes = ((self.inter, self.hidden), (self.inter, self.hidden), (self.hidden, self.inter))
        if any(t.shape != shape for m, shape in zip(mats, shapes) for t in m):
            raise ValueError(f"expert matrices must be [{self.inter}, {self.hidden}] x2 and [{self.hidden}, {self.inter}]")
        if (self.dtype == torch.int8) != (scales is not None):
            raise ValueError("int8 experts need their per-row scales (and only they have scales)")
        if scales is not None:
            scales = tuple([t.float().contiguous() for t in m] for m in scales)
            if any(len(m) != self.num_experts or any(t.shape != (shape[0],) for t in m) for m, shape in zip(scales, shapes)):
                raise ValueError(f"int8 expert scales must be [{self.inter}], [{self.inter}] and [{self.hidden}] per expert")
        self.kind = _KINDS[self.dtype]
        self._keep = (mats, scales)
        self.ptrs = torch.tensor([t.data_ptr() for m in mats for t in m], dtype=torch.int64)
        self.scale_ptrs = None if scales is None else torch.tensor([t.data_ptr() for m in scales for t in m],
                                                                   dtype=torch.int64)

    @classmethod
    def fused(cls, gate_up: list[torch.Tensor], down: list[torch.Tensor],
              scales: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> "ExpertTable":
        """From fused gate+up [2I, H] matrices (gate rows first) and, for int8, their [2I] scales."""
        inter = gate_up[0].shape[0] // 2

        def halves(ts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            return [t[:inter] for t in ts], [t[inter:] for t in ts]

        return cls(*halves(gate_up), down, None if scales is None else (*halves(scales[0]), scales[1]))

    def shared_fits(self, dtype: torch.dtype) -> bool:
        """True when a shared expert with plain weights of ``dtype`` can run in the same native pass: the
        experts' own fp32 / bf16, or either beside int8 experts (the activations' dtype)."""
        return dtype in _DTYPES and (self.dtype == torch.int8 or dtype == self.dtype)


def moe_applies(table: ExpertTable | None, x: torch.Tensor, topk_ids: torch.Tensor) -> bool:
    return (table is not None and x.device.type == "cpu" and x.dim() == 2 and x.shape[0] == 1
            and x.dtype in _DTYPES and topk_ids.shape[1] <= MAX_TOP_K and available())


def moe_decode(x: torch.Tensor, table: ExpertTable, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Routed experts of one token x [1, H] -> [1, H] fp32 (moe_experts' semantics; the caller casts), plus
    the shared expert when given (its plain gate, up [I_s, H] and down [H, I_s] weights, of a dtype
    :meth:`ExpertTable.shared_fits`): then the sum is rounded as ``routed.to(x.dtype) + shared_expert(x)``
    rounds it. Check :func:`moe_applies` first."""
    lib = _lib
    assert lib is not None, "call moe_applies() first"
    ids = topk_ids.reshape(-1).to(torch.int64).contiguous()
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    xc = x.contiguous()
    out = torch.empty((1, table.hidden), dtype=torch.float32)
    shared_inter = 0 if shared is None else shared[0].shape[0]
    scratch = torch.empty(ids.numel() * 3 * table.inter + 3 * shared_inter, dtype=torch.float32)
    gate, up, down = (None, None, None) if shared is None else (t.data_ptr() for t in shared)
    shared_kind = 0 if shared is None else _KINDS[shared[0].dtype]
    rc = lib.ming_moe_decode(table.ptrs.data_ptr(), None if table.scale_ptrs is None else table.scale_ptrs.data_ptr(),
                             table.num_experts, table.kind, ids.data_ptr(), weights.data_ptr(), ids.numel(),
                             xc.data_ptr(), xc.dtype == torch.bfloat16, table.hidden, table.inter,
                             gate, up, down, shared_inter, shared_kind, xc.dtype == torch.bfloat16, out.data_ptr(),
                             scratch.data_ptr(), torch.get_num_threads())
    if rc == -1:
        raise ValueError(f"expert ids must lie in [0, {table.num_experts}); got {ids.tolist()}")
    if rc == -4:
        raise ValueError(f"a shared expert of {shared[0].dtype} cannot share the native pass of {table.dtype} experts")
    if rc != 0:
        raise MemoryError("native moe_decode: out of memory for the converted activations")
    return out


def _small_op_applies(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (first.device.type == "cpu" and first.dtype in _DTYPES and first.numel() <= SMALL_OP_MAX_ELEMENTS
            and all(t.device.type == "cpu" and t.dtype == first.dtype for t in tensors)
            and not any(t.requires_grad for t in tensors) and available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """kernels.rms_norm's semantics for a decode-sized CPU input (x, weight and residual of one fp32/bf16
    dtype, at most SMALL_OP_MAX_ELEMENTS); None where it does not apply (the caller runs torch's)."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if x.dim() == 0 or weight.shape != x.shape[-1:] or (residual is not None and residual.shape != x.shape) \
            or not _small_op_applies(*tensors):
        return None
    lib = _lib
    assert lib is not None
    xc, wc = x.contiguous(), weight.contiguous()
    rc_ = None if residual is None else residual.contiguous()
    y = torch.empty_like(xc)
    h = None if residual is None else torch.empty_like(xc)
    dim = x.shape[-1]
    rc = lib.ming_rms_norm(xc.data_ptr(), None if rc_ is None else rc_.data_ptr(), wc.data_ptr(), y.data_ptr(),
                           None if h is None else h.data_ptr(), xc.numel() // dim, dim, eps,
                           x.dtype == torch.bfloat16)
    if rc != 0:
        raise MemoryError("native rms_norm: out of memory")
    return y if h is None else (y, h)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """kernels.apply_rotary's semantics for one position: x [B, heads, 1, head_dim] (fp32/bf16, CPU, at
    most SMALL_OP_MAX_ELEMENTS), cos/sin [B or 1, 1, rot]; None where it does not apply."""
    if x.dim() != 4 or x.shape[2] != 1 or cos.dim() != 3 or cos.shape[1] != 1 or cos.shape != sin.shape \
            or cos.shape[0] not in (1, x.shape[0]) or cos.shape[2] % 2 or not 0 < cos.shape[2] <= x.shape[3] \
            or cos.device.type != "cpu" or not _small_op_applies(x):
        return None
    lib = _lib
    assert lib is not None
    xc = x.contiguous()
    c, s = cos.float().contiguous(), sin.float().contiguous()
    y = torch.empty_like(xc)
    batch, heads, _, head_dim = xc.shape
    lib.ming_rotary(xc.data_ptr(), c.data_ptr(), s.data_ptr(), y.data_ptr(), batch, heads, head_dim, cos.shape[-1],
                    cos.shape[0], x.dtype == torch.bfloat16)
    return y
