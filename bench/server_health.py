"""How long any client waits for GET /health while another client sends a huge prompt (issue 9 §2).

    python bench/server_health.py [--repo DIR] [--model DIR] [--sizes-mib 4,14.5] [--json]

The server runs in its own process (`python -m engine.server`, from the checkout --repo: this one by
default; an older checkout gives the "before" figures) with the tiny model (or --model). One thread
asks for /health every 20 ms and times each answer; meanwhile another client sends, one after
another:

  accepted       a streamed chat whose text is just under the prompt bound (context tokens x the most
                 characters a token stands for, engine.server.text) and fits the context: the largest
                 prompt the server lets through to the engine, which tokenises it on its generation
                 thread and prefills it; dropped after --accepted-s seconds (the engine then stops
                 within a prefill chunk)
  counted        a chat under the characters bound whose tokens plus max_tokens pass the context:
                 counted by the server on a thread and refused before it is queued
  text_<N>MiB    a chat body of N MiB of plain text (the issue's 4 and 14.5 MiB)
  media_31MiB    a chat body just under the 32 MiB body limit, the bulk of it one base64 image part
                 (noise: refused as not an image, after decoding the base64)

For each: the request's status, code and time, and the /health waits during it (worst, median,
count). The worst wait is the figure: how long the server stopped answering everyone else.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.cli import run  # noqa: E402
from bench.server_latency import server_process  # noqa: E402
from engine.server.text import chars_per_token  # noqa: E402
from engine.tiny import ensure_tiny_checkpoint  # noqa: E402

MiB = 1024 * 1024
WORDS = "the quick brown fox jumps over the lazy dog while the cat sleeps "


def prompt_bound(checkpoint: Path) -> tuple[int, int]:
    """(context tokens, characters bound) as the server derives them."""
    from engine.models.thinker.config import MingConfig  # noqa: PLC0415

    context = MingConfig.from_file(checkpoint).llm.max_position_embeddings
    return context, context * chars_per_token(str(checkpoint / "tokenizer.json"))


def text_of(chars: int) -> str:
    return (WORDS * (chars // len(WORDS) + 1))[:chars]


def chat(text, max_tokens: int = 2, stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "stream": stream}


def bodies(context: int, bound: int, sizes_mib: list[float]) -> list[tuple[str, bytes, bool]]:
    """(name, body, streamed) of each case."""
    fits = min(bound, context) - 400  # (room for the prompt template and the reply)
    out = [("accepted", chat(text_of(fits), stream=True), True),
           ("counted", chat(text_of(bound - 100), max_tokens=min(4096, context // 2)), False)]
    for mib in sizes_mib:
        out.append((f"text_{mib:g}MiB", chat(text_of(int(mib * MiB))), False))
    noise = base64.b64encode(os.urandom(int(31 * MiB * 3 / 4) - 4096)).decode()
    out.append(("media_31MiB", chat([{"type": "text", "text": "what is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," + noise}}]),
                False))
    return [(name, json.dumps(body).encode(), streamed) for name, body, streamed in out]


def send(url: str, body: bytes, streamed: bool, drop_after_s: float) -> tuple[int, str]:
    """(status, error code or "ok") of one request; a streamed one is dropped after `drop_after_s`."""
    headers = {"content-type": "application/json"}
    try:
        if not streamed:
            r = httpx.post(url + "/v1/chat/completions", content=body, timeout=600, headers=headers)
            return r.status_code, (r.json().get("error", {}).get("code") if r.status_code >= 400 else "ok")
        timeout = httpx.Timeout(600, read=drop_after_s)  # no line for that long (the prefill): drop it
        with httpx.Client(timeout=timeout) as c, c.stream("POST", url + "/v1/chat/completions", content=body,
                                                          headers=headers) as r:
            if r.status_code >= 400:
                r.read()
                return r.status_code, r.json().get("error", {}).get("code")
            t0 = time.perf_counter()
            try:
                for _ in r.iter_lines():
                    if time.perf_counter() - t0 > drop_after_s:
                        break
            except httpx.ReadTimeout:
                pass
            return r.status_code, f"streamed, dropped after {drop_after_s:g} s"
    except httpx.HTTPError as e:
        return 0, type(e).__name__


def measure(url: str, body: bytes, streamed: bool, drop_after_s: float) -> dict:
    waits: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                c.get(url + "/health")
                waits.append(time.perf_counter() - t0)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    status, code = send(url, body, streamed, drop_after_s)
    took = time.perf_counter() - t0
    time.sleep(0.2)
    stop.set()
    poller.join()
    while httpx.get(url + "/health", timeout=60).json()["queue"]["running"]:  # a dropped stream: let it stop
        time.sleep(0.05)
    return {"bytes": len(body), "status": status, "code": code, "request_s": round(took, 3),
            "health_worst_ms": round(1000 * max(waits), 1), "health_median_ms": round(1000 * statistics.median(waits), 1),
            "health_polls": len(waits)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=str(ROOT), help="the checkout whose server is measured (default: this one)")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the tiny demo model)")
    ap.add_argument("--sizes-mib", default="4,14.5", help="plain-text body sizes to send, MiB")
    ap.add_argument("--accepted-s", type=float, default=4.0, help="drop the accepted prompt's stream after this")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    checkpoint = Path(args.model) if args.model else ensure_tiny_checkpoint()
    context, bound = prompt_bound(checkpoint)
    sizes = [float(x) for x in args.sizes_mib.split(",") if x]
    results = {"repo": args.repo, "context_tokens": context, "prompt_bound_chars": bound, "cases": {}}
    with server_process(args.model, 1, Path(args.repo)) as url:
        for name, body, streamed in bodies(context, bound, sizes):
            results["cases"][name] = measure(url, body, streamed, args.accepted_s)
            if not args.json:
                r = results["cases"][name]
                print(f"{name:>14}: {r['bytes'] / MiB:6.2f} MiB -> {r['status']} {r['code']:<32} in "
                      f"{r['request_s']:7.2f} s; /health worst {r['health_worst_ms']:8.1f} ms, median "
                      f"{r['health_median_ms']:5.1f} ms over {r['health_polls']} polls", flush=True)
    worst = max(r["health_worst_ms"] for r in results["cases"].values())
    results["health_worst_ms"] = worst
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"worst /health wait over all cases: {worst:.1f} ms (prompt bound {bound:,} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
