"""python -m engine.server --model PATH_OR_HUB_ID [--host 127.0.0.1] [--port 8000] [--token T] [--openai-only]"""

from __future__ import annotations

import argparse
import math
import os
import sys

from engine.server.auth import StartupRefused, check_bind, listen_socket
from engine.server.limits import MiB, Limits

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's (a KeyError after the load)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_number(text: str) -> float:
    """A size or duration limit: a finite number > 0 (nan, inf and 1e400 would switch the limit off or fail)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m engine.server",
                                 description="Serve the engine over HTTP (OpenAI-compatible) and websockets "
                                             "(/v1/realtime) on one port.")
    ap.add_argument("--model", default=None,
                    help="checkpoint directory or hub id (default: the tiny random demo model)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s; others need --token)")
    ap.add_argument("--port", type=int, default=8000, help="port (default %(default)s; 0 = any free port)")
    ap.add_argument("--token", default=os.environ.get("MING_SERVER_TOKEN") or None,
                    help="secret clients must send (Authorization: Bearer T, or ?token=T); env MING_SERVER_TOKEN")
    ap.add_argument("--served-model-name", default=None, help="model id reported by /v1/models")
    ap.add_argument("--openai-only", action="store_true",
                    help="OpenAI's routes and shapes only: no /v1/realtime, no extension routes, fields, metrics or "
                         "queue comment lines (PCM audio at OpenAI's 24 kHz)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                    help="weight and activation dtype (default: bf16 on GPU; on CPU fp32 where the model fits in "
                         "memory, else bf16)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--expert-dtype", choices=["bf16", "fp8", "fp8-block", "int8", "int4"], default="bf16",
                    help="routed-expert weights: bf16 = as stored (default), or quantised while loading (fp8 e4m3 "
                         "per channel or in 128x128 blocks, int8 per channel, int4 with scales per 128 inputs)")
    ap.add_argument("--linear-dtype", choices=["bf16", "int8"], default="bf16",
                    help="CPU only: the LLM's other linears as loaded (default) or int8 per output channel; without a "
                         "GPU: --expert-dtype int4 --linear-dtype int8")
    ap.add_argument("--placement", choices=["auto", "single"], default="auto",
                    help="auto (default): on CUDA, a model too big for one GPU is spread over the GPUs and host "
                         "memory (cold experts computed by the CPU); single: everything on --device")
    d = Limits()
    ap.add_argument("--max-sessions", type=_positive_int, default=d.max_sessions, help="concurrent realtime sessions")
    ap.add_argument("--max-queue", type=_positive_int, default=d.max_queue, help="requests waiting for the engine")
    ap.add_argument("--max-connections", type=_positive_int, default=d.max_connections,
                    help="open HTTP and websocket connections (past it the one idle longest is closed, or the new one "
                         "refused with 503)")
    ap.add_argument("--max-message-mb", type=_positive_number, default=d.max_message_bytes / MiB,
                    help="realtime event size")
    ap.add_argument("--max-request-mb", type=_positive_number, default=d.max_request_bytes / MiB,
                    help="HTTP JSON body size")
    ap.add_argument("--max-upload-mb", type=_positive_number, default=d.max_upload_bytes / MiB, help="upload size")
    ap.add_argument("--max-audio-seconds", type=_positive_number, default=d.max_audio_seconds, help="audio clip length")
    ap.add_argument("--max-transcription-seconds", type=_positive_number, default=d.max_transcription_seconds,
                    help="length of one recording to transcribe (transcribed in 30 s windows)")
    ap.add_argument("--max-image-pixels", type=_positive_int, default=d.max_image_pixels,
                    help="pixels per image or frame")
    ap.add_argument("--max-new-tokens", type=_positive_int, default=d.max_new_tokens, help="largest max_tokens allowed")
    ap.add_argument("--realtime-idle-seconds", type=_positive_number, default=d.realtime_idle_s,
                    help="a realtime session whose client sends nothing this long, with no response running, is closed")
    ap.add_argument("--threads", type=_positive_int, default=None,
                    help="torch intra-op threads (default: torch's choice; 1 suits small models on few cores)")
    ap.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="the HTTP server's log (default: info)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sock = None
    try:  # before the (slow) model load: the address, the token, the limits
        check_bind(args.host, args.token)  # (what the flags say first: no port is taken for a refused start)
        sock = listen_socket(args.host, args.port)  # held through the load: the port stays ours
        limits = Limits(max_sessions=args.max_sessions, max_queue=args.max_queue, max_connections=args.max_connections,
                        max_message_bytes=int(args.max_message_mb * MiB), max_request_bytes=int(args.max_request_mb * MiB),
                        max_upload_bytes=int(args.max_upload_mb * MiB), max_audio_seconds=args.max_audio_seconds,
                        max_transcription_seconds=args.max_transcription_seconds, max_image_pixels=args.max_image_pixels, max_new_tokens=args.max_new_tokens,
                        realtime_idle_s=args.realtime_idle_seconds)
    except (StartupRefused, ValueError) as e:
        if sock is not None:
            sock.close()
        print(f"error: {e}", file=sys.stderr)
        return 2

    import uvicorn  # noqa: PLC0415

    from engine.errors import MingError  # noqa: PLC0415
    from engine.loader import LoadProgressPrinter  # noqa: PLC0415
    from engine.runtime import Engine, device_problem  # noqa: PLC0415
    from engine.server.app import create_app, uvicorn_config  # noqa: PLC0415

    problem = device_problem(args.device)
    if problem:
        sock.close()
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    try:
        engine = Engine.load(args.model, dtype=args.dtype, device=args.device, placement=args.placement,
                             expert_dtype=args.expert_dtype, linear_dtype=args.linear_dtype,
                             log=lambda line: print(f"[{line}]", file=sys.stderr),
                             progress=LoadProgressPrinter(sys.stderr, prefix="[", suffix="]"))
    except (OSError, ValueError, MingError) as e:  # missing/corrupt files or config, bad dtype, too big
        sock.close()
        print(f"error: could not load the model {args.model or 'the tiny demo checkpoint'!r}: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if engine.is_demo:
        print("[random demo weights: output is meaningless; use --model for the real checkpoint]", file=sys.stderr)
    app = create_app(engine, limits, token=args.token, model_id=args.served_model_name, openai_only=args.openai_only)
    host, port = (f"[{args.host}]" if ":" in args.host else args.host), sock.getsockname()[1]  # port 0: the one got
    where = "OpenAI routes only" if args.openai_only else f"realtime: ws://{host}:{port}/v1/realtime"
    print(f"serving {app.state.ctx.model_id} on http://{host}:{port} ({where})"
          f"{', token required' if args.token else ''}", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn_config(app, args.host, port, args.log_level)).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    from engine.command import run_command

    sys.exit(run_command(main))
