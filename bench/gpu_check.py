"""Checks of the CUDA paths on a real GPU: Triton kernels, the engine end to end, the expert runtime.

    python bench/gpu_check.py [--only kernels,engine,runtime,graphs] [--json]

Needs a CUDA GPU (prints why and exits 2 without one); exits 1 when a check fails. What it checks:

* kernels: the Triton MoE, RMSNorm (+residual) and rotary kernels compiled for the GPU (not the
  interpreter) against an fp64 oracle, by relative error ``|out - ref| / |ref|`` (fp32 ≤ 1e-5,
  fp16 ≤ 2e-3, bf16 ≤ 1e-2), in fp32, fp16 and bf16, over shapes with an expert that gets no token,
  single tokens, sizes that are not multiples of the tiles, and the real Ming-flash expert shape;
  outputs are poisoned with NaN first so an unwritten element fails.
* engine: the tiny checkpoint on CUDA in fp32 (Triton kernels) against the CPU in fp32 (torch
  reference): prefill logits difference and greedy tokens; and on CUDA with the kernels forced to the
  torch reference (``MING_KERNELS_FORCE_REFERENCE``) against the Triton ones. bf16 decode tokens/s.
* runtime: the tiny model with its routed experts split between the GPU and pinned host memory
  computed by the CPU (hot cache and fetches on), against the same model with every expert on the GPU.
* graphs: the decode step replayed from CUDA graphs (engine.decode_graphs) against the same step run
  eagerly: greedy tokens identical over 300 steps (crossing window buckets) in bf16 and fp32; host
  syncs per step (0 expected, engine.tools.host_sync), kernels per step (torch.profiler) and decode
  tokens/s with and without the graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
results: list[dict] = []


def record(group: str, name: str, ok: bool, **figures) -> None:
    row = {"group": group, "check": name, "ok": bool(ok), **figures}
    results.append(row)
    print(json.dumps(row, default=str), file=sys.stderr, flush=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------ kernels

def check_moe(dtype: torch.dtype) -> None:
    from engine.kernels.moe import moe_experts_reference
    from engine.kernels.triton_impl.moe import moe_experts_triton

    gen = torch.Generator().manual_seed(1)
    # (tokens, experts, top_k, hidden, inter, expert that receives no token)
    shapes = [(1, 8, 2, 64, 32, None), (7, 5, 2, 72, 40, 3), (33, 16, 4, 200, 136, 0), (300, 24, 6, 96, 80, 5),
              (1, 64, 8, 4096, 1024, None), (128, 64, 8, 4096, 1024, None)]
    for T, E, k, H, I, empty in shapes:
        x = torch.randn(T, H, generator=gen)
        w = [torch.randn(s, generator=gen) * s[-1] ** -0.5 for s in ((E, I, H), (E, I, H), (E, H, I))]
        scores = torch.rand(T, E, generator=gen)
        if empty is not None:
            scores[:, empty] = -1.0
        ids = scores.topk(k, dim=1).indices
        rw = torch.rand(T, k, generator=gen)
        rw = rw / rw.sum(1, keepdim=True)
        # fp64 oracle on the dtype-rounded inputs, on the GPU (only the experts in use are upcast)
        used, remap = torch.unique(ids, return_inverse=True)
        xd = x.to(dtype).double().cuda()
        wd = [t[used].to(dtype).double().cuda() for t in w]
        ref = moe_experts_reference(xd, *wd, remap.cuda(), rw.cuda())
        xs = x.to(dtype).cuda()
        ws = [t.to(dtype).cuda() for t in w]
        out = moe_experts_triton(xs, *ws, ids.cuda(), rw.cuda())
        torch.cuda.synchronize()
        err = rel_err(out, ref)
        same_dtype = rel_err(out, moe_experts_reference(xs, *ws, ids.cuda(), rw.cuda()))
        record("kernels", f"moe T={T} E={E} k={k} H={H} I={I} empty={empty} {DTYPE_NAMES[dtype]}",
               err <= TOLERANCE[dtype], rel_err_vs_fp64=err, rel_err_vs_torch_same_dtype=same_dtype,
               tolerance=TOLERANCE[dtype])


def check_rmsnorm(dtype: torch.dtype) -> None:
    from engine.kernels.triton_impl.rmsnorm import rms_norm_triton

    gen = torch.Generator().manual_seed(2)
    for shape in [(1, 4096), (37, 4096), (5, 100), (2, 3, 1000)]:
        x = torch.randn(shape, generator=gen)
        r = torch.randn(shape, generator=gen)
        w = 1 + 0.1 * torch.randn(shape[-1], generator=gen)
        xs, rs, ws = (t.to(dtype) for t in (x, r, w))
        for with_residual in (False, True):
            h = xs.double() + (rs.double() if with_residual else 0)
            ref = ws.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            got = rms_norm_triton(xs.cuda(), ws.cuda(), 1e-6, rs.cuda() if with_residual else None)
            y = got[0] if with_residual else got
            err = rel_err(y, ref)
            ok = err <= TOLERANCE[dtype]
            figures = {"rel_err_vs_fp64": err}
            if with_residual:
                figures["residual_rel_err"] = rel_err(got[1], h)
                ok = ok and figures["residual_rel_err"] <= TOLERANCE[dtype]
            record("kernels", f"rmsnorm {shape} residual={with_residual} {DTYPE_NAMES[dtype]}", ok, **figures)


def check_rotary(dtype: torch.dtype) -> None:
    from engine.kernels.triton_impl.rotary import apply_rotary_triton

    gen = torch.Generator().manual_seed(3)
    for (B, heads, L, D, rot) in [(1, 32, 1, 128, 64), (2, 4, 37, 128, 64), (1, 3, 5, 24, 16), (2, 2, 9, 64, 64)]:
        x = torch.randn(B, heads, L, D, generator=gen).to(dtype)
        ang = torch.rand(B, L, rot // 2, generator=gen) * 20 - 10
        ang = torch.cat((ang, ang), -1)
        cos, sin = ang.cos(), ang.sin()
        xd, c, s = x.double(), cos.double()[:, None].to(dtype).double(), sin.double()[:, None].to(dtype).double()
        half = rot // 2
        xr = xd[..., :rot]
        rotated = xr * c + torch.cat((-xr[..., half:], xr[..., :half]), -1) * s
        ref = torch.cat((rotated, xd[..., rot:]), -1)
        out = apply_rotary_triton(x.cuda(), cos.cuda(), sin.cuda())
        err = rel_err(out, ref)
        record("kernels", f"rotary B={B} heads={heads} L={L} D={D} rot={rot} {DTYPE_NAMES[dtype]}",
               err <= TOLERANCE[dtype], rel_err_vs_fp64=err)


# ------------------------------------------------------------------------------------------------ engine

def _prefill_logits(engine, text: str) -> torch.Tensor:
    from engine.models.thinker.positions import PositionTokens, rope_index

    model = engine.model
    ids = engine.tokenizer.encode_plain(text)
    with torch.inference_mode():
        t = torch.tensor([ids], device=model.device)
        pos, deltas = rope_index(t, PositionTokens.from_config(model.config.llm))
        emb, im, am = model.llm.prepare_inputs(t, None)
        return model.llm(emb, pos, model.numerics, None, None, im, am).float().cpu()


def _greedy(engine, n: int) -> tuple[list[int], float]:
    from engine.events import Done
    from engine.sampling import GenerationParams

    msgs = [{"role": "user", "content": "Tell me about the Ming dynasty in a few sentences."}]
    done = [e for e in engine.chat(msgs, GenerationParams(max_new_tokens=n, temperature=0.0)) if isinstance(e, Done)][0]
    return list(done.token_ids), done.stats.decode_tokens_per_s


def check_engine(tiny: Path) -> None:
    from engine.runtime import Engine

    # Decode speed first: a CPU engine loaded in the same process sets torch's CPU thread count to 1.
    bf = Engine.load(tiny, device="cuda")  # bf16 by default on GPU
    _greedy(bf, 64)  # warm-up: Triton compiles a kernel variant per new argument specialisation
    toks, tps = _greedy(bf, 64)
    record("engine", "tiny bf16 cuda greedy decode", len(toks) > 0, decode_tokens_per_s=tps, new_tokens=len(toks))
    text = "The Ming dynasty ruled China from 1368 to 1644. " * 4
    cpu = Engine.load(tiny, dtype="fp32", device="cpu")
    gpu = Engine.load(tiny, dtype="fp32", device="cuda")
    lc, lg = _prefill_logits(cpu, text), _prefill_logits(gpu, text)
    diff = float((lc - lg).abs().max())
    record("engine", "tiny fp32 prefill logits cuda(triton) vs cpu(torch)", diff < 1e-3, max_abs_diff=diff,
           tokens=lc.shape[1])
    tc, _ = _greedy(cpu, 48)
    tg, _ = _greedy(gpu, 48)
    first = next((i for i, (a, b) in enumerate(zip(tc, tg)) if a != b), None)
    record("engine", "tiny fp32 greedy tokens cuda vs cpu", first is None or first >= 16,
           equal=tc == tg, first_difference=first, n=len(tc))
    os.environ["MING_KERNELS_FORCE_REFERENCE"] = "1"
    try:
        lr = _prefill_logits(gpu, text)
    finally:
        del os.environ["MING_KERNELS_FORCE_REFERENCE"]
    diff = float((lr - lg).abs().max())
    record("engine", "tiny fp32 prefill logits cuda triton vs cuda torch reference", diff < 1e-3, max_abs_diff=diff)


def check_runtime(tiny: Path) -> None:
    from engine.models.thinker.config import MingConfig
    from engine.models.thinker.layers import Numerics
    from engine.placement.expert_runtime import CPU, DeviceMap, ExpertPlacement, RuntimeOptions
    from engine.models.thinker.positions import PositionTokens, rope_index
    from engine.models.thinker.model import load_model

    cfg = MingConfig.from_file(tiny)
    moe = [i for i in range(cfg.llm.num_hidden_layers) if cfg.llm.is_moe_layer(i)]
    slots = {l: tuple(CPU if e % 2 else 0 for e in range(cfg.llm.num_experts)) for l in moe}
    plain = load_model(tiny, dtype="fp32", device="cuda")
    for mode in ("auto", "off"):
        placed = load_model(tiny, dtype="fp32", device="cuda", plan=ExpertPlacement(slots, {l: 0 for l in moe}),
                            runtime_options=RuntimeOptions(device_map=DeviceMap.cuda(1), cache_capacity=4,
                                                           fetch_threshold=2, fused_gpu_experts=mode))
        rt = placed.moe_runtime
        host = [w for lr in rt.layers.values() for w, s in zip(lr.experts, lr.slots) if s == CPU]
        pinned = bool(host) and all(t.is_pinned() for w in host for t in w.tensors())
        fused = sum(len(lr.fused) for lr in rt.layers.values())
        gen = torch.Generator().manual_seed(5)
        num = Numerics()
        diffs = []
        with torch.inference_mode():
            for n in (1, 3, 40):
                ids = torch.randint(10, cfg.llm.vocab_size, (1, n), generator=gen)
                pos, _ = rope_index(ids, PositionTokens.from_config(plain.llm.config))
                a = plain.llm(plain.llm.model.embed(ids.cuda()), pos.cuda(), num)
                b = placed.llm(placed.llm.model.embed(ids.cuda()), pos.cuda(), num)
                diffs.append(float((a - b).abs().max()))
        st = rt.stats
        record("runtime", f"tiny fp32: experts split GPU / pinned host (CPU), cache+fetch, fused={mode}, vs all on GPU",
               max(diffs) < 1e-4 and "cpu" in st.tokens and "gpu0" in st.tokens and pinned
               and (fused > 0) == (mode == "auto"),
               max_abs_diff=max(diffs), tokens=dict(st.tokens), cache_hits=st.cache_hits, fetches=st.fetches,
               transient_fetches=st.transient_fetches, host_experts_pinned=pinned, fused_slots=fused)


def _greedy_ids(engine, n: int, cuda_graphs: bool) -> tuple[list[int], float]:
    from engine.events import Done
    from engine.generate import generate
    from engine.sampling import GenerationParams

    prompt = engine.processor.build([{"role": "user", "content": "Tell me about the Ming dynasty."}]).ids
    events = list(generate(engine.model, engine.tokenizer, prompt, GenerationParams(max_new_tokens=n),
                           eos_ids=set(), cuda_graphs=cuda_graphs))
    done = events[-1]
    if not isinstance(done, Done):
        raise RuntimeError(done.message)
    return list(done.token_ids), done.stats.decode_tokens_per_s


def _step_figures(engine, graphs_on: bool) -> dict:
    """Host syncs and CUDA kernels of one decode step (step + sampling + feeding the next input)."""
    from torch.profiler import ProfilerActivity, profile

    from engine.decode_graphs import decode_graphs_for
    from engine.generate import DecodeStep, prefill
    from engine.models.thinker.positions import PositionTokens, rope_index
    from engine.sampling import GenerationParams, Sampler
    from engine.tools.host_sync import HostSyncCounter

    llm, num = engine.model.llm, engine.model.numerics
    graphs = decode_graphs_for(llm, num) if graphs_on else None
    with torch.inference_mode():
        ids = torch.arange(20, 84, device="cuda").view(1, -1)
        pos, deltas = rope_index(ids, PositionTokens.from_config(llm.config))
        cache = graphs.acquire(1) if graphs is not None else llm.new_cache(1, num, "cuda", capacity=512)
        cache.rope_deltas = deltas
        pre = prefill(llm, num, cache, llm.model.embed(ids), pos)
        step = DecodeStep(llm, num, cache, graphs)
        sampler = Sampler(GenerationParams(), llm.config.vocab_size, 1, "cuda")
        step.feed(sampler(pre.logits))
        for _ in range(3):  # warm-up (and capture)
            step.feed(sampler(step.step()))
        torch.cuda.synchronize()
        with HostSyncCounter() as c:
            for _ in range(10):
                step.feed(sampler(step.step()))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step.feed(sampler(step.step()))
            torch.cuda.synchronize()
    kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
                  and not e.key.startswith(("Memcpy", "Memset")))
    return {"host_syncs_per_step": c.count.total / 10, "syncs": dict(c.count.syncs),
            "dispatched_ops_per_step": c.count.ops / 10, "cuda_kernels_per_step": kernels / 10}


def check_graphs(tiny: Path) -> None:
    from engine import decode_graphs
    from engine.runtime import Engine

    for dtype in ("bf16", "fp32"):
        engine = Engine.load(tiny, dtype=dtype, device="cuda", placement="single")
        blockers = decode_graphs.graph_blockers(engine.model.llm)
        g = decode_graphs.decode_graphs_for(engine.model.llm, engine.model.numerics)
        _greedy_ids(engine, 16, True)  # warm-up: Triton compiles, first capture
        graphed, tps_graph = _greedy_ids(engine, 300, True)
        if g is not None:
            g.replay = False  # the very same step (static cache, window buckets, masks), launched eagerly
        same_step, tps_same = _greedy_ids(engine, 300, True)
        if g is not None:
            g.replay = True
        plain, tps_plain = _greedy_ids(engine, 300, False)  # the eager loop (growing cache, exact windows)
        first = next((i for i, (a, b) in enumerate(zip(same_step, graphed)) if a != b), None)
        first_plain = next((i for i, (a, b) in enumerate(zip(plain, graphed)) if a != b), None)
        record("graphs", f"tiny {dtype}: greedy tokens, CUDA graph replays vs the same step launched eagerly",
               not blockers and same_step == graphed, blockers=blockers, first_difference=first, n=len(graphed),
               captures=g.captures if g else 0, first_difference_vs_plain_eager_loop=first_plain,
               decode_tokens_per_s_graphs=tps_graph, decode_tokens_per_s_same_step_eager=tps_same,
               decode_tokens_per_s_plain_eager=tps_plain)
        if dtype == "bf16":
            for on in (False, True):
                f = _step_figures(engine, on)
                record("graphs", f"tiny bf16 decode step, graphs={'on' if on else 'off'}: host syncs and kernels",
                       f["host_syncs_per_step"] == 0, **f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated groups to check: kernels, engine, runtime, graphs")
    args = ap.parse_args(argv)
    groups = set((args.only or "kernels,engine,runtime,graphs").split(","))
    if not groups <= {"kernels", "engine", "runtime", "graphs"}:
        ap.error(f"--only takes kernels, engine, runtime, graphs; got {args.only!r}")
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(),
           "capability": torch.cuda.get_device_capability()}
    print(json.dumps(env), file=sys.stderr)
    from engine.tiny import ensure_tiny_checkpoint

    tiny = ensure_tiny_checkpoint(tempfile.mkdtemp(prefix="ming-gpu-check-"))
    steps = [(f"{fn.__name__} {DTYPE_NAMES[dt]}", fn, (dt,)) for dt in TOLERANCE for fn in (check_moe, check_rmsnorm, check_rotary)
             if "kernels" in groups]
    steps += [(f"check_{g}", fn, (tiny,)) for g, fn in (("engine", check_engine), ("runtime", check_runtime),
                                                          ("graphs", check_graphs)) if g in groups]
    for name, fn, a in steps:
        t0 = time.perf_counter()
        try:
            fn(*a)
        except Exception as e:  # one broken check must not hide the others
            import traceback

            traceback.print_exc()
            record(name.split()[0], name, False, error=f"{type(e).__name__}: {e}")
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    bad = [r for r in results if not r["ok"]]
    if args.json:
        print(json.dumps({"env": env, "results": results}, default=str))
    else:
        print(f"{env['gpu']} (capability {env['capability']}), torch {env['torch']}, triton {env['triton']}")
        for r in results:
            figs = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items() if k not in ("group", "check", "ok")}
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['group']:8s} {r['check']}  {figs}")
        print(f"\n{len(results) - len(bad)} ok, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
