"""Compile every variant of the fused MoE kernels for a CUDA architecture on a machine without a GPU.

    python bench/moe_compile_check.py [--arch 90] [--max-spill-bytes 0] [--json]

The CPU tests run the kernels under the Triton interpreter, which executes them as Python and skips
what only the compiler checks (e.g. that globals read inside ``@triton.jit`` code are constexpr).
This compiles each kernel (gate/up and down; sorted and direct modes) for plain bf16 weights and for
every quantised storage (fp8 per channel and in blocks, int8, int4) through Triton's own toolchain (TTIR -> PTX -> cubin with the
bundled ptxas), so code-generation errors of the CUDA path show up without a GPU. Each storage is compiled
with the launch configuration it gets at every batch range (moe.launch_config: sorted, direct, the larger
tiles), and ptxas reports the registers and the bytes spilled to local memory per thread: a quantised variant
that spills fails (what made the in-kernel int4 path 20-50x slower than bf16 on an H200; bf16's tiles were
timed on an H100 and are reported only). It checks that the
kernels compile and fit, not what they compute or how fast (bench/gpu_check.py and bench/moe_layer_gpu.py do
that on a GPU).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # read when @triton.jit decorates: must be unset before the import
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from engine.kernels.triton_impl import moe  # noqa: E402

WARP_SIZE = 32
# (QUANT mode, weight element type, scale element type) as _run passes them
STORAGES = {"bf16": (moe.QUANT_NONE, "bf16", "bf16"), "fp8": (moe.QUANT_CHANNEL, "fp8e4nv", "fp32"),
            "fp8-block": (moe.QUANT_BLOCK, "fp8e4nv", "fp32"), "int8": (moe.QUANT_CHANNEL, "i8", "fp32"),
            "int4": (moe.QUANT_INT4, "u8", "fp32")}
POINTERS = {"x_ptr": "act", "h_ptr": "act", "w_gate_ptr": "w", "w_up_ptr": "w", "w_down_ptr": "w", "s_gate_ptr": "s",
            "s_up_ptr": "s", "s_down_ptr": "s", "out_ptr": "fp32", "routing_weight_ptr": "fp32", "sorted_ptr": "i32",
            "block_expert_ptr": "i32", "ids_ptr": "i64", "shared_gate_ptr": "act", "shared_up_ptr": "act",
            "shared_down_ptr": "act"}
# Each storage compiled without the shared expert; plain weights also with it (the fused shared pass).
VARIANTS = [(storage, False) for storage in STORAGES] + [("bf16", True)]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def batch_ranges(quant: int) -> list[int]:
    """One assignment count inside each range of the storage's launch table (moe.launch_config's bounds)."""
    table = moe.QUANT_LAUNCH_CONFIGS.get(quant, moe.LAUNCH_CONFIGS)
    counts, low = [], 1
    for bound, _ in table:
        counts.append(low)
        low = int(bound) if bound != float("inf") else None
    return counts


def registers_and_spills(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill-store bytes per thread) that ptxas reports for the kernel in `ptx`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(PTXAS), "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", str(src),
                              "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas: {out.stderr[-300:]}")
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


REAL_GROUP_K = 128


def source(kernel, storage: str, direct: bool, cfg: moe.LaunchConfig, shared: bool = False) -> ASTSource:
    quant, w_type, s_type = STORAGES[storage]
    types = {"act": "bf16", "w": w_type, "s": s_type}
    # (the real shape's int4 groups and fp8 blocks are 128 columns: a tile of up to 128 lies in one)
    scale_per_tile = moe.scale_per_tile(quant, REAL_GROUP_K, cfg.block_k)
    consts = dict(QUANT=quant, SCALE_PER_TILE=scale_per_tile, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_IN_FP32=False,
                  DOT_PRECISION=None, EMULATE_BF16_RTNE=False, DIRECT=direct, HAS_SHARED=shared)
    params = list(inspect.signature(kernel.fn).parameters)
    signature, constexprs = {}, {}
    for i, name in enumerate(params):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        elif name in POINTERS:
            signature[name] = "*" + types.get(POINTERS[name], POINTERS[name])
        else:
            signature[name] = "i32"
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: Hopper)")
    ap.add_argument("--max-spill-bytes", type=int, default=0,
                    help="spill stores per thread a quantised storage's variant may have")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, WARP_SIZE)
    rows = []
    for storage, shared in VARIANTS:
        quant = STORAGES[storage][0]
        for n_assign in batch_ranges(quant):
            cfg = moe.launch_config(n_assign, quant)
            for kernel in (moe._gate_up_kernel, moe._down_kernel):
                t0 = time.perf_counter()
                regs = spill = None
                try:
                    compiled = triton.compile(source(kernel, storage, cfg.direct, cfg, shared), target=target,
                                              options={"num_warps": cfg.num_warps or 4, "num_stages": cfg.num_stages or 3})
                    regs, spill = registers_and_spills(compiled.asm["ptx"], args.arch)
                    # quantised storages' tiles were chosen to fit in registers: a spill fails them; bf16's were
                    # picked by timing on an H100 (moe.LAUNCH_CONFIGS), so their spills are reported, not failed
                    ok = "cubin" in compiled.asm and (quant == moe.QUANT_NONE or spill <= args.max_spill_bytes)
                    detail = f"{regs} registers, {spill} B spilled"
                except Exception as e:  # report every variant, then fail
                    ok, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
                rows.append({"kernel": kernel.fn.__name__, "storage": storage + ("+shared" if shared else ""),
                             "mode": "direct" if cfg.direct else "sorted", "from_assignments": n_assign,
                             "tiles": [cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages],
                             "registers": regs, "spill_bytes": spill,
                             "ok": ok, "seconds": time.perf_counter() - t0, "detail": detail})
                if not args.json:
                    r = rows[-1]
                    print(f"{r['kernel']:16s} {r['storage']:12s} {r['mode']:7s} T*k>={n_assign:<5} {str(r['tiles']):22s} "
                          f"{'ok' if ok else 'FAILED':6s} {r['seconds']:5.1f} s  {detail}")
    failed = sum(not r["ok"] for r in rows)
    if args.json:
        print(json.dumps({"arch": args.arch, "triton": triton.__version__, "rows": rows, "failed": failed}))
    else:
        print(f"sm_{args.arch}, triton {triton.__version__}: {len(rows) - failed} compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
