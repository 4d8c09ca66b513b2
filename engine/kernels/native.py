"""Native CPU decode kernels (``csrc/cpu_decode.c``): few-row linears, one token's routed + shared
experts, decode-sized RMSNorm and rotary, and the two halves of a decoder layer for one token
(:class:`AttentionDecode`, :class:`MlpDecode`: one call each instead of ~20 torch ops).

Decode on the CPU is a chain of GEMVs, and torch's GEMV reads weights well below the memory bandwidth
(bench/cpu_gemv.py: 11-19 GB/s of a 26-34 GB/s machine; oneDNN's pre-packed fp32 path 21-28 GB/s, and it
has no bf16 path on CPUs without native bf16). These kernels stream the checkpoint's own row-major
[out, in] weights (fp32 or bf16, no repacking; int8 with row scales and int4 with group scales in the
engine's quantised storage, read in place) on torch's OpenMP threads. int4 and int8 weights meet int8
activations (quantised per 32 columns, byte dot products: AVX-512 VNNI, AVX-VNNI, or vpmaddubsw on AVX2 or
AVX-512 without VNNI): by default int4 weights one-part int8 activations and int8 weights' decode rows
two-part ones (int8x2, fp32-like), with ``MING_CPU_ACTIVATIONS=int8``
one-part ones for both, with ``=float`` fp32 ones (or :func:`set_quantized_activations`; see
ACTIVATIONS_ENV). ``MING_NATIVE_ISA=avx2`` (or ``avx-vnni``, ``avx512``) builds the kernels as an older CPU
does, to test and time that code on a newer one.

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

# decode kernels, and the load's quantisers (ming_quantize_rows), compiled into one library
SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("cpu_decode.c", "cpu_quantize.c"))
DISABLE_ENV = "MING_NATIVE_KERNELS"
CACHE_ENV = "MING_STUDIO_CACHE"  # the studio's cache (engine.tiny.default_cache_dir); kernels go in kernels/
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-std=c11")
BUILD_TIMEOUT_S = 180
# Instruction sets a build can be limited to, below this CPU's (tests and benchmarks: the code a CPU without
# AVX-512 compiles, with AVX-VNNI or without; or one with AVX-512 but neither VNNI nor bf16, as Skylake-SP; run on
# this one: its speed is this CPU's, not that CPU's). MING_NATIVE_ISA=avx2 (avx-vnni, avx512) makes the loaded
# kernels such a build.
EMULATED_ISAS = {"avx2": ("-mno-avx512f", "-mno-avxvnni"), "avx-vnni": ("-mno-avx512f",),
                 "avx512": ("-mno-avx512vnni", "-mno-avxvnni", "-mno-avx512bf16")}
ISA_ENV = "MING_NATIVE_ISA"
# Linears of at most this many rows take the native kernel (each weight row is read once for all rows);
# larger blocks (prefill) are GEMMs, where torch's BLAS is the faster choice.
MAX_ROWS = 8
# Except bf16 where torch's GEMMs run on AMX tiles (oneDNN, CPUs with AMX-BF16): from a few rows they beat the
# native kernel's fp32 multiply-adds, the sooner the longer the rows (bench/cpu_gemv.py "few-row blocks"; 2
# threads of an AMX Xeon, matrices out of cache, torch's time over the native kernel's: k = 1024 at 5 rows
# 0.95-1.09, 6 rows 0.88-1.02; k = 2048 at 4 rows 0.91-0.95; k = 4096 at 3 rows 0.91-1.02, 4 rows 0.81-0.90;
# k = 8192 at 2 rows 0.86). Pairs (k below which, most rows the native kernel keeps), by k; from the last k: 1.
AMX_BF16_NATIVE_ROWS = ((2048, 4), (8192, 3))
# There too, int4 and int8 weights (bound for blocks) meeting bf16 blocks of at least this many rows are
# dequantised to bf16 (ming_dequantize_bf16: ~0.05 ms per million weights on 2 cores) a panel of at most
# AMX_PANEL_BYTES at a time, and the panel multiplied by torch's GEMM on AMX tiles. 2 threads of an AMX Xeon,
# bf16 blocks against the native kernel's int8-activation path: int4 [2048, 4096] 8 rows 1.22 ms against 0.89,
# 16 rows 1.29 against 1.75, 64 rows 2.2 against 5.9; [4096, 1024] 16 rows 0.69 against 0.73; one MoE layer of
# 256 experts (bench/moe_layer_cpu.py --prefill-tokens 2048 --path int4,int8), 2048-token prefill: int4 2235 ->
# 1030 ms, int8 3464 -> 1234 ms (512 tokens, ~16 rows an expert: 620 -> 577, 1063 -> 854). The bf16 weights are
# what dequantize() gives; the activations stay bf16 (no int8 quantisation).
AMX_QUANT_MIN_ROWS = 16
AMX_PANEL_BYTES = 32 << 20
# RMSNorm and rotary of at most this many elements run natively (decode: a token's hidden state or its
# heads; ~10 torch ops each otherwise, whose fixed costs dominate at this size); larger ones are torch's.
SMALL_OP_MAX_ELEMENTS = 1 << 16
# Matrices smaller than this stay on torch's F.linear: they sit in cache (a model this small fits), where
# torch's ~6 us per call beats this path's ~12-20 us of Python, ctypes and tensor set-up (bench/cpu_gemv.py,
# "one matrix in cache": fp32 512x512 about even, bf16 512x512 native 1.3x faster).
BIND_MIN_BYTES = 512 << 10
MAX_TOP_K = 64  # the kernel sorts at most this many slots on its stack
# What int4 and int8 weights meet in the native kernels: int8 activations (quantised per 32 columns, summed with
# byte dot products, as llama.cpp's Q4_0 / Q8_0 x Q8_0: AVX-512 VNNI or AVX-VNNI; AVX2 or AVX-512 without VNNI
# by vpmaddubsw, int8 weights as magnitudes against the activations given their signs; decode of one MoE layer at
# the real shape on 2 cores of an AVX-512 Xeon, the kernels built as for AVX2: int4 experts 6.4 -> 3.4 ms, int8
# ones (int8x2) 6.3 -> 5.0 ms; for AVX-512 without VNNI 4.2 -> 3.1 ms, 5.7 -> 4.6 ms, bench/moe_layer_cpu.py
# --cpu-isa avx2|avx512 --path int4-float,int4,int8-float,int8) or fp32 ones (the weights widened
# exactly in registers), or, for int8 weights, "int8x2" activations:
# two int8 parts per value (the second the first's remainder in 256ths: within max|x| / 65 024 of a 32-column
# block, fp32-like), two byte dot products per 64 weights. "auto" (the default): int8 activations for int4
# weights, whose own error dwarfs theirs (bench/int8_activations.py at the real MoE shape: 20.4 % -> 20.4 % of the
# output), int8x2 for int8 weights, whose own error does not (1.5 % -> 2.1 % with int8 activations); "int8": int8
# activations for both; "float": fp32 for both. The environment variable picks it at load.
ACTIVATIONS_ENV = "MING_CPU_ACTIVATIONS"
ACTIVATION_KINDS = ("auto", "int8", "float")
_ACTIVATIONS = {"auto": {"int4": "int8", "int8": "int8x2"}, "int8": {"int4": "int8", "int8": "int8"}, "float": {}}
_KIND_BITS = {"int8": 1 << 2, "int4": 1 << 3}  # the kernels' weight kinds W_I8, W_I4
_SPLIT_BIT = 1 << 4  # the kernels' A8_SPLIT_BIT: int8 weights' activations in two parts
_DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_failure: str | None = None


def activations_summary() -> str:
    """What int4 and int8 weights meet now, in words (logs, benchmarks)."""
    words = {"int8": "int8 activations", "int8x2": "two-part int8 activations (int8x2)", "float": "fp32 activations"}
    acts = {kind: activations_for(kind) for kind in ("int4", "int8")}
    if acts["int4"] == acts["int8"]:
        return words[acts["int4"]] if acts["int4"] == "float" else f"{words[acts['int4']]} for int4 and int8 weights"
    return ", ".join(f"{words[a]} for {kind} weights" for kind, a in acts.items())


def _activations_from_env() -> str:
    value = os.environ.get(ACTIVATIONS_ENV, "auto").strip().lower() or "auto"
    if value not in ACTIVATION_KINDS:
        log.warning("%s=%r is not one of %s; using auto", ACTIVATIONS_ENV, value, ", ".join(ACTIVATION_KINDS))
        return "auto"
    return value


def _kind_bits(setting: str) -> int:
    return sum(_KIND_BITS[kind] | (_SPLIT_BIT if acts == "int8x2" else 0)
               for kind, acts in _ACTIVATIONS[setting].items())


def _emulated_isa() -> str | None:
    """The instruction set MING_NATIVE_ISA limits the build to (a key of EMULATED_ISAS), or None for this CPU's."""
    value = os.environ.get(ISA_ENV, "").strip().lower()
    if value in ("", "native"):
        return None
    if value not in EMULATED_ISAS:
        if value not in _warned_isas:  # once per value: status() asks on every call
            _warned_isas.add(value)
            log.warning("%s=%r is not one of native, %s; building for this CPU", ISA_ENV, value, ", ".join(EMULATED_ISAS))
        return None
    return value


_warned_isas: set[str] = set()


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
    key = hashlib.sha256("\0".join((*(src.read_text() for src in SOURCES), cc, version, " ".join(flags), _cpu_identity(),
                                    torch.__version__)).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_decode-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True,
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
    lib.ming_linear.argtypes = (p, i32, p, i64, p, i32, p, i32, i64, i64, i64, i32)
    lib.ming_linear.restype = i32
    lib.ming_moe_decode.argtypes = (p, p, i64, i32, i64, i64, p, p, i64, p, i32, i64, i64, p, p, p, i64, i32, i32, p, p,
                                    i32)
    lib.ming_moe_decode.restype = i32
    lib.ming_rms_norm.argtypes = (p, p, p, p, p, i64, i64, ctypes.c_float, i32)
    lib.ming_rms_norm.restype = i32
    lib.ming_rotary.argtypes = (p, p, p, p, i64, i64, i64, i64, i64, i32)
    lib.ming_rotary.restype = None
    f32 = ctypes.c_float
    lib.ming_attention_decode.argtypes = (p, p, p, p, f32, p, p, i32, p, p, p, p, f32, i64, i64, i64, i64, p, p, i64,
                                          p, p, i64, i64, f32, i32, p, p, i32)
    lib.ming_attention_decode.restype = i32
    lib.ming_mlp_decode.argtypes = (p, i32, p, i32, i32, p, i64, i64, i64, i64, f32, p, p, i32, i64, i64, i64, p, p, p,
                                    i64, i32, p, p, p, i64, p, p, p, i32)
    lib.ming_mlp_decode.restype = i32
    lib.ming_quantize_rows.argtypes = (p, i32, i64, i64, i64, p, p, i32)
    lib.ming_quantize_rows.restype = i32
    lib.ming_dequantize_bf16.argtypes = (p, i32, p, i64, i64, i64, i64, p, i32)
    lib.ming_dequantize_bf16.restype = i32
    lib.ming_vector_floats.argtypes = ()
    lib.ming_vector_floats.restype = i32
    lib.ming_int8_activations_available.argtypes = ()
    lib.ming_int8_activations_available.restype = i32
    lib.ming_set_int8_activations.argtypes = (i32,)
    lib.ming_set_int8_activations.restype = None
    lib.ming_int8x2_max_rows.argtypes = ()
    lib.ming_int8x2_max_rows.restype = i32


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _failure, _activations_setting
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cc = _compiler()
        if cc is None:
            _failure = "no C compiler (cc, gcc or clang) on PATH"
        else:
            try:
                lib = ctypes.CDLL(str(_build(cc, EMULATED_ISAS.get(_emulated_isa() or "", ()))))
                _declare(lib)
                _activations_setting = _activations_from_env()
                lib.ming_set_int8_activations(_kind_bits(_activations_setting))
                _lib = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _failure = f"building {', '.join(src.name for src in SOURCES)} failed: {e}"
        if _failure:
            log.warning("native CPU decode kernels unavailable (%s); using torch's path", _failure)
        return _lib


def build_with_vector_width(floats: int) -> ctypes.CDLL:
    """The kernels built with another vector width (4, 8 or 16 floats: the SSE, AVX and AVX-512 code
    paths' layouts; GCC splits wider vectors on a CPU without them), for tests that check every width's
    tails and bf16 permutation on one machine. Raises RuntimeError when it cannot be built."""
    return _build_with((f"-DMING_VECTOR_FLOATS={int(floats)}",))


def build_for_isa(isa: str) -> ctypes.CDLL:
    """The kernels as a CPU with only ``isa`` (a key of EMULATED_ISAS) builds them, for this CPU to run (which
    must have it). Raises ValueError for an unknown name, RuntimeError when it cannot be built."""
    if isa not in EMULATED_ISAS:
        raise ValueError(f"isa must be one of {', '.join(EMULATED_ISAS)}; got {isa!r}")
    return _build_with(EMULATED_ISAS[isa])


def _build_with(extra_flags: tuple[str, ...]) -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler")
    lib = ctypes.CDLL(str(_build(cc, extra_flags)))
    _declare(lib)
    lib.ming_set_int8_activations(_kind_bits(_activations_setting))
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
    amx = (f", bf16 blocks of {max_rows(torch.bfloat16, torch.bfloat16, 4096) + 1}+ rows (k = 4096; int4 / int8 "
           f"weights: {AMX_QUANT_MIN_ROWS}+ rows, as bf16 panels) on torch's AMX GEMM" if torch_bf16_gemm_uses_amx() else "")
    isa = _emulated_isa()
    built = f", built as for {isa} ({ISA_ENV})" if isa else ""
    return (f"native ({lib.ming_vector_floats() * 32}-bit vectors{built}, {torch.get_num_threads()} threads, "
            f"{activations_summary()}{amx})")


def quantized_activations() -> str:
    """The setting int4 and int8 weights' dot products follow now: "auto" (int8 activations for int4 weights, int8x2
    for int8 ones), "int8" (int8 for both) or "float" (fp32 for both; also wherever the native kernels or their
    int8 kernels, AVX2 or newer, are missing); activations_for says what each kind meets on this CPU."""
    if not int8_kernel_kinds():
        return "float"
    return _activations_setting


_activations_setting = "auto"


def int8_kernel_kinds() -> tuple[str, ...]:
    """The weight kinds the loaded kernels can meet with int8 activations (AVX2 or newer: int4 and int8; none
    without the kernels or on older CPUs)."""
    lib = _load() if _disabled() is None else None
    bits = lib.ming_int8_activations_available() if lib is not None else 0
    return tuple(kind for kind, bit in _KIND_BITS.items() if bits & bit)


def activations_for(kind: str) -> str:
    """What the native kernels' `kind` ("int4", "int8") weights meet now: "int8" activations, "int8x2" (two int8
    parts) or "float": the setting's, where the kernels have it."""
    acts = _ACTIVATIONS[_activations_setting].get(kind, "float")
    return acts if kind in int8_kernel_kinds() else "float"


def int8_activation_kinds() -> tuple[str, ...]:
    """The weight kinds ("int4", "int8") that meet (one-part) int8 activations now."""
    return tuple(kind for kind in ("int4", "int8") if activations_for(kind) == "int8")


def activations_take(cols: int, int4_group: int = 0, rows: int = 1) -> str:
    """What a matrix of `cols` input columns meets now in a block of `rows` activation rows: an int8 one (int4_group
    0) activations_for("int8") where cols is a multiple of 64 (int8x2: blocks of at most the kernels'
    ming_int8x2_max_rows, larger ones fp32), an int4 one (groups of `int4_group`) activations_for("int4") where its
    groups are of a multiple of 128 dividing cols; else "float"."""
    if int4_group:
        fits = int4_group % 128 == 0 and cols % int4_group == 0
    else:
        fits = cols > 0 and cols % 64 == 0
    acts = activations_for("int4" if int4_group else "int8") if fits else "float"
    if acts == "int8x2" and _lib is not None and rows > _lib.ming_int8x2_max_rows():
        return "float"
    return acts


def int8_activations_take(cols: int, int4_group: int = 0) -> bool:
    """True when a matrix of `cols` input columns meets (one-part) int8 activations now (activations_take)."""
    return activations_take(cols, int4_group) == "int8"


def set_quantized_activations(kind: str) -> str:
    """Choose what int4 and int8 weights meet (see ACTIVATION_KINDS: "auto", "int8", "float"; int8 activations
    only where the kernels have them: int8_kernel_kinds). Returns what runs from now on (see
    quantized_activations)."""
    global _activations_setting
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_KINDS)}; got {kind!r}")
    lib = _load() if _disabled() is None else None
    if lib is not None:
        lib.ming_set_int8_activations(_kind_bits(kind))
    _activations_setting = kind
    return quantized_activations()


def reset() -> None:
    """Forget the loaded library state (tests): the next call builds or loads again."""
    global _lib, _tried, _failure
    with _lock:
        _lib, _tried, _failure = None, False, None


def binds(weight: torch.Tensor, min_bytes: int | None = None, scaled: bool = False) -> bool:
    """True when decode GEMVs of this [out, in] weight take the native kernel: a contiguous fp32/bf16 CPU
    matrix (int8 or packed int4 too when ``scaled``: they come with their scales) of at least ``min_bytes``
    (default BIND_MIN_BYTES), and the kernels available."""
    min_bytes = BIND_MIN_BYTES if min_bytes is None else min_bytes
    kinds = (*_DTYPES, torch.int8, torch.uint8) if scaled else _DTYPES
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in kinds and not weight.is_mkldnn
            and weight.is_contiguous() and weight.numel() * weight.element_size() >= min_bytes
            and available())


_amx: bool | None = None


def torch_bf16_gemm_uses_amx() -> bool:
    """True when torch's CPU bf16 GEMMs run on AMX tiles: oneDNN built in, a CPU (and kernel) with AMX, and
    ONEDNN_MAX_CPU_ISA not below it. Decided once."""
    global _amx
    if _amx is None:
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        try:
            _amx = bool(torch.backends.mkldnn.is_available() and probe is not None and probe()
                        and (not isa or isa in ("ALL", "DEFAULT") or "AMX" in isa))
        except RuntimeError:
            _amx = False
    return _amx


def max_rows(x_dtype: torch.dtype, weight_dtype: torch.dtype, k: int) -> int:
    """Most activation rows of a linear with k input columns that should take the native kernel rather than
    torch's GEMM: MAX_ROWS, fewer for bf16 on bf16 weights where torch's GEMMs use AMX
    (AMX_BF16_NATIVE_ROWS)."""
    if x_dtype != torch.bfloat16 or weight_dtype != torch.bfloat16 or not torch_bf16_gemm_uses_amx():
        return MAX_ROWS
    return next((rows for cols, rows in AMX_BF16_NATIVE_ROWS if k < cols), 1)


def linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when :func:`linear` takes ``x @ weight.T``: the weight :func:`binds`, fp32/bf16 CPU x of at
    most :func:`max_rows` rows."""
    k = x.shape[-1] if x.dim() else 0
    return (x.device.type == "cpu" and x.dtype in _DTYPES and k == weight.shape[-1] and k > 0
            and 0 < x.numel() <= max_rows(x.dtype, weight.dtype, k) * k and not weight.requires_grad
            and binds(weight))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for few rows (check :func:`linear_applies` first); result in x's dtype.
    The unbound form of :class:`BoundLinear`, for weights used once (cpu_linear's callers)."""
    lib = _lib
    assert lib is not None, "call linear_applies() first"
    y = BoundLinear(weight, lib, bf16_rows=MAX_ROWS)(x)
    if y is None:
        raise ValueError(f"native linear takes 1..{MAX_ROWS} rows of fp32/bf16 CPU activations; got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    return y


def quantize_rows(w: torch.Tensor, group: int = 0, out: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The load's quantisers (``csrc/cpu_quantize.c``): a contiguous fp32 or bf16 CPU weight [..., in] to int8
    with one fp32 scale per row (``group`` 0; q int8 [..., in], scale [...]) or to int4 with one per group of
    ``group`` columns (q uint8 [..., in / 2], scale [..., in / group]), the values of the torch definitions
    (engine.kernels.dequant.quantize_int8_rows, engine.placement.quant.quantize_int4_rows). None where the
    kernels are not built or do not take the weight (another dtype or device, not contiguous, a group that is
    odd or does not divide ``in``, an ``out`` pair that is not contiguous CPU storage of those shapes and
    dtypes): the caller runs the torch definition. ``out`` (q, scale): written in place and returned. Raises
    ValueError for a weight with non-finite values, as they do."""
    if not (w.device.type == "cpu" and w.dtype in _DTYPES and w.dim() >= 1 and w.is_contiguous()
            and w.shape[-1] > 0 and not w.requires_grad and available()):
        return None
    cols = w.shape[-1]
    if group and (group < 0 or group % 2 or cols % group):
        return None
    rows = w.numel() // cols
    q_shape, q_dtype = ((*w.shape[:-1], cols // 2), torch.uint8) if group else (tuple(w.shape), torch.int8)
    scale_shape = (*w.shape[:-1], cols // group) if group else tuple(w.shape[:-1])
    if out is None:
        q, scale = torch.empty(q_shape, dtype=q_dtype), torch.empty(scale_shape, dtype=torch.float32)
    else:
        q, scale = out
        if not all(t.device.type == "cpu" and t.is_contiguous() and tuple(t.shape) == shape and t.dtype == dtype
                   for t, shape, dtype in ((q, q_shape, q_dtype), (scale, scale_shape, torch.float32))):
            return None
    rc = _lib.ming_quantize_rows(w.data_ptr(), int(w.dtype == torch.bfloat16), rows, cols, group, q.data_ptr(),
                                 scale.data_ptr(), torch.get_num_threads())
    if rc == -1:
        raise ValueError("cannot quantise a weight with non-finite values")
    return (q, scale) if rc == 0 else None


def int4_group_fits(group: int, cols: int) -> bool:
    """True when the native kernels take int4 matrices of ``cols`` input columns with scales per ``group``
    of them: the group divides the row and is a multiple of two vectors of this build (a chunk of the dot
    product never straddles two groups; 32 columns on AVX-512, 16 on AVX2, 8 on SSE)."""
    return (available() and group > 0 and cols % group == 0
            and group % (2 * _lib.ming_vector_floats()) == 0)


def _int4_group(cols: int, groups: int) -> int:
    """Input columns per scale of an int4 matrix of ``cols`` columns with ``groups`` scales per row, where the
    native kernels take them (:func:`int4_group_fits`); 0 otherwise."""
    group = cols // groups if groups > 0 and cols % groups == 0 else 0
    return group if int4_group_fits(group, cols) else 0


def _scale_layout(weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[int, torch.Tensor | None, int]:
    """(input columns, the scales as the kernel reads them, int4 group) of a weight the kernels take: fp32 /
    bf16 without scales, int8 [n, k] with fp32 per-row scales [n], packed int4 (uint8 [n, k / 2], the
    engine's storage: engine.kernels.dequant) with fp32 group scales [n, k / group]. ValueError otherwise."""
    n, cols = weight.shape
    if weight.dtype in _DTYPES:
        if scale is not None:
            raise ValueError(f"a {weight.dtype} weight has no scales")
        return cols, None, 0
    if weight.dtype == torch.int8 and scale is not None:
        return cols, _plain(scale.float().contiguous(), torch.float32, (n,)), 0
    if weight.dtype == torch.uint8 and scale is not None and scale.dim() == 2 and scale.shape[0] == n:
        k, groups = 2 * cols, scale.shape[1]
        group = _int4_group(k, groups)
        if not group:
            raise ValueError(f"int4 groups of {k / max(groups, 1):g} columns (rows of {k}) do not fit the native kernels")
        return k, _plain(scale.float().contiguous(), torch.float32, (n, groups)), group
    raise ValueError(f"the native kernels take fp32 / bf16 weights, int8 with per-row scales and packed int4 "
                     f"with group scales; got {weight.dtype} {tuple(weight.shape)} with scales "
                     f"{None if scale is None else tuple(scale.shape)}")


_panels = threading.local()  # each thread's bf16 panel buffer (the offload runtime's CPU workers run experts at once)


def _panel_buffer(numel: int) -> torch.Tensor:
    buf = getattr(_panels, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _panels.buf = torch.empty(numel, dtype=torch.bfloat16)
    return buf


class BoundLinear:
    """One plain [out, in] fp32/bf16 CPU weight, an int8 one with its fp32 per-row ``scale`` (W = q *
    scale[row], as torch's weight-only int8 GEMM reads it), or a packed int4 one (uint8 [out, in / 2]) with
    its group scales [out, in / group], bound to the native kernel once (see :func:`bind_linear`): its checks
    are made when binding, so a decode call costs little more than the kernel (torch's F.linear on a small
    matrix costs ~6 us; the checked :func:`linear` ~3x that in Python alone). int4 takes any number of rows
    (the kernel runs them in chunks of MAX_ROWS), int8 too when bound with ``blocks`` (prefill blocks in
    fp32, which torch's int8 kernel does not vectorise); the others at most MAX_ROWS, bf16 activations of a
    bf16 weight at most ``bf16_rows`` (default :func:`max_rows`: fewer where torch's GEMM is faster). Where
    torch's bf16 GEMMs use AMX, bf16 blocks of AMX_QUANT_MIN_ROWS or more on int4 / int8 weights bound for
    blocks go through bf16 panels (see :meth:`takes_bf16_panels`)."""

    __slots__ = ("weight", "scale", "lib", "ptr", "scale_ptr", "n", "k", "kind", "group", "blocks", "bf16_rows")

    def __init__(self, weight: torch.Tensor, lib: ctypes.CDLL, scale: torch.Tensor | None = None,
                 blocks: bool = False, bf16_rows: int | None = None) -> None:
        if weight.dim() != 2 or weight.dtype not in _KINDS:
            raise ValueError(f"expected a 2-D weight of {sorted(map(str, _KINDS))}; got {weight.dtype} {tuple(weight.shape)}")
        self.weight, self.lib = weight, lib  # keeps the weight (and so the pointer) alive
        self.n = weight.shape[0]
        self.k, self.scale, self.group = _scale_layout(weight, scale)
        self.ptr, self.kind = weight.data_ptr(), _KINDS[weight.dtype]
        self.scale_ptr = None if self.scale is None else self.scale.data_ptr()
        self.blocks = self.group > 0 or (blocks and weight.dtype == torch.int8)  # any number of rows
        self.bf16_rows = max_rows(torch.bfloat16, weight.dtype, self.k) if bf16_rows is None else bf16_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [..., k] @ weight.T in x's dtype (no row: the empty result), or None when x is not for this
        kernel (more than MAX_ROWS rows unless bound for blocks, another dtype or device): the caller then
        runs torch's path."""
        if x.dim() == 0 or x.shape[-1] != self.k:
            raise ValueError(f"native linear: activations of {self.k} features expected; got {tuple(x.shape)}")
        rows = x.numel() // self.k
        if self.takes_bf16_panels(x):
            return self._bf16_panels(x)
        limit = self.bf16_rows if x.dtype == torch.bfloat16 else MAX_ROWS
        if (rows > limit and not self.blocks) or x.dtype not in _DTYPES or x.device.type != "cpu":
            return None
        if rows == 0:  # no token: the empty result, whatever x's strides
            return torch.empty((*x.shape[:-1], self.n), dtype=x.dtype)
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty((*x.shape[:-1], self.n), dtype=x.dtype)
        x_bf16 = x.dtype == torch.bfloat16
        code = self.lib.ming_linear(self.ptr, self.kind, self.scale_ptr, self.group, x.data_ptr(), x_bf16,
                                    y.data_ptr(), x_bf16, rows, self.n, self.k, torch.get_num_threads())
        if code == -1:
            raise MemoryError("native linear: out of memory for the converted activations")
        if code != 0:
            raise RuntimeError(f"native linear: the kernel refused {rows} rows (code {code})")
        return y

    def takes_bf16_panels(self, x: torch.Tensor) -> bool:
        """True when x (bf16, AMX_QUANT_MIN_ROWS rows or more) meets this int4 / int8 weight (bound for blocks)
        as bf16 panels multiplied by torch's GEMM: where that GEMM uses AMX tiles."""
        return (self.blocks and x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() > 0
                and x.shape[-1] == self.k and x.numel() >= AMX_QUANT_MIN_ROWS * self.k and torch_bf16_gemm_uses_amx())

    def _bf16_panels(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T with W dequantised to bf16 a panel of rows at a time (this thread's buffer), each panel
        through torch's GEMM; result bf16."""
        x2 = x.reshape(-1, self.k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        per_panel = max(1, min(self.n, AMX_PANEL_BYTES // (2 * self.k)))
        buf = _panel_buffer(per_panel * self.k)
        y = torch.empty((x2.shape[0], self.n), dtype=torch.bfloat16)
        for r0 in range(0, self.n, per_panel):
            r = min(per_panel, self.n - r0)
            panel = buf[: r * self.k].view(r, self.k)
            code = self.lib.ming_dequantize_bf16(self.ptr, self.kind, self.scale_ptr, self.group, self.k, r0, r,
                                                 panel.data_ptr(), torch.get_num_threads())
            if code != 0:
                raise RuntimeError(f"native dequantisation refused rows {r0}..{r0 + r} (code {code})")
            if r == self.n:
                torch.mm(x2, panel.t(), out=y)
            else:
                y[:, r0:r0 + r] = torch.mm(x2, panel.t())
        return y.view(*x.shape[:-1], self.n)


def bind_linear(weight: torch.Tensor, min_bytes: int | None = None, scale: torch.Tensor | None = None,
                blocks: bool = False) -> BoundLinear | None:
    """The native decode GEMV bound to this weight (int8: with its per-row ``scale``; packed int4: with its
    group scales) where it :func:`binds`, else None. Decided once: PackedLinear binds when loading.
    ``blocks``: an int8 weight takes blocks of any number of rows too (see BoundLinear)."""
    if not binds(weight, min_bytes, scaled=scale is not None) or (weight.dtype in _SCALED) != (scale is not None):
        return None
    assert _lib is not None
    try:
        return BoundLinear(weight.detach(), _lib, scale, blocks)
    except ValueError:  # int4 groups this build's kernels do not take
        return None


# Weight kinds of the kernels (cpu_decode.c): fp32, bf16, int8 with one fp32 scale per row, int4 packed two
# per byte (uint8 storage) with one fp32 scale per group of columns.
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.uint8: 3}
_SCALED = (torch.int8, torch.uint8)


class ExpertTable:
    """Data pointers of every expert's gate, up [I, H] and down [H, I] matrices (contiguous CPU tensors of one
    dtype: fp32, bf16, int8 with ``scales``: each matrix's fp32 per-row scales, [I], [I], [H], W = q *
    scale[row]; or packed int4, uint8 [I, H / 2], [I, H / 2], [H, I / 2], with ``scales`` per group of input
    columns, [I, H / g], [I, H / g], [H, I / g']), for :func:`moe_decode`. Views into larger tensors are fine
    (gate and up as the two halves of a fused [2I, H] matrix: ``ExpertTable.fused``); the tensors are kept
    alive here."""

    def __init__(self, gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor],
                 scales: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None) -> None:
        self.dtype = gate[0].dtype
        packed = 2 if self.dtype == torch.uint8 else 1  # int4: two columns per byte
        self.inter, self.hidden = gate[0].shape[0], gate[0].shape[1] * packed
        self.num_experts = len(gate)
        mats = (gate, up, down)
        if self.dtype not in _KINDS or any(len(m) != self.num_experts for m in mats) or any(
                t.dtype != self.dtype or not t.is_contiguous() or t.device.type != "cpu" for m in mats for t in m):
            raise ValueError("expert matrices must be contiguous CPU tensors of one dtype: fp32, bf16, int8 or "
                             "packed int4 (uint8)")
        shapes = ((self.inter, self.hidden), (self.inter, self.hidden), (self.hidden, self.inter))
        if any(t.shape != (out, cols // packed) for m, (out, cols) in zip(mats, shapes) for t in m):
            raise ValueError(f"expert matrices must be [{self.inter}, {self.hidden}] x2 and [{self.hidden}, {self.inter}]"
                             + (" (int4: half the columns, two per byte)" if packed == 2 else ""))
        if (self.dtype in _SCALED) != (scales is not None):
            raise ValueError("int8 and int4 experts need their scales (and only they have scales)")
        self.gate_up_group = self.down_group = 0
        if scales is not None:
            scales = tuple([t.float().contiguous() for t in m] for m in scales)
            if packed == 2:  # one group width per matrix role, from the first expert's scales
                groups = [m[0].shape[-1] if m[0].dim() == 2 else 0 for m in scales]
                self.gate_up_group = _int4_group(self.hidden, groups[0]) if groups[0] == groups[1] else 0
                self.down_group = _int4_group(self.inter, groups[2])
                if not (self.gate_up_group and self.down_group):
                    raise ValueError(f"int4 expert groups of {self.gate_up_group} / {self.down_group} columns do not fit "
                                     "the native kernels")
                scale_shapes = ((self.inter, groups[0]), (self.inter, groups[1]), (self.hidden, groups[2]))
            else:
                scale_shapes = tuple((out,) for out, _ in shapes)
            if any(len(m) != self.num_experts or any(t.shape != shape for t in m) for m, shape in zip(scales, scale_shapes)):
                raise ValueError(f"expert scales must be {', '.join(str(list(s)) for s in scale_shapes)} per expert")
        self.kind = _KINDS[self.dtype]
        self._keep = (mats, scales)
        self.ptrs = torch.tensor([t.data_ptr() for m in mats for t in m], dtype=torch.int64)
        self.scale_ptrs = None if scales is None else torch.tensor([t.data_ptr() for m in scales for t in m],
                                                                   dtype=torch.int64)

    @classmethod
    def fused(cls, gate_up: list[torch.Tensor], down: list[torch.Tensor],
              scales: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> "ExpertTable":
        """From fused gate+up [2I, H] matrices (gate rows first) and, for int8 / int4, their [2I(, groups)]
        scales."""
        inter = gate_up[0].shape[0] // 2

        def halves(ts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            return [t[:inter] for t in ts], [t[inter:] for t in ts]

        return cls(*halves(gate_up), down, None if scales is None else (*halves(scales[0]), scales[1]))

    def shared_fits(self, dtype: torch.dtype) -> bool:
        """True when a shared expert with plain weights of ``dtype`` can run in the same native pass: the
        experts' own fp32 / bf16, or either beside int8 / int4 experts (the activations' dtype)."""
        return dtype in _DTYPES and (self.dtype in _SCALED or dtype == self.dtype)


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
                             table.num_experts, table.kind, table.gate_up_group, table.down_group, ids.data_ptr(),
                             weights.data_ptr(), ids.numel(),
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
    if x.dim() == 0 or x.numel() == 0 or weight.shape != x.shape[-1:] \
            or (residual is not None and residual.shape != x.shape) or not _small_op_applies(*tensors):
        return None  # (no row, or rows of no width: torch's path returns the empty result)
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


def _plain(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` detached when it is a contiguous CPU tensor of ``dtype`` and ``shape``; else ValueError."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype != dtype or t.is_mkldnn \
            or tuple(t.shape) != tuple(shape) or not t.is_contiguous():
        raise ValueError(f"expected a contiguous CPU {dtype} tensor of shape {tuple(shape)}; got "
                         f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    return t.detach()


class AttentionDecode:
    """The attention half of one decoder layer for one token, bound to ``ming_attention_decode``:
    (x, residual) -> (post_norm(attention(input_norm(x + residual)) + x + residual), the new residual), the
    token's rotated key and its value written into the layer's KV cache at ``slot``, attending to slots
    0..slot. Norm weights of the activations' dtype (fp32 or bf16), the two projections of it too or int8
    with per-row scales, no biases; the checks are made here, once, so a call costs the kernel and two
    output tensors."""

    __slots__ = ("dtype", "hidden", "n_heads", "n_kv", "head_dim", "rot", "eps", "head_eps", "scale", "_keep",
                 "_ptrs", "lib")

    def __init__(self, *, input_norm: torch.Tensor, post_norm: torch.Tensor, eps: float, qkv: torch.Tensor,
                 o: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, head_eps: float, n_heads: int,
                 n_kv: int, head_dim: int, rotary_dim: int, qkv_scale: torch.Tensor | None = None,
                 o_scale: torch.Tensor | None = None) -> None:
        if not available():
            raise RuntimeError("the native kernels are not available")
        dtype, hidden = input_norm.dtype, input_norm.shape[0]
        if dtype not in _DTYPES or n_kv < 1 or n_heads % n_kv or rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
            raise ValueError(f"attention shape: {n_heads} heads, {n_kv} KV heads of {head_dim}, rotary {rotary_dim}")
        self.dtype, self.hidden = dtype, hidden
        self.n_heads, self.n_kv, self.head_dim, self.rot = n_heads, n_kv, head_dim, rotary_dim
        self.eps, self.head_eps, self.scale = float(eps), float(head_eps), 1.0 / head_dim ** 0.5
        n_qkv = (n_heads + 2 * n_kv) * head_dim
        w_dtype = torch.int8 if qkv.dtype == torch.int8 else dtype  # int8 projections: with per-row scales
        if (w_dtype == torch.int8) != (qkv_scale is not None and o_scale is not None):
            raise ValueError("int8 projections need their per-row scales (and only they have scales)")
        tensors = (_plain(input_norm, dtype, (hidden,)), _plain(post_norm, dtype, (hidden,)),
                   _plain(qkv, w_dtype, (n_qkv, hidden)), _plain(o, w_dtype, (hidden, n_heads * head_dim)),
                   _plain(q_norm, dtype, (head_dim,)), _plain(k_norm, dtype, (head_dim,)))
        scales = (None, None) if w_dtype != torch.int8 else (
            _plain(qkv_scale.float().contiguous(), torch.float32, (n_qkv,)),
            _plain(o_scale.float().contiguous(), torch.float32, (hidden,)))
        self._keep = (tensors, scales)
        self._ptrs = (*(t.data_ptr() for t in tensors[:4]), _KINDS[w_dtype],
                      *(None if t is None else t.data_ptr() for t in scales), *(t.data_ptr() for t in tensors[4:]))
        self.lib = _lib

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [.., hidden] of one token (residual None: the first layer, whose residual is x);
        cos/sin: this position's fp32 tables, ``rotary_dim`` contiguous floats; k_cache/v_cache the layer's
        contiguous [1, n_kv, capacity, head_dim] buffers of the dtype. Returns (y, new residual)."""
        if x.dtype != self.dtype or x.numel() != self.hidden or cos.dtype != torch.float32 \
                or cos.numel() != self.rot or sin.dtype != torch.float32 or sin.numel() != self.rot:
            raise ValueError("native attention: one token of the layer's dtype and fp32 rotary tables of its width")
        if k_cache.dtype != self.dtype or v_cache.dtype != self.dtype or k_cache.shape != v_cache.shape \
                or k_cache.shape[0] != 1 or tuple(k_cache.shape[1::2]) != (self.n_kv, self.head_dim) \
                or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("native attention: the KV cache must be one sequence's contiguous buffers")
        capacity = k_cache.shape[2]
        x = x.contiguous()
        if residual is not None:
            residual = residual.contiguous()
        y = torch.empty_like(x)
        res_out = torch.empty_like(x)
        in_norm, post_norm, qkv, o, kind, qkv_scale, o_scale, q_norm, k_norm = self._ptrs
        rc = self.lib.ming_attention_decode(
            x.data_ptr(), None if residual is None else residual.data_ptr(), in_norm, post_norm, self.eps, qkv, o,
            kind, qkv_scale, o_scale, q_norm, k_norm, self.head_eps, self.hidden, self.n_heads, self.n_kv,
            self.head_dim, cos.data_ptr(), sin.data_ptr(), self.rot, k_cache.data_ptr(), v_cache.data_ptr(), capacity, slot, self.scale,
            self.dtype == torch.bfloat16, y.data_ptr(), res_out.data_ptr(), torch.get_num_threads())
        if rc == -2:
            raise MemoryError("native attention: out of memory")
        if rc != 0:
            raise ValueError(f"native attention: the kernel refused slot {slot} of a cache of {capacity} (code {rc})")
        return y, res_out


class MlpDecode:
    """The MLP half of one decoder layer for one token, bound to ``ming_mlp_decode``: a MoE layer's router
    (fp32 logits from a fp32/bf16 gate, group-limited sigmoid top-k: engine.kernels.router) and its chosen
    experts (an :class:`ExpertTable`) with the shared expert in one pass, or a dense layer's SwiGLU (as the
    "shared" expert alone; of the activations' dtype, or int8 with ``shared_scales``). Activations of one
    dtype (fp32 or bf16), rounded where torch's modules round."""

    __slots__ = ("dtype", "hidden", "router", "table", "shared", "lib", "_keep", "_args", "_args_after")

    def __init__(self, dtype: torch.dtype, hidden: int, *, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                 router_weight: torch.Tensor | None = None, expert_bias: torch.Tensor | None = None,
                 table: ExpertTable | None = None, n_group: int = 1, topk_group: int = 1, top_k: int = 0,
                 scaling: float = 1.0, shared_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                 ) -> None:
        if not available():
            raise RuntimeError("the native kernels are not available")
        if dtype not in _DTYPES:
            raise ValueError(f"activations must be fp32 or bf16; got {dtype}")
        self.dtype, self.hidden, self.lib = dtype, hidden, _lib
        keep: list = []
        scale_ptrs = (None, None, None)
        if shared is not None:
            inter_s = shared[0].shape[0]
            w_dtype = torch.int8 if shared[0].dtype == torch.int8 else dtype  # int8: with per-row scales
            if (w_dtype == torch.int8) != (shared_scales is not None):
                raise ValueError("int8 MLP weights need their per-row scales (and only they have scales)")
            shared = (_plain(shared[0], w_dtype, (inter_s, hidden)), _plain(shared[1], w_dtype, (inter_s, hidden)),
                      _plain(shared[2], w_dtype, (hidden, inter_s)))
            keep.append(shared)
            if shared_scales is not None:
                shared_scales = tuple(_plain(t.float().contiguous(), torch.float32, (n,))
                                      for t, n in zip(shared_scales, (inter_s, inter_s, hidden)))
                keep.append(shared_scales)
                scale_ptrs = tuple(t.data_ptr() for t in shared_scales)
        if router_weight is not None:
            if table is None or table.hidden != hidden:
                raise ValueError("a MoE layer needs its expert table (of this hidden size)")
            e = table.num_experts
            if router_weight.dtype not in _DTYPES:
                raise ValueError(f"router weights must be fp32 or bf16; got {router_weight.dtype}")
            router_weight = _plain(router_weight, router_weight.dtype, (e, hidden))
            expert_bias = _plain(expert_bias.float().contiguous(), torch.float32, (e,))
            if e % n_group or not 0 < topk_group <= n_group or not 0 < top_k <= min(e, MAX_TOP_K):
                raise ValueError(f"router shape: {e} experts, {n_group} groups, keep {topk_group}, top-{top_k}")
            keep += [router_weight, expert_bias, table]
        elif shared is None:
            raise ValueError("a dense layer needs its SwiGLU weights")
        self.router, self.table, self.shared, self._keep = router_weight, table, shared, keep
        g = u = d = None
        if shared is not None:
            g, u, d = (t.data_ptr() for t in shared)
        self._args = (
            None if router_weight is None else router_weight.data_ptr(),
            0 if router_weight is None else _KINDS[router_weight.dtype],
        )
        self._args_after = (
            None if expert_bias is None else expert_bias.data_ptr(),
            0 if table is None else table.num_experts, n_group, topk_group, top_k if table is not None else 0,
            float(scaling),
            None if table is None else table.ptrs.data_ptr(),
            None if table is None or table.scale_ptrs is None else table.scale_ptrs.data_ptr(),
            0 if table is None else table.kind, 0 if table is None else table.gate_up_group,
            0 if table is None else table.down_group, 0 if table is None else table.inter,
            g, u, d, 0 if shared is None else shared[0].shape[0], 0 if shared is None else _KINDS[shared[0].dtype],
            *scale_ptrs, hidden)

    @property
    def top_k(self) -> int:
        return self._args_after[4]

    @property
    def can_route_in_bf16(self) -> bool:
        """True when ``router_bf16`` is what the reference computes here: a bf16 router (or none: dense)."""
        return self.router is None or self.router.dtype == torch.bfloat16

    def __call__(self, x: torch.Tensor, routing: tuple[torch.Tensor, torch.Tensor] | None = None,
                 router_bf16: bool = False) -> torch.Tensor | None:
        """x [.., hidden] of one token -> the layer's MLP output, same shape and dtype. ``routing``: an
        ([top_k] int64, [top_k] fp32) pair of tensors that receive the chosen experts and weights.
        ``router_bf16``: select the experts in bf16 as the reference's bf16 router does (Numerics).
        None (nothing computed) when the token's choice ties at its boundary (an expert or group left out
        scores as the last one kept, frequent in bf16): which one torch.topk keeps is its algorithm's, so the
        caller routes that token with torch (engine.kernels.router), as the reference does."""
        if x.dtype != self.dtype or x.numel() != self.hidden:
            raise ValueError(f"native MLP: one token of {self.hidden} {self.dtype} activations")
        if router_bf16 and not self.can_route_in_bf16:
            raise ValueError("native MLP: a bf16 router needs its weights in bf16")
        x = x.contiguous()
        y = torch.empty_like(x)
        ids = weights = None
        if routing is not None:
            k = self.top_k
            if routing[0].dtype != torch.int64 or routing[1].dtype != torch.float32 or routing[0].numel() < k \
                    or routing[1].numel() < k or not (routing[0].is_contiguous() and routing[1].is_contiguous()) \
                    or routing[0].device.type != "cpu" or routing[1].device.type != "cpu":
                raise ValueError(f"native MLP: routing takes contiguous CPU int64 and fp32 tensors of {k} entries")
            ids, weights = routing[0].data_ptr(), routing[1].data_ptr()
        rc = self.lib.ming_mlp_decode(x.data_ptr(), self.dtype == torch.bfloat16, *self._args, bool(router_bf16),
                                      *self._args_after, y.data_ptr(), ids, weights, torch.get_num_threads())
        if rc == 1:
            return None
        if rc == -2:
            raise MemoryError("native MLP: out of memory")
        if rc != 0:
            raise ValueError(f"native MLP: the kernel refused the layer (code {rc})")
        return y
