"""Vision encoders of the Ming-flash-omni thinker (spec §4.3, §4.4).

Two ViTs exist upstream and the checkpoint's `vision_config.model_type` says which one to build
(`build_vision_encoder`):

* ``qwen3_moe_vit`` (2.0): `Qwen3MoeVisionTransformer` — Conv3d patch embed with bias, a learned
  position table bilinearly interpolated to each image grid, 2-D rotary, LayerNorm blocks with full
  attention per image and temporal slice, a LayerNorm + MLP patch merger.  The checkpoint also holds
  `deepstack_merger_list.*`; they are kept as parameters (strict loading) but never run.
* ``qwen2_5_vit`` (Preview): `Qwen2_5_VisionTransformer` — bias-free patch embed, no absolute
  positions, 2-D rotary, RMSNorm blocks with a SwiGLU MLP, window attention at merge-unit
  granularity except in `fullatt_block_indexes`, an RMSNorm + MLP merger, then the window
  permutation is undone.

Both take the processor's flattened patches ``pixel_values [N, C*tp*P*P]`` (rows in merge-block
order) and ``grid_thw [n, 3]`` and return one row per LLM image token: ``[sum(t*h*w)/m², out_hidden]``.

The state-dict keys equal the upstream checkpoint names without the leading ``vision.``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# (the config's typed view lives apart, torch-free: what only reads a config needs no torch)
from engine.models.thinker.vision_config import QWEN2_5_VIT, QWEN3_VIT, VisionConfig

# Constants the upstream modelling code hard-codes (they are not config keys).
VIT_NORM_EPS = 1e-6          # LayerNorm (2.0) / RMSNorm (Preview) eps, blocks and merger
VIT_ROPE_THETA = 10000.0     # base of the 2-D vision rotary
#: Most bytes of attention scores one scaled_dot_product_attention call on the CPU may hold: its kernel
#: materialises [heads, queries, keys] (a 4000x4000 picture is one chunk of 62,500 patches), so a chunk
#: over it is attended in blocks of queries (each row's softmax is its own: the same result). A cancel is checked
#: before each block; smaller blocks would check more often but cost time at the real shape (bench/vit_attention_cpu.py,
#: 2.0 ViT over a 2000x2000 picture on 2 cores: 16 MiB blocks 2.06x and 64 MiB 1.24x the time of 256 MiB ones)
MAX_SCORE_BYTES = 256 * 1024 * 1024

#: `hidden_act` functions as transformers' ACT2FN holds them (the reference MLPs call ACT2FN[hidden_act]), one
#: per name of vision_config.VISION_ACTIVATIONS
_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
    "relu6": F.relu6,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def grid_list(grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """`grid_thw` ([n, 3] tensor or nested sequence) as a list of python (t, h, w) triples."""
    if isinstance(grid_thw, torch.Tensor):
        grid_thw = grid_thw.reshape(-1, 3).tolist()
    out = [(int(t), int(h), int(w)) for t, h, w in grid_thw]
    if not out:
        raise ValueError("grid_thw is empty")
    return out


def _check_inputs(cfg: VisionConfig, pixel_values: torch.Tensor, grid: list[tuple[int, int, int]]) -> None:
    m = cfg.spatial_merge_size
    for t, h, w in grid:
        if t < 1 or h < 1 or w < 1 or h % m or w % m:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) must be positive with h, w multiples of "
                             f"spatial_merge_size {m}")
    n = sum(t * h * w for t, h, w in grid)
    if pixel_values.dim() != 2 or pixel_values.shape[0] != n or pixel_values.shape[1] != cfg.patch_dim:
        raise ValueError(f"pixel_values must be [{n}, {cfg.patch_dim}] for grids {grid}, "
                         f"got {list(pixel_values.shape)}")


def merge_order_coords(grid: list[tuple[int, int, int]], merge: int, device=None) -> torch.Tensor:
    """Full-resolution (row, col) patch coordinates of every token, in the processor's token order.

    Order is (t, merged row, merged col, intra row, intra col); the coordinates repeat for each t.
    Returns a long tensor [sum(t*h*w), 2].
    """
    out = []
    for t, h, w in grid:
        hb, wb = h // merge, w // merge
        # r[bh, bw, i, j] = bh·m + i ; c[bh, bw, i, j] = bw·m + j
        r = torch.arange(h, device=device).view(hb, 1, merge, 1).expand(hb, wb, merge, merge)
        c = torch.arange(w, device=device).view(1, wb, 1, merge).expand(hb, wb, merge, merge)
        rc = torch.stack((r.reshape(-1), c.reshape(-1)), dim=-1)
        out.append(rc.repeat(t, 1))
    return torch.cat(out, dim=0)


def vision_rotary_cos_sin(coords: torch.Tensor, head_dim: int, *, bf16_tables: bool,
                          theta: float = VIT_ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, head_dim] (fp32) of the 2-D vision rotary for tokens at (row, col) `coords`.

    dim = head_dim/2 rotary channels hold head_dim/4 frequencies inv_k = θ^(−2k/dim) applied to the
    row, then the same for the column; the angle vector is duplicated to head_dim (rotate-half).
    With `bf16_tables` the frequency vector, the position ramp, the angle products and cos/sin are
    rounded to bf16 exactly where the reference (whose buffers were cast by `.to(bfloat16)`) rounds.
    """
    dim = head_dim // 2
    table_dtype = torch.bfloat16 if bf16_tables else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=coords.device) / dim))
    inv_freq = inv_freq.to(table_dtype)
    n_pos = int(coords.max().item()) + 1 if coords.numel() else 1
    seq = torch.arange(n_pos, dtype=table_dtype, device=coords.device)
    table = torch.outer(seq, inv_freq)                       # [n_pos, dim/2] in table dtype
    angles = table[coords].flatten(1)                        # [S, dim]: row freqs | col freqs
    emb = torch.cat((angles, angles), dim=-1)                # [S, head_dim]
    return emb.cos().float(), emb.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on x [S, heads, head_dim], computed in fp32, returned in x's dtype."""
    xf = x.float()
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens: Sequence[int], check: Callable[[], None] | None = None) -> torch.Tensor:
    """Non-causal attention within each [cu[i], cu[i+1]) chunk; q/k/v [S, heads, hd] → [S, heads, hd].

    Scale 1/sqrt(head_dim). Tokens never attend across chunk boundaries. `check` is called before
    each attention call (it may raise to stop: a request cancelled during a huge picture).
    """
    out = torch.empty_like(q)
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if b <= a:
            continue
        kc, vc = (t[a:b].transpose(0, 1) for t in (k, v))   # [heads, L, hd]
        # CUDA's flash / memory-efficient kernels never hold the scores: one call per chunk there
        block = query_block(q.shape[1], b - a, q.element_size()) if q.device.type == "cpu" else b - a
        for start in range(a, b, block):
            if check is not None:
                check()
            qc = q[start:min(b, start + block)].transpose(0, 1)
            out[start:start + qc.shape[1]] = F.scaled_dot_product_attention(qc, kc, vc).transpose(0, 1)
    return out


def query_block(heads: int, keys: int, element_size: int) -> int:
    """Queries per attention call so that its [heads, queries, keys] scores stay within MAX_SCORE_BYTES."""
    return max(1, MAX_SCORE_BYTES // (heads * keys * element_size))


def per_frame_cu_seqlens(grid: list[tuple[int, int, int]], tokens_per_patch: int = 1) -> list[int]:
    """Boundaries of full attention: one chunk of h·w tokens per temporal slice of each image."""
    cu = [0]
    for t, h, w in grid:
        for _ in range(t):
            cu.append(cu[-1] + h * w * tokens_per_patch)
    return cu


class VisionPatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (tp, P, P) applied to each patch row reshaped to [C, tp, P, P].

    (Equivalent to a Linear with the weight flattened in (c, τ, y, x) order; the Conv3d call is kept
    because it rounds like the reference, and its cost is negligible next to the blocks.)
    """

    def __init__(self, cfg: VisionConfig, bias: bool):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.proj
        x = pixel_values.to(p.weight.dtype).reshape(-1, p.in_channels, *p.kernel_size)
        return p(x).reshape(-1, p.out_channels)


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm computed in fp32 and returned in x's dtype (bf16-safe)."""
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(),
                        norm.bias.float() if norm.bias is not None else None, norm.eps).to(x.dtype)


class VisionRMSNorm(nn.Module):
    """RMSNorm with one `weight` (the Preview ViT's norm): fp32 statistics, weight · x̂ in x's dtype."""

    def __init__(self, dim: int, eps: float = VIT_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class VisionAttention(nn.Module):
    """Fused-qkv multi-head attention with 2-D rotary, restricted to cu_seqlens chunks."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: Sequence[int], cos: torch.Tensor,
                sin: torch.Tensor, check: Callable[[], None] | None = None) -> torch.Tensor:
        s = x.shape[0]
        # qkv output is [q (all heads) | k | v], each head-major.
        q, k, v = self.qkv(x).reshape(s, 3, self.num_heads, -1).unbind(1)
        q = apply_vision_rotary(q, cos, sin)
        k = apply_vision_rotary(k, cos, sin)
        o = chunked_attention(q, k, v, cu_seqlens, check)
        return self.proj(o.reshape(s, -1))


# --------------------------------------------------------------------------------------------
# 2.0: Qwen3-style ViT
# --------------------------------------------------------------------------------------------


class Qwen3VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3VisionBlock(nn.Module):
    """Pre-LN block: x += proj(attn(LN1 x)); x += fc2(act(fc1(LN2 x)))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=VIT_NORM_EPS)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=VIT_NORM_EPS)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = Qwen3VisionMLP(cfg)

    def forward(self, x, cu_seqlens, cos, sin, check=None):
        x = x + self.attn(_layer_norm(self.norm1, x), cu_seqlens, cos, sin, check)
        return x + self.mlp(_layer_norm(self.norm2, x))


class Qwen3PatchMerger(nn.Module):
    """LayerNorm, group m² consecutive tokens, fc1 → exact GELU → fc2.

    `postshuffle_norm` (the unused deepstack mergers) normalises the grouped vector instead.
    """

    def __init__(self, cfg: VisionConfig, postshuffle_norm: bool = False):
        super().__init__()
        self.merged = cfg.merged_hidden_size
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged if postshuffle_norm else cfg.hidden_size, eps=VIT_NORM_EPS)
        self.linear_fc1 = nn.Linear(self.merged, self.merged, bias=True)
        self.linear_fc2 = nn.Linear(self.merged, cfg.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = _layer_norm(self.norm, x.reshape(-1, self.merged))
        else:
            x = _layer_norm(self.norm, x).reshape(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Qwen3MoeVisionTransformer(nn.Module):
    """Ming-flash-omni 2.0 ViT (spec §4.3): patches [N, C·tp·P·P] + grid_thw → [N/m², out_hidden].

    `rope_bf16_tables`: None (default) computes the rotary table in bf16 when the weights are bf16
    (what the reference does after `.to(bfloat16)`) and in fp32 otherwise; True/False force it.
    """

    def __init__(self, cfg: VisionConfig, *, rope_bf16_tables: bool | None = None):
        super().__init__()
        if cfg.model_type != QWEN3_VIT:
            raise ValueError(f"Qwen3MoeVisionTransformer needs model_type {QWEN3_VIT!r}, got {cfg.model_type!r}")
        self.config = cfg
        self.rope_bf16_tables = rope_bf16_tables
        self.patch_embed = VisionPatchEmbed(cfg, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(Qwen3VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = Qwen3PatchMerger(cfg)
        # Present in the checkpoint, evaluated upstream but discarded: never run here.
        self.deepstack_merger_list = nn.ModuleList(
            Qwen3PatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes)

    def _bf16_tables(self) -> bool:
        if self.rope_bf16_tables is not None:
            return bool(self.rope_bf16_tables)
        return self.patch_embed.proj.weight.dtype == torch.bfloat16

    def interpolated_pos_embed(self, grid: list[tuple[int, int, int]]) -> torch.Tensor:
        """Learned G×G table bilinearly resampled (align-corners) to each grid, in token order.

        Corner weights are computed in fp32 and cast to the table dtype before the weighted sum;
        the raster (row, col) result is tiled over t and reordered to merge-block order.
        """
        table = self.pos_embed.weight
        g = self.config.num_grid_per_side
        m = self.config.spatial_merge_size
        dev = table.device
        out = []
        for t, h, w in grid:
            r = torch.linspace(0, g - 1, h, dtype=torch.float32, device=dev)
            c = torch.linspace(0, g - 1, w, dtype=torch.float32, device=dev)
            r0, c0 = r.int(), c.int()                    # truncation == floor (coords >= 0)
            r1, c1 = (r0 + 1).clamp(max=g - 1), (c0 + 1).clamp(max=g - 1)
            dr, dc = r - r0, c - c0
            corners = (
                (r0, c0, (1 - dr)[:, None] * (1 - dc)[None, :]),
                (r0, c1, (1 - dr)[:, None] * dc[None, :]),
                (r1, c0, dr[:, None] * (1 - dc)[None, :]),
                (r1, c1, dr[:, None] * dc[None, :]),
            )
            acc = None
            for ri, ci, wt in corners:
                idx = (ri.long()[:, None] * g + ci.long()[None, :]).reshape(-1)
                term = table[idx] * wt.reshape(-1, 1).to(table.dtype)
                acc = term if acc is None else acc + term
            pe = acc.repeat(t, 1).view(t, h // m, m, w // m, m, -1).permute(0, 1, 3, 2, 4, 5)
            out.append(pe.reshape(t * h * w, -1))
        return torch.cat(out, dim=0)

    def rotary_cos_sin(self, grid: list[tuple[int, int, int]], device=None):
        coords = merge_order_coords(grid, self.config.spatial_merge_size, device=device)
        return vision_rotary_cos_sin(coords, self.config.head_dim, bf16_tables=self._bf16_tables())

    def forward(self, pixel_values: torch.Tensor, grid_thw, check: Callable[[], None] | None = None) -> torch.Tensor:
        """`check` is called between blocks and attention calls (it may raise to stop)."""
        grid = grid_list(grid_thw)
        _check_inputs(self.config, pixel_values, grid)
        x = self.patch_embed(pixel_values)
        x = x + self.interpolated_pos_embed(grid).to(x.dtype)
        cos, sin = self.rotary_cos_sin(grid, device=x.device)
        cu = per_frame_cu_seqlens(grid)
        for blk in self.blocks:
            x = blk(x, cu, cos, sin, check)
            if check is not None:
                check()
        return self.merger(x)


# --------------------------------------------------------------------------------------------
# Preview: Qwen2.5-VL ViT
# --------------------------------------------------------------------------------------------


class Qwen2_5VisionMLP(nn.Module):
    """SwiGLU with biases: down(act(gate x) ⊙ up x)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen2_5VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = VisionRMSNorm(cfg.hidden_size)
        self.norm2 = VisionRMSNorm(cfg.hidden_size)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = Qwen2_5VisionMLP(cfg)

    def forward(self, x, cu_seqlens, cos, sin, check=None):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin, check)
        return x + self.mlp(self.norm2(x))


class Qwen2_5PatchMerger(nn.Module):
    """RMSNorm (`ln_q`), group m² tokens, Linear → exact GELU → Linear (`mlp.0`, `mlp.2`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merged = cfg.merged_hidden_size
        self.ln_q = VisionRMSNorm(cfg.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(),
                                 nn.Linear(self.merged, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged))


def window_partition(grid: list[tuple[int, int, int]], merge: int, window: int,
                     device=None) -> tuple[torch.Tensor, list[int]]:
    """Window-major permutation of merge units and the windows' cu_seqlens (in patch tokens).

    For each image and temporal slice the merged (h/m × w/m) grid is cut into window×window tiles
    (edge tiles are partial); units are listed tile by tile, raster order inside a tile.
    Returns (unit permutation [sum(t*h*w)/m²] long, cu_seqlens list starting with 0).
    """
    perm, cu = [], [0]
    base = 0
    unit = merge * merge
    for t, h, w in grid:
        mh, mw = h // merge, w // merge
        idx = torch.arange(t * mh * mw, device=device).view(t, mh, mw) + base
        for ti in range(t):
            for r0 in range(0, mh, window):
                for c0 in range(0, mw, window):
                    tile = idx[ti, r0:r0 + window, c0:c0 + window].reshape(-1)
                    perm.append(tile)
                    cu.append(cu[-1] + tile.numel() * unit)
        base += t * mh * mw
    return torch.cat(perm), cu


class Qwen2_5_VisionTransformer(nn.Module):
    """Ming-flash-omni Preview ViT (spec §4.4): patches + grid_thw → [N/m², out_hidden], token order.

    `rope_bf16_tables` as in `Qwen3MoeVisionTransformer`.
    """

    def __init__(self, cfg: VisionConfig, *, rope_bf16_tables: bool | None = None):
        super().__init__()
        if cfg.model_type != QWEN2_5_VIT:
            raise ValueError(f"Qwen2_5_VisionTransformer needs model_type {QWEN2_5_VIT!r}, got {cfg.model_type!r}")
        # Indexes past the last block are never reached (upstream tests `layer_num in fullatt_block_indexes`):
        # a shallow ViT keeping the released [7, 15, 23, 31] runs every block windowed.
        bad = [i for i in cfg.fullatt_block_indexes if i < 0]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} are negative")
        self.config = cfg
        self.rope_bf16_tables = rope_bf16_tables
        self.patch_embed = VisionPatchEmbed(cfg, bias=False)
        self.blocks = nn.ModuleList(Qwen2_5VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = Qwen2_5PatchMerger(cfg)

    def _bf16_tables(self) -> bool:
        if self.rope_bf16_tables is not None:
            return bool(self.rope_bf16_tables)
        return self.patch_embed.proj.weight.dtype == torch.bfloat16

    def rotary_cos_sin(self, grid: list[tuple[int, int, int]], device=None):
        coords = merge_order_coords(grid, self.config.spatial_merge_size, device=device)
        return vision_rotary_cos_sin(coords, self.config.head_dim, bf16_tables=self._bf16_tables())

    def forward(self, pixel_values: torch.Tensor, grid_thw, check: Callable[[], None] | None = None) -> torch.Tensor:
        """`check` is called between blocks and attention calls (it may raise to stop)."""
        cfg = self.config
        grid = grid_list(grid_thw)
        _check_inputs(cfg, pixel_values, grid)
        unit = cfg.merge_unit
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary_cos_sin(grid, device=x.device)
        perm, cu_window = window_partition(grid, cfg.spatial_merge_size, cfg.window_merged, device=x.device)
        s = x.shape[0]

        def permute(a: torch.Tensor) -> torch.Tensor:
            return a.reshape(s // unit, unit, -1)[perm].reshape(s, -1)

        x, cos, sin = permute(x), permute(cos), permute(sin)
        # Windows never cross temporal slices, so the per-frame chunks are still contiguous.
        cu_full = per_frame_cu_seqlens(grid)
        full = set(cfg.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cu_full if i in full else cu_window, cos, sin, check)
            if check is not None:
                check()
        x = self.merger(x)
        return x[torch.argsort(perm)]


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

VisionEncoder = Qwen3MoeVisionTransformer | Qwen2_5_VisionTransformer


def build_vision_encoder(cfg: VisionConfig | dict, *, rope_bf16_tables: bool | None = None) -> nn.Module:
    """The ViT named by `vision_config["model_type"]` (`qwen3_moe_vit` → 2.0, `qwen2_5_vit` → Preview)."""
    if isinstance(cfg, dict):
        cfg = VisionConfig.from_dict(cfg)
    if cfg.model_type == QWEN3_VIT:
        return Qwen3MoeVisionTransformer(cfg, rope_bf16_tables=rope_bf16_tables)
    if cfg.model_type == QWEN2_5_VIT:
        return Qwen2_5_VisionTransformer(cfg, rope_bf16_tables=rope_bf16_tables)
    raise ValueError(f"unsupported vision model_type {cfg.model_type!r}")
