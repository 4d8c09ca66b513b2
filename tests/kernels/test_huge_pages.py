"""Large CPU weight buffers on transparent huge pages (engine.kernels.huge_pages): aligned where the kernel
gives them, the same values and results as 4 KiB pages, and plain torch.empty when it cannot."""

from __future__ import annotations

import errno
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from engine.kernels import huge_pages, native
from engine.kernels.dequant import quantize_int8_rows
from engine.kernels.moe import PackedExperts, QuantizedCpuExperts, moe_experts_packed
from engine.loader import CheckpointFiles, load_module
from engine.models.thinker.model import _read_int8_linears
from engine.placement import quant

HIDDEN, INTER, EXPERTS = 1024, 512, 4  # a gate+up bank of 8 MiB, down 4 MiB: whole huge pages
MIB = 1 << 20

needs_huge_pages = pytest.mark.skipif(not huge_pages.status().applies, reason=huge_pages.status().reason)


def _banks(fill: torch.Tensor, dtype: torch.dtype, on_huge_pages: bool) -> tuple[torch.Tensor, torch.Tensor]:
    huge_pages.set_enabled(on_huge_pages)
    try:
        gate_up = huge_pages.empty((EXPERTS, 2 * INTER, HIDDEN), dtype)
        down = huge_pages.empty((EXPERTS, HIDDEN, INTER), dtype)
    finally:
        huge_pages.set_enabled(None)
    gate_up.copy_(fill[:, : 2 * INTER])
    down.copy_(fill[:, 2 * INTER:].reshape(EXPERTS, HIDDEN, INTER))
    return gate_up, down


@pytest.fixture(scope="module")
def weights() -> torch.Tensor:
    return torch.randn(EXPERTS, 3 * INTER, HIDDEN, generator=torch.Generator().manual_seed(0)) * 0.02


@pytest.fixture(scope="module")
def routing() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(1, HIDDEN, generator=gen), torch.tensor([[3, 1]]), torch.tensor([[0.7, 0.3]])


@needs_huge_pages
def test_a_large_buffer_starts_on_a_huge_page_and_holds_what_is_written(weights):
    gate_up, down = _banks(weights.to(torch.bfloat16), torch.bfloat16, on_huge_pages=True)
    assert huge_pages.is_huge_page_aligned(gate_up) and huge_pages.is_huge_page_aligned(down)
    assert gate_up.is_contiguous() and gate_up.shape == (EXPERTS, 2 * INTER, HIDDEN)
    assert torch.equal(gate_up, weights[:, : 2 * INTER].to(torch.bfloat16))
    small = huge_pages.empty((MIB // 4,), torch.float32)  # 1 MiB: below one huge page, torch's own buffer
    assert small.numel() == MIB // 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_experts_on_huge_pages_give_the_4k_page_results(weights, routing, dtype):
    x, ids, w = routing
    out = {}
    for on_huge_pages in (True, False):
        gate_up, down = _banks(weights.to(dtype), dtype, on_huge_pages)
        packed = PackedExperts.from_weights(gate_up[:, :INTER], gate_up[:, INTER:], down, use_onednn=False,
                                            gate_up=gate_up)
        out[on_huge_pages] = moe_experts_packed(x.to(dtype), packed, ids, w).float()
    # the same kernel on the same values: equal up to the kernel's own rounding (one bf16 ulp of the output)
    assert torch.allclose(out[True], out[False], rtol=2 ** -7, atol=1e-5), (out[True] - out[False]).abs().max()


@pytest.mark.skipif(not native.available(), reason="the native int4 kernels are not built here")
def test_an_int4_bank_on_huge_pages_gives_the_4k_page_results(weights, routing):
    int4_weights = {proj: quant.quantize(mats.contiguous(), "int4") for proj, mats in zip(
        quant.PROJECTIONS, (weights[:, :INTER], weights[:, INTER:2 * INTER], weights[:, 2 * INTER:].reshape(EXPERTS, HIDDEN, INTER)))}
    x, ids, w = routing
    out = {}
    for on_huge_pages in (True, False):
        huge_pages.set_enabled(on_huge_pages)
        try:
            q, s, fused = quant.empty_bank("int4", EXPERTS, INTER, HIDDEN, "cpu", fuse_gate_up=True)
        finally:
            huge_pages.set_enabled(None)
        assert huge_pages.is_huge_page_aligned(fused[0]) == (on_huge_pages and huge_pages.status().applies)
        for proj in quant.PROJECTIONS:
            q[proj].copy_(int4_weights[proj][0])
            s[proj].copy_(int4_weights[proj][1])
        packed = QuantizedCpuExperts.from_weights(*(q[p] for p in quant.PROJECTIONS),
                                                  tuple(s[p] for p in quant.PROJECTIONS), torch.float32, "int4",
                                                  fused=fused)
        out[on_huge_pages] = moe_experts_packed(x, packed, ids, w)
    assert torch.allclose(out[True], out[False], rtol=1e-5, atol=1e-6), (out[True] - out[False]).abs().max()


@needs_huge_pages
def test_a_refused_madvise_falls_back_to_4k_pages(monkeypatch, caplog):
    def refuse(mapping, offset, length):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(huge_pages, "_advise_huge", refuse)
    with caplog.at_level(logging.INFO, logger=huge_pages.__name__):
        t = huge_pages.empty((4, MIB), torch.uint8)
    t.fill_(7)  # an ordinary writable buffer
    assert t.shape == (4, MIB) and int(t.sum()) == 7 * 4 * MIB
    assert "using 4 KiB pages" in caplog.text


def test_thp_never_or_turned_off_says_why_and_uses_torch_empty(monkeypatch, tmp_path):
    setting, size_setting = tmp_path / "enabled", tmp_path / "hugepages-2048kB" / "enabled"
    size_setting.parent.mkdir()
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    monkeypatch.setattr(huge_pages, "THP_SIZE_SETTING", size_setting)  # absent: the global setting rules
    monkeypatch.setattr(huge_pages, "_aligned_mapping", lambda nbytes: pytest.fail("mapped although THP is never"))
    if huge_pages.sys.platform.startswith("linux"):
        assert huge_pages.status() == huge_pages.HugePageStatus(
            False, f"transparent huge pages are never on this kernel ({setting}, hugepages-2048kB)")
        setting.write_text("always [madvise] never\n")
        size_setting.write_text("always inherit madvise [never]\n")  # 2 MiB pages off on their own
        assert not huge_pages.status().applies
        size_setting.write_text("always [inherit] madvise never\n")
        assert huge_pages.status().applies
        setting.write_text("always madvise [never]\n")
    assert huge_pages.empty((2, MIB), torch.uint8).shape == (2, MIB)
    setting.write_text("[madvise]\n")
    monkeypatch.setenv(huge_pages.DISABLE_ENV, "0")
    assert not huge_pages.status().applies and huge_pages.DISABLE_ENV in huge_pages.status().reason
    assert huge_pages.empty((2, MIB), torch.uint8).shape == (2, MIB)


@needs_huge_pages
def test_a_loaded_cpu_weight_is_on_huge_pages_with_the_checkpoint_values(tmp_path):
    stored = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(2))  # 4 MiB in fp32
    save_file({"proj.weight": stored}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        module = torch.nn.Module()
        module.proj = torch.nn.Linear(1024, 1024, bias=False)
    with CheckpointFiles.open(tmp_path).reader() as reader:
        load_module(module, reader, "", torch.float32, "cpu")
    assert huge_pages.is_huge_page_aligned(module.proj.weight)
    assert torch.equal(module.proj.weight.data, stored)


@needs_huge_pages
def test_an_int8_linear_quantised_while_read_is_on_huge_pages(tmp_path):
    stored = torch.randn(1024, 2048, generator=torch.Generator().manual_seed(3))  # 2 MiB once int8
    save_file({"proj.weight": stored}, str(tmp_path / "model.safetensors"))
    llm = torch.nn.Module()
    llm.config = SimpleNamespace(tie_word_embeddings=False)
    llm.proj = torch.nn.Linear(2048, 1024, bias=False, device="meta")
    with CheckpointFiles.open(tmp_path).reader() as reader:
        _read_int8_linears(llm, reader, "", torch.float32, ["proj"])
    q = llm.proj.packed.q
    assert huge_pages.is_huge_page_aligned(q)
    assert torch.equal(q, quantize_int8_rows(stored)[0])
