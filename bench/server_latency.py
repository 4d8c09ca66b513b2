"""Server overhead and throughput on the tiny model (or --model).

    python bench/server_latency.py [--model DIR] [--runs 15] [--tokens 16] [--json]

1. Time to first token: in-process (`engine.chat`), over the realtime websocket (response.create
   sent -> first response.text.delta received) and over HTTP (POST /v1/chat/completions with
   stream=true -> first content chunk). Same prompt, greedy, runs interleaved; medians. The
   overhead is server minus in-process (goal: <= 10 ms).
2. Throughput: tokens/s summed over 1, 8 and 32 concurrent realtime sessions (the engine runs one
   generation at a time, so this shows the queue's cost, not batching), with mean time to first
   token and queue wait as the server reports them.

The server runs in its own process (python -m engine.server) so client and server do not share
an interpreter lock.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402

from engine.client import AsyncRealtimeClient, RealtimeClient  # noqa: E402
from engine.events import TextDelta  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from engine.sampling import GenerationParams  # noqa: E402

PROMPT = "Tell me about the Ming dynasty in a few sentences."
SYSTEM = "You are a helpful assistant."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine.server", "--port", str(port), "--log-level", "warning",
           "--max-sessions", "64", "--threads", str(threads)]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def ttft_inproc(engine: Engine, tokens: int) -> float:
    t0 = time.perf_counter()
    for ev in engine.chat([{"role": "user", "content": PROMPT}], GenerationParams(max_new_tokens=tokens),
                          system_prompt=SYSTEM):
        if isinstance(ev, TextDelta):
            return time.perf_counter() - t0
    raise RuntimeError("no token")


def ttft_ws(rt: RealtimeClient, tokens: int) -> float:
    t0 = time.perf_counter()
    first = None
    for ev in rt.respond(max_output_tokens=tokens, instructions=SYSTEM):
        if ev["type"] == "response.text.delta" and first is None:
            first = time.perf_counter() - t0
    for item in ev["response"]["output"]:  # keep the conversation to one user turn
        rt.delete_item(item["id"])
    return first


def ttft_http(http: httpx.Client, tokens: int) -> float:
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
            "max_tokens": tokens, "stream": True}
    t0 = time.perf_counter()
    first = None
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        for line in resp.iter_lines():
            if first is None and line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - t0
    return first


async def session_load(url: str, n_sessions: int, requests_each: int, tokens: int) -> dict:
    ttfts, waits, total_tokens = [], [], 0

    async def one(i: int):
        nonlocal total_tokens
        async with AsyncRealtimeClient(url) as rt:
            for r in range(requests_each):
                item = await rt.add_message("user", f"Session {i} request {r}: {PROMPT}")
                async for ev in rt.respond(max_output_tokens=tokens, instructions=SYSTEM):
                    if ev["type"] == "response.done":
                        resp = ev["response"]
                        total_tokens += resp["usage"]["output_tokens"]
                        ttfts.append(resp["metrics"].get("time_to_first_token_ms", float("nan")))
                        waits.append(resp["metrics"]["queue_wait_ms"])
                # every request starts from a one-message conversation, so the levels compare
                for out in [item["item"]] + resp["output"]:
                    await rt.delete_item(out["id"])

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n_sessions)))
    wall = time.perf_counter() - t0
    return {"sessions": n_sessions, "requests": n_sessions * requests_each, "tokens": total_tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(total_tokens / wall, 2),
            "mean_ttft_ms": round(statistics.fmean(ttfts), 1), "mean_queue_wait_ms": round(statistics.fmean(waits), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the tiny random demo model)")
    ap.add_argument("--runs", type=int, default=15, help="time-to-first-token runs per path")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    ap.add_argument("--sessions", default="1,8,32", help="concurrency levels for throughput")
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
    try:
        base = f"http://127.0.0.1:{port}"
        ws_url = f"ws://127.0.0.1:{port}/v1/realtime"
        tt = {"in_process": [], "websocket": [], "http": []}
        with RealtimeClient(ws_url) as rt, httpx.Client(base_url=base, timeout=120) as http:
            rt.add_message("user", PROMPT)
            for _ in range(2):  # warm-up
                ttft_inproc(engine, args.tokens), ttft_ws(rt, args.tokens), ttft_http(http, args.tokens)
            for _ in range(args.runs):
                tt["in_process"].append(ttft_inproc(engine, args.tokens))
                tt["websocket"].append(ttft_ws(rt, args.tokens))
                tt["http"].append(ttft_http(http, args.tokens))
        med = {k: 1000 * statistics.median(v) for k, v in tt.items()}
        out["ttft_ms"] = {k: round(v, 2) for k, v in med.items()}
        out["overhead_ms"] = {"websocket": round(med["websocket"] - med["in_process"], 2),
                              "http": round(med["http"] - med["in_process"], 2)}
        out["throughput"] = []
        for n in [int(x) for x in args.sessions.split(",")]:
            out["throughput"].append(asyncio.run(session_load(ws_url, n, max(1, 8 // n), args.tokens)))
    finally:
        proc.terminate()
        proc.wait(10)

    if args.json:
        print(json.dumps(out))
        return 0
    print(f"model {out['model']} on {out['device']} ({args.threads} torch thread(s)); {args.tokens} new tokens per "
          f"request; medians of {args.runs} runs")
    print()
    print(f"{'time to first token':<22}{'ms':>10}{'overhead ms':>14}")
    for k in ("in_process", "websocket", "http"):
        over = "" if k == "in_process" else f"{out['overhead_ms'][k]:.2f}"
        print(f"{k:<22}{out['ttft_ms'][k]:>10.2f}{over:>14}")
    print()
    print(f"{'sessions':>8}{'requests':>10}{'tokens':>8}{'wall s':>9}{'tokens/s':>10}{'mean ttft ms':>14}"
          f"{'mean queue ms':>15}")
    for row in out["throughput"]:
        print(f"{row['sessions']:>8}{row['requests']:>10}{row['tokens']:>8}{row['wall_s']:>9.2f}"
              f"{row['tokens_per_s']:>10.1f}{row['mean_ttft_ms']:>14.1f}{row['mean_queue_wait_ms']:>15.1f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.exit(main())
