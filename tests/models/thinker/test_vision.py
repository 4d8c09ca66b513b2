"""Tests of engine/vision.py: config parsing, full-size checkpoint names, and both ViTs against
independent dense re-formulations of the spec (§4.3, §4.4), the bf16 path and the `mm` fixture."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.models.thinker.vision import (
    Qwen2_5_VisionTransformer,
    Qwen3MoeVisionTransformer,
    VisionConfig,
    build_vision_encoder,
    chunked_attention,
    merge_order_coords,
    vision_rotary_cos_sin,
    window_partition,
)
from tests.paths import SHARED

REAL = {"v2": SHARED / "fixtures/real_configs/ming-flash-omni-2.0/config.json",
        "preview": SHARED / "fixtures/real_configs/ming-flash-omni-preview/config.json"}
FULL_NAMES = SHARED / "fixtures/ming_ref/full_names"
MM = SHARED / "fixtures/ming_ref/mm"
need_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared fixtures folder absent")

QWEN3_SMALL = dict(model_type="qwen3_moe_vit", depth=2, hidden_size=32, num_heads=2, intermediate_size=48,
                   out_hidden_size=24, patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
                   in_channels=3, hidden_act="gelu_pytorch_tanh", num_position_embeddings=16,
                   deepstack_visual_indexes=[0])
QWEN25_SMALL = dict(model_type="qwen2_5_vit", depth=3, hidden_size=32, num_heads=2, intermediate_size=40,
                    out_hidden_size=24, patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
                    in_channels=3, hidden_act="silu", window_size=16, fullatt_block_indexes=[1])


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or ".norm.weight" in name \
                    or name.endswith("ln_q.weight") or name == "norm.weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "pos_embed" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def _model(cfg_dict: dict, seed: int = 0):
    m = build_vision_encoder(cfg_dict).eval()
    _randomise(m, seed)
    return m


def _pixels(cfg: VisionConfig, grids, seed: int = 1) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, cfg.patch_dim, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------
# Independent dense reference (no chunking, no permutation): token coordinates come from the
# processor's order, attention uses an explicit boolean mask over the whole sequence.
# ------------------------------------------------------------------------------------------


def _token_meta(grids, m):
    """Per token: (image, frame, row, col) in processor order, derived element by element."""
    out = []
    for img, (t, h, w) in enumerate(grids):
        for f in range(t):
            for bh in range(h // m):
                for bw in range(w // m):
                    for i in range(m):
                        for j in range(m):
                            out.append((img, f, bh * m + i, bw * m + j))
    return torch.tensor(out)


def _dense_attention(attn, x, mask, cos, sin):
    s, d = x.shape
    nh = attn.num_heads
    q, k, v = attn.qkv(x).view(s, 3, nh, d // nh).unbind(1)

    def rot(y):
        y1, y2 = y.chunk(2, -1)
        return y * cos[:, None] + torch.cat((-y2, y1), -1) * sin[:, None]

    q, k = rot(q), rot(k)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d // nh)
    scores = scores.masked_fill(~mask[None], float("-inf"))
    o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return attn.proj(o.reshape(s, d))


def _rotary_dense(meta, head_dim):
    dim = head_dim // 2
    inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.cat((meta[:, 2:3] * inv, meta[:, 3:4] * inv), dim=1)
    ang = torch.cat((ang, ang), dim=1).float()
    return ang.cos(), ang.sin()


def _qwen3_dense(model: Qwen3MoeVisionTransformer, pixels, grids):
    cfg = model.config
    m, g = cfg.spatial_merge_size, cfg.num_grid_per_side
    meta = _token_meta(grids, m)
    x = model.patch_embed.proj(pixels.view(-1, cfg.in_channels, cfg.temporal_patch_size,
                                           cfg.patch_size, cfg.patch_size)).view(len(meta), -1)
    table = model.pos_embed.weight.view(g, g, -1).permute(2, 0, 1)[None]
    pos = []
    for t, h, w in grids:
        img = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]  # [D, h, w]
        pos.append(img)
    # pick each token's (row, col) from its own image's interpolated map
    x = x + torch.stack([pos[i][:, r, c] for i, _, r, c in meta.tolist()])
    cos, sin = _rotary_dense(meta, cfg.head_dim)
    same = (meta[:, None, 0] == meta[None, :, 0]) & (meta[:, None, 1] == meta[None, :, 1])
    for blk in model.blocks:
        x = x + _dense_attention(blk.attn, blk.norm1(x), same, cos, sin)
        x = x + blk.mlp.linear_fc2(F.gelu(blk.mlp.linear_fc1(blk.norm2(x)), approximate="tanh"))
    mg = model.merger
    y = mg.norm(x).view(-1, cfg.merged_hidden_size)
    return mg.linear_fc2(F.gelu(mg.linear_fc1(y)))


def _rms(norm, x):
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _qwen25_dense(model: Qwen2_5_VisionTransformer, pixels, grids):
    cfg = model.config
    m = cfg.spatial_merge_size
    win = cfg.window_size // cfg.patch_size          # window side in patches
    meta = _token_meta(grids, m)
    x = model.patch_embed.proj(pixels.view(-1, cfg.in_channels, cfg.temporal_patch_size,
                                           cfg.patch_size, cfg.patch_size)).view(len(meta), -1)
    cos, sin = _rotary_dense(meta, cfg.head_dim)
    same = (meta[:, None, 0] == meta[None, :, 0]) & (meta[:, None, 1] == meta[None, :, 1])
    wr, wc = meta[:, 2] // win, meta[:, 3] // win
    same_win = same & (wr[:, None] == wr[None, :]) & (wc[:, None] == wc[None, :])
    for i, blk in enumerate(model.blocks):
        mask = same if i in cfg.fullatt_block_indexes else same_win
        x = x + _dense_attention(blk.attn, _rms(blk.norm1, x), mask, cos, sin)
        h = _rms(blk.norm2, x)
        x = x + blk.mlp.down_proj(F.silu(blk.mlp.gate_proj(h)) * blk.mlp.up_proj(h))
    mg = model.merger
    return mg.mlp(_rms(mg.ln_q, x).view(-1, cfg.merged_hidden_size))


# ------------------------------------------------------------------------------------------


@need_shared
def test_config_parses_real_configs():
    v2 = VisionConfig.from_dict(json.loads(REAL["v2"].read_text())["vision_config"])
    assert (v2.model_type, v2.depth, v2.hidden_size, v2.head_dim) == ("qwen3_moe_vit", 27, 1152, 72)
    assert (v2.num_grid_per_side, v2.patch_dim, v2.out_hidden_size) == (48, 1536, 4096)
    assert v2.deepstack_visual_indexes == (8, 16, 24) and v2.hidden_act == "gelu_pytorch_tanh"
    pv = VisionConfig.from_dict(json.loads(REAL["preview"].read_text())["vision_config"])
    assert (pv.model_type, pv.depth, pv.hidden_size, pv.head_dim) == ("qwen2_5_vit", 32, 1280, 80)
    assert (pv.window_merged, pv.fullatt_block_indexes, pv.out_hidden_size) == (4, (7, 15, 23, 31), 8192)
    assert pv.intermediate_size == 3456 and pv.hidden_act == "silu"


def test_config_rejects_bad_input():
    with pytest.raises(ValueError):
        VisionConfig.from_dict({**QWEN3_SMALL, "model_type": "siglip"})
    with pytest.raises(ValueError):
        VisionConfig.from_dict({"depth": 2})   # no model_type
    with pytest.raises(ValueError):
        VisionConfig.from_dict({**QWEN3_SMALL, "num_position_embeddings": 0})


def test_factory_dispatches_on_model_type():
    assert isinstance(build_vision_encoder(QWEN3_SMALL), Qwen3MoeVisionTransformer)
    assert isinstance(build_vision_encoder(QWEN25_SMALL), Qwen2_5_VisionTransformer)


@need_shared
@pytest.mark.parametrize("flavour", ["v2", "preview"])
def test_full_size_names_and_shapes_match_checkpoint(flavour):
    cfg = json.loads(REAL[flavour].read_text())
    with torch.device("meta"):
        vit = build_vision_encoder(cfg["vision_config"])
    ours = [(f"vision.{k}", list(v.shape)) for k, v in vit.state_dict().items()]
    ref = []
    for line in (FULL_NAMES / flavour / "names.txt").read_text().splitlines():
        name, shape, _ = line.split("\t")
        if name.startswith("vision."):
            ref.append((name, json.loads(shape)))
    assert ours == ref


def test_merge_order_coords():
    c = merge_order_coords([(1, 2, 4)], 2).tolist()
    assert c == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    c2 = merge_order_coords([(2, 2, 2)], 2).tolist()
    assert c2 == [[0, 0], [0, 1], [1, 0], [1, 1]] * 2


def test_rotary_tables_fp32_and_bf16():
    coords = torch.tensor([[0, 0], [3, 7], [45, 200]])
    cos, sin = vision_rotary_cos_sin(coords, 72, bf16_tables=False)
    assert cos.shape == (3, 72) and cos.dtype == torch.float32
    inv = 10000.0 ** (-torch.arange(0, 36, 2, dtype=torch.float64) / 36)      # 18 frequencies
    ang = torch.cat((coords[:, :1] * inv, coords[:, 1:] * inv), 1)
    ang = torch.cat((ang, ang), 1)
    torch.testing.assert_close(cos.double(), ang.cos(), atol=2e-5, rtol=0)
    torch.testing.assert_close(sin.double(), ang.sin(), atol=2e-5, rtol=0)
    # bf16 tables: bf16 frequency, bf16 product, bf16 cos (the reference after .to(bfloat16))
    cos_b, sin_b = vision_rotary_cos_sin(coords, 72, bf16_tables=True)
    inv_b = inv.float().bfloat16()
    ang_b = torch.cat((coords[:, :1].bfloat16() * inv_b, coords[:, 1:].bfloat16() * inv_b), 1)
    ang_b = torch.cat((ang_b, ang_b), 1)
    assert torch.equal(cos_b, ang_b.cos().float()) and torch.equal(sin_b, ang_b.sin().float())
    assert (cos_b - cos).abs().max() > 1e-3          # the switch really changes the table


def test_rope_switch_defaults_follow_weight_dtype():
    vit = _model(QWEN3_SMALL)
    grid = [(1, 4, 4)]
    assert torch.equal(vit.rotary_cos_sin(grid)[0],
                       vision_rotary_cos_sin(merge_order_coords(grid, 2), 16, bf16_tables=False)[0])
    vit_b = _model(QWEN3_SMALL).to(torch.bfloat16)
    assert torch.equal(vit_b.rotary_cos_sin(grid)[0],
                       vision_rotary_cos_sin(merge_order_coords(grid, 2), 16, bf16_tables=True)[0])
    vit_b.rope_bf16_tables = False
    assert torch.equal(vit_b.rotary_cos_sin(grid)[0], vit.rotary_cos_sin(grid)[0])


def test_pos_embed_is_align_corners_bilinear_in_merge_order():
    vit = _model(QWEN3_SMALL)
    g = vit.config.num_grid_per_side
    table = vit.pos_embed.weight.detach()
    with torch.no_grad():
        # grid equal to the table: the table itself (raster → merge-block order)
        pe = vit.interpolated_pos_embed([(1, g, g)])
        idx = [r * g + c for r, c in merge_order_coords([(1, g, g)], 2).tolist()]
        torch.testing.assert_close(pe, table[idx], atol=1e-6, rtol=0)
        # other sizes, tiled over t: torch's align_corners bilinear resampling
        for t, h, w in [(1, 6, 10), (3, 2, 8)]:
            pe = vit.interpolated_pos_embed([(t, h, w)])
            img = F.interpolate(table.view(g, g, -1).permute(2, 0, 1)[None], size=(h, w),
                                mode="bilinear", align_corners=True)[0]
            exp = torch.stack([img[:, r, c] for r, c in merge_order_coords([(t, h, w)], 2).tolist()])
            torch.testing.assert_close(pe, exp, atol=1e-5, rtol=0)


def test_pos_embed_weights_rounded_to_table_dtype():
    vit = _model(QWEN3_SMALL).to(torch.bfloat16)
    g = vit.config.num_grid_per_side
    table = vit.pos_embed.weight.detach()
    h, w = 6, 4
    pe = vit.interpolated_pos_embed([(1, h, w)])
    assert pe.dtype == torch.bfloat16
    rows = torch.linspace(0, g - 1, h)
    cols = torch.linspace(0, g - 1, w)
    for k, (r, c) in enumerate(merge_order_coords([(1, h, w)], 2).tolist()):
        y, x = rows[r].item(), cols[c].item()
        y0, x0 = int(y), int(x)
        y1, x1 = min(y0 + 1, g - 1), min(x0 + 1, g - 1)
        dy, dx = torch.tensor(y - y0, dtype=torch.float32), torch.tensor(x - x0, dtype=torch.float32)
        terms = [(y0, x0, (1 - dy) * (1 - dx)), (y0, x1, (1 - dy) * dx), (y1, x0, dy * (1 - dx)), (y1, x1, dy * dx)]
        acc = None
        for yy, xx, wt in terms:
            term = table[yy * g + xx] * wt.bfloat16()
            acc = term if acc is None else acc + term
        assert torch.equal(pe[k], acc), k


def test_qwen3_vit_matches_dense_reference():
    vit = _model(QWEN3_SMALL, seed=3)
    grids = [(1, 4, 6), (2, 2, 4), (1, 6, 2)]
    px = _pixels(vit.config, grids)
    with torch.no_grad():
        out = vit(px, torch.tensor(grids))
        ref = _qwen3_dense(vit, px, grids)
    assert out.shape == (sum(t * h * w for t, h, w in grids) // 4, 24)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_attention_over_a_huge_image_runs_in_query_blocks_within_the_score_budget(monkeypatch):
    """A 4000x4000 picture is 62,500 patches in one chunk: CPU attention materialises [heads, L, L] scores
    (31 GB here, a 500 from the server), so the queries are taken in blocks whose scores fit the budget."""
    from engine.models.thinker import vision

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(300, 2, 8, generator=gen) for _ in range(3))
    whole = chunked_attention(q, k, v, [0, 100, 300])
    seen = []
    real = F.scaled_dot_product_attention

    def spy(qb, kb, vb):
        seen.append((qb.shape[-2], kb.shape[-2]))
        return real(qb, kb, vb)

    monkeypatch.setattr(vision, "MAX_SCORE_BYTES", 2 * 50 * 200 * 4)  # heads * 50 queries * 200 keys * fp32
    monkeypatch.setattr(vision.F, "scaled_dot_product_attention", spy)
    blocked = chunked_attention(q, k, v, [0, 100, 300])
    assert all(2 * n_q * n_k * 4 <= vision.MAX_SCORE_BYTES for n_q, n_k in seen), seen
    assert {n_k for _, n_k in seen} == {100, 200} and len(seen) == 1 + 4  # the 200-patch chunk in 4 blocks
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=0)


def test_qwen3_images_and_frames_are_isolated():
    vit = _model(QWEN3_SMALL, seed=4)
    grids = [(2, 4, 4), (1, 4, 4)]
    px = _pixels(vit.config, grids)
    with torch.no_grad():
        base = vit(px, grids)
        px2 = px.clone()
        px2[32:] += 1.0                              # change only the second image
        px3 = px.clone()
        px3[16:32] -= 1.0                            # change only frame 1 of image 0
        a, b = vit(px2, grids), vit(px3, grids)
    assert torch.equal(a[:8], base[:8]) and not torch.allclose(a[8:], base[8:])
    assert torch.equal(b[:4], base[:4]) and not torch.allclose(b[4:8], base[4:8])


def test_qwen3_deepstack_mergers_kept_but_never_run():
    vit = _model(QWEN3_SMALL, seed=5)
    assert any(k.startswith("deepstack_merger_list.0.") for k in vit.state_dict())
    grids = [(1, 4, 4)]
    px = _pixels(vit.config, grids)
    with torch.no_grad():
        base = vit(px, grids)
        for p in vit.deepstack_merger_list.parameters():
            p.fill_(float("nan"))
        assert torch.equal(vit(px, grids), base)


def test_window_partition_tiles_merge_units():
    perm, cu = window_partition([(1, 6, 10), (2, 4, 4)], merge=2, window=2)
    # image 0: merged 3x5 grid -> windows (2x2, 2x2, 2x1, 1x2, 1x2, 1x1); image 1: 2x2 per frame
    assert cu == [0, 16, 32, 40, 48, 56, 60, 76, 92]
    assert sorted(perm.tolist()) == list(range(23))
    assert perm[:4].tolist() == [0, 1, 5, 6] and perm[8:10].tolist() == [4, 9]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("cfg", [QWEN3_SMALL, QWEN25_SMALL], ids=["qwen3", "qwen25"])
def test_a_check_runs_between_blocks_and_attention_calls_and_can_stop_the_encoder(cfg):
    """A cancelled request stopped only once the whole ViT was through (60-120 s for a huge picture):
    `check` is called before each attention call and after each block, so raising stops it there; it
    changes nothing else."""
    vit = _model(cfg, seed=2)
    grids = [(1, 4, 6), (1, 2, 4)]
    px = _pixels(vit.config, grids)
    calls = []
    with torch.no_grad():
        plain = vit(px, torch.tensor(grids))
        checked = vit(px, torch.tensor(grids), lambda: calls.append(1))
    assert torch.equal(plain, checked)
    assert len(calls) >= 2 * vit.config.depth  # at least one attention call and one block end per block

    def stop_in_second_block():
        calls.append(1)
        if len(calls) > len(calls_per_block):
            raise _Stop
    calls_per_block = calls[:len(calls) // vit.config.depth]
    calls.clear()
    with torch.no_grad(), pytest.raises(_Stop):
        vit(px, torch.tensor(grids), stop_in_second_block)
    assert len(calls) == len(calls_per_block) + 1


def test_qwen25_vit_matches_dense_reference():
    vit = _model(QWEN25_SMALL, seed=6)
    assert vit.config.window_merged == 2
    grids = [(1, 6, 10), (2, 4, 4), (1, 8, 8)]
    px = _pixels(vit.config, grids)
    with torch.no_grad():
        out = vit(px, torch.tensor(grids))
        ref = _qwen25_dense(vit, px, grids)
    assert out.shape == (sum(t * h * w for t, h, w in grids) // 4, 24)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_qwen25_window_layers_are_local():
    # no full-attention block: a token's output depends only on its own window
    vit = _model({**QWEN25_SMALL, "fullatt_block_indexes": []}, seed=7)
    grids = [(1, 8, 8)]                       # merged 4x4 = four 2x2 windows
    px = _pixels(vit.config, grids)
    with torch.no_grad():
        base = vit(px, grids)
        px2 = px.clone()
        px2[60:64] += 2.0                     # last merge unit -> window (1, 1)
        out = vit(px2, grids)
    changed = (out - base).abs().amax(-1) > 0
    units = torch.arange(16).view(4, 4)
    expect = torch.zeros(16, dtype=torch.bool)
    expect[units[2:, 2:].reshape(-1)] = True
    assert torch.equal(changed, expect)


@pytest.mark.parametrize("cfg", [QWEN3_SMALL, QWEN25_SMALL], ids=["qwen3", "qwen2_5"])
def test_bf16_run_is_close_to_fp32(cfg):
    vit = _model(cfg, seed=8)
    grids = [(1, 4, 8), (2, 4, 4)]
    px = _pixels(vit.config, grids)
    with torch.no_grad():
        ref = vit(px, grids)
        vit_b = vit.to(torch.bfloat16)
        out = vit_b(px.bfloat16(), grids)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err


def test_input_validation():
    vit = _model(QWEN3_SMALL)
    with pytest.raises(ValueError):
        vit(torch.zeros(15, vit.config.patch_dim), [(1, 4, 4)])
    with pytest.raises(ValueError):
        vit(torch.zeros(12, vit.config.patch_dim), [(1, 3, 4)])


@need_shared
def test_mm_fixture_vision_encoder_out():
    from safetensors.torch import load_file
    cfg = json.loads((MM / "config.json").read_text())
    vit = build_vision_encoder(cfg["vision_config"]).eval()
    w = load_file(str(MM / "model.safetensors"))
    vit.load_state_dict({k[7:]: v for k, v in w.items() if k.startswith("vision.")}, strict=True)
    inp, out = load_file(str(MM / "inputs.safetensors")), load_file(str(MM / "outputs.safetensors"))
    with torch.no_grad():
        got = vit(inp["pixel_values"], inp["image_grid_thw"])
    torch.testing.assert_close(got, out["vision_encoder_out"], atol=1e-5, rtol=0)


def test_preview_config_omitting_keys_takes_the_upstream_config_defaults():
    # Qwen2_5_VLVisionConfig's defaults (spec §4.4): a Preview vision_config that omits window_size,
    # fullatt_block_indexes, patch / merge / temporal sizes or hidden_act is built with them, not refused
    cfg = VisionConfig.from_dict({"model_type": "qwen2_5_vit", "depth": 2, "hidden_size": 32, "num_heads": 2,
                                  "intermediate_size": 40, "out_hidden_size": 24})
    assert (cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size, cfg.in_channels) == (14, 2, 2, 3)
    assert (cfg.window_size, cfg.window_merged, cfg.fullatt_block_indexes) == (112, 4, (7, 15, 23, 31))
    assert cfg.hidden_act == "silu"
    # `spatial_patch_size` is informational upstream (the ViT reads `patch_size` only)
    assert VisionConfig.from_dict({**QWEN25_SMALL, "patch_size": 4, "spatial_patch_size": 7}).patch_size == 4


def test_qwen3_config_omitting_keys_takes_the_upstream_config_defaults():
    # Qwen3VLMoeVisionConfig's defaults (spec §4.3): a 2.0 vision_config that omits a key is built with
    # the class default, not refused; an omitted deepstack list means three (unused) deepstack mergers,
    # whose weights the checkpoint then holds, while an empty list means none
    cfg = VisionConfig.from_dict({"model_type": "qwen3_moe_vit"})
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (27, 1152, 16, 4304)
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.spatial_merge_size, cfg.in_channels) == (16, 2, 2, 3)
    assert (cfg.out_hidden_size, cfg.num_grid_per_side, cfg.hidden_act) == (3584, 48, "gelu_pytorch_tanh")
    assert cfg.deepstack_visual_indexes == (8, 16, 24)
    small = {k: v for k, v in QWEN3_SMALL.items() if k != "deepstack_visual_indexes"}
    vit = build_vision_encoder(small)
    assert len(vit.deepstack_merger_list) == 3
    assert "deepstack_merger_list.2.linear_fc2.bias" in vit.state_dict()
    assert len(build_vision_encoder({**small, "deepstack_visual_indexes": []}).deepstack_merger_list) == 0
    assert VisionConfig.from_dict({**QWEN3_SMALL, "patch_size": 4, "spatial_patch_size": 7}).patch_size == 4


def test_preview_fullatt_indexes_past_the_depth_are_never_reached_not_refused():
    # a 3-block Preview ViT keeping the released list [7, 15, 23, 31] runs every block windowed
    # (upstream tests `layer_num in fullatt_block_indexes`); it equals the same ViT with no full blocks
    vit = _model({**QWEN25_SMALL, "fullatt_block_indexes": [7, 15, 23, 31]}, seed=9)
    windowed = _model({**QWEN25_SMALL, "fullatt_block_indexes": []}, seed=9)
    grids = [(1, 8, 12)]
    px = _pixels(vit.config, grids)
    with torch.no_grad():
        out, ref = vit(px, grids), windowed(px, grids)
        dense = _qwen25_dense(vit, px, grids)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=0)


@pytest.mark.parametrize("act, ref", [
    ("gelu_new", lambda x: 0.5 * x * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))),
    ("gelu_fast", lambda x: 0.5 * x * (1 + torch.tanh(0.7978845608 * x * (1 + 0.044715 * x * x)))),
    ("gelu_python", lambda x: 0.5 * x * (1 + torch.erf(x * 0.7071067811865476))),
    ("relu", lambda x: x.clamp_min(0)), ("swish", lambda x: x / (1 + torch.exp(-x))),
    ("relu2", lambda x: x.clamp_min(0) ** 2), ("tanh", torch.tanh),
])
def test_qwen3_mlp_reads_any_transformers_activation_name(act, ref):
    # the reference MLP is fc2(ACT2FN[hidden_act](fc1 x)) (spec §4.3): a vision_config naming another
    # transformers activation is built with it, not refused
    vit = build_vision_encoder({**QWEN3_SMALL, "hidden_act": act})
    assert vit.config.hidden_act == act
    mlp = vit.blocks[0].mlp
    x = torch.randn(5, QWEN3_SMALL["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.linear_fc2(ref(mlp.linear_fc1(x))), atol=1e-5, rtol=1e-5)


def test_every_activation_name_the_config_takes_has_its_function():
    # vision_config.VISION_ACTIVATIONS (checked without torch) and the functions the ViTs build with name the same set
    from engine.models.thinker.vision import _ACTIVATIONS
    from engine.models.thinker.vision_config import VISION_ACTIVATIONS

    assert sorted(VISION_ACTIVATIONS) == sorted(_ACTIVATIONS)
    with pytest.raises(ValueError, match="hidden_act 'gelu_accurate' not supported"):
        VisionConfig.from_dict({**QWEN3_SMALL, "hidden_act": "gelu_accurate"})


def test_non_square_position_table_uses_its_first_floor_sqrt_squared_rows():
    # upstream: G = int(num_position_embeddings ** 0.5); the table keeps all n rows (checkpoint shape)
    # but bilinear indices stay below G² (spec §4.3): n = 20 runs exactly like n = 16 with those rows
    big = _model({**QWEN3_SMALL, "num_position_embeddings": 20}, seed=4)
    assert big.config.num_grid_per_side == 4 and tuple(big.pos_embed.weight.shape) == (20, 32)
    small = _model(QWEN3_SMALL, seed=4)
    state = big.state_dict()
    state["pos_embed.weight"] = state["pos_embed.weight"][:16]
    small.load_state_dict(state)
    grids = [(1, 6, 10), (1, 2, 2)]
    px = _pixels(big.config, grids)
    with torch.no_grad():
        torch.testing.assert_close(big(px, grids), small(px, grids), atol=1e-6, rtol=0)
