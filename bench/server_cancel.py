"""How long the engine stays busy after a client drops a long prompt at once, through the server
(issue 9 §3): an HTTP stream whose connection closes, a realtime socket that closes, a realtime
response.cancel.

    python bench/server_cancel.py [--repo DIR] [--model DIR] [--prompt-tokens 16000] [--runs 1] [--json]

The server runs in its own process (`python -m engine.server` from the checkout --repo: this one by
default; a checkout without chunked prefill gives the "before" figures) with the tiny model (or
--model). The prompt is plain text of about --prompt-tokens tokens of the checkpoint's tokenizer.
Each case starts the request, drops it as soon as the server says generation has started (queue
position 0: the engine is building and prefilling the prompt), and times from the drop until the
engine is free again (/health `queue.running` back to 0, polled every 10 ms). For scale, the time
the same prompt takes to its first token without a cancel (`prefill_s`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from bench.cli import run  # noqa: E402
from bench.server_latency import server_process  # noqa: E402
from engine.tiny import ensure_tiny_checkpoint  # noqa: E402

UNIT = "the quick brown fox jumps over the lazy dog while the cat sleeps by the fire. "


def long_prompt(checkpoint: Path, tokens: int) -> tuple[str, int]:
    """Plain text of about `tokens` tokens, and its exact token count."""
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    per_unit = len(tok.encode(UNIT, add_special_tokens=False).ids)
    text = UNIT * max(1, tokens // per_unit)
    return text, len(tok.encode(text, add_special_tokens=False).ids)


def until_free(url: str, t_drop: float, timeout: float = 300.0) -> float:
    """Seconds from `t_drop` until the engine runs nothing."""
    with httpx.Client(timeout=30) as c:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if c.get(url + "/health").json()["queue"]["running"] == 0:
                return time.perf_counter() - t_drop
            time.sleep(0.01)
    raise RuntimeError("the engine did not finish the dropped request")


def prefill_s(url: str, text: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", timeout=600,
                   json={"messages": [{"role": "user", "content": text}], "max_tokens": 1})
    if r.status_code != 200:
        raise RuntimeError(f"the prompt was refused: {r.text[:300]}")
    return time.perf_counter() - t0


def http_drop(url: str, text: str) -> float:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4, "stream": True}
    with httpx.Client(timeout=600) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith(": queue_position") and '"position":0' in line.replace(" ", ""):
                break
        t_drop = time.perf_counter()
    return until_free(url, t_drop)


def realtime_drop(url: str, text: str, how: str) -> float:
    ws_url = url.replace("http://", "ws://") + "/v1/realtime"
    with connect(ws_url, max_size=None) as ws:
        json.loads(ws.recv(timeout=30))  # session.created
        ws.send(json.dumps({"type": "conversation.item.create",
                            "item": {"type": "message", "role": "user", "content": text}}))
        while json.loads(ws.recv(timeout=60))["type"] != "conversation.item.done":
            pass
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 4}}))
        while True:
            ev = json.loads(ws.recv(timeout=60))
            if ev["type"] == "response.queue_position" and ev["position"] == 0:
                break
        t_drop = time.perf_counter()
        if how == "response.cancel":
            ws.send(json.dumps({"type": "response.cancel"}))
            while json.loads(ws.recv(timeout=600))["type"] != "response.done":
                pass
    return until_free(url, t_drop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=str(ROOT), help="the checkout whose server is measured (default: this one)")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the tiny demo model)")
    ap.add_argument("--prompt-tokens", type=int, default=16000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    checkpoint = Path(args.model) if args.model else ensure_tiny_checkpoint()
    text, n_tokens = long_prompt(checkpoint, args.prompt_tokens)
    results: dict = {"repo": args.repo, "prompt_tokens": n_tokens}
    with server_process(args.model, 1, Path(args.repo)) as url:
        results["prefill_s"] = round(prefill_s(url, text), 3)
        cases = {"http_drop": lambda: http_drop(url, text),
                 "realtime_close": lambda: realtime_drop(url, text, "close"),
                 "realtime_response.cancel": lambda: realtime_drop(url, text, "response.cancel")}
        for name, run in cases.items():
            times = [run() for _ in range(args.runs)]
            results[f"{name}_busy_s"] = round(statistics.median(times), 3)
            if not args.json:
                print(f"{name:>26}: engine busy {results[f'{name}_busy_s']:.3f} s after the drop", flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"prompt {n_tokens} tokens; its time to first token without a cancel: {results['prefill_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
