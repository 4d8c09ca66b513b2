"""One-token GEMV on this CPU: torch's plain path, oneDNN's pre-packed one and the native kernel, against read bandwidth.

    python bench/cpu_gemv.py [--threads 2] [--mib 768] [--json]

Why: decode on the CPU is a chain of GEMVs (x [1, K] @ W[N, K]^T), so its speed is the rate at which
these read weights. This measures, in one run:

* read bandwidth: best of a few ``sum`` passes over a buffer of --mib MiB (far above the caches);
* for each shape of the mid-size bench model (bench/vs_llamacpp.py) and each dtype: ``--mib`` MiB of
  distinct [N, K] weights walked once per pass (out of cache, as in decode), through ``F.linear`` on
  the plain weight, through oneDNN on the weight pre-packed by engine.kernels, and through the native
  decode kernel on the plain weight (engine.kernels.native: the engine's CPU decode path where it
  builds); GB/s, the fraction of the read bandwidth, packed / plain and native / plain;
* the fixed cost per call: one small matrix (in cache) called repeatedly, plain vs packed, to show
  where engine.kernels.ONEDNN_FP32_MIN_BYTES (fp32 matrices below it stay unpacked) comes from;
* int8 weights with one scale per row (the no-GPU option ``--linear-dtype int8``; int8 experts): torch's
  weight-only int8 kernel against the native one, fp32 and bf16 activations, streamed as above;
* int8 prefill blocks (16 and 64 rows) at the real expert shapes: torch's int8 kernel against the native one
  bound for blocks, which the engine runs for fp32 activations (torch's fp32 int8 path is not vectorised:
  timed on fewer matrices) and leaves to torch in bf16;
* few-row blocks (a decode batch, an expert's share of a prefill) of plain fp32 / bf16 weights at the real
  model's shapes: torch's F.linear against the native kernel for 1-8 rows, and which one the engine takes
  (engine.kernels.native.max_rows: on CPUs where torch's bf16 GEMMs use AMX tiles, they take bf16 blocks
  from a few rows);
* int4 weights with a scale per 128 columns (the no-GPU expert format) at the real model's expert shapes:
  torch's int4 kernel (on its own layout) against the native one (on the engine's storage), for a decode
  row and the few-row blocks an expert gets in prefill; fp32 activations through torch's kernel are timed
  on fewer matrices (that path is not vectorised: tens of times slower, so compute bound either way).

The figures move with other processes on the machine; ratios from the same run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.kernels import native  # noqa: E402
from engine.kernels.moe import ONEDNN_FP32_MIN_BYTES, _pack_matrix, _packed_linear, onednn_packing_available  # noqa: E402

# (name, N, K): one matrix of the mid-size bench model (hidden 2048, experts of 512)
SHAPES = (("expert gate+up", 1024, 2048), ("expert down", 2048, 512), ("attention out", 2048, 2048))
SMALL = (128, 256, 512, 768, 1024)  # square fp32/bf16 matrices for the per-call cost
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TIMED_REPS = 3  # timed calls per measurement after a warm-up call (the best is kept)


def _seconds(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(mib: int) -> float:
    buf = torch.ones(mib * 2**20 // 4)  # written, so its pages are real
    return buf.numel() * 4 / _seconds(lambda: buf.sum(), 5) / 1e9


def streamed(n: int, k: int, dtype: torch.dtype, mib: int, reps: int = TIMED_REPS) -> dict:
    count = max(2, mib * 2**20 // (n * k * dtype.itemsize))
    gen = torch.Generator().manual_seed(n * k)
    plain = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(count)]
    x = torch.randn(1, k, generator=gen).to(dtype)
    nbytes = count * n * k * dtype.itemsize
    row = {"matrices": count, "plain_gbs": nbytes / _seconds(lambda: [F.linear(x, w) for w in plain], reps) / 1e9}
    if native.available():  # bound once per weight, as PackedLinear does when loading
        bound = [native.bind_linear(w) for w in plain]
        row["native_gbs"] = nbytes / _seconds(lambda: [b(x) for b in bound], reps) / 1e9
        del bound
    if onednn_packing_available(dtype):
        packed = [_pack_matrix(w, True) for w in plain]
        del plain
        row["packed_gbs"] = nbytes / _seconds(lambda: [_packed_linear(x, w) for w in packed], reps) / 1e9
    return row


def streamed_int8(n: int, k: int, dtype: torch.dtype, mib: int, reps: int = TIMED_REPS) -> dict:
    """int8 [n, k] weights with per-row scales, x of ``dtype``: torch's int8 GEMV vs the native one."""
    from engine.kernels.dequant import quantize_int8_rows

    count = max(2, mib * 2**20 // (n * k))
    gen = torch.Generator().manual_seed(n * k + 8)
    mats = [quantize_int8_rows(torch.randn(n, k, generator=gen)) for _ in range(count)]
    x = torch.randn(1, k, generator=gen).to(dtype)
    nbytes = count * n * k
    row: dict = {"matrices": count}
    if hasattr(torch, "_weight_int8pack_mm"):
        scales = [s.to(dtype) for _, s in mats]
        row["torch_gbs"] = nbytes / _seconds(lambda: [torch._weight_int8pack_mm(x, q, sc)
                                                      for (q, _), sc in zip(mats, scales)], reps) / 1e9
    if native.available():
        bound = [native.bind_linear(q, scale=sc) for q, sc in mats]
        row["native_gbs"] = nbytes / _seconds(lambda: [b(x) for b in bound], reps) / 1e9
    return row


INT8_BLOCK_ROWS = (16, 64)  # prefill blocks: the native kernel takes them in fp32 (torch's int8 kernel's fp32 path is scalar)
INT8_TORCH_FP32_MATRICES = 2


def streamed_int8_block(n: int, k: int, dtype: torch.dtype, rows: int, mib: int, reps: int = TIMED_REPS) -> dict:
    """int8 [n, k] weights with per-row scales, a block of ``rows`` activation rows of ``dtype``: torch's int8
    kernel vs the native one bound for blocks (what engine.kernels.moe._Int8Matrix runs in fp32)."""
    from engine.kernels.dequant import quantize_int8_rows

    count = max(2, mib * 2**20 // (n * k))
    gen = torch.Generator().manual_seed(n * k + rows)
    mats = [quantize_int8_rows(torch.randn(n, k, generator=gen)) for _ in range(count)]
    x = torch.randn(rows, k, generator=gen).to(dtype)
    row: dict = {"matrices": count}
    if native.available():
        bound = [native.bind_linear(q, min_bytes=0, scale=sc, blocks=True) for q, sc in mats]
        row["native_gbs"] = count * n * k / _seconds(lambda: [b(x) for b in bound], reps) / 1e9
    if hasattr(torch, "_weight_int8pack_mm"):
        used = mats if dtype != torch.float32 else mats[:INT8_TORCH_FP32_MATRICES]
        scales = [sc.to(dtype) for _, sc in used]
        row["torch_gbs"] = len(used) * n * k / _seconds(lambda: [torch._weight_int8pack_mm(x, q, sc)
                                                                 for (q, _), sc in zip(used, scales)], reps) / 1e9
    return row


INT4_SHAPES = (("real expert gate+up", 2048, 4096), ("real expert down", 4096, 1024))
INT4_ROWS = (1, 4, 16)
INT4_TORCH_FP32_MATRICES = 4


def streamed_int4(n: int, k: int, dtype: torch.dtype, rows: int, mib: int, reps: int = TIMED_REPS) -> dict:
    """int4 [n, k] weights with group scales, ``rows`` activation rows of ``dtype``: torch's int4 kernel vs
    the native one."""
    from engine.kernels.moe import _Int4Matrix, int4_cpu_kernel_available
    from engine.placement.quant import quantize

    count = max(2, mib * 2**20 // (n * k // 2))
    gen = torch.Generator().manual_seed(n * k + 4)
    mats = [quantize(torch.randn(n, k, generator=gen), "int4") for _ in range(count)]
    x = torch.randn(rows, k, generator=gen).to(dtype)
    nbytes = n * k // 2
    row: dict = {"matrices": count}
    if native.available():
        bound = [native.bind_linear(q, min_bytes=0, scale=sc) for q, sc in mats]
        row["native_gbs"] = count * nbytes / _seconds(lambda: [b(x) for b in bound], reps) / 1e9
        del bound
    if int4_cpu_kernel_available():
        used = mats if dtype != torch.float32 else mats[:INT4_TORCH_FP32_MATRICES]
        torch_mats = [_Int4Matrix(q, sc, dtype) for q, sc in used]
        row["torch_gbs"] = len(used) * nbytes / _seconds(lambda: [m(x) for m in torch_mats], reps) / 1e9
    return row


FEW_ROWS_SHAPES = (("real expert gate+up", 2048, 4096), ("real expert down", 4096, 1024), ("k 8192", 1024, 8192))
FEW_ROWS = (1, 2, 3, 4, 6, 8)


def few_rows(n: int, k: int, dtype: torch.dtype, rows: int, mib: int, reps: int = TIMED_REPS) -> dict:
    """Plain [n, k] weights of ``dtype``, ``rows`` activation rows: torch's F.linear against the native kernel
    (forced, whatever native.max_rows says), and what the engine's dispatch (native.linear_applies) picks."""
    count = max(2, mib * 2**20 // (n * k * dtype.itemsize))
    gen = torch.Generator().manual_seed(n * k + rows)
    mats = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(count)]
    x = torch.randn(rows, k, generator=gen).to(dtype)
    nbytes = count * n * k * dtype.itemsize
    row: dict = {"matrices": count, "torch_gbs": nbytes / _seconds(lambda: [F.linear(x, w) for w in mats], reps) / 1e9}
    if native.available():
        row["native_gbs"] = nbytes / _seconds(lambda: [native.linear(x, w) for w in mats], reps) / 1e9
        row["engine_takes"] = "native" if native.linear_applies(x, mats[0]) else "torch"
    return row


def per_call(n: int, dtype: torch.dtype, reps: int = TIMED_REPS) -> dict:
    w = torch.randn(n, n).to(dtype)
    x = torch.randn(1, n).to(dtype)
    row = {"kib": n * n * dtype.itemsize // 1024,
           "plain_us": _seconds(lambda: [F.linear(x, w) for _ in range(200)], reps) / 200 * 1e6}
    if native.available():
        bound = native.bind_linear(w, min_bytes=0)  # every size, to show where BIND_MIN_BYTES comes from
        row["native_us"] = _seconds(lambda: [bound(x) for _ in range(200)], reps) / 200 * 1e6
    if onednn_packing_available(dtype):
        p = _pack_matrix(w, True)
        row["packed_us"] = _seconds(lambda: [_packed_linear(x, p) for _ in range(200)], reps) / 200 * 1e6
    return row


def _print_torch_vs_native(title: str, rows: dict, bw: float, width: int, digits: int) -> None:
    """A table of torch's kernel against the native one: GB/s each, native / read bandwidth, native / torch."""
    na = "n/a"
    print(f"\n{title:{width}s} {'torch GB/s':>10s} {'native GB/s':>11s} {'native/bw':>9s} {'native/torch':>12s}")
    for name, r in rows.items():
        t, n_ = r.get("torch_gbs"), r.get("native_gbs")
        print(f"{name:{width}s} " + (f"{t:10.{digits}f}" if t else f"{na:>10s}")
              + (f" {n_:11.{digits}f} {n_ / bw:9.2f}" if n_ else f" {na:>11s} {na:>9s}")
              + (f" {n_ / t:12.2f}" if t and n_ else f" {na:>12s}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mib", type=int, default=768, help="weights walked per pass (above the caches)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--reps", type=int, default=TIMED_REPS, help="timed calls per measurement (the best is kept)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps must be at least 1; got {args.reps}")
    torch.set_num_threads(args.threads)
    out: dict = {"threads": args.threads, "read_gbs": read_bandwidth(args.mib), "streamed": {}, "per_call": {},
                 "int8": {}, "int8_blocks": {}, "int4": {}, "few_rows": {}}
    with torch.inference_mode():
        for dname, dtype in DTYPES.items():
            for name, n, k in SHAPES:
                out["streamed"][f"{dname} {name} [{n}x{k}]"] = streamed(n, k, dtype, args.mib, args.reps)
                out["int8"][f"int8, {dname} x: {name} [{n}x{k}]"] = streamed_int8(n, k, dtype, args.mib, args.reps)
            for n in SMALL:
                out["per_call"][f"{dname} {n}x{n}"] = per_call(n, dtype, args.reps)
            for name, n, k in FEW_ROWS_SHAPES:
                for rows in FEW_ROWS:
                    out["few_rows"][f"{dname} x{rows}: {name} [{n}x{k}]"] = few_rows(n, k, dtype, rows, args.mib // 4,
                                                                                     args.reps)
            for name, n, k in INT4_SHAPES:
                for rows in INT8_BLOCK_ROWS:
                    out["int8_blocks"][f"int8, {dname} x{rows}: {name} [{n}x{k}]"] = streamed_int8_block(
                        n, k, dtype, rows, args.mib // 2, args.reps)
                for rows in INT4_ROWS:
                    out["int4"][f"int4, {dname} x{rows}: {name} [{n}x{k}]"] = streamed_int4(n, k, dtype, rows,
                                                                                              args.mib // 2, args.reps)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    bw = out["read_gbs"]
    na = "n/a"
    print(f"threads {args.threads}; read bandwidth (sum over {args.mib} MiB): {bw:.1f} GB/s; "
          f"native kernel: {native.status()}")
    print(f"\n{'weights streamed once per pass':40s} {'plain GB/s':>10s} {'packed GB/s':>11s} "
          f"{'packed/bw':>9s} {'packed/plain':>12s} {'native GB/s':>11s} {'native/bw':>9s} {'native/plain':>12s}")
    for name, r in out["streamed"].items():
        cols = ""
        for key in ("packed_gbs", "native_gbs"):
            p = r.get(key)
            cols += (f" {p:11.1f} {p / bw:9.2f} {p / r['plain_gbs']:12.2f}" if p is not None
                     else f" {na:>11s} {na:>9s} {na:>12s}")
        print(f"{name:40s} {r['plain_gbs']:10.1f}{cols}")
    _print_torch_vs_native("int8 weights + row scales, streamed", out["int8"], bw, 40, 1)
    _print_torch_vs_native("int8 prefill blocks (GB/s of int8 bytes)", out["int8_blocks"], bw, 48, 2)
    _print_torch_vs_native("int4 weights + scale per 128, streamed", out["int4"], bw, 48, 2)
    _print_torch_vs_native("few-row blocks, plain weights (GB/s of weights)", out["few_rows"], bw, 48, 2)
    takes = {name: r["engine_takes"] for name, r in out["few_rows"].items() if "engine_takes" in r}
    if takes:
        print("the engine takes: " + "; ".join(f"{name}: {who}" for name, who in takes.items()))
    print(f"torch's bf16 GEMMs use AMX tiles: {native.torch_bf16_gemm_uses_amx()}")
    print(f"\n{'one matrix in cache, per call':40s} {'KiB':>6s} {'plain us':>9s} {'packed us':>10s} {'native us':>10s}")
    for name, r in out["per_call"].items():
        cols = "".join(f" {r[key]:10.1f}" if key in r else f" {na:>10s}" for key in ("packed_us", "native_us"))
        print(f"{name:40s} {r['kib']:6d} {r['plain_us']:9.1f}{cols}")
    print(f"\nengine.kernels.native.BIND_MIN_BYTES = {native.BIND_MIN_BYTES // 1024} KiB (smaller matrices stay on "
          "torch's F.linear: in cache, its fixed cost per call is lower)")
    print(f"engine.kernels.ONEDNN_FP32_MIN_BYTES = {ONEDNN_FP32_MIN_BYTES / 2**20:.0f} MiB (without the native "
          "kernel, fp32 matrices below it stay on the plain path; bf16 ones are packed where oneDNN supports bf16)")
    missing = [d for d, t in DTYPES.items() if not onednn_packing_available(t)]
    if missing:
        print(f"n/a: this CPU / torch build has no oneDNN packing for {', '.join(missing)}; "
              "the engine runs those weights through torch's plain path here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
