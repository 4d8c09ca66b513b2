"""3-D positions: the spec's worked example (§3.2) and decode continuation, independent of fixtures."""

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
