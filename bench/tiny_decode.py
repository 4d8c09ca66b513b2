"""Time to first token and decode tokens/s of the embedded tiny model on this machine.

    python bench/tiny_decode.py [--model DIR] [--new-tokens 64] [--runs 5] [--json]

Greedy decoding of a fixed chat prompt; one warm-up run first; medians over the runs. The ratio
printed is decode tokens/s relative to the prefill rate, to show where time goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cli import run  # noqa: E402
from engine.events import Done  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from engine.sampling import GenerationParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the tiny random demo model)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    engine = Engine.load(args.model)
    msgs = [{"role": "user", "content": "Tell me about the Ming dynasty in a few sentences."}]
    params = GenerationParams(max_new_tokens=args.new_tokens)
    list(engine.chat(msgs, params))  # warm-up
    ttft, tps, prompt_tokens = [], [], 0
    for _ in range(args.runs):
        done = list(engine.chat(msgs, params))[-1]
        assert isinstance(done, Done), done
        ttft.append(done.stats.time_to_first_token_s)
        tps.append(done.stats.decode_tokens_per_s)
        prompt_tokens = done.stats.prompt_tokens
    out = {"model": engine.info().name, "device": engine.info().device, "dtype": engine.info().dtype,
           "prompt_tokens": prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
           "ttft_ms_median": 1000 * statistics.median(ttft), "decode_tokens_per_s_median": statistics.median(tps),
           "prefill_tokens_per_s_median": prompt_tokens / statistics.median(ttft)}
    out["decode_vs_prefill_ratio"] = out["decode_tokens_per_s_median"] / out["prefill_tokens_per_s_median"]
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
