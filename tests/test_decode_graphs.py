"""CUDA graphs of the decode step: window buckets, when a model can be captured, and (on a GPU only)
the same greedy tokens and log probabilities with and without the graphs."""

import pytest
import torch

from engine.decode_graphs import MIN_WINDOW, decode_graphs_for, graph_blockers, window_bucket
from engine.events import Done, TextDelta
from engine.sampling import GenerationParams


def test_window_buckets_are_powers_of_two_within_the_capacity():
    assert window_bucket(1, 4096) == MIN_WINDOW
    assert window_bucket(MIN_WINDOW, 4096) == MIN_WINDOW
    assert window_bucket(MIN_WINDOW + 1, 4096) == 2 * MIN_WINDOW
    assert window_bucket(1000, 4096) == 1024 and window_bucket(1025, 4096) == 2048
    assert window_bucket(3000, 3000) == 3000  # never past the cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")
def test_a_cpu_model_runs_its_steps_eagerly(tiny_engine):
    assert graph_blockers(tiny_engine.model.llm) == ["no CUDA"]
    assert decode_graphs_for(tiny_engine.model.llm, tiny_engine.model.numerics) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graph_replays_give_the_eager_greedy_tokens(tiny_checkpoint, dtype, monkeypatch):
    from engine.generate import generate
    from engine.runtime import Engine

    engine = Engine.load(tiny_checkpoint, dtype=dtype, device="cuda")
    llm = engine.model.llm
    assert graph_blockers(llm) == []
    prompt = engine.processor.build([{"role": "user", "content": "Tell me about the Ming dynasty."}]).ids
    params = GenerationParams(max_new_tokens=MIN_WINDOW + 50)

    def tokens():  # no end-of-sequence id: the steps run past a window bucket
        events = list(generate(engine.model, engine.tokenizer, prompt, params, eos_ids=set()))
        assert isinstance(events[-1], Done), events[-1]
        return events[-1].token_ids

    graphs = decode_graphs_for(llm, engine.model.numerics)
    with_graphs = tokens()
    assert graphs.captures >= 2  # the steps crossed a window bucket
    graphs.replay = False  # the same step, launched eagerly
    try:
        assert with_graphs == tokens()
    finally:
        graphs.replay = True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_refused_capture_leaves_the_request_running_eagerly(tiny_checkpoint, monkeypatch):
    """A driver that refuses the capture (here: _capture raising as torch does) must not end the reply: the
    same steps run eagerly, with the eager tokens, the cause kept and said once."""
    from engine import decode_graphs
    from engine.generate import generate
    from engine.runtime import Engine

    engine = Engine.load(tiny_checkpoint, dtype="fp32", device="cuda")
    prompt = engine.processor.build([{"role": "user", "content": "Tell me about the Ming dynasty."}]).ids
    params = GenerationParams(max_new_tokens=MIN_WINDOW + 20)
    graphs = decode_graphs_for(engine.model.llm, engine.model.numerics)
    graphs.replay = False
    eager = list(generate(engine.model, engine.tokenizer, prompt, params, eos_ids=set()))[-1].token_ids
    graphs.replay = True

    def refused(self, batch, window):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(decode_graphs.DecodeGraphs, "_capture", refused)
    with pytest.warns(RuntimeWarning, match="run eagerly"):
        events = list(generate(engine.model, engine.tokenizer, prompt, params, eos_ids=set()))
    assert isinstance(events[-1], Done), events[-1]
    assert events[-1].token_ids == eager and graphs.failure.startswith("RuntimeError") and not graphs.replay
    graphs.replay, graphs.failure = True, None


def test_a_cache_made_for_cuda_keys_the_layers_indexed_device(monkeypatch):
    """Layers report "cuda:N"; a cache asked for "cuda" (the engine's device as the user typed it) must key its
    per-device slots the same way, or an eager device step finds no slot (KeyError: device('cuda', 0))."""
    from engine.models.thinker.kv_cache import indexed_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert indexed_device("cuda") == torch.device("cuda", 1)
    assert indexed_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert indexed_device("cuda:0") == torch.device("cuda", 0) and indexed_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_eager_decode_loop_runs_on_cuda(tiny_checkpoint):
    """The loop without graphs (MING_CUDA_GRAPHS=0, quantised or host-resident experts) on a model loaded with
    device="cuda": it ended in a KeyError at the first step; now it decodes the graphs' greedy tokens (the first
    16 compared: the eager loop attends over exactly the cached slots, the graphs over a masked bucket)."""
    from engine.generate import generate
    from engine.runtime import Engine

    engine = Engine.load(tiny_checkpoint, dtype="fp32", device="cuda")
    prompt = engine.processor.build([{"role": "user", "content": "Tell me about the Ming dynasty."}]).ids
    params = GenerationParams(max_new_tokens=40)
    runs = [list(generate(engine.model, engine.tokenizer, prompt, params, eos_ids=set(), cuda_graphs=graphs))[-1]
            for graphs in (False, None)]
    assert all(isinstance(done, Done) for done in runs), runs
    eager, graphed = (done.token_ids for done in runs)
    assert len(eager) == 40 and eager[:16] == graphed[:16]


GRAPH_LOGPROB_TOLERANCE = 1e-3  # fp32: the replayed step against the same step launched eagerly


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replays_give_the_eager_logprobs(tiny_checkpoint):
    """Log probabilities are computed after the replay (from its static logits, before the next replay overwrites
    them) and read back with the ids a step late: the same entries as the eager steps give."""
    from engine.generate import generate
    from engine.runtime import Engine

    engine = Engine.load(tiny_checkpoint, dtype="fp32", device="cuda")
    prompt = engine.processor.build([{"role": "user", "content": "Tell me about the Ming dynasty."}]).ids
    params = GenerationParams(max_new_tokens=MIN_WINDOW + 10, logprobs=True, top_logprobs=4)

    def entries():
        events = list(generate(engine.model, engine.tokenizer, prompt, params, eos_ids=set()))
        assert isinstance(events[-1], Done), events[-1]
        return [e for ev in events if isinstance(ev, TextDelta) for e in ev.logprobs]

    graphs = decode_graphs_for(engine.model.llm, engine.model.numerics)
    with_graphs = entries()
    graphs.replay = False
    try:
        eager = entries()
    finally:
        graphs.replay = True
    assert eager and [e.bytes for e in with_graphs] == [e.bytes for e in eager]
    flat = lambda es: [v for e in es for v in [e.logprob] + [t.logprob for t in e.top_logprobs]]  # noqa: E731
    assert flat(with_graphs) == pytest.approx(flat(eager), abs=GRAPH_LOGPROB_TOLERANCE)


@pytest.mark.parametrize("expert_dtype", ["bf16", "fp8", "int4"])
def test_quantised_experts_on_the_triton_path_can_be_captured(expert_dtype, monkeypatch):
    """fp8 / int4 experts are dequantised inside the Triton kernel, which reads nothing back to the host (0 syncs
    per step at the real shape on an H200), so their decode step is captured like a plain one; the CPU's packed
    layouts are not."""
    from types import SimpleNamespace

    from engine import kernels
    from engine.models.thinker.layers import ExpertBank
    from engine.placement.quant import quantize_bank_

    bank = ExpertBank(SimpleNamespace(num_experts=4, hidden_size=64, moe_intermediate_size=32)).requires_grad_(False)
    for p in bank.parameters():
        p.normal_(0, 0.02)
    quantize_bank_(bank, expert_dtype)
    monkeypatch.setattr(kernels.dispatch, "use_triton", lambda impl, *tensors: True)  # as on CUDA tensors
    assert bank.sync_free
    bank.pack_for_cpu(torch.float32)
    assert not bank.sync_free
