"""3-D positions: the spec's worked example (§3.2) and decode continuation, independent of fixtures."""

import numpy as np
import torch

from engine.models.thinker.positions import PositionTokens, decode_positions, rope_index

TOK = PositionTokens(image_patch=900, video_patch=901, image_start=902, video_start=903,
                     interleaved_video=True, spatial_merge_size=2)


def test_spec_worked_example_single_image():
    ids = [1] * 10 + [902] + [900] * 24 + [904] + [2] * 4  # 11 text, 24 patches, </image>, 4 text
    pos, delta = rope_index(torch.tensor([ids]), TOK, image_grid_thw=torch.tensor([[1, 8, 12]]))
    t, h, w = pos[:, 0]
    assert t[:11].tolist() == list(range(11))
    assert set(t[11:35].tolist()) == {11}
    assert sorted(set(h[11:35].tolist())) == [10, 11, 12, 13]
    assert sorted(set(w[11:35].tolist())) == list(range(9, 15))
    assert t[35:].tolist() == [12, 13, 14, 15, 16]
    assert int(delta) == 16 + 1 - 40
    assert decode_positions(40, delta)[:, 0, 0].tolist() == [17, 17, 17]


def test_text_only_left_padding_positions_and_delta():
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    pos, delta = rope_index(torch.tensor([[5, 5, 1, 2, 3]]), TOK, attention_mask=mask)
    assert pos[0, 0].tolist() == [1, 1, 0, 1, 2] and int(delta) == 3 - 5
    # decode continues where the real tokens stopped, on all three axes
    assert decode_positions(5, delta)[:, 0, 0].tolist() == [3, 3, 3]


def test_interleaved_video_frames_each_take_one_t_position():
    frame = [902] + [901] * 2 + [904]
    ids = [1, 2] + frame + [3] + frame
    pos, _ = rope_index(torch.tensor([ids]), TOK, video_grid_thw=torch.tensor([[2, 2, 4]]))
    t = pos[0, 0].tolist()
    assert t == [0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 8]


def test_fractional_seconds_per_grid_round_as_the_reference_float32_arithmetic():
    """Preview-style video with absolute time (second_per_grid_ts, float32 as the processor makes it):
    upstream multiplies t x 0.7 x 2.0 and adds the offset in float32, then truncates. k = 5 gives
    float32(5 x 0.7) = 3.5 exactly, so T = 4 + 7 = 11 (float64 arithmetic gives 6.9999... -> 10)."""
    tok = PositionTokens(image_patch=900, video_patch=901, image_start=902, video_start=903,
                         interleaved_video=False, spatial_merge_size=2)
    ids = [1, 2, 3, 903] + [901] * (6 * 2 * 2) + [905, 7]
    sec = torch.tensor([0.7], dtype=torch.float32)
    pos, delta = rope_index(torch.tensor([ids]), tok, video_grid_thw=torch.tensor([[6, 4, 4]]),
                            second_per_grid_ts=sec)
    t = pos[0, 0].tolist()
    # the rule re-derived in numpy float32: int(float32(float32(k * 0.7) * 2) + 4)
    expect = [int(np.float32(np.float32(k * np.float32(0.7)) * np.float32(2.0)) + np.float32(4)) for k in range(6)]
    assert expect == [4, 5, 6, 8, 9, 11]
    assert [t[4 + 4 * k] for k in range(6)] == expect
    assert t[-2:] == [12, 13] and int(delta) == 13 + 1 - len(ids)


def test_interleaved_video_takes_one_second_per_grid_entry_per_temporal_patch():
    """2.0 layout with second_per_grid_ts: upstream splits the grids into t = 1 blocks and indexes the
    seconds by block, one entry per temporal patch; each block's single time step (index 0) makes the
    positions those without it. Two videos (2, 4, 4) and (1, 4, 4) with three entries raised a size
    mismatch (the entries were repeated per video)."""
    frame = [902] + [901] * 4 + [904]
    ids = torch.tensor([[1, 903] + (frame + [5]) * 2 + [2, 903] + frame + [2]])
    grid = torch.tensor([[2, 4, 4], [1, 4, 4]])
    want, want_delta = rope_index(ids, TOK, video_grid_thw=grid)
    pos, delta = rope_index(ids, TOK, video_grid_thw=grid, second_per_grid_ts=torch.tensor([0.7, 0.7, 1.5]))
    assert torch.equal(pos, want) and torch.equal(delta, want_delta)


def test_blocks_of_a_kind_without_grids_are_text():
    """Upstream counts image blocks only when image_grid_thw is given (and video blocks only with
    video_grid_thw); a prompt holding an image block but called with the video grid alone numbers the
    image's tokens as text. It raised TypeError (indexing the missing image grid)."""
    frame = [902] + [901] * 2 + [904]
    image = [902] + [900] * 4 + [904]
    ids = [1] + image + [2] + frame
    pos, delta = rope_index(torch.tensor([ids]), TOK, video_grid_thw=torch.tensor([[1, 2, 4]]))
    t = pos[0, 0].tolist()
    assert t[:9] == list(range(9))          # text, the image block as text, text, <image>
    assert t[9:11] == [9, 9] and t[11] == 10  # the frame: one T position, then </image>
    assert int(delta) == 10 + 1 - len(ids)
