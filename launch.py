#!/usr/bin/env python
"""Start Ming Omni Studio: load a model, then serve the studio page in the browser.

With no arguments it loads the tiny random demo checkpoint (generated on first use into
$MING_STUDIO_CACHE or ~/.cache/ming-omni-studio): it produces meaningless text and only shows that
the studio works. Load the real model with --model.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

EXIT_MODEL_ERROR = 2
EXIT_SERVER_ERROR = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python launch.py", description=__doc__.split("\n\n")[0],
        epilog="examples:\n"
               "  python launch.py                                  # tiny random demo model\n"
               "  python launch.py --model inclusionAI/Ming-flash-omni-2.0\n"
               "  python launch.py --model /models/Ming-flash-omni-2.0 --dtype bf16 --device cuda\n"
               "  python launch.py --host 0.0.0.0 --port 8080       # reachable from other machines\n\n"
               f"exit codes: {EXIT_MODEL_ERROR} = the model could not be loaded, "
               f"{EXIT_SERVER_ERROR} = the server could not start.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", metavar="PATH_OR_HUB_ID", default=None,
                    help="checkpoint to load: a local directory, or a Hugging Face hub id such as "
                         "inclusionAI/Ming-flash-omni-2.0 (downloaded into the hub cache). "
                         "Default: the tiny random demo checkpoint (meaningless output).")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to serve on (default: %(default)s, this machine only; "
                         "0.0.0.0 = every network interface)")
    ap.add_argument("--port", type=int, default=7860, help="port to serve on (default: %(default)s)")
    ap.add_argument("--share", action="store_true",
                    help="also create a temporary public gradio.live link (needs internet access)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                    help="weight and activation dtype (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--expert-dtype", choices=["bf16", "fp8", "fp8-block", "int8", "int4"], default="bf16",
                    help="routed-expert weights: bf16 = as stored (default), fp8 (e4m3) or int8 with per-channel "
                         "scales, quantised while loading (about half the expert memory)")
    ap.add_argument("--placement", choices=["auto", "single"], default="auto",
                    help="auto (default): on CUDA, a model too big for one GPU is spread over this machine's GPUs and "
                         "host memory (cold experts computed by the CPU); single: everything on --device")
    ap.add_argument("--device", default=None,
                    help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    return ap.parse_args(argv)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _check_device(name: str | None) -> str | None:
    """A readable problem with the requested device, or None when it can be used."""
    if name is None:
        return None
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        return f"invalid --device '{name}': {e}"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name}: CUDA is not available on this machine (use --device cpu)"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present"
    elif dev.type not in ("cpu", "mps", "xpu"):
        return f"--device {name}: unsupported device type '{dev.type}'"
    return None


class _LoadProgress:
    """Prints tensor-loading progress every 10% (only for checkpoints with many tensors)."""

    def __init__(self):
        self.shown = -1

    def __call__(self, done: int, total: int, name: str) -> None:
        if total < 200:
            return
        tenth = done * 10 // total
        if tenth > self.shown:
            self.shown = tenth
            print(f"  loading tensors: {done}/{total} ({tenth * 10}%)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    problem = _check_device(args.device)
    if problem:
        return _fail(problem, EXIT_MODEL_ERROR)

    from engine.models.thinker.config import ConfigError
    from engine.loader import CheckpointError
    from engine.runtime import REAL_MODEL_HINT, Engine
    from engine.models.thinker.tokenizer import TokenizerError

    what = args.model or "the tiny random demo checkpoint"
    print(f"Loading {what} ...", flush=True)
    t_load = time.perf_counter()
    try:
        engine = Engine.load(args.model, dtype=args.dtype, device=args.device, progress=_LoadProgress(),
                             expert_dtype=args.expert_dtype, placement=args.placement,
                             log=lambda line: print(line, flush=True))
    except (CheckpointError, ConfigError, TokenizerError) as e:
        return _fail(f"could not load the model {args.model or what!r}:\n  {e}", EXIT_MODEL_ERROR)
    except (OSError, ValueError) as e:  # unreadable files, bad dtype for this checkpoint, ...
        return _fail(f"could not load the model {args.model or what!r}:\n  {type(e).__name__}: {e}",
                     EXIT_MODEL_ERROR)
    load_s = time.perf_counter() - t_load
    info = engine.info()
    print(f"Loaded {info.name} in {load_s:.1f} s ({info.parameters:,} parameters, {info.dtype} on {info.device})",
          flush=True)
    if engine.is_demo:
        print("NOTE: these are RANDOM DEMO WEIGHTS: the replies are meaningless text.\n"
              f"      To load the real model: {REAL_MODEL_HINT}", flush=True)

    from app.studio import build_studio

    demo = build_studio(engine)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                    prevent_thread_lock=True, show_error=True, quiet=True)
    except OSError as e:  # port in use, address not available
        return _fail(f"could not start the server on {args.host}:{args.port}: {e}", EXIT_SERVER_ERROR)
    print(f"Ming Omni Studio is running at {demo.local_url}  (ready {time.perf_counter() - t_start:.1f} s "
          "after start; press Ctrl+C to stop)", flush=True)
    if demo.share_url:
        print(f"Public link: {demo.share_url}", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
