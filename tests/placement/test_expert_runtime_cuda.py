"""The expert runtime on a real CUDA device (skipped elsewhere; bench/gpu_session.py runs it on a GPU lease):
host-resident experts pinned or pageable (RuntimeOptions.pin_host_experts) give the single-device result."""

import pytest
import torch

from engine.placement.expert_runtime import CPU, DeviceMap, ExpertPlacement, MoERuntime, RuntimeOptions
from tests.placement.test_expert_runtime import SPLIT, _inputs, _reference, _ToyLLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("pin", [True, False])
def test_host_experts_pinned_or_pageable_compute_the_same_layer(pin):
    plain = _ToyLLM(seed=4)
    llm = _ToyLLM(seed=4)
    one_gpu = {layer: tuple(0 if s == 1 else s for s in slots) for layer, slots in SPLIT.items()}
    rt = MoERuntime.attach(llm, ExpertPlacement(one_gpu, {1: 0, 2: 0}),
                           RuntimeOptions(device_map=DeviceMap.cuda(1), cache_capacity=0, fetch_threshold=10,
                                          pin_host_experts=pin))
    host = [w for lr in rt.layers.values() for w, s in zip(lr.experts, lr.slots) if s == CPU]
    assert host and all(t.is_pinned() == pin for w in host for t in w.tensors())
    x, ids, w = _inputs()
    with torch.inference_mode():
        for layer in (1, 2):
            got = llm.model.layers[layer].mlp.experts(x.cuda(), ids.cuda(), w.float().cuda()).cpu()
            assert torch.allclose(got, _reference(plain, layer, x, ids, w.float()), atol=1e-4, rtol=1e-4)
    # (_inputs' routing: the host experts with at most 10 tokens, layer 2's experts 0 and 1, are computed by the
    # CPU; the others are fetched to the GPU: both paths read the host copies)
    assert rt.stats.tokens.get("cpu", 0) > 0 and rt.stats.fetches > 0
