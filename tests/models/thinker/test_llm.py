"""Model behaviour the spec implies, checked without fixtures: KV-cache decode equals a full
forward, left padding does not change a row, routing rules, rotary layout, bf16 numerics switch."""

import contextlib
import json

import pytest
import torch

from engine.models.thinker.layers import GROUP_SCORE_TOP, Numerics, Router, VideoRotary
from engine.models.thinker.positions import decode_positions, rope_index, PositionTokens
from engine.models.thinker.model import load_model, parse_dtype
from tests.activations import quantized_activations

FP32 = Numerics()


def _positions(llm, ids, mask=None):
    return rope_index(ids, PositionTokens.from_config(llm.config), attention_mask=mask)


def _assert_decode_matches_full_forward(llm, ids: torch.Tensor, prefill: int) -> None:
    """A prefill of `prefill` tokens then one-token KV-cache steps give the hidden states of one full forward."""
    with torch.inference_mode():
        pos, delta = _positions(llm, ids)
        full = llm(llm.model.embed(ids), pos, FP32)
        cache = llm.new_cache(1, FP32, "cpu")
        part = llm(llm.model.embed(ids[:, :prefill]), pos[:, :, :prefill], FP32, cache=cache)
        steps = [llm(llm.model.embed(ids[:, i:i + 1]), decode_positions(cache.length, delta), FP32, cache=cache)
                 for i in range(prefill, ids.shape[1])]
    torch.testing.assert_close(torch.cat([part] + steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_kv_cache_decode_matches_full_forward(tiny_checkpoint):
    llm = load_model(tiny_checkpoint, dtype="fp32", device="cpu").llm
    _assert_decode_matches_full_forward(llm, torch.tensor([[5, 60, 70, 80, 90, 100, 110, 120]]), 5)


def test_left_padding_does_not_change_a_row(tiny_checkpoint):
    llm = load_model(tiny_checkpoint, dtype="fp32", device="cpu").llm
    a = torch.tensor([[10, 20, 30, 40, 50]])
    padded = torch.tensor([[0, 0, 10, 20, 30, 40, 50], [1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    with torch.inference_mode():
        alone = llm(llm.model.embed(a), _positions(llm, a)[0], FP32)
        pos, _ = _positions(llm, padded, mask)
        both = llm(llm.model.embed(padded), pos, FP32, step_mask=mask)
    torch.testing.assert_close(both[0, 2:], alone[0], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(both).all()


def _router(e=32, groups=4, topk_group=2, k=4, h=16):
    class C:
        num_experts, hidden_size, num_experts_per_tok, n_group = e, h, k, groups
        routed_scaling_factor = 2.5
    C.topk_group = topk_group
    r = Router(C)
    torch.manual_seed(0)
    r.weight.data.normal_()
    r.expert_bias.data.uniform_(-0.15, 0.15)
    return r


def test_router_rules_against_a_naive_implementation():
    r = _router()
    x = torch.randn(64, 16)
    ids, w = r.route(r.logits(x, FP32))
    s = torch.sigmoid(x @ r.weight.T)
    biased = s + r.expert_bias
    size = 32 // 4
    for t in range(64):
        gscore = [sorted(biased[t, g * size:(g + 1) * size].tolist())[-GROUP_SCORE_TOP:] for g in range(4)]
        keep = sorted(range(4), key=lambda g: -sum(gscore[g]))[:2]
        cands = [e for g in keep for e in range(g * size, (g + 1) * size)]
        chosen = sorted(cands, key=lambda e: -biased[t, e].item())[:4]
        assert sorted(ids[t].tolist()) == sorted(chosen)
        want = s[t, chosen] / s[t, chosen].sum() * 2.5  # unbiased scores, renormalised, scaled
        got = dict(zip(ids[t].tolist(), w[t].tolist()))
        assert torch.allclose(torch.tensor([got[e] for e in chosen]), want, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.full((64,), 2.5))


def test_bf16_router_switch_rounds_logits():
    r = _router()
    x = torch.randn(8, 16)
    assert r.logits(x, Numerics(router_bf16=True)).dtype == torch.bfloat16
    assert r.logits(x, FP32).dtype == torch.float32


def test_rotary_axes_and_bf16_tables(tiny_checkpoint):
    rot = load_model(tiny_checkpoint, dtype="fp32", device="cpu").llm.model.rotary_emb
    axes = rot.channel_axes().tolist()
    assert axes[:24] == [1, 2] * 12 and axes[24:32] == [0] * 8  # H/W interleaved high freqs, T on the 8 lowest
    assert axes[32:] == axes[:32] and rot.channel_frequencies().tolist() == list(range(32)) * 2
    assert not torch.equal(rot.inv_freq(True), rot.inv_freq(False))
    assert torch.equal(rot.inv_freq(True), rot.inv_freq(False).to(torch.bfloat16).float())
    # text tokens (T = H = W): ordinary 1-D partial rotary
    p = torch.arange(6).view(1, 1, -1).expand(3, 1, -1)
    cos, _ = rot(p, FP32)
    ref = torch.outer(torch.arange(6).float(), rot.inv_freq(False))
    torch.testing.assert_close(cos[0], torch.cat([ref, ref], -1).cos())


def test_bf16_model_runs_close_to_fp32(tiny_checkpoint):
    m32 = load_model(tiny_checkpoint, dtype="fp32", device="cpu")
    m16 = load_model(tiny_checkpoint, dtype="bf16", device="cpu")
    assert m16.numerics.rope_bf16_tables and m16.numerics.router_bf16  # reference numerics by default
    ids = torch.tensor([[10, 20, 30, 40, 50, 60]])
    with torch.inference_mode():
        pos = _positions(m32.llm, ids)[0]
        a = m32.llm(m32.llm.model.embed(ids), pos, m32.numerics)
        b = m16.llm(m16.llm.model.embed(ids), pos, m16.numerics)
    assert m16.llm.lm_head.weight.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.95  # bf16 rounding may flip near-tie expert choices in a random model


def test_cpu_packing_is_chosen_where_it_pays(tiny_checkpoint, monkeypatch):
    """Without the native decode kernels: fp32 matrices as small as the tiny model's stay on torch's plain
    path (oneDNN's fixed cost per call would make it slower); large fp32 ones and bf16 ones are packed.
    With them (test_native_kernels_take_the_decode_of_the_default_cpu_load): fp32 is never pre-packed."""
    from engine import kernels
    monkeypatch.setenv(kernels.native.DISABLE_ENV, "0")
    if not kernels.onednn_packing_available(torch.float32):
        pytest.skip("this torch build cannot pre-pack fp32 weights")
    tiny = load_model(tiny_checkpoint, dtype="fp32", device="cpu").llm
    assert tiny.model.layers[1].mlp.experts.packed is None and type(tiny.lm_head) is torch.nn.Linear
    assert not kernels.onednn_packing_pays(torch.zeros(512, 512))
    assert kernels.onednn_packing_pays(torch.zeros(2048, 512))  # one expert's down matrix of the bench model
    if kernels.onednn_packing_available(torch.bfloat16):
        assert kernels.onednn_packing_pays(torch.zeros(128, 128, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cpu_packed_weights_match_the_plain_path(tiny_checkpoint, dtype, monkeypatch):
    """The default CPU load re-lays experts and projections out for oneDNN; its outputs are the plain
    path's up to summation order (fp32: relative 1e-4; bf16: bf16 rounding of other partial sums)."""
    from engine import kernels
    if not kernels.onednn_packing_available(parse_dtype(dtype)):
        pytest.skip(f"this torch build cannot pre-pack {dtype} weights")
    monkeypatch.setenv(kernels.native.DISABLE_ENV, "0")  # oneDNN's layouts (the native kernels': below)
    monkeypatch.setattr(kernels.moe, "ONEDNN_FP32_MIN_BYTES", 0)  # pack the tiny model's fp32 matrices too
    packed = load_model(tiny_checkpoint, dtype=dtype, device="cpu")
    plain = load_model(tiny_checkpoint, dtype=dtype, device="cpu", pack_cpu_experts=False)
    bank = packed.llm.model.layers[1].mlp.experts
    assert bank.packed is not None and bank.gate_proj.device.type == "meta"
    assert plain.llm.model.layers[1].mlp.experts.packed is None
    ids = torch.tensor([[10, 20, 30, 40, 50, 60]])
    with torch.inference_mode():
        pos, delta = _positions(plain.llm, ids)
        a = plain.llm(plain.llm.model.embed(ids), pos, plain.numerics).float()
        b = packed.llm(packed.llm.model.embed(ids), pos, packed.numerics).float()
        # a decode step too (one token: the packed decode path)
        step, out = torch.tensor([[70]]), []
        for m in (plain, packed):
            cache = m.llm.new_cache(1, m.numerics, "cpu")
            m.llm(m.llm.model.embed(ids), pos, m.numerics, cache=cache)
            out.append(m.llm(m.llm.model.embed(step), decode_positions(cache.length, delta), m.numerics,
                             cache=cache).float())
        c, d = out
    if dtype == "fp32":
        for want, got in ((a, b), (c, d)):
            assert float((want - got).abs().max()) <= 1e-4 * float(want.abs().max())
    else:
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
        assert torch.nn.functional.cosine_similarity(c.flatten(), d.flatten(), dim=0) > 0.999


def _skip_without_native_kernels(native) -> None:
    if native._compiler() is None:
        pytest.skip("no C compiler here: the native kernels cannot be built (torch's path runs)")
    if native._disabled():
        pytest.skip(f"the native kernels are turned off here ({native._disabled()})")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_native_kernels_take_the_decode_of_the_default_cpu_load(tiny_checkpoint, dtype, monkeypatch):
    """Where the native CPU kernels build (every machine with a C compiler), the default CPU load keeps the
    checkpoint's plain layout; where a layer's projections are large enough for the native GEMV (here: all,
    by lowering the bound), a decode step runs each half of every layer in one native call (attention;
    router + routed and shared experts, or the dense MLP) and lm_head natively, and a prefill + decode
    step give the plain model's logits up to summation order (fp32: relative 1e-4; bf16: cosine > 0.999)."""
    from engine import kernels
    from engine.kernels import PackedLinear, native

    _skip_without_native_kernels(native)
    assert native.available(), native.status()
    default = load_model(tiny_checkpoint, dtype=dtype, device="cpu").llm
    assert default.model.layers[1].mlp.experts.packed.native_table() is not None
    assert default.model.layers[1].mlp.cpu_shared is not None  # the shared expert in the same native pass
    assert getattr(default.lm_head, "native", None) is None  # the tiny model's matrices are below native.BIND_MIN_BYTES
    assert all(layer.cpu_decode is None for layer in default.model.layers)  # and so are its layers' projections
    monkeypatch.setattr(native, "BIND_MIN_BYTES", 0)  # bind them all, as a large model's
    fast = load_model(tiny_checkpoint, dtype=dtype, device="cpu")
    plain = load_model(tiny_checkpoint, dtype=dtype, device="cpu", pack_cpu_experts=False)
    bank = fast.llm.model.layers[1].mlp.experts
    assert bank.packed is not None and not bank.packed.onednn and bank.packed.native_table() is not None
    assert isinstance(fast.llm.lm_head, PackedLinear) and not fast.llm.lm_head.packed.is_mkldnn
    assert fast.llm.lm_head.native is not None
    assert all(layer.cpu_decode is not None for layer in fast.llm.model.layers)
    calls = {"linear": 0, "moe_decode": 0, "attention": 0, "mlp": 0}

    def counted(name, real):
        return lambda *a, **kw: calls.__setitem__(name, calls[name] + 1) or real(*a, **kw)
    monkeypatch.setattr(native.BoundLinear, "__call__", counted("linear", native.BoundLinear.__call__))
    monkeypatch.setattr(native, "moe_decode", counted("moe_decode", native.moe_decode))
    monkeypatch.setattr(native.AttentionDecode, "__call__", counted("attention", native.AttentionDecode.__call__))
    monkeypatch.setattr(native.MlpDecode, "__call__", counted("mlp", native.MlpDecode.__call__))
    ids = torch.tensor([[10, 20, 30, 40, 50, 60]])
    out = []
    with torch.inference_mode():
        pos, delta = _positions(plain.llm, ids)
        for m in (plain, fast):
            cache = m.llm.new_cache(1, m.numerics, "cpu")
            a = m.llm(m.llm.model.embed(ids), pos, m.numerics, cache=cache).float()
            prefill_calls = dict(calls)
            b = m.llm(m.llm.model.embed(torch.tensor([[70]])), decode_positions(cache.length, delta), m.numerics,
                      cache=cache).float()
            out.append((a, b))
    layers = len(fast.llm.model.layers)
    assert prefill_calls["attention"] == prefill_calls["mlp"] == 0  # a prefill of 6 tokens: torch's modules
    decode_calls = {k: v - prefill_calls[k] for k, v in calls.items()}
    assert decode_calls == {"attention": layers, "mlp": layers, "moe_decode": 0, "linear": 1}  # + lm_head
    for want, got in zip(*out):
        _assert_same_logits(want, got, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_native_decode_routes_tied_experts_as_the_reference(tiny_checkpoint, dtype, monkeypatch):
    """Routers whose scores tie (here every router zeroed: all experts score 0.5; in bf16 ties at the top-k
    boundary are common) must choose the experts torch's router chooses: the native decode layer took the
    lowest ids, so a decode step's logits were those of other experts than the plain model's. The step's
    logits now match the plain model's up to summation order."""
    from engine.kernels import native

    _skip_without_native_kernels(native)
    monkeypatch.setattr(native, "BIND_MIN_BYTES", 0)  # every layer bound to the native decode kernels
    models = [load_model(tiny_checkpoint, dtype=dtype, device="cpu", pack_cpu_experts=pack) for pack in (False, True)]
    for m in models:
        with torch.no_grad():
            for layer in m.llm.model.layers:
                if layer.is_moe:
                    for gate in (layer.mlp.gate, layer.mlp.image_gate, layer.mlp.audio_gate):
                        gate.weight.zero_()
                        gate.expert_bias.zero_()
        for layer in m.llm.model.layers:  # re-bound after the edit (the native layer reads the router's storage)
            if layer.cpu_decode is not None:
                assert layer.bind_cpu_decode()
    plain, fast = models
    assert all(layer.cpu_decode is not None for layer in fast.llm.model.layers)
    ids = torch.tensor([[10, 20, 30, 40, 50, 60]])
    with torch.inference_mode():
        pos, delta = _positions(plain.llm, ids)
        want, got = (_decode_step_logits(m, ids, pos, delta) for m in models)
    _assert_same_logits(want, got, dtype)


def test_bf16_on_a_cpu_without_native_bf16_runs_prefill_gemms_in_fp32(tiny_checkpoint, monkeypatch):
    """Where bf16 matmuls are emulated (AVX2-only CPUs; forced here), the bf16 load wraps the projections
    so a prefill of many tokens computes them in fp32 (kernels.cpu_linear), the experts too (kernels.swiglu);
    a decode step stays in bf16; the logits agree with those of plain nn.Linear projections up to bf16 rounding."""
    from engine import kernels
    from engine.kernels import PackedLinear

    monkeypatch.setenv(kernels.native.DISABLE_ENV, "0")  # decode GEMVs through torch, to see their dtype
    real = kernels.moe.onednn_packing_available
    monkeypatch.setattr(kernels.moe, "onednn_packing_available", lambda dt: dt != torch.bfloat16 and real(dt))
    monkeypatch.setattr(kernels, "onednn_packing_available", kernels.moe.onednn_packing_available)
    wrapped = load_model(tiny_checkpoint, dtype="bf16", device="cpu")
    plain = load_model(tiny_checkpoint, dtype="bf16", device="cpu", pack_cpu_experts=False)
    assert isinstance(wrapped.llm.lm_head, PackedLinear) and not wrapped.llm.lm_head.packed.is_mkldnn
    assert type(plain.llm.lm_head) is torch.nn.Linear
    ids = torch.arange(10, 10 + 2 * kernels.moe.BF16_UPCAST_MIN_ROWS).unsqueeze(0)
    with torch.inference_mode():
        pos, delta = _positions(plain.llm, ids)
        a = plain.llm(plain.llm.model.embed(ids), pos, plain.numerics).float()
        cache = wrapped.llm.new_cache(1, wrapped.numerics, "cpu")
        computed_in = []
        linear = torch.nn.functional.linear
        monkeypatch.setattr(torch.nn.functional, "linear",
                            lambda x, w, *args: computed_in.append((w.dtype, x.numel() // x.shape[-1], w.shape[0]))
                            or linear(x, w, *args))
        b = wrapped.llm(wrapped.llm.model.embed(ids), pos, wrapped.numerics, cache=cache).float()
        prefill, computed_in[:] = set(computed_in), []
        wrapped.llm(wrapped.llm.model.embed(torch.tensor([[70]])), decode_positions(cache.length, delta),
                    wrapped.numerics, cache=cache)
    rows, experts = kernels.moe.BF16_UPCAST_MIN_ROWS, wrapped.config.llm.num_experts
    assert any(dtype == torch.float32 and n == ids.shape[1] for dtype, n, _ in prefill)  # projections, whole prompt
    # in bf16 only expert blocks of few tokens and the router (bf16 logits: the reference's numerics)
    assert all(n < rows or out == experts for dtype, n, out in prefill if dtype == torch.bfloat16)
    assert {dtype for dtype, _, _ in computed_in} == {torch.bfloat16}  # a decode step's GEMVs stay bf16
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_moe_block_folds_the_shared_expert_into_the_fused_kernel(tiny_checkpoint, monkeypatch):
    """Where the routed experts run the Triton kernel (here forced, under the interpreter), the shared
    expert is computed in the same pass; the block's output stays that of the two-step reference."""
    import engine.kernels.dispatch as dispatch
    import engine.kernels.moe as moe_kernels

    llm = load_model(tiny_checkpoint, dtype="fp32", device="cpu", pack_cpu_experts=False).llm
    block = next(layer.mlp for layer in llm.model.layers if layer.is_moe)
    x = torch.randn(1, 6, llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert block._shared_for_fused_pass() is None  # CPU tensors: the torch path
        want = block(x, FP32)
        calls = []
        triton_moe = moe_kernels.use_triton
        monkeypatch.setattr(dispatch, "use_triton", lambda impl, *t: impl != "torch")
        monkeypatch.setattr(moe_kernels, "use_triton", lambda impl, *t: calls.append(impl) or triton_moe("triton", *t))
        assert block._shared_for_fused_pass() is not None
        got = block(x, FP32)
    assert calls  # the fused kernel ran
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _decode_step_logits(m, ids: torch.Tensor, pos: torch.Tensor, delta: torch.Tensor, token: int = 70) -> torch.Tensor:
    """fp32 logits of one decode step (`token`) after a prefill of `ids` into a new cache of model `m`."""
    cache = m.llm.new_cache(1, m.numerics, "cpu")
    m.llm(m.llm.model.embed(ids), pos, m.numerics, cache=cache)
    return m.llm(m.llm.model.embed(torch.tensor([[token]])), decode_positions(cache.length, delta), m.numerics,
                 cache=cache).float()


def _assert_same_logits(want: torch.Tensor, got: torch.Tensor, dtype: str) -> None:
    """fp32: within 1e-4 of the largest logit (summation order); bf16: cosine > 0.999."""
    if dtype == "fp32":
        assert float((want - got).abs().max()) <= 1e-4 * float(want.abs().max())
    else:
        assert torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_quantized_experts_decode_in_one_native_call_per_layer(tiny_checkpoint, dtype, kind, monkeypatch,
                                                              fp32_activations):
    """A CPU load with int8 or int4 experts (the no-GPU formats): each decode step's routed experts run in one
    native call per MoE layer, with the shared expert in it, and the logits match the same quantised model on
    torch's int8 / int4 kernels (fp32: relative 1e-4; bf16: cosine > 0.999); with int8 activations (int4: CPUs with
    AVX2; int8: with VNNI), int4 within 2 % of the largest logit."""
    from engine.kernels import native

    _skip_without_native_kernels(native)
    fast = load_model(tiny_checkpoint, dtype=dtype, device="cpu", expert_dtype=kind)
    mlp = fast.llm.model.layers[1].mlp
    assert mlp.experts.packed.kernel == kind and mlp.experts.packed.native_table() is not None
    assert mlp.cpu_shared is not None
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    torch_path = load_model(tiny_checkpoint, dtype=dtype, device="cpu", expert_dtype=kind)
    assert torch_path.llm.model.layers[1].mlp.experts.packed.native_table() is None
    monkeypatch.delenv(native.DISABLE_ENV)
    calls = []
    monkeypatch.setattr(native, "moe_decode", lambda *a, _real=native.moe_decode: calls.append(1) or _real(*a))
    ids = torch.tensor([[10, 20, 30, 40, 50, 60]])
    steps = []
    with torch.inference_mode():
        pos, delta = _positions(fast.llm, ids)
        for m, native_on in ((torch_path, False), (fast, True)):
            if not native_on:
                monkeypatch.setenv(native.DISABLE_ENV, "0")
            steps.append(_decode_step_logits(m, ids, pos, delta))
            monkeypatch.delenv(native.DISABLE_ENV, raising=False)
        assert len(calls) == sum(layer.is_moe for layer in fast.llm.model.layers)  # the fast model's step only
        _assert_same_logits(*steps, dtype)
        with quantized_activations("int8") as took:  # int4's default where the CPU has AVX2; int8's with VNNI
            if kind in took:  # int4: within 2 % of max |logit|; int8 experts: the same ~1 % input changes flip near-tie
                # expert choices of the random tiny model here, so only a sanity bound (their accuracy:
                # tests/kernels/test_native.py, against the quantised activations' exact products)
                got = _decode_step_logits(fast, ids, pos, delta)
                assert bool(torch.isfinite(got).all()) and not torch.equal(got, steps[1])
                bound = 0.02 if kind == "int4" else 1.0
                assert float((got - steps[0]).abs().max()) <= bound * float(steps[0].abs().max())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_int8_linears_decode_natively_layer_by_layer(tiny_checkpoint, dtype, monkeypatch, fp32_activations):
    """A CPU load with int8 linears (the no-GPU option): their decode GEMVs bind to the native kernel with
    their per-row scales, where large enough (here: all, by lowering the bound) each layer's two halves run
    natively, int8 projections included, and a decode step gives the logits of the same int8 model on
    torch's int8 kernels (fp32: relative 1e-4; bf16: cosine > 0.999); with int8 activations (CPUs with
    VNNI: AVX-512 or AVX-VNNI), within 2 % of the largest logit."""
    from engine.kernels import native

    _skip_without_native_kernels(native)
    monkeypatch.setattr(native, "BIND_MIN_BYTES", 0)
    fast = load_model(tiny_checkpoint, dtype=dtype, device="cpu", linear_dtype="int8", numerics=Numerics.intent(
        torch.float32 if dtype == "fp32" else torch.bfloat16))
    layer = fast.llm.model.layers[1]
    assert layer.attention.query_key_value.native.weight.dtype == torch.int8
    assert all(layer.cpu_decode is not None for layer in fast.llm.model.layers)
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    torch_path = load_model(tiny_checkpoint, dtype=dtype, device="cpu", linear_dtype="int8", numerics=fast.numerics)
    assert all(layer.cpu_decode is None for layer in torch_path.llm.model.layers)
    assert torch_path.llm.model.layers[1].attention.query_key_value.native is None  # torch's int8 kernel
    monkeypatch.delenv(native.DISABLE_ENV)
    ids = torch.tensor([[10, 20, 30, 40, 50, 60]])
    with torch.inference_mode():
        pos, delta = _positions(fast.llm, ids)
        steps = [_decode_step_logits(m, ids, pos, delta) for m in (torch_path, fast)]
        _assert_same_logits(*steps, dtype)
        with quantized_activations("int8") as took:
            if "int8" in took:  # the int8 path runs (its accuracy: tests/kernels/test_native.py, against the quantised
                # activations' exact products); here ~1-2 % changes of a layer's input flip near-tie expert
                # choices of the random tiny model's later MoE layers, so only a sanity bound on the logits
                got = _decode_step_logits(fast, ids, pos, delta)
                assert bool(torch.isfinite(got).all()) and not torch.equal(got, steps[1])
                assert float((got - steps[0]).abs().max()) <= float(steps[0].abs().max())


@pytest.mark.parametrize("head_dim,partial,rotated", [(64, 0.5, 32), (128, 1.0, 64), (96, 1.0, 64)])
def test_video_rope_channel_map_at_other_rotary_widths(tmp_path, head_dim, partial, rotated):
    """The reference builds cos/sin channel by channel from its hard-coded [8, 12, 12] split (spec §2.4):
    at most 64 channels rotate, channel c takes its axis from c mod 32 (H even / W odd below 24, T from
    24) and its angle from channel c of the duplicated table of the whole rotary width. A config with
    head_dim 128 and partial_rotary_factor 1.0 rotated all 128 channels with per-frequency axes."""
    from tests.models.thinker.variants import write_variant

    ckpt = write_variant(tmp_path / "ckpt", llm={"head_dim": head_dim, "partial_rotary_factor": partial})
    llm = load_model(ckpt, dtype="fp32", device="cpu").llm
    rot = llm.model.rotary_emb
    width = int(head_dim * partial)
    p = torch.tensor([[3, 9], [5, -2], [11, 4]]).view(3, 1, 2)  # distinct T, H, W positions
    cos, sin = rot(p, FP32)
    assert cos.shape == (1, 2, rotated)
    inv = 1.0 / 2400000.0 ** (torch.arange(0, width, 2).float() / width)
    for c in range(rotated):
        j = c % 32
        axis = 0 if j >= 24 else (1 if j % 2 == 0 else 2)
        angle = p[axis, 0].float() * inv[c % (width // 2)]
        torch.testing.assert_close(cos[0, :, c], angle.cos())
        torch.testing.assert_close(sin[0, :, c], angle.sin())
    # channels past the rotated ones pass through the attention unchanged; decode agrees with a full forward
    _assert_decode_matches_full_forward(llm, torch.tensor([[5, 60, 70, 80, 90, 100]]), 4)


def test_zero_shared_experts_load_and_add_nothing(tmp_path):
    """num_shared_experts = 0: the reference still builds the shared-expert MLP (0 wide, zero-size tensors in
    the checkpoint) and adds its zeros; null builds none. The engine refused the 0 checkpoint's tensors
    as unexpected; both now load and give the same logits (the other weights are drawn identically)."""
    from tests.models.thinker.variants import write_variant

    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    logits = {}
    for n in (0, None):
        llm = load_model(write_variant(tmp_path / str(n), llm={"num_shared_experts": n}), dtype="fp32", device="cpu").llm
        mlp = llm.model.layers[1].mlp
        assert (mlp.shared_experts is None) == (n is None)
        with torch.inference_mode():
            logits[n] = llm(llm.model.embed(ids), _positions(llm, ids)[0], FP32)
        if n == 0:
            assert mlp.shared_experts.gate_proj.weight.shape[0] == 0
            _assert_decode_matches_full_forward(llm, ids, 4)
            int8 = load_model(tmp_path / "0", dtype="fp32", device="cpu", linear_dtype="int8").llm  # nothing to quantise
            with torch.inference_mode():
                assert torch.isfinite(int8(int8.model.embed(ids), _positions(int8, ids)[0], FP32)).all()
    torch.testing.assert_close(logits[0], logits[None], atol=0, rtol=0)


def test_audio_slots_follow_the_projector_conv_and_slots_that_disagree_with_the_rows_are_refused(tmp_path):
    """Spec §5.3 / §5.4: T₃ is the projector conv's output length, with the checkpoint's ds_kernel_size /
    ds_stride. With ds_stride 3 the processor counted kernel 3 / stride 2 (15 and 11 `<audioPatch>` slots for
    clips of 60 and 44 mel frames) while the encoder gave 10 and 8 rows, and prepare_inputs quietly filled the
    first rows, leaving the spare slots with their token embedding. The processor now counts as the projector
    does, every slot takes its row and the audio router covers every slot; slots and rows that disagree are an
    error, never a partial fill."""
    from engine.media.audio import prepare_audio
    from engine.models.thinker.llm import AudioSpan, MultimodalInputError, MultimodalInputs
    from engine.models.thinker.processor import MediaSettings, ProcessedPrompt
    from engine.runtime import Engine
    from tests.models.thinker.variants import write_variant

    root = write_variant(tmp_path / "ckpt", audio={"ds_stride": 3})
    loaded = load_model(root, dtype="fp32", device="cpu")
    settings = MediaSettings.for_checkpoint(root, loaded.config)
    rate = settings.audio.sample_rate
    waves = [torch.sin(torch.arange(n * settings.audio.hop_length) * 0.05) for n in (60, 44)]
    clips = [prepare_audio(w, rate, settings.audio) for w in waves]
    assert [c.n_frames for c in clips] == [60, 44]
    slots = [c.n_tokens for c in clips]
    assert slots == [10, 8]   # T₂ 30 and 22, then (T₂ - 1)//3 + 1
    starts = [1, 3 + slots[0]]
    ids = [0] * (starts[1] + slots[1] + 1)
    prompt = ProcessedPrompt(text="", ids=ids, audios=clips, audio_spans=list(zip(starts, slots)))
    mm = Engine(loaded, None, is_demo=False).encode_media(prompt)
    spans = mm.audio_spans[0]
    assert [s.embeds.shape[0] for s in spans] == [AudioSpan(*s).length for s in spans] == slots
    llm = loaded.llm
    embeds, _, audio_mask = llm.prepare_inputs(torch.tensor([ids]), mm)
    for span in spans:
        torch.testing.assert_close(embeds[0, span.start:span.start + span.length], span.embeds)
    assert int(audio_mask.sum()) == sum(slots)

    rows = torch.randn(3, llm.config.hidden_size)
    with pytest.raises(MultimodalInputError, match="5 <audioPatch> slots but the audio encoder gave 3 rows"):
        llm.prepare_inputs(torch.tensor([ids]), MultimodalInputs(audio_spans=[[AudioSpan(2, rows, 5)]]))


def test_tied_word_embeddings_make_the_embedding_table_the_output_head(tmp_path):
    """tie_word_embeddings true: the reference's PreTrainedModel ties lm_head.weight to
    model.word_embeddings.weight (re-tied after loading, so a stored lm_head.weight does not count) and its
    save_pretrained writes no lm_head.weight. The engine read lm_head.weight whatever the key said: a tied
    checkpoint without one was refused, and one with a stale copy ran that copy."""
    from safetensors.torch import load_file, save_file
    from tests.models.thinker.variants import write_variant

    ckpt = write_variant(tmp_path / "tied", llm={"tie_word_embeddings": True})
    state = load_file(str(ckpt / "model.safetensors"))
    assert "model.lm_head.weight" not in state
    table = state["model.model.word_embeddings.weight"]
    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])

    def run(llm):
        trace: dict = {}
        with torch.inference_mode():
            logits = llm(llm.model.embed(ids), _positions(llm, ids)[0], FP32, trace=trace)
        return logits, trace["last_hidden_state"]

    logits, hidden = run(load_model(ckpt, dtype="fp32", device="cpu").llm)
    torch.testing.assert_close(logits, hidden @ table.T, atol=1e-4, rtol=1e-4)
    # a checkpoint that also stores some other lm_head.weight loads, and the embedding table still wins
    state["model.lm_head.weight"] = torch.randn_like(table)
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    torch.testing.assert_close(run(load_model(ckpt, dtype="fp32", device="cpu").llm)[0], logits, atol=1e-5, rtol=0)
    # int8 linears quantise the tied head from the embedding table (per-row int8: ~1 % of the logits' range)
    int8 = run(load_model(ckpt, dtype="fp32", device="cpu", linear_dtype="int8").llm)[0]
    assert float((int8 - logits).abs().max()) <= 0.05 * float(logits.abs().max())


def _compare_with_reference(ckpt, atol: float = 1e-4) -> None:
    """Our logits of a left-padded batch of two against tests/models/thinker/reference_llm.py's."""
    import json

    from safetensors.torch import load_file
    from tests.models.thinker import reference_llm

    config = json.loads((ckpt / "config.json").read_text())["llm_config"]
    llm = load_model(ckpt, dtype="fp32", device="cpu").llm
    ids = torch.tensor([[0, 0, 10, 20, 30, 40, 50, 60], [1, 2, 3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    pos, _ = _positions(llm, ids, mask)
    with torch.inference_mode():
        ours = llm(llm.model.embed(ids), pos, FP32, step_mask=mask)
    ref = reference_llm.logits(load_file(str(ckpt / "model.safetensors")), config, ids, pos, mask, prefix="model.")
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=atol, rtol=1e-4)


def test_omitted_moe_keys_take_bailing_moe_v2_config_defaults(tmp_path):
    """BailingMoeV2Config defaults num_experts 16, num_experts_per_tok 2, n_group 8, topk_group 4. A config
    omitting n_group / topk_group routed over all experts (read as 1 group of 1), one omitting
    num_experts_per_tok was refused (read as 0) and one omitting num_experts ran every layer dense; now the
    class's values, checked against a from-the-rules forward. moe_intermediate_size / intermediate_size
    default to None upstream (a layer that needs one fails): refused only where a layer needs it."""
    import json

    from engine.models.thinker.config import ConfigError, MingConfig
    from tests.models.thinker.variants import OMIT, write_variant

    omitted = {"num_experts": OMIT, "num_experts_per_tok": OMIT, "n_group": OMIT, "topk_group": OMIT}
    ckpt = write_variant(tmp_path / "omit", llm=omitted)
    cfg = MingConfig.from_file(ckpt).llm
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (16, 2, 8, 4)
    _compare_with_reference(ckpt)
    raw = json.loads((ckpt / "config.json").read_text())["llm_config"]
    for key, value, message in (("n_group", None, "n_group"), ("moe_intermediate_size", OMIT, "moe_intermediate_size"),
                                ("intermediate_size", OMIT, "intermediate_size")):
        bad = {k: v for k, v in {**raw, key: value}.items() if v is not OMIT}
        with pytest.raises(ConfigError, match=message):
            MingConfig.from_dict(bad)
    # no dense layer: intermediate_size is never read
    all_moe = {k: v for k, v in raw.items() if k != "intermediate_size"}
    assert MingConfig.from_dict({**all_moe, "first_k_dense_replace": 0}).llm.num_moe_layers == raw["num_hidden_layers"]


def test_sliding_window_masks_keys_as_the_reference_eager_mask_does(tmp_path):
    """use_sliding_window true with sliding_window W (BailingMoeV2Config keeps both; defaults False / 81920):
    the reference's eager causal mask (_prepare_4d_causal_attention_mask_with_cache_position, also the masked
    SDPA path) hides keys j <= i - W from query i in every layer, slot indices counting the padding. The
    engine ignored both keys. Checked on a left-padded batch against the from-the-rules forward, and a prefill
    (in chunks) + device decode steps against one whole-sequence forward."""
    from engine.generate import DecodeStep, prefill
    from engine.models.thinker.config import MingConfig
    from tests.models.thinker.variants import write_variant

    ckpt = write_variant(tmp_path / "window", llm={"use_sliding_window": True, "sliding_window": 3})
    assert MingConfig.from_file(ckpt).llm.sliding_window == 3
    _compare_with_reference(ckpt)
    llm = load_model(ckpt, dtype="fp32", device="cpu").llm
    ids = torch.tensor([[0, 0, 10, 20, 30, 40, 50, 60, 70, 80], [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]])
    mask = torch.tensor([[0, 0] + [1] * 8, [1] * 10])
    with torch.inference_mode():
        full = llm(llm.model.embed(ids), _positions(llm, ids, mask)[0], FP32, step_mask=mask)
        pos, delta = _positions(llm, ids[:, :6], mask[:, :6])
        cache = llm.new_cache(2, FP32, "cpu", capacity=16)
        cache.rope_deltas = delta
        steps = [prefill(llm, FP32, cache, llm.model.embed(ids[:, :6]), pos, step_mask=mask[:, :6], chunk_tokens=4).logits]
        step = DecodeStep(llm, FP32, cache)
        for i in range(6, ids.shape[1] - 1):
            step.feed(ids[:, i])
            steps.append(step.step())
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 5:-1], atol=1e-4, rtol=1e-4)


@contextlib.contextmanager
def _one_thread():
    """Tiny tensors: one intra-op thread (thread hand-offs cost more than these ops on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_a_config_without_rope_scaling_gets_plain_rope_on_the_temporal_axis(tmp_path):
    """BailingMoeV2Config defaults rope_scaling to None, and the reference then builds its 1-D rotary
    (transformers' "default" rope type). Such a config (key absent or null) was refused; it now loads with
    plain partial RoPE over the whole rotary width (128 channels here, where the video rotary caps at 64),
    every channel on p_T, and its logits match the plain reference forward's."""
    from engine.models.thinker.config import DEFAULT_ROPE, MingConfig
    from tests.models.thinker.variants import OMIT, write_variant

    ckpt = write_variant(tmp_path / "ckpt", llm={"rope_scaling": OMIT, "partial_rotary_factor": 1.0})
    null = json.loads((ckpt / "config.json").read_text())
    null["llm_config"]["rope_scaling"] = None
    assert MingConfig.from_dict(null).llm.rope_scaling_type == DEFAULT_ROPE
    with _one_thread():
        llm = load_model(ckpt, dtype="fp32", device="cpu").llm
        p = torch.tensor([[3, 9], [5, -2], [11, 4]]).view(3, 1, 2)  # distinct T, H, W positions
        cos, sin = llm.model.rotary_emb(p, FP32)
        inv = 1.0 / 2400000.0 ** (torch.arange(0, 128, 2).float() / 128)
        angle = p[0, 0].float().unsqueeze(-1) * inv.repeat(2)
        torch.testing.assert_close(cos[0], angle.cos())
        torch.testing.assert_close(sin[0], angle.sin())
        _compare_with_reference(ckpt)
        _assert_decode_matches_full_forward(llm, torch.tensor([[5, 60, 70, 80, 90, 100]]), 4)
