"""Cost of one real-shape talker step on this CPU with random weights (no checkpoint needed).

    python bench/tts_step_cost.py [--layers 2] [--reps 3] [--dtype fp32|bf16] [--json]

One talker step = the Qwen2 LLM's 1-token decode (896 wide, 24 layers, 14/2 heads, MLP 4864, over a
300-token cache) + the CFM loop (10 steps x a CFG batch of 2 through the DiT, 1024 wide, 28 layers,
16 heads, over 37 tokens) + the aggregator (1152 wide, 28 layers, 16 heads, over 5 tokens) + the stop
head. To bound the time, each stack is built with `--layers` layers (not the real depth), timed, and
the per-layer cost is extrapolated linearly to the real depth:

    full = outside + real_depth * (t(L) - t(1)) / (L - 1)        (L = --layers, t(1) measured too)

where `outside` = t(1) - per_layer. One step produces 4 latents = 0.32 s of 44.1 kHz audio, so
RTF = step seconds / 0.32 (the VAE decoder is left out: its real size is not published).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.models.talker.backbone import Qwen2Backbone, StaticKVCache  # noqa: E402
from engine.models.talker.cfm import CFM  # noqa: E402
from engine.models.talker.config import DiTConfig, Qwen2BackboneConfig  # noqa: E402
from engine.models.talker.dit import DiT, Aggregator  # noqa: E402

LLM = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
           rope_theta=1e6, vocab_size=1024, rms_norm_eps=1e-6)
LLM_DEPTH, DIT_DEPTH, AGG_DEPTH = 24, 28, 28
CACHE_TOKENS = 300
PATCH_SECONDS = 4 * 4 * 882 / 44100


def _init(module: torch.nn.Module, dtype) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    for p in module.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) / max(1, p.shape[-1]) ** 0.5)
    return module.to(dtype).eval()


def _time(fn, reps: int) -> float:
    """Fastest of `reps` runs after a warm-up (the minimum is the figure least disturbed by other load)."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def llm_step(layers: int, dtype, reps: int) -> float:
    cfg = Qwen2BackboneConfig.from_dict({**LLM, "num_hidden_layers": layers}, "bench")
    model = _init(Qwen2Backbone(cfg), dtype)
    cache = StaticKVCache(cfg, 2048, 1, dtype, "cpu")
    with torch.inference_mode():
        model(torch.randn(1, CACHE_TOKENS, cfg.hidden_size, dtype=dtype), cache)
        x = torch.randn(1, 1, cfg.hidden_size, dtype=dtype)

        def step():
            model(x, cache)
            cache.length -= 1  # stay at the same cache length
        return _time(step, reps)


def cfm_loop(layers: int, dtype, reps: int) -> float:
    cfg = DiTConfig(64, 1024, layers, 16, 4.0, llm_cond_dim=896)
    cfm = CFM(_init(DiT(cfg), dtype), steps=10)
    h = torch.randn(1, 1, 896, dtype=dtype)
    his, y0, sde = (torch.randn(1, 32, 64, dtype=dtype), torch.randn(1, 4, 64, dtype=dtype),
                    torch.randn(10, 1, 4, 64, dtype=dtype))
    with torch.inference_mode():
        return _time(lambda: cfm.sample(h, his, y0, sde, 2.0, 0.0), reps)


def aggregator(layers: int, dtype, reps: int) -> float:
    agg = _init(Aggregator(DiTConfig(64, 1152, layers, 16, 4.0), 896), dtype)
    x = torch.randn(1, 4, 64, dtype=dtype)
    with torch.inference_mode():
        return _time(lambda: agg(x), reps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3, help="layers actually built per stack (>= 2)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    n = max(2, args.layers)
    rows = {}
    for name, fn, depth in (("llm_step", llm_step, LLM_DEPTH), ("cfm_10_steps_cfg", cfm_loop, DIT_DEPTH),
                            ("aggregator", aggregator, AGG_DEPTH)):
        one, many = fn(1, dtype, args.reps), fn(n, dtype, args.reps)
        per_layer = max(0.0, (many - one) / (n - 1))
        rows[name] = {"t_1_layer_ms": 1000 * one, f"t_{n}_layers_ms": 1000 * many, "per_layer_ms": 1000 * per_layer,
                      "real_depth": depth, "extrapolated_ms": 1000 * (one - per_layer + depth * per_layer)}
    step_ms = sum(r["extrapolated_ms"] for r in rows.values())
    out = {"dtype": args.dtype, "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "layers_built": n, "stacks": rows,
           "step_ms": step_ms, "audio_per_step_s": PATCH_SECONDS, "rtf": step_ms / 1000 / PATCH_SECONDS}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"real-shape talker step on CPU ({args.dtype}, {out['threads']} threads, load average "
          f"{out['load_average']:.1f}), stacks built with 1 and {n} layers, fastest of {args.reps}")
    print(f"{'part':20s} {'1 layer ms':>11s} {f'{n} layers ms':>12s} {'ms/layer':>9s} {'depth':>6s} {'full ms':>9s} {'share':>6s}")
    for name, r in rows.items():
        print(f"{name:20s} {r['t_1_layer_ms']:11.1f} {r[f't_{n}_layers_ms']:12.1f} {r['per_layer_ms']:9.2f} "
              f"{r['real_depth']:6d} {r['extrapolated_ms']:9.1f} {r['extrapolated_ms'] / step_ms:6.1%}")
    print(f"one step (4 latents = {PATCH_SECONDS:.2f} s of audio): {step_ms:.0f} ms -> RTF {out['rtf']:.2f} "
          "(VAE decode not included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
