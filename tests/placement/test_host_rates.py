"""This host's CPU streaming rates for the planner (engine.placement.host_rates)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import native
from engine.placement import host_rates
from engine.placement.host_rates import matrix_bytes_for, measure_rates, stream_gbs

needs_native = pytest.mark.skipif(not native.available(), reason="the native CPU kernels are not built here")


@needs_native
@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16", "fp32"])
def test_every_format_streams_at_a_plausible_rate(fmt):
    gbs = stream_gbs(fmt, torch.bfloat16, 8 << 20, passes=2)
    assert gbs is not None and 0.05 < gbs < 5000  # GB/s of weight bytes: a real read, not a cached zero page


def test_unknown_formats_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="unknown weight format"):
        stream_gbs("int3", torch.float32, 1 << 20)
    with pytest.raises(ValueError, match="unknown dtype"):
        measure_rates("int4", "int8", "fp64")


def test_the_matrices_outgrow_the_cache_but_not_the_memory(monkeypatch):
    monkeypatch.setattr(host_rates, "last_level_cache_bytes", lambda: 260 << 20)
    assert matrix_bytes_for() == 1 << 30  # 4 x 260 MiB, capped at 1 GiB
    assert matrix_bytes_for(available=2 << 30) == 256 << 20  # an eighth of what is available
    monkeypatch.setattr(host_rates, "last_level_cache_bytes", lambda: 0)
    assert matrix_bytes_for() == host_rates.MIN_MATRIX_BYTES


@needs_native
def test_measure_rates_names_the_kernels_it_timed(monkeypatch):
    monkeypatch.setattr(host_rates, "matrix_bytes_for", lambda available=None: 4 << 20)
    rates = measure_rates("fp8", "bf16", "fp32")  # fp8 experts are int8 on a CPU; unquantised linears fp32
    assert (rates.expert_format, rates.weight_format) == ("int8", "fp32")
    assert rates.cpu_expert_gbs > 0 and rates.cpu_weight_gbs > 0 and "measured on this host" in rates.describe()
