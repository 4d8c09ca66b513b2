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
import errno  # noqa: E402
import secrets  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

EXIT_MODEL_ERROR = 2
EXIT_SERVER_ERROR = 1
EXIT_INTERRUPTED = 130  # Ctrl+C before the studio was ready (the shell's code for a SIGINT)
# On a Hugging Face Space the Space's own visibility decides who may open it (a public Space is a
# public demo by design), and the app must listen on every interface.
IN_SPACE = bool(os.environ.get("SPACE_ID"))


# Addresses of this machine itself: reached directly, never through a proxy (a proxy's loopback is its own machine's).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PROXY_SETTINGS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def keep_loopback_off_proxies(environ=os.environ) -> None:
    """With a proxy in the environment (HTTP_PROXY / HTTPS_PROXY / ALL_PROXY, upper or lower case: a company machine)
    and no NO_PROXY naming this machine, `python launch.py` died in Gradio's start-up check of its own page (an
    httpx.ConnectError traceback: the check went to the proxy), and the studio's requests to the engine it had just
    started on 127.0.0.1 went to the proxy too. The loopback names are added to NO_PROXY and no_proxy (both, as
    either may be read), this process's only; a remote engine is still reached through the proxy."""
    if not any(environ.get(name) or environ.get(name.lower()) for name in PROXY_SETTINGS):
        return
    named = [h.strip() for name in ("NO_PROXY", "no_proxy") for h in environ.get(name, "").split(",") if h.strip()]
    if "*" in named:  # (no proxy for anything already)
        return
    kept = list(dict.fromkeys(named + [h for h in LOOPBACK_NAMES if h not in named]))
    environ["NO_PROXY"] = environ["no_proxy"] = ",".join(kept)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python launch.py", description=__doc__.split("\n\n")[0],
        epilog="examples:\n"
               "  python launch.py                                  # tiny random demo model\n"
               "  python launch.py --model inclusionAI/Ming-flash-omni-2.0\n"
               "  python launch.py --model /models/Ming-flash-omni-2.0 --dtype bf16 --device cuda\n"
               "  python launch.py --host 0.0.0.0 --auth alice:secret  # reachable from other machines, with a login\n"
               "  python launch.py --engine ws://gpu-box:8000 --engine-token T   # UI only, the engine runs elsewhere\n\n"
               f"exit codes: {EXIT_MODEL_ERROR} = the model could not be loaded or the settings were refused, "
               f"{EXIT_SERVER_ERROR} = the server could not start, "
               f"{EXIT_INTERRUPTED} = stopped by Ctrl+C while starting, 143 = stopped by SIGTERM.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", metavar="PATH_OR_HUB_ID", default=None,
                    help="checkpoint to load: a local directory, or a Hugging Face hub id such as "
                         "inclusionAI/Ming-flash-omni-2.0 (downloaded into the hub cache). "
                         "Default: the tiny random demo checkpoint (meaningless output).")
    ap.add_argument("--engine", metavar="URL", default=os.environ.get("ENGINE_URL") or None,
                    help="use an engine server that runs elsewhere (python -m engine.server) instead of loading a "
                         "model here: ws://HOST:PORT or http://HOST:PORT (wss:// or https:// through TLS; a path after "
                         "the port is the prefix a reverse proxy serves the engine under; openai+http(s)://HOST:PORT: "
                         "any OpenAI-compatible server) (default: $ENGINE_URL). This studio then only serves the page "
                         "and never loads torch.")
    ap.add_argument("--engine-token", metavar="T", default=os.environ.get("ENGINE_TOKEN") or None,
                    help="the engine server's token (default: $ENGINE_TOKEN)")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if IN_SPACE else "127.0.0.1"),
                    help="address to serve on (default: %(default)s, this machine only; "
                         "0.0.0.0 = every network interface, which needs --auth)")
    ap.add_argument("--port", type=int, default=7860, help="port to serve on (default: %(default)s)")
    ap.add_argument("--share", action="store_true",
                    help="also create a temporary public gradio.live link (needs internet access and --auth)")
    ap.add_argument("--auth", metavar="USER:PASSWORD", action="append",
                    default=[os.environ["STUDIO_AUTH"]] if os.environ.get("STUDIO_AUTH") else None,
                    help="require this login (repeatable; default: $STUDIO_AUTH); needed with --share or a "
                         "non-loopback --host")
    ap.add_argument("--auth-file", metavar="FILE", default=None,
                    help="a file with one USER:PASSWORD per line (blank lines and # comments skipped)")
    ap.add_argument("--insecure-no-auth", action="store_true",
                    help="serve to the network or a share link WITHOUT a login (anyone who finds it can use the "
                         "model); refused unless given explicitly")
    ap.add_argument("--local-audio", action="store_true",
                    help="kiosk mode: talk to the model through this machine's microphone and speaker (push-to-talk "
                         "with Enter) in this terminal instead of serving the page (needs sounddevice and Debian's "
                         "libportaudio2)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                    help="weight and activation dtype (default: bf16 on GPU; on CPU fp32 where the model fits in the "
                         "memory available, else bf16)")
    ap.add_argument("--expert-dtype", choices=["bf16", "fp8", "fp8-block", "int8", "int4"], default="bf16",
                    help="routed-expert weights: bf16 = as stored (default), or quantised while loading (fp8 e4m3 "
                         "per channel or in 128x128 blocks, int8 per channel: half the expert memory; int4 with scales "
                         "per 128 inputs: a quarter)")
    ap.add_argument("--linear-dtype", choices=["bf16", "int8"], default="bf16",
                    help="CPU only: the LLM's other linears (attention, dense MLP, shared experts, lm_head) as loaded "
                         "(default) or int8 per output channel. A machine without a GPU: --expert-dtype int4 "
                         "--linear-dtype int8 (python -m engine.plan --gpus none says how much memory that needs)")
    ap.add_argument("--placement", choices=["auto", "single"], default="auto",
                    help="auto (default): on CUDA, a model too big for one GPU is spread over this machine's GPUs and "
                         "host memory (cold experts computed by the CPU); single: everything on --device")
    ap.add_argument("--device", default=None,
                    help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    ap.add_argument("--max-sessions", type=int, default=None, metavar="N",
                    help="the engine's concurrent realtime sessions, Live calls and chats together (past them a Live "
                         "call is refused and a chat waits in the engine's line) (default: the engine server's, "
                         "python -m engine.server --max-sessions)")
    args = ap.parse_args(argv)
    if args.max_sessions is not None and args.max_sessions < 1:
        ap.error(f"--max-sessions must be at least 1, got {args.max_sessions}")
    engine_from = "--engine" if argv_names(argv, "--engine") else "ENGINE_URL (set in the environment)"
    args.engine_from = engine_from  # (what messages about the engine's address name: a Space sets ENGINE_URL)
    if args.engine and args.model:
        ap.error(f"{engine_from} (a remote engine) and --model (load one here) exclude each other")
    loading = [flag for dest, flag in LOCAL_LOAD_FLAGS.items() if getattr(args, dest) != ap.get_default(dest)]
    if args.engine and loading:  # they were dropped without a word: the engine server loads the model
        ap.error(f"{', '.join(loading)}: how a model loads and is served here, and with {engine_from} nothing loads "
                 "here; give them to the engine server (python -m engine.server takes the same flags)")
    return args


# The flags of a model load and its engine server in this process (dest -> flag), which a studio driving a remote
# engine has no use for.
LOCAL_LOAD_FLAGS = {"dtype": "--dtype", "device": "--device", "expert_dtype": "--expert-dtype",
                    "linear_dtype": "--linear-dtype", "placement": "--placement", "max_sessions": "--max-sessions"}


def argv_names(argv: list[str] | None, flag: str) -> bool:
    """True when the command line (`argv`, or sys.argv) gives `flag` (as `--flag V` or `--flag=V`)."""
    return any(a == flag or a.startswith(flag + "=") for a in (sys.argv[1:] if argv is None else argv))


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _address_exit_code(refused: Exception) -> int:
    """A port in use is a server that could not start; a port out of range or a --host that is no address of this
    machine is a setting refused (the exit codes of --help)."""
    cause = refused.__cause__
    in_use = isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE
    return EXIT_SERVER_ERROR if in_use else EXIT_MODEL_ERROR


def _engine_limits(args: argparse.Namespace):
    """The local engine server's limits: the engine's defaults, with --max-sessions when given."""
    from engine.server import Limits

    return Limits() if args.max_sessions is None else Limits(max_sessions=args.max_sessions)


def _start_local_engine(args: argparse.Namespace):
    """Load the model here and serve it on a loopback port of this process (a token made for this
    start): the studio reaches it through the same client a remote studio uses. Returns (engine
    link, server handle) or an exit code."""
    from app.engine_link import EngineLink
    from engine.client import EngineClient
    from engine.errors import MingError
    from engine.loader import LoadProgressPrinter
    from engine.runtime import REAL_MODEL_COMMAND, Engine
    from engine.server import ServerHandle, create_app

    what = args.model or "the tiny random demo checkpoint"
    print(f"Loading {what} ...", flush=True)
    t_load = time.perf_counter()
    try:
        engine = Engine.load(args.model, dtype=args.dtype, device=args.device, progress=LoadProgressPrinter(),
                             expert_dtype=args.expert_dtype, placement=args.placement,
                             linear_dtype=args.linear_dtype,
                             log=lambda line: print(line, flush=True))
    except MingError as e:
        return _fail(f"could not load the model {args.model or what!r}:\n  {e}", EXIT_MODEL_ERROR)
    except (OSError, ValueError) as e:  # unreadable files, bad dtype for this checkpoint, ...
        return _fail(f"could not load the model {args.model or what!r}:\n  {type(e).__name__}: {e}",
                     EXIT_MODEL_ERROR)
    info = engine.info()
    print(f"Loaded {info.name} in {time.perf_counter() - t_load:.1f} s ({info.parameters:,} parameters, "
          f"{info.dtype} on {info.device})", flush=True)
    if engine.is_demo:
        print("NOTE: these are RANDOM DEMO WEIGHTS: the replies are meaningless text.\n"
              "      To load the real model, run (or give --model a local checkpoint directory):\n"
              f"        {REAL_MODEL_COMMAND}", flush=True)
    token = secrets.token_urlsafe(24)
    try:
        handle = ServerHandle(create_app(engine, _engine_limits(args), token=token), host="127.0.0.1", port=0).start()
    except (OSError, RuntimeError) as e:
        return _fail(f"could not start the engine server on a loopback port: {e}", EXIT_SERVER_ERROR)
    return EngineLink(EngineClient(handle.url, token=token)), handle


def _connect_remote_engine(args: argparse.Namespace):
    """A UI-only studio: the engine runs elsewhere. An engine that is down at start is reported here
    and in the page, which reconnects when it comes back. Returns (engine link, None) or an exit code."""
    from app.engine_link import EngineLink, cleartext_token_warning
    from engine.client import EngineClient
    from engine.client.core import url_shown

    try:
        client = EngineClient(args.engine, token=args.engine_token)
    except ValueError as e:  # not a URL the studio can reach an engine at
        return _fail(f"{args.engine_from}: {e}", EXIT_MODEL_ERROR)
    shown = url_shown(args.engine)  # (a ?token= stays out of the log)
    plain = cleartext_token_warning(client)
    if plain:
        print(plain, file=sys.stderr, flush=True)
    link = EngineLink(client, remote=True)  # asks the engine who it is, once (the page then reuses the answer)
    status = link.status()
    if status.ok:
        print(f"Engine at {shown}: {status.info.name}" + (" (RANDOM DEMO WEIGHTS)" if status.info.is_demo else ""),
              flush=True)
    elif status.code == "unauthorized":  # not "not answering ... reconnects": it never will
        print(f"WARNING: the engine at {shown} refused the token: give its token with --engine-token (or "
              "ENGINE_TOKEN) and start the studio again. The studio starts anyway and shows this in the page.",
              file=sys.stderr, flush=True)
    else:  # (any failure to reach it is reported, the page keeps trying)
        print(f"WARNING: {status.problem}. The studio starts anyway, shows this in the page and reconnects when the "
              "engine is back.", file=sys.stderr, flush=True)
    return link, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    keep_loopback_off_proxies()
    from app.access import AccessRefused, check_access, read_credentials

    try:
        credentials = read_credentials(args.auth, args.auth_file,
                                       "--auth" if argv_names(argv, "--auth") else "STUDIO_AUTH (in the environment)")
        warning = check_access(args.host, args.share, credentials, args.insecure_no_auth or IN_SPACE)
    except AccessRefused as e:
        return _fail(str(e), EXIT_MODEL_ERROR)
    if warning and not IN_SPACE:
        print(warning, file=sys.stderr, flush=True)
    elif IN_SPACE and not credentials:
        print(f"Running on the Hugging Face Space {os.environ['SPACE_ID']}: who may open it is the Space's "
              "visibility setting (set the secret STUDIO_AUTH=user:password to require a login too).", flush=True)

    if not args.engine:  # the settings of a local load, then the studio's address: before minutes of loading
        try:
            from engine.runtime import device_problem
        except ImportError as e:  # a UI-only install (no torch) or a Space (no engine.runtime) without ENGINE_URL
            return _fail(f"no engine to use: this install cannot load a model here ({e}; a UI-only install from "
                         "requirements-ui.txt, or a Space). Give it an engine server: --engine ws://HOST:PORT "
                         "--engine-token T, or ENGINE_URL and ENGINE_TOKEN (on a Space: its secrets).",
                         EXIT_MODEL_ERROR)
        problem = device_problem(args.device)
        if problem:
            return _fail(problem, EXIT_MODEL_ERROR)
    if not args.local_audio:  # (gradio binds the address later)
        from engine.server.auth import StartupRefused, listen_socket

        try:
            listen_socket(args.host, args.port).close()
        except StartupRefused as e:
            return _fail(str(e), _address_exit_code(e))
    if args.local_audio:
        from app.local_audio import check_local_audio

        problem = check_local_audio()
        if problem:  # before loading anything: there is no point without a microphone
            return _fail(f"--local-audio: {problem}", EXIT_MODEL_ERROR)
    started = _connect_remote_engine(args) if args.engine else _start_local_engine(args)
    if isinstance(started, int):
        return started
    link, engine_server = started
    if args.local_audio:
        from app.engine_link import SPEECH_OUT
        from app.local_audio import run_local_audio

        try:
            return run_local_audio(*link.target(), speech_output=link.has(SPEECH_OUT))
        finally:
            if engine_server is not None:
                engine_server.stop()

    from app.http_answers import make_studio_http_default
    from app.studio import build_studio, close_studio, launch_options
    from engine.server.ws_protocol import make_uvicorn_default

    make_uvicorn_default()  # the Live relay's handshakes: a 414 / 431 answered, not left hanging
    make_studio_http_default()  # a request that does not parse: h11's status (431 for a head too long) and why
    demo = build_studio(link)
    try:
        demo.launch(**launch_options(demo), server_name=args.host, server_port=args.port, share=args.share,
                    auth=credentials or None, auth_message="Ming Omni Studio: please log in.",
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
        close_studio(demo)
        if engine_server is not None:
            engine_server.stop()
    return 0


def run(argv: list[str] | None = None) -> int:
    """main, with a Ctrl+C pressed while the studio starts (the model loading, the page being built) said in one
    line instead of a KeyboardInterrupt traceback. (Once the page is served, Ctrl+C is main's normal stop: 0.)
    SIGTERM (kill, a service manager) at any time closes the studio and the engine as Ctrl+C does, then exits 143."""
    from engine.command import EXIT_TERMINATED, STOPPED_BY_SIGTERM, Terminated, sigterm_raises_terminated

    try:
        with sigterm_raises_terminated():
            return main(argv)
    except KeyboardInterrupt:
        print("\nstopped (Ctrl+C) while the studio was starting", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(STOPPED_BY_SIGTERM, file=sys.stderr)
        return EXIT_TERMINATED


if __name__ == "__main__":
    sys.exit(run())
