"""Error of quantised routed experts against the unquantised model on the public parity fixtures.

For each case (default: ../shared/fixtures/ming_ref/llm_b1, llm_b2, mm) the model is loaded once per
expert dtype through `load_model` (fp32 activations, as engine.tools.parity does): "bf16" (the
unquantised reference: experts stay in the model dtype), "fp8" (per-channel scales), "fp8-block"
(128x128 block scales), "int8" and "int4" (groups of up to 128 inputs). Experts are computed by
dequantising them exactly as stored (`pack_cpu_experts=False`): the error of the format itself, which
is what the fused GPU kernel computes (the CPU kernels add only their summation order, except fp8,
which the CPU runs re-quantised to int8). The reference runs prefill
and the case's number of greedy KV-cache decode steps. Each quantised model is then run
*teacher-forced* on the same inputs and the reference's greedy tokens, so every position is compared
on identical context:

* max_abs / mean_abs: |logits − reference logits| over valid prefill positions and decode steps;
* top1: fraction of those positions whose argmax (the greedy token) equals the reference's;
* greedy_free: fraction of the tokens a free-running greedy decode of the quantised model generates
  that equal the reference's (position by position);
* router_sets: fraction of (MoE layer, token) routing decisions whose selected expert *set* equals the
  reference's; router_overlap: mean |selected ∩ reference| / k;
* vs_upstream: max |prefill logits − the fixture's upstream fp32 logits| (context: the bf16 row is the
  parity error of the unquantised engine itself); ref_mean_abs_logit: mean |reference logit| (scale).

The fixture models are tiny and random (hidden 64, 16 experts, top-4); a changed routing decision
changes a token's output a lot, so max_abs is dominated by the few routing flips near ties.

Usage: python bench/quant_error.py [CASE_DIR ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.tools.parity import _processor_for, conversation_from_prompt, llm_case_inputs  # noqa: E402
from engine.models.thinker.positions import PositionTokens, decode_positions, rope_index  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from engine.models.thinker.model import load_model  # noqa: E402

DEFAULT_CASES = ["llm_b1", "llm_b2", "mm"]
FIXTURES = REPO.parent / "shared" / "fixtures" / "ming_ref"
KINDS = ("bf16", "fp8", "fp8-block", "int8", "int4")


def _llm_inputs(case_dir: Path, loaded):
    """(ids, mask, mm, image_grid_thw, video_grid_thw) of an `llm` case, as engine.tools.parity builds them."""
    return llm_case_inputs(case_dir)


def _mm_inputs(case_dir: Path, loaded):
    """The `mm` case end to end: raw media through our processor and encoders (of this model)."""
    meta = json.loads((case_dir / "meta.json").read_text())
    inputs = load_file(str(case_dir / "inputs.safetensors"))
    _, processor = _processor_for(case_dir, loaded)
    media = {"image": [inputs[k].numpy() for k in sorted(inputs) if re.fullmatch(r"raw\.image\d+", k)],
             "audio": [(inputs[k], 16000) for k in sorted(inputs) if re.fullmatch(r"raw\.audio\d+", k)],
             "video": []}
    messages, system, thinking = conversation_from_prompt(meta["prompt_text_before_expansion"], media)
    prompt = processor.build(messages, system_prompt=system, thinking=thinking)
    with torch.inference_mode():
        mm = Engine(loaded, processor.tokenizer, is_demo=False).encode_media(prompt)
    ids = torch.tensor([prompt.ids])
    return ids, torch.ones_like(ids), mm, prompt.image_grid_thw, prompt.video_grid_thw


def run(loaded, inputs, n_new: int, forced: torch.Tensor | None = None) -> dict:
    """Prefill + n_new greedy decode steps (feeding `forced` tokens when given). Returns logits at valid
    prefill positions and decode steps, tokens, and routing ids per MoE layer."""
    llm, num = loaded.llm, loaded.numerics
    ids, mask, mm, igrid, vgrid = inputs
    b = ids.shape[0]
    with torch.inference_mode():
        pos, deltas = rope_index(ids, PositionTokens.from_config(loaded.config.llm), igrid, vgrid, mask)
        embeds, image_mask, audio_mask = llm.prepare_inputs(ids, mm)
        cache = llm.new_cache(b, num, "cpu")
        cache.rope_deltas = deltas
        trace: dict = {}
        logits = llm(embeds, pos, num, mask, cache, image_mask, audio_mask, trace=trace)
        valid = mask.bool()
        routes = {l: [t[0].ids[valid]] for l, t in trace.get("routers", {}).items()}
        step_logits, tokens = [logits[:, -1]], []
        for step in range(n_new):
            nxt = step_logits[-1].argmax(-1) if forced is None else forced[:, step]
            tokens.append(step_logits[-1].argmax(-1))
            if step == n_new - 1:
                break
            dtrace: dict = {}
            out = llm(llm.model.embed(nxt.view(b, 1)), decode_positions(cache.length, deltas), num,
                      torch.ones(b, 1, dtype=torch.long), cache, trace=dtrace)
            step_logits.append(out[:, -1])
            for l, t in dtrace.get("routers", {}).items():
                routes[l].append(t[0].ids.reshape(b, -1))
    all_logits = torch.cat([logits[valid]] + [s for s in step_logits[1:]], dim=0)
    return {"prefill": logits, "valid": valid, "logits": all_logits,
            "tokens": torch.stack(tokens, 1) if tokens else torch.zeros(b, 0, dtype=torch.long),
            "routes": {l: torch.cat(v, 0) for l, v in routes.items()}}


def compare(ref: dict, got: dict, free: dict, upstream: torch.Tensor | None) -> dict:
    d = (got["logits"] - ref["logits"]).abs()
    same_sets, overlap, n = 0, 0.0, 0
    for l, r_ids in ref["routes"].items():
        r, g = r_ids.sort(-1).values, got["routes"][l].sort(-1).values
        same_sets += int((r == g).all(-1).sum())
        k = r.shape[-1]
        overlap += float(((r.unsqueeze(-1) == g.unsqueeze(-2)).any(-1).sum(-1).float() / k).sum())
        n += r.shape[0]
    vs_up = float("nan")
    if upstream is not None and upstream.shape == got["prefill"].shape:
        vs_up = float((got["prefill"][got["valid"]] - upstream[got["valid"]]).abs().max())
    return {
        "max_abs": float(d.max()), "mean_abs": float(d.mean()),
        "top1": float((got["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean()),
        "greedy_free": float((free["tokens"] == ref["tokens"]).float().mean()) if ref["tokens"].numel() else float("nan"),
        "router_sets": same_sets / max(n, 1), "router_overlap": overlap / max(n, 1),
        "positions": int(d.shape[0]), "routing_decisions": n, "vs_upstream": vs_up,
        "ref_mean_abs_logit": float(ref["logits"].abs().mean()),
    }


def measure_case(case_dir: Path) -> list[dict]:
    meta = json.loads((case_dir / "meta.json").read_text())
    outputs = load_file(str(case_dir / "outputs.safetensors"))
    n_new = outputs["generated_ids"].shape[1] if "generated_ids" in outputs else 0
    build = _mm_inputs if meta.get("kind") == "mm" else _llm_inputs
    rows, ref = [], None
    for kind in KINDS:
        loaded = load_model(case_dir, dtype="fp32", device="cpu", expert_dtype=kind, pack_cpu_experts=False)
        inputs = build(case_dir, loaded)
        if ref is None:
            ref = run(loaded, inputs, n_new)
            got, free = ref, ref
        else:
            got, free = run(loaded, inputs, n_new, forced=ref["tokens"]), run(loaded, inputs, n_new)
        rows.append({"case": case_dir.name, "expert_dtype": kind, **compare(ref, got, free, outputs.get("logits"))})
    return rows


def format_rows(rows: list[dict]) -> str:
    cols = ["case", "expert_dtype", "max_abs", "mean_abs", "top1", "greedy_free", "router_sets", "router_overlap",
            "vs_upstream", "ref_mean_abs_logit"]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    body = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", type=Path, help=f"case folders (default: {', '.join(DEFAULT_CASES)} "
                                                          f"under {FIXTURES})")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    cases = args.cases or [FIXTURES / c for c in DEFAULT_CASES]
    missing = [c for c in cases if not (c / "meta.json").is_file()]
    if missing:
        print(f"missing case folder(s): {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = [r for c in cases for r in measure_case(c)]
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
