"""3-D (T, H, W) VideoRoPE position ids and rope deltas for text, image, video and audio spans
(spec §3): the reference's "t-scale" index builder, reproduced exactly, quirks included."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.models.thinker.config import LLMConfig

# generate() calls the index builder with this temporal scale (spec §3.1).
DEFAULT_T_SCALE = 2.0


@dataclass(frozen=True)
class PositionTokens:
    """The token ids the position builder looks for, and how it treats videos."""

    image_patch: int
    video_patch: int
    image_start: int
    video_start: int
    interleaved_video: bool
    spatial_merge_size: int

    @classmethod
    def from_config(cls, cfg: LLMConfig, fix_video_start_token: int | None = None) -> "PositionTokens":
        """`fix_video_start_token`: the id of `<video>` to use instead of the shipped
        `video_start_token` (which is `</image>`, spec §1.4); None keeps the reference behaviour."""
        return cls(image_patch=cfg.image_patch_token, video_patch=cfg.video_patch_token,
                   image_start=cfg.image_start_token,
                   video_start=fix_video_start_token if fix_video_start_token is not None else cfg.video_start_token,
                   interleaved_video=cfg.use_interleaved_frame_timestamp,
                   spatial_merge_size=cfg.spatial_merge_size)


def _split_video_grids(video_grid_thw: torch.Tensor) -> torch.Tensor:
    """2.0 interleaved layout: every temporal patch is its own t=1 block (spec §3.4)."""
    reps = video_grid_thw[:, 0].long()
    grids = video_grid_thw.repeat_interleave(reps, dim=0).clone()
    grids[:, 0] = 1
    return grids


def _count_blocks(ids: torch.Tensor, start: int, patch: int) -> int:
    if ids.numel() < 2:
        return 0
    return int(((ids[:-1] == start) & (ids[1:] == patch)).sum())


def _text_positions(attention_mask: torch.Tensor | None, batch: int, length: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if attention_mask is None:
        pos = torch.arange(length, device=device).view(1, 1, -1).expand(3, batch, -1).clone()
        return pos, torch.zeros(batch, 1, dtype=torch.long, device=device)
    mask = attention_mask.long()
    pos = mask.cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    pos = pos.unsqueeze(0).expand(3, -1, -1).clone()
    deltas = pos.amax(dim=(0, 2)).view(-1, 1) + 1 - length
    return pos, deltas


def rope_index(input_ids: torch.Tensor, tokens: PositionTokens,
               image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, scale_factor: float = DEFAULT_T_SCALE,
               second_per_grid_ts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, L] -> (position_ids [3, B, L] int64, rope_deltas [B, 1] int64).

    Grids are (t, h, w) in ViT patches, listed in order of appearance across the whole batch.
    Padded slots (attention_mask 0) get position 1, as in the reference.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    if image_grid_thw is None and video_grid_thw is None:
        return _text_positions(attention_mask, batch, length, device)

    m = tokens.spatial_merge_size
    if video_grid_thw is not None and tokens.interleaved_video:
        # second_per_grid_ts stays as given: upstream indexes it by the split blocks (one entry per
        # temporal patch), whose single time step makes its value irrelevant but for the float dtype
        video_grid_thw = _split_video_grids(video_grid_thw)
    video_block_start = tokens.image_start if tokens.interleaved_video else tokens.video_start
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    position_ids = torch.ones(3, batch, length, dtype=torch.long, device=device)
    deltas = torch.zeros(batch, 1, dtype=torch.long, device=device)
    image_i = video_i = 0
    for b in range(batch):
        keep = attention_mask[b] == 1
        ids = input_ids[b][keep]
        # blocks of a kind count only when its grids are given (upstream); the others' tokens stay text
        n_images = _count_blocks(ids, tokens.image_start, tokens.image_patch) if image_grid_thw is not None else 0
        n_videos = _count_blocks(ids, video_block_start, tokens.video_patch) if video_grid_thw is not None else 0
        ids_list = ids.tolist()
        chunks: list[torch.Tensor] = []
        st = 0

        def next_index(tok: int, remaining: int) -> int:
            if remaining <= 0:
                return len(ids_list) + 1
            try:
                return ids_list.index(tok, st)
            except ValueError:
                return len(ids_list) + 1

        def start_pos() -> torch.Tensor | int:
            # a 0-d tensor of the previous chunk's dtype, as upstream: text after a fractional-time
            # block continues in that block's float dtype
            return chunks[-1][0].max() + 1 if chunks else 0

        for _ in range(n_images + n_videos):
            ed_image = next_index(tokens.image_patch, n_images)
            ed_video = next_index(tokens.video_patch, n_videos)
            if ed_image < ed_video:
                t, h, w = (int(x) for x in image_grid_thw[image_i])
                sec_per_t: torch.Tensor | float = 0  # upstream gives images no time step
                image_i += 1
                n_images -= 1
                ed = ed_image
            else:
                t, h, w = (int(x) for x in video_grid_thw[video_i])
                sec_per_t = 1.0 if second_per_grid_ts is None else second_per_grid_ts[video_i]
                video_i += 1
                n_videos -= 1
                ed = ed_video
            gt, gh, gw = t, h // m, w // m
            text_len = ed - st
            s0 = start_pos()
            chunks.append(torch.arange(text_len, device=device).view(1, -1).expand(3, -1) + s0)
            # the time index is computed in the reference's own tensor dtypes (float32 for the default dtype
            # or a float32 second_per_grid_ts) and truncated at the end: a fractional step such as 0.7 s x 2.0
            # rounds there as it does upstream, and adding the offset in float32 rounds it again
            t_idx = torch.arange(gt, device=device).view(-1, 1).expand(-1, gh * gw).flatten()
            t_idx = t_idx * sec_per_t * scale_factor if second_per_grid_ts is not None else t_idx * scale_factor
            p_t = t_idx + text_len + s0
            h_idx = (torch.arange(gh, device=device) - (gh - 1) // 2).view(1, -1, 1).expand(gt, gh, gw).flatten()
            w_idx = (torch.arange(gw, device=device) - (gw - 1) // 2).view(1, 1, -1).expand(gt, gh, gw).flatten()
            chunks.append(torch.stack([p_t, h_idx + p_t, w_idx + p_t]))
            st = ed + gt * gh * gw
        if st < len(ids_list):
            s0 = start_pos()
            chunks.append(torch.arange(len(ids_list) - st, device=device).view(1, -1).expand(3, -1) + s0)
        pos = torch.cat(chunks, dim=1).long() if chunks else torch.zeros(3, 0, dtype=torch.long, device=device)
        position_ids[:, b, keep] = pos
        t_max = int(pos[0].max()) if pos.numel() else -1
        deltas[b, 0] = t_max + 1 - length
    return position_ids, deltas


def decode_positions(cache_length: int, rope_deltas: torch.Tensor, new_tokens: int = 1) -> torch.Tensor:
    """Positions of tokens appended after `cache_length` cached ones: cache_len + delta on all axes."""
    base = torch.arange(cache_length, cache_length + new_tokens, device=rope_deltas.device)
    pos = base.view(1, -1) + rope_deltas.view(-1, 1)
    return pos.unsqueeze(0).expand(3, -1, -1)
