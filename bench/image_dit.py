"""Cost of one denoising step of the real-shape Z-Image DiT (6.15 B parameters: dim 3840, 30 layers,
2+2 refiners, 30 heads, caption width 2560) with random weights, batch 2 (CFG), 256 caption tokens.

    python bench/image_dit.py                     # CPU, 256², bounded: a few layers, extrapolated
    python bench/image_dit.py --device cuda --size 1024 [--compile] [--full]   # GPU, written for real

CPU (bounded): the full model does not fit this machine's memory budget or time, so a cut-down model
with the real widths (1 main layer, 1 noise + 1 context refiner) is run, each block timed by hooks,
and the 30 + 2 model is extrapolated linearly:
    t(30, 2) = t(rest) + 30·t(main layer) + 2·[t(noise refiner) + t(context refiner)]
(every main layer sees the same 512-token sequence, every refiner its own stream, so block costs are
additive). Fastest of `--runs` steps after a warm-up step (the machine is shared: the minimum is the
least disturbed figure). bf16 by default where the CPU computes bf16 natively (avx512_bf16 / AMX, as
oneDNN reports it; the real checkpoint is bf16), fp32 elsewhere: an AVX2-only CPU emulates bf16
matmuls ~50x slower than fp32 ones (the engine runs the image generator in fp32 on the CPU).

GPU (`--device cuda`): the full 30-layer model in bf16 (`--full`, default on CUDA), eager, and with
`--compile` diffusers' regional torch.compile of the repeated blocks; synchronised timings, plus the
real-shape VAE decode (FLUX VAE layout, 16 latent channels). Skipped with a message without CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kernels import onednn_packing_available  # noqa: E402

# The public Z-Image configuration (spec §8.5 table).
REAL = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
            n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
            t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
# FLUX-style image VAE (16 latent channels, 8x) for the GPU decode figure.
REAL_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
CAPTION_TOKENS = 256


def build(layers: int, refiners: int, dtype: torch.dtype, device: str):
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**{**REAL, "n_layers": layers, "n_refiner_layers": refiners})
    model = model.to(dtype).to_empty(device=device)  # allocate straight in the target dtype
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def inputs(size: int, dtype: torch.dtype, device: str):
    side = size // 8
    x = [torch.randn(16, 1, side, side, device=device, dtype=dtype) for _ in range(2)]
    cap = [torch.randn(CAPTION_TOKENS, REAL["cap_feat_dim"], device=device, dtype=dtype) for _ in range(2)]
    t = torch.full((2,), 0.5, device=device, dtype=dtype)
    return x, t, cap


def time_steps(model, args, runs: int, device: str) -> float:
    """Fastest of `runs` steps after a warm-up step (the least disturbed by other load)."""
    x, t, cap = inputs(args.size, model.dtype, device)
    times = []
    with torch.inference_mode():
        for i in range(runs + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x, t, cap, return_dict=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:  # the first step is a warm-up
                times.append(time.perf_counter() - t0)
    return min(times)


def full_params() -> int:
    from diffusers import ZImageTransformer2DModel
    with torch.device("meta"):
        return sum(p.numel() for p in ZImageTransformer2DModel(**REAL).parameters())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latent side = size/8)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                    help="default: bf16 on CUDA and on CPUs with native bf16, fp32 on other CPUs")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="time the whole 30-layer model (default on CUDA)")
    ap.add_argument("--compile", action="store_true", help="CUDA: also time diffusers' regional torch.compile")
    ap.add_argument("--steps", type=int, default=30, help="steps per image for the per-image estimate")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if args.dtype is None:
        args.dtype = "bf16" if cuda or onednn_packing_available(torch.bfloat16) else "fp32"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if cuda and not torch.cuda.is_available():
        print("CUDA is not available here: run the CPU variant (no --device) instead", file=sys.stderr)
        return 2
    out: dict = {"device": args.device if not cuda else torch.cuda.get_device_name(), "dtype": args.dtype,
                 "size": args.size, "image_tokens": (args.size // 16) ** 2, "caption_tokens": CAPTION_TOKENS,
                 "batch": 2, "threads": torch.get_num_threads(), "full_params": full_params()}
    if args.full or cuda:
        model = build(REAL["n_layers"], REAL["n_refiner_layers"], dtype, args.device)
        out["step_s_eager"] = time_steps(model, args, args.runs, args.device)
        if args.compile:
            if not cuda:
                print("--compile is for CUDA devices", file=sys.stderr)
                return 2
            model.compile_repeated_blocks(fullgraph=True)
            time_steps(model, args, 1, args.device)  # compile
            out["step_s_compiled"] = time_steps(model, args, args.runs, args.device)
        del model
        if cuda:
            from diffusers import AutoencoderKL
            torch.cuda.empty_cache()
            with torch.device("meta"):
                vae = AutoencoderKL(**REAL_VAE)
            vae = vae.to(dtype).to_empty(device=args.device).eval()
            with torch.no_grad():
                for p in vae.parameters():
                    p.normal_(0.0, 0.02)
            z = torch.randn(1, 16, args.size // 8, args.size // 8, device=args.device, dtype=dtype)
            with torch.inference_mode():
                vae.decode(z)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                vae.decode(z)
                torch.cuda.synchronize()
            out["vae_decode_s"] = time.perf_counter() - t0
    else:
        # One cut-down model (1 main layer, 1 refiner pair); every block is timed by hooks in the same
        # steps, so the extrapolation is not at the mercy of the machine's load between models.
        model = build(1, 1, dtype, args.device)
        blocks = {"main_layer": model.layers[0], "noise_refiner": model.noise_refiner[0],
                  "context_refiner": model.context_refiner[0]}
        seen: dict[str, list[float]] = {k: [] for k in blocks}
        starts: dict[str, float] = {}
        for name, block in blocks.items():
            block.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter()))
            block.register_forward_hook(lambda m, a, o, n=name: seen[n].append(time.perf_counter() - starts[n]))
        out["step_s_L1_R1"] = time_steps(model, args, args.runs, args.device)
        per = {k: min(v[1:]) for k, v in seen.items()}  # [0] is the warm-up step
        out.update({f"{k}_s": v for k, v in per.items()})
        rest = out["step_s_L1_R1"] - sum(per.values())
        out["embed_final_other_s"] = rest
        out["step_s_eager"] = (rest + REAL["n_layers"] * per["main_layer"]
                               + REAL["n_refiner_layers"] * (per["noise_refiner"] + per["context_refiner"]))
        layer_flops = 2 * 2 * (out["image_tokens"] + CAPTION_TOKENS) * sum(
            p.numel() for p in model.layers[0].parameters())
        out["main_layer_gflops"] = layer_flops / per["main_layer"] / 1e9
        out["extrapolated"] = True
    out["image_s_estimate"] = args.steps * out.get("step_s_compiled", out["step_s_eager"])
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:22s} {v:.4f}" if isinstance(v, float) else f"{k:22s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
