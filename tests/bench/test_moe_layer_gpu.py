"""bench/moe_layer_gpu.py's storages (runs on a GPU; its weight quantisation is checked here on the CPU)."""

import sys

import pytest
import torch

from tests.paths import REPO


@pytest.mark.parametrize("kind,tolerance", [("bf16", 0.0), ("fp8", 0.08), ("int4", 0.25)])
def test_quantised_weights_compute_the_layer_within_their_storage_error(kind, tolerance):
    sys.path.insert(0, str(REPO / "bench"))
    import moe_layer_gpu

    from engine.kernels.moe import moe_experts

    gen = torch.Generator().manual_seed(0)
    plain = tuple((torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for s in ((4, 32, 64), (4, 32, 64), (4, 64, 32)))
    weights, scales = moe_layer_gpu.quantised(plain, kind)
    assert (scales is None) == (kind == "bf16") and all(w.shape[0] == 4 for w in weights)
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, 4, (5, 2), generator=gen)
    w = torch.rand(5, 2, generator=gen)
    ref = moe_experts(x.float(), *(t.float() for t in plain), ids, w)
    got = moe_experts(x, *weights, ids, w, scales=scales).float()
    assert float((got - ref).norm() / ref.norm()) <= tolerance + 1e-2  # + bf16 activations' rounding
