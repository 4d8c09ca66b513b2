"""bench/gguf_export.py without llama.cpp: the GGUF file reads back with the `gguf` package's reader
and holds exactly our weights under llama.cpp's `bailingmoe2` names, with the right metadata.
Skipped when `gguf` (requirements-bench.txt) is not installed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from bench.gguf_export import INERT_MERGE, GGUFExportError, check_exportable, export_gguf  # noqa: E402
from bench.vs_llamacpp import midsize_config, write_checkpoint  # noqa: E402
from engine.models.thinker.config import LLMConfig  # noqa: E402
from engine.models.thinker.model import load_model  # noqa: E402
from engine.tiny import tiny_config  # noqa: E402


def small_config(**over) -> dict:
    cfg = midsize_config(hidden=128, layers=3, experts=8, heads=4)  # head_dim 32, rotary 16
    cfg.update({"intermediate_size": 96, "moe_intermediate_size": 32, "num_experts_per_tok": 2,
                "n_group": 4, "topk_group": 2})
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("gguf") / "small", small_config(), log=lambda *_: None)


def _kv(reader, key):
    field = reader.fields[key]
    return field.contents()


def _read(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_reads_back_exactly(small_checkpoint, tmp_path, dtype):
    model = load_model(small_checkpoint, dtype=dtype, device="cpu", pack_cpu_experts=False)
    cfg = model.config.llm
    tok = json.loads((small_checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    rep = export_gguf(model.llm, tmp_path / "m.gguf", dtype, tokenizer_json=tok, eos_id=cfg.eos_token_ids[0])
    reader, tensors = _read(rep.path)

    assert _kv(reader, "general.architecture") == "bailingmoe2"
    a = "bailingmoe2."
    expect = {"block_count": 3, "embedding_length": 128, "feed_forward_length": 96, "attention.head_count": 4,
              "attention.head_count_kv": 4, "attention.key_length": 32, "attention.value_length": 32,
              "rope.dimension_count": 16, "leading_dense_block_count": 1, "expert_count": 8,
              "expert_used_count": 2, "expert_group_count": 4, "expert_group_used_count": 2,
              "expert_feed_forward_length": 32, "expert_shared_feed_forward_length": 32,
              "expert_shared_count": 1, "expert_gating_func": 2, "expert_weights_norm": True,
              "vocab_size": cfg.vocab_size}
    for k, v in expect.items():
        assert _kv(reader, a + k) == v, k
    assert _kv(reader, a + "expert_weights_scale") == pytest.approx(2.5)
    assert _kv(reader, a + "rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert _kv(reader, a + "attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert _kv(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = _kv(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[cfg.eos_token_ids[0]] == "<|role_end|>"
    assert _kv(reader, "tokenizer.ggml.merges") == [INERT_MERGE]
    assert _kv(reader, "tokenizer.ggml.eos_token_id") == cfg.eos_token_ids[0]

    # Every parameter except the image/audio gates, under its bailingmoe2 name, bit for bit.
    assert sorted(rep.dropped) == sorted(n for n, _ in model.llm.named_parameters()
                                         if ".image_gate." in n or ".audio_gate." in n)
    assert set(tensors) == set(rep.tensors)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.BAILINGMOE2]}
    params = dict(model.llm.named_parameters())
    for name, t in tensors.items():
        assert name.rsplit(".", 1)[0] in {n.format(bid=i) for n in allowed for i in range(3)}, name
        ours = params[rep.tensors[name][0]]
        assert tuple(int(d) for d in t.shape) == tuple(reversed(ours.shape)), name  # ggml ne order
        if dtype == "bf16" and ours.dim() > 1 and "ffn_gate_inp" not in name:
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16, name
            got = np.asarray(t.data).view(np.uint16).reshape(ours.shape)
            want = ours.contiguous().view(torch.int16).numpy().view(np.uint16)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            got = np.asarray(t.data).reshape(ours.shape)
            want = ours.float().numpy()
        assert np.array_equal(got, want), name

    # The layouts llama.cpp relies on: fused QKV rows Q | K | V, experts stacked [E, I, H].
    assert tensors["blk.0.attn_qkv.weight"].shape.tolist() == [128, (4 + 2 * 4) * 32]
    assert tensors["blk.1.ffn_gate_exps.weight"].shape.tolist() == [128, 32, 8]
    assert tensors["blk.1.ffn_down_exps.weight"].shape.tolist() == [32, 128, 8]
    assert "blk.1.exp_probs_b.bias" in tensors and "blk.0.ffn_gate.weight" in tensors


def test_group_keys_left_out_when_inert(tmp_path):
    ckpt = write_checkpoint(tmp_path / "nogroups", small_config(n_group=2, topk_group=2), log=lambda *_: None)
    model = load_model(ckpt, dtype="fp32", device="cpu", pack_cpu_experts=False)  # the weights as stored
    rep = export_gguf(model.llm, tmp_path / "m.gguf")
    reader, _ = _read(rep.path)
    assert "bailingmoe2.expert_group_count" not in reader.fields
    assert any("inert" in n for n in rep.notes)


def test_rejects_what_bailingmoe2_cannot_hold():
    # The tiny demo model has 4 heads of 128 in a hidden size of 128: llama.cpp's fused QKV needs
    # n_heads * head_dim == hidden.
    with pytest.raises(GGUFExportError, match="hidden_size"):
        check_exportable(LLMConfig.from_dict(tiny_config()["llm_config"]))
    with pytest.raises(GGUFExportError, match="bias"):
        check_exportable(LLMConfig.from_dict(small_config(use_qkv_bias=True)))


def test_llamacpp_runs_the_export_with_our_logits(small_checkpoint, tmp_path):
    """End to end when llama-cpp-python is installed (skipped otherwise): same last-position logits."""
    pytest.importorskip("llama_cpp")
    from bench.vs_llamacpp import LlamaCpp, Ours, compare_logits, run_once
    from engine.models.thinker.layers import Numerics

    stored = load_model(small_checkpoint, dtype="fp32", device="cpu", pack_cpu_experts=False)
    path = export_gguf(stored.llm, tmp_path / "m.gguf").path
    del stored
    # ours as the engine runs it (weights re-laid out for the CPU kernels)
    model = load_model(small_checkpoint, dtype="fp32", device="cpu", numerics=Numerics.intent(torch.float32))
    ids = [int(i) for i in torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0))]
    ours = run_once(Ours(model), ids, 4)
    theirs = run_once(LlamaCpp(path, threads=1, n_ctx=64, n_batch=64, kv_type=0), ids, 4)
    cmp = compare_logits(ours, theirs)
    assert cmp["prefill_argmax_agree"]
    assert cmp["prefill_last_max_abs_diff"] < 1e-4, cmp
