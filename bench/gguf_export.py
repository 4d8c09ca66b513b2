"""Export our BailingMoeV2 LLM (a loaded `engine.models.thinker.model.LoadedModel`) to a GGUF file of llama.cpp's
`bailingmoe2` architecture, with the `gguf` package (`pip install -r requirements-bench.txt`).

    python bench/gguf_export.py CHECKPOINT_DIR OUT.gguf [--dtype fp32|bf16]

It exists for `bench/vs_llamacpp.py` (the same weights in both engines) and is a *text-only* export:

* Only the text router (`mlp.gate`) is written. Ming's MultiRouter also has `mlp.image_gate` and
  `mlp.audio_gate`, used only for image/video/audio feature tokens (spec §2.7); llama.cpp has one
  router per layer, so those two gates are dropped and the file is exact for text-only prompts.
* Our 3-D video RoPE reduces to ordinary partial rotate-half RoPE when p_T = p_H = p_W (every text
  token, spec §2.4): that is llama.cpp's NEOX rope over `rope.dimension_count` = rotary_dim channels.
* The rotary inverse frequencies are fp32 in llama.cpp: compare against `Numerics.intent(dtype)`,
  not the bf16-rounded tables of `Numerics.reference(bf16)` (spec §2.11).

What llama.cpp's `bailingmoe2` loader/graph expect (read from the llama.cpp sources vendored by
llama-cpp-python 0.3.36: src/models/bailingmoe2.cpp, src/llama-graph.cpp build_qkv/build_moe_ffn,
src/llama-model.cpp load_hparams, gguf-py/gguf/constants.py):

* one fused `blk.N.attn_qkv.weight` {n_embd, n_embd + 2*n_embd_gqa}, split head-major as Q | K | V
  (the same layout as our `query_key_value`), so n_heads*head_dim must equal hidden_size;
* `attn_q_norm`/`attn_k_norm` RMSNorm over head_dim before RoPE, eps `attention.layer_norm_rms_epsilon`;
* rope type NEOX (rotate-half) over the first `rope.dimension_count` channels, base `rope.freq_base`;
* the first `leading_dense_block_count` layers have a dense SwiGLU `ffn_gate/ffn_up/ffn_down`
  (`feed_forward_length`); the others `ffn_gate_inp` (router), optional `exp_probs_b.bias` (expert bias,
  selection only), stacked `ffn_{gate,up,down}_exps` and a shared expert `ffn_{gate,up,down}_shexp`
  of width (expert_shared_feed_forward_length or expert_feed_forward_length) * expert_shared_count;
* routing: `expert_gating_func` (2 = sigmoid), bias added for selection only, group-limited selection
  when `expert_group_count` > 1 (group score = sum of the two largest biased scores; keep
  `expert_group_used_count` groups; llama.cpp asserts 0 < used < count), top-`expert_used_count`,
  weights = unbiased scores renormalised (`expert_weights_norm`; sum clamped below at 6.1e-5 where
  we add 1e-20) times `expert_weights_scale`.
  When topk_group == n_group every group is kept, so the group keys are left out (inert).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.models.thinker.config import LLMConfig  # noqa: E402
from engine.models.thinker.llm import BailingMoeV2ForCausalLM  # noqa: E402

GGUF_ARCH = "bailingmoe2"
# llama.cpp needs a merges array for a gpt2 (byte-level BPE) vocab and gguf-py cannot write an
# empty array. Our tokenizer has no merges; this pair produces "ĠĠ", which is not in the vocab, so
# llama.cpp falls back to the two byte tokens: the same tokenization as no merges at all.
INERT_MERGE = "Ġ Ġ"
# Tensors kept in F32 whatever the weight dtype (as llama.cpp's converter does): norms, the router
# and the expert bias.
_KEEP_F32 = ("attn_norm", "ffn_norm", "output_norm", "attn_q_norm", "attn_k_norm", "ffn_gate_inp", "exp_probs_b")


class GGUFExportError(ValueError):
    """The model uses a feature llama.cpp's bailingmoe2 graph cannot express."""


def _gguf():
    try:
        import gguf
    except ImportError as e:  # optional dependency of the benchmark only
        raise ImportError("the `gguf` package is needed: pip install -r requirements-bench.txt") from e
    return gguf


@dataclass
class ExportReport:
    """What was written, and what was left out on purpose."""

    path: Path
    dtype: str
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # gguf name -> (our name, shape)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nbytes: int = 0


def check_exportable(cfg: LLMConfig) -> list[str]:
    """Raise GGUFExportError for what bailingmoe2 cannot hold; return notes about inert features."""
    notes = []
    if cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size:
        raise GGUFExportError(f"llama.cpp's fused attn_qkv is {{n_embd, n_embd + 2*n_embd_gqa}}: needs "
                              f"num_attention_heads*head_dim ({cfg.num_attention_heads * cfg.head_dim}) == "
                              f"hidden_size ({cfg.hidden_size})")
    if cfg.use_qkv_bias or cfg.use_bias:
        raise GGUFExportError("bailingmoe2 in llama.cpp has no attention biases (use_qkv_bias/use_bias)")
    if cfg.num_experts == 0:
        raise GGUFExportError("bailingmoe2 in llama.cpp needs num_experts > 0")
    if cfg.num_shared_experts == 0:
        raise GGUFExportError("bailingmoe2 in llama.cpp always builds a shared expert (num_shared_experts > 0)")
    if cfg.hidden_act != "silu":
        raise GGUFExportError(f"hidden_act {cfg.hidden_act!r}: only silu")
    if cfg.n_group > 1 and cfg.topk_group >= cfg.n_group:
        notes.append(f"topk_group == n_group ({cfg.n_group}): group-limited routing keeps every group, "
                     "so expert_group_count is not written (inert)")
    if cfg.uses_multi_router:
        notes.append("MultiRouter: only the text gate is exported (image/audio gates dropped; exact for text-only prompts)")
    notes.append("video_rope: exported as partial NEOX rope (identical for text tokens, p_T = p_H = p_W)")
    return notes


def tensor_map(cfg: LLMConfig) -> dict[str, str]:
    """Our parameter name -> GGUF tensor name, built from gguf's own name table for the arch."""
    gguf = _gguf()
    T = gguf.MODEL_TENSOR
    allowed = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.BAILINGMOE2])

    def name(t, bid: int | None = None, suffix: str = "weight") -> str:
        if t not in allowed:
            raise GGUFExportError(f"{t} is not a bailingmoe2 tensor in this gguf version")
        base = gguf.TENSOR_NAMES[t]
        return (base.format(bid=bid) if bid is not None else base) + "." + suffix

    out = {"model.word_embeddings.weight": name(T.TOKEN_EMBD),
           "model.norm.weight": name(T.OUTPUT_NORM),
           "lm_head.weight": name(T.OUTPUT)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": name(T.ATTN_NORM, i),
                p + "attention.query_key_value.weight": name(T.ATTN_QKV, i),
                p + "attention.dense.weight": name(T.ATTN_OUT, i),
                p + "attention.q_norm.weight": name(T.ATTN_Q_NORM, i),
                p + "attention.k_norm.weight": name(T.ATTN_K_NORM, i),
                p + "post_attention_layernorm.weight": name(T.FFN_NORM, i)}
        if cfg.is_moe_layer(i):
            out |= {p + "mlp.gate.weight": name(T.FFN_GATE_INP, i),
                    p + "mlp.gate.expert_bias": name(T.FFN_EXP_PROBS_B, i, "bias"),
                    p + "mlp.experts.gate_proj": name(T.FFN_GATE_EXP, i),
                    p + "mlp.experts.up_proj": name(T.FFN_UP_EXP, i),
                    p + "mlp.experts.down_proj": name(T.FFN_DOWN_EXP, i),
                    p + "mlp.shared_experts.gate_proj.weight": name(T.FFN_GATE_SHEXP, i),
                    p + "mlp.shared_experts.up_proj.weight": name(T.FFN_UP_SHEXP, i),
                    p + "mlp.shared_experts.down_proj.weight": name(T.FFN_DOWN_SHEXP, i)}
        else:
            out |= {p + "mlp.gate_proj.weight": name(T.FFN_GATE, i),
                    p + "mlp.up_proj.weight": name(T.FFN_UP, i),
                    p + "mlp.down_proj.weight": name(T.FFN_DOWN, i)}
    return out


def write_metadata(writer: Any, cfg: LLMConfig, dtype: str, name: str, tokenizer_json: dict | None,
                   bos_id: int | None, eos_id: int | None, pad_id: int | None) -> None:
    gguf = _gguf()
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "fp32" else gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.rotary_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_leading_dense_block_count(cfg.first_k_dense_replace)
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if 1 < cfg.n_group and cfg.topk_group < cfg.n_group:
        writer.add_expert_group_count(cfg.n_group)
        writer.add_expert_group_used_count(cfg.topk_group)
    writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    # llama.cpp builds the shared expert with width n_ff_shexp * expert_shared_count.
    writer.add_expert_shared_feed_forward_length(cfg.moe_intermediate_size)
    writer.add_expert_shared_count(cfg.num_shared_experts)
    writer.add_expert_weights_scale(cfg.routed_scaling_factor)
    writer.add_expert_weights_norm(True)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    _write_vocab(writer, cfg, tokenizer_json, bos_id, eos_id, pad_id)


def _write_vocab(writer: Any, cfg: LLMConfig, tokenizer_json: dict | None, bos_id, eos_id, pad_id) -> None:
    """A gpt2-style byte-level BPE vocab of exactly vocab_size entries. From the checkpoint's
    tokenizer.json when given (ids without a token become `<|reserved_i|>`), merges included."""
    gguf = _gguf()
    tokens = [f"<|reserved_{i}|>" for i in range(cfg.vocab_size)]
    types = [gguf.TokenType.CONTROL] * cfg.vocab_size
    merges: list[str] = []
    if tokenizer_json is not None:
        model = tokenizer_json.get("model", {})
        special = {a["id"] for a in tokenizer_json.get("added_tokens", []) if a.get("special")}
        for text, i in model.get("vocab", {}).items():
            if 0 <= i < cfg.vocab_size:
                tokens[i] = text
                types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
        for a in tokenizer_json.get("added_tokens", []):
            if 0 <= a["id"] < cfg.vocab_size:
                tokens[a["id"]] = a["content"]
                types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("bailingmoe2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges or [INERT_MERGE])
    for value, add in ((bos_id, writer.add_bos_token_id), (eos_id, writer.add_eos_token_id),
                       (pad_id, writer.add_pad_token_id)):
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _as_numpy(t: torch.Tensor, gguf_name: str, dtype: str):
    """(array, raw_dtype) without copying where possible: F32 as float32, BF16 as its uint16 bits."""
    gguf = _gguf()
    t = t.detach()
    if dtype == "fp32" or any(k in gguf_name for k in _KEEP_F32) or t.dim() == 1:
        arr = t.to(torch.float32).contiguous().numpy()
        return arr, None
    arr = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return arr, gguf.GGMLQuantizationType.BF16


def export_gguf(llm: BailingMoeV2ForCausalLM, out_path: str | Path, dtype: str = "fp32", *,
                tokenizer_json: dict | None = None, name: str = "ming-bailingmoe2",
                bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None) -> ExportReport:
    """Write `llm`'s weights (as they are in memory: what our engine runs) to `out_path`."""
    gguf = _gguf()
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    cfg = llm.config
    notes = check_exportable(cfg)
    mapping = tensor_map(cfg)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = ExportReport(path=out_path, dtype=dtype, notes=notes)
    params = dict(llm.named_parameters())
    params |= {n: b for n, b in llm.named_buffers()}
    on_meta = [n for n, t in params.items() if t.device.type == "meta"]
    if on_meta:
        raise ValueError(f"{len(on_meta)} weights are not materialised (e.g. '{on_meta[0]}'): load the model with "
                         "load_model(..., pack_cpu_experts=False) and without quantisation or a placement plan")
    tmp = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
    try:
        write_metadata(writer, cfg, dtype, name, tokenizer_json, bos_id, eos_id, pad_id)
        for ours, t in params.items():
            if ours not in mapping:
                report.dropped.append(ours)
                continue
            arr, raw = _as_numpy(t, mapping[ours], dtype)
            writer.add_tensor(mapping[ours], arr, raw_dtype=raw)
            report.tensors[mapping[ours]] = (ours, tuple(t.shape))
            report.nbytes += arr.nbytes
        missing = sorted(set(mapping) - set(params))
        if missing:
            raise GGUFExportError(f"model has no parameter {missing[0]} (and {len(missing) - 1} more)")
        unexpected = [d for d in report.dropped if not (".image_gate." in d or ".audio_gate." in d)]
        if unexpected:
            raise GGUFExportError(f"no GGUF name for parameter {unexpected[0]}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(out_path)
    return report


def main(argv: list[str] | None = None) -> int:
    import json

    from engine.models.thinker.model import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args(argv)
    model = load_model(args.checkpoint, dtype=args.dtype, device="cpu", pack_cpu_experts=False)
    tok = args.checkpoint / "tokenizer.json"
    tcfg = json.loads((args.checkpoint / "tokenizer_config.json").read_text()) if (
        args.checkpoint / "tokenizer_config.json").is_file() else {}
    tokenizer_json = json.loads(tok.read_text(encoding="utf-8")) if tok.is_file() else None
    ids = {a["content"]: a["id"] for a in (tokenizer_json or {}).get("added_tokens", [])}
    cfg = model.config.llm
    rep = export_gguf(model.llm, args.out, args.dtype, tokenizer_json=tokenizer_json, name=args.checkpoint.name,
                      bos_id=ids.get(tcfg.get("bos_token")), eos_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
                      pad_id=cfg.pad_token_id)
    print(f"wrote {rep.path}: {len(rep.tensors)} tensors, {rep.nbytes / 2**20:.1f} MiB ({rep.dtype})")
    for n in rep.notes:
        print(f"note: {n}")
    if rep.dropped:
        print(f"dropped {len(rep.dropped)} tensors (image/audio gates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
