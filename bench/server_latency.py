"""Time to first token through client -> server -> engine vs in-process, and throughput under load,
on the tiny model (or --model).

    python bench/server_latency.py [--model DIR] [--runs 15] [--tokens 16] [--json]

1. Time to first token, measured by the caller from the request to the first TextDelta, same prompt,
   greedy, runs interleaved, medians:
     in_process       engine.chat(...) in this process (what the studio did before);
     client_realtime  EngineClient.chat(...) (a realtime session per call from the client's pool of
                      connected sessions: items, response.create; what the studio does now);
     client_connect   the same on a fresh EngineClient each time (websocket handshake included);
     client_http      EngineClient.chat(..., transport="http") (/v1/chat/completions stream);
     session_respond  RealtimeClient.respond() on an open session (the Live tab's path);
     studio           the studio's Chat (a UI-only `launch.py --engine` in its own process) driven by
                      gradio_client: from submitting the turn to the first streamed assistant text,
                      i.e. UI -> client -> server -> engine and back through Gradio's own stream;
     gradio_floor     for scale, Gradio's own cost: a minimal Gradio app (its own process, no engine)
                      whose streaming handler yields at once, driven the same way (time to its first
                      streamed output).
   The overhead of each path is its median minus in-process (goal: <= 10 ms); for the studio, what
   it adds beyond Gradio's floor and the engine is studio - gradio_floor - in_process.
2. Throughput: tokens/s summed over 1, 8 and 32 concurrent AsyncEngineClient.chat calls (the engine
   runs one generation at a time, so this shows the queue's cost, not batching), with the mean time
   to first token the clients saw and the mean queue wait the server reported.

The server runs in its own process (python -m engine.server) so client and server do not share an
interpreter lock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.cli import SetupError, run  # noqa: E402
from engine.client import AsyncEngineClient, EngineClient, RealtimeClient  # noqa: E402
from engine.events import Done, Error, TextDelta  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from engine.sampling import GenerationParams  # noqa: E402

PROMPT = "Tell me about the Ming dynasty in a few sentences."
SYSTEM = "You are a helpful assistant."
MESSAGES = [{"role": "user", "content": PROMPT}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, threads: int, repo: Path = ROOT) -> subprocess.Popen:
    """`python -m engine.server` in its own process, started from the checkout `repo` (this one by
    default; the server benchmarks point it at an older checkout to measure "before")."""
    cmd = [sys.executable, "-m", "engine.server", "--port", str(port), "--log-level", "warning",
           "--max-sessions", "64", "--threads", str(threads)]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError(f"the engine server this benchmark starts exited (exit code {proc.returncode}): "
                             f"{proc.stderr.read().strip()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


@contextmanager
def server_process(model: str | None = None, threads: int = 1, repo: Path = ROOT):
    """The base URL of a server running in its own process (stopped on exit)."""
    port = free_port()
    proc = start_server(model, port, threads, repo)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def first_token_s(events) -> float:
    """Seconds from now to the first TextDelta of `events` (the rest is drained; an Error raises)."""
    t0 = time.perf_counter()
    first = None
    for ev in events:
        if isinstance(ev, TextDelta) and first is None:
            first = time.perf_counter() - t0
        elif isinstance(ev, Error):
            raise RuntimeError(f"{ev.code}: {ev.message}")
    if first is None:
        raise RuntimeError("the reply had no text")
    return first


def ttft_in_process(engine: Engine, tokens: int) -> float:
    return first_token_s(engine.chat(MESSAGES, GenerationParams(max_new_tokens=tokens), system_prompt=SYSTEM))


def ttft_client(client: EngineClient, tokens: int, transport: str) -> float:
    return first_token_s(client.chat(MESSAGES, max_tokens=tokens, system=SYSTEM, transport=transport))


def ttft_fresh_client(url: str, tokens: int) -> float:
    with EngineClient(url) as client:
        return ttft_client(client, tokens, "realtime")


def start_studio(engine_port: int) -> tuple[subprocess.Popen, str]:
    """A UI-only studio on a free port driving the engine server; (process, page URL)."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--engine", f"ws://127.0.0.1:{engine_port}",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, wait_for_page(proc, f"http://127.0.0.1:{port}/", "the studio")


def wait_for_page(proc: subprocess.Popen, url: str, what: str) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "config", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


GRADIO_FLOOR_APP = """
import sys
import gradio as gr

def echo(text):
    yield text

with gr.Blocks() as demo:
    box, out = gr.Textbox(), gr.Textbox()
    box.submit(echo, box, out, api_name="echo")
demo.queue().launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), quiet=True)
"""


def start_gradio_floor() -> tuple[subprocess.Popen, str]:
    """A minimal Gradio app (one streaming handler that yields at once) on a free port; (process, URL)."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-c", GRADIO_FLOOR_APP, str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_for_page(proc, f"http://127.0.0.1:{port}/", "the minimal Gradio app")


def ttft_gradio_floor(app) -> float:
    t0 = time.perf_counter()
    job = app.submit("hello", api_name="/echo")
    while not job.outputs() and not job.done():
        time.sleep(0.0005)
    first = time.perf_counter() - t0
    job.result(timeout=60)
    return first


def ttft_studio(studio, tokens: int) -> float:
    """Submit a turn to the Chat tab's API and wait for the first non-empty assistant text."""
    history = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    t0 = time.perf_counter()
    job = studio.submit(history, tokens, 0.0, 1.0, 0, 1.0, None, SYSTEM, False, False, "", api_name="/chat")
    first = None
    while first is None and not job.done():
        for out in job.outputs():
            last = out[0][-1] if out and isinstance(out[0], list) and out[0] else None  # skipped: an update dict
            if last and last.get("role") == "assistant" and any(p.get("text") for p in last.get("content") or []):
                first = time.perf_counter() - t0
                break
        else:
            time.sleep(0.0005)
    job.result(timeout=60)
    if first is None:
        raise RuntimeError("the studio's reply had no text")
    return first


def ttft_session(rt: RealtimeClient, tokens: int) -> float:
    first = first_token_s(rt.respond(max_output_tokens=tokens, instructions=SYSTEM))
    rt.delete_item(rt.state.log.items[-1]["id"])  # keep the conversation to the one user turn
    return first


async def load(url: str, n_clients: int, requests_each: int, tokens: int) -> dict:
    ttfts, waits, total_tokens = [], [], 0

    async def one(i: int, client: AsyncEngineClient):
        nonlocal total_tokens
        for r in range(requests_each):
            t0, first = time.perf_counter(), None
            async for ev in client.chat([{"role": "user", "content": f"Client {i} request {r}: {PROMPT}"}],
                                        max_tokens=tokens, system=SYSTEM):
                if isinstance(ev, TextDelta) and first is None:
                    first = time.perf_counter() - t0
                elif isinstance(ev, Done):
                    total_tokens += ev.stats.new_tokens
                    waits.append(ev.stats.queue_wait_s)
                elif isinstance(ev, Error):
                    raise RuntimeError(f"{ev.code}: {ev.message}")
            if first is not None:
                ttfts.append(first)

    async with AsyncEngineClient(url) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, client) for i in range(n_clients)))
        wall = time.perf_counter() - t0
    return {"clients": n_clients, "requests": n_clients * requests_each, "tokens": total_tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(total_tokens / wall, 2),
            "mean_ttft_ms": round(1000 * statistics.fmean(ttfts), 1),
            "mean_queue_wait_ms": round(1000 * statistics.fmean(waits), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the tiny random demo model)")
    ap.add_argument("--runs", type=int, default=15, help="time-to-first-token runs per path")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels for throughput")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, in-process and in the server (default 1: on a 2-core machine two "
                         "OpenMP threads per process fight the event loop and the other process)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model)
    port = free_port()
    proc = start_server(args.model, port, args.threads)
    out: dict = {"model": engine.info().name, "device": engine.info().device, "runs": args.runs,
                 "tokens": args.tokens, "threads": args.threads}
    paths = ("in_process", "client_realtime", "client_connect", "client_http", "session_respond", "studio",
             "gradio_floor")
    studio_proc = floor_proc = None
    try:
        url = f"ws://127.0.0.1:{port}"
        tt: dict[str, list[float]] = {k: [] for k in paths}
        from gradio_client import Client

        studio_proc, studio_url = start_studio(port)
        studio = Client(studio_url, verbose=False)
        floor_proc, floor_url = start_gradio_floor()
        floor = Client(floor_url, verbose=False)
        with EngineClient(url) as client, RealtimeClient(url) as rt:
            rt.add_message("user", PROMPT)
            measure = {"in_process": lambda: ttft_in_process(engine, args.tokens),
                       "client_realtime": lambda: ttft_client(client, args.tokens, "realtime"),
                       "client_connect": lambda: ttft_fresh_client(url, args.tokens),
                       "client_http": lambda: ttft_client(client, args.tokens, "http"),
                       "session_respond": lambda: ttft_session(rt, args.tokens),
                       "studio": lambda: ttft_studio(studio, args.tokens),
                       "gradio_floor": lambda: ttft_gradio_floor(floor)}
            for _ in range(2):  # warm-up
                for k in paths:
                    measure[k]()
            for _ in range(args.runs):
                for k in paths:
                    tt[k].append(measure[k]())
        med = {k: 1000 * statistics.median(v) for k, v in tt.items()}
        out["ttft_ms"] = {k: round(v, 2) for k, v in med.items()}
        out["overhead_ms"] = {k: round(med[k] - med["in_process"], 2) for k in paths[1:-1]}
        out["studio_beyond_gradio_ms"] = round(med["studio"] - med["gradio_floor"] - med["in_process"], 2)
        out["throughput"] = [asyncio.run(load(url, n, max(1, 8 // n), args.tokens))
                             for n in (int(x) for x in args.clients.split(","))]
    finally:
        for p_ in (floor_proc, studio_proc, proc):
            if p_ is not None:
                p_.terminate()
                p_.wait(10)

    if args.json:
        print(json.dumps(out))
        return 0
    print(f"model {out['model']} on {out['device']} ({args.threads} torch thread(s)); {args.tokens} new tokens per "
          f"request; medians of {args.runs} runs")
    print()
    print(f"{'time to first token':<22}{'ms':>10}{'overhead ms':>14}")
    for k in paths:
        over = f"{out['overhead_ms'][k]:.2f}" if k in out["overhead_ms"] else ""
        print(f"{k:<22}{out['ttft_ms'][k]:>10.2f}{over:>14}")
    print(f"the studio beyond Gradio's floor and the engine (studio - gradio_floor - in_process): "
          f"{out['studio_beyond_gradio_ms']:.2f} ms")
    print()
    print(f"{'clients':>8}{'requests':>10}{'tokens':>8}{'wall s':>9}{'tokens/s':>10}{'mean ttft ms':>14}"
          f"{'mean queue ms':>15}")
    for row in out["throughput"]:
        print(f"{row['clients']:>8}{row['requests']:>10}{row['tokens']:>8}{row['wall_s']:>9.2f}"
              f"{row['tokens_per_s']:>10.1f}{row['mean_ttft_ms']:>14.1f}{row['mean_queue_wait_ms']:>15.1f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.exit(run(main))
