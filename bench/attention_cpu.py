"""The CPU decode attention (one token, one sequence) at the real Ming shape and long contexts: the native kernel
(engine.kernels.native.AttentionDecode: the attention half of a decoder layer in one call) against the same math
in torch's ops, and the bytes it reads (projections + the KV cache) against this machine's read bandwidth.

    python bench/attention_cpu.py [--contexts 1024,8192] [--dtype bf16|fp32] [--linears int8|plain]
                                  [--layers 4] [--repeats 5] [--threads 2] [--json]

Defaults: hidden 4 096, 32 query heads on 4 KV heads of 128, rotary 64 (Ming-flash-omni 2.0's attention), int8
projections with per-row scales (the no-GPU format), a bf16 cache. `--layers` copies of the weights and caches
are called in turn, so that they do not all sit in the last-level cache. The two paths alternate; medians of
`--repeats`. Also printed: the largest difference between the two outputs relative to the largest value.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.moe_layer_cpu import measure_bandwidth  # noqa: E402
from engine.kernels import apply_rotary_reference, native, rms_norm_reference  # noqa: E402
from engine.kernels.dequant import quantize_int8_rows  # noqa: E402

EPS = 1e-6


def make_layer(gen: torch.Generator, args, ctx: int, dtype: torch.dtype) -> dict:
    h, nh, nkv, hd = args.hidden, args.heads, args.kv_heads, args.head_dim
    norm = lambda n: (torch.rand(n, generator=gen) + 0.5).to(dtype)  # noqa: E731
    qkv = torch.randn((nh + 2 * nkv) * hd, h, generator=gen) * h ** -0.5
    o = torch.randn(h, nh * hd, generator=gen) * (nh * hd) ** -0.5
    layer = {"in_norm": norm(h), "post_norm": norm(h), "q_norm": norm(hd), "k_norm": norm(hd),
             "k": torch.randn(1, nkv, ctx + 1, hd, generator=gen).to(dtype),
             "v": torch.randn(1, nkv, ctx + 1, hd, generator=gen).to(dtype)}
    if args.linears == "int8":
        (q8, qs), (o8, os_) = quantize_int8_rows(qkv), quantize_int8_rows(o)
        proj = {"qkv": q8, "o": o8, "qkv_scale": qs, "o_scale": os_}
        qkv, o = q8 * qs[:, None], o8 * os_[:, None]  # torch's path: the same weights, dequantised
    else:
        proj = {"qkv": qkv.to(dtype), "o": o.to(dtype)}
    layer["qkv_w"], layer["o_w"] = qkv.to(dtype), o.to(dtype)
    layer["native"] = native.AttentionDecode(
        input_norm=layer["in_norm"], post_norm=layer["post_norm"], eps=EPS, q_norm=layer["q_norm"],
        k_norm=layer["k_norm"], head_eps=EPS, n_heads=nh, n_kv=nkv, head_dim=hd, rotary_dim=args.rotary, **proj)
    layer["bytes"] = sum(t.numel() * t.element_size() for t in proj.values()) + 2 * nkv * (ctx + 1) * hd * (
        2 if dtype == torch.bfloat16 else 4)
    return layer


def torch_path(layer: dict, x, residual, cos, sin, slot: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The same attention half in torch's ops (norms, projections, rotary, the cache write, SDPA with grouped
    queries)."""
    nh, nkv, hd = args.heads, args.kv_heads, args.head_dim
    h, res = rms_norm_reference(x, layer["in_norm"], EPS, residual)
    q, k, v = F.linear(h, layer["qkv_w"]).view(1, 1, nh + 2 * nkv, hd).split([nh, nkv, nkv], dim=2)
    q = apply_rotary_reference(rms_norm_reference(q, layer["q_norm"], EPS).transpose(1, 2), cos, sin)
    k = apply_rotary_reference(rms_norm_reference(k, layer["k_norm"], EPS).transpose(1, 2), cos, sin)
    layer["k"][:, :, slot:slot + 1], layer["v"][:, :, slot:slot + 1] = k, v.transpose(1, 2)
    att = F.scaled_dot_product_attention(q, layer["k"][:, :, :slot + 1], layer["v"][:, :, :slot + 1], enable_gqa=True)
    return rms_norm_reference(F.linear(att.transpose(1, 2).reshape(1, 1, nh * hd), layer["o_w"]), layer["post_norm"],
                              EPS, res)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    bandwidth = measure_bandwidth()
    rows = []
    for ctx in args.contexts:
        gen = torch.Generator().manual_seed(ctx)
        layers = [make_layer(gen, args, ctx, dtype) for _ in range(args.layers)]
        x, residual = (torch.randn(1, 1, args.hidden, generator=gen).to(dtype) for _ in range(2))
        angles = torch.rand(1, 1, args.rotary // 2, generator=gen) * 50
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        paths = {"native": lambda ly: ly["native"](x, residual, cos, sin, ly["k"], ly["v"], ctx),
                 "torch": lambda ly: torch_path(ly, x, residual, cos.to(dtype), sin.to(dtype), ctx, args)}
        outs = {name: call(layers[0]) for name, call in paths.items()}
        scale = float(outs["torch"][0].float().abs().max())
        diff = float((outs["native"][0].float() - outs["torch"][0].float()).abs().max()) / scale
        times: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(args.repeats):
            for name in (paths if r % 2 == 0 else list(paths)[::-1]):
                start = time.perf_counter()
                for layer in layers:
                    paths[name](layer)
                times[name].append((time.perf_counter() - start) / len(layers))
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        nbytes = layers[0]["bytes"]
        rows.append({"context": ctx, "native_ms": ms["native"], "torch_ms": ms["torch"],
                     "speedup": ms["torch"] / ms["native"], "mb_per_layer": nbytes / 1e6,
                     "native_gb_s": nbytes / ms["native"] / 1e6, "roofline": nbytes / ms["native"] / 1e6 / bandwidth,
                     "max_rel_diff": diff})
    return {"bench": "attention_cpu", "dtype": args.dtype, "linears": args.linears, "threads": args.threads,
            "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
            "layers": args.layers, "read_gb_s": bandwidth, "native": native.status(), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=lambda s: [int(c) for c in s.split(",")], default=[1024, 8192])
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--linears", choices=("int8", "plain"), default="int8")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rotary", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not native.available():
        raise SystemExit(f"the native kernels are not available here: {native.status()}")
    out = run(args)
    if args.json:
        print(json.dumps(out))
        return
    print(f"decode attention on CPU: hidden {args.hidden}, {args.heads} heads on {args.kv_heads} KV heads of "
          f"{args.head_dim}, {args.linears} projections, {args.dtype} cache, {args.threads} threads; "
          f"read bandwidth {out['read_gb_s']:.1f} GB/s")
    print(f"{'context':>8} {'native ms':>10} {'torch ms':>9} {'speedup':>8} {'MB/layer':>9} {'GB/s':>6} "
          f"{'roofline':>8} {'max rel diff':>12}")
    for r in out["rows"]:
        print(f"{r['context']:>8} {r['native_ms']:>10.2f} {r['torch_ms']:>9.2f} {r['speedup']:>8.2f} "
              f"{r['mb_per_layer']:>9.1f} {r['native_gb_s']:>6.1f} {r['roofline']:>8.2f} {r['max_rel_diff']:>12.2e}")
    print("native ms / torch ms: per layer, one token attending to every cached slot; roofline: the bytes the layer "
          "reads (projections + KV cache) per native call / the read bandwidth")


if __name__ == "__main__":
    main()
