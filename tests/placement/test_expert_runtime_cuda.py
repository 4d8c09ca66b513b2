"""The expert runtime on a real CUDA device (skipped elsewhere; bench/gpu_session.py runs it on a GPU lease):
host-resident experts pinned or pageable (RuntimeOptions.pin_host_experts) give the single-device result, for
many tokens and for one (the native call on the routing row copied beside the token); a layer wholly on the GPU
replays from a CUDA graph."""

import pytest
import torch

from engine.placement.expert_runtime import CPU, DeviceMap, ExpertPlacement, MoERuntime, RuntimeOptions
from tests.placement.test_expert_runtime import E, SPLIT, _inputs, _reference, _ToyLLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("tokens", [40, 1])
@pytest.mark.parametrize("pin", [True, False])
def test_host_experts_pinned_or_pageable_compute_the_same_layer(pin, tokens):
    plain = _ToyLLM(seed=4)
    llm = _ToyLLM(seed=4)
    one_gpu = {layer: tuple(0 if s == 1 else s for s in slots) for layer, slots in SPLIT.items()}
    rt = MoERuntime.attach(llm, ExpertPlacement(one_gpu, {1: 0, 2: 0}),
                           RuntimeOptions(device_map=DeviceMap.cuda(1), cache_capacity=0, fetch_threshold=10,
                                          pin_host_experts=pin))
    host = [w for lr in rt.layers.values() for w, s in zip(lr.experts, lr.slots) if s == CPU]
    assert host and all(t.is_pinned() == pin for w in host for t in w.tensors())
    x, ids, w = _inputs(t=tokens)
    with torch.inference_mode():
        for layer in (1, 2):
            got = llm.model.layers[layer].mlp.experts(x.cuda(), ids.cuda(), w.float().cuda()).cpu()
            assert torch.allclose(got, _reference(plain, layer, x, ids, w.float()), atol=1e-4, rtol=1e-4)
    # (_inputs' routing: the host experts with at most 10 tokens, layer 2's experts 0 and 1, are computed by the
    # CPU; the others are fetched to the GPU: both paths read the host copies)
    assert rt.stats.tokens.get("cpu", 0) > 0 and (rt.stats.fetches > 0 or tokens == 1)


def test_a_layer_wholly_on_the_gpu_replays_from_a_cuda_graph():
    plain = _ToyLLM(seed=5)
    llm = _ToyLLM(seed=5)
    MoERuntime.attach(llm, ExpertPlacement.uniform([1, 2], E, 0), RuntimeOptions(device_map=DeviceMap.cuda(1)))
    bank = llm.model.layers[1].mlp.experts
    assert bank.sync_free
    x, ids, w = (t.cuda() for t in _inputs(t=1, seed=2))
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            bank(x, ids, w)  # (warm-up: the kernel's compile, off the capture)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = bank(x, ids, w)
        for seed in (3, 4):  # new inputs in the captured buffers, replayed
            nx, nids, nw = _inputs(t=1, seed=seed)
            for buffer, value in ((x, nx), (ids, nids), (w, nw)):
                buffer.copy_(value)
            graph.replay()
            want = _reference(plain, 1, nx, nids, nw)
            assert torch.allclose(out.cpu(), want, atol=1e-4, rtol=1e-4), (out.cpu() - want).abs().max()
