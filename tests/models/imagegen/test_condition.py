"""Query blocks appended after the prompt, their 1 x s² grid positions (spec §8.2, §3.6), and the
connector's bidirectional attention."""

import torch

from engine.models.imagegen.condition import Connector, append_query_blocks
from engine.models.thinker.positions import PositionTokens, rope_index

PATCH = 100
TOKENS = PositionTokens(image_patch=PATCH, video_patch=120, image_start=PATCH + 1, video_start=PATCH + 2,
                        interleaved_video=True, spatial_merge_size=2)


def test_blocks_wrappers_grids_and_last_scale_slots():
    lay = append_query_blocks([5, 6, 7], (2, 4), PATCH)
    ids = lay.input_ids[0].tolist()
    assert ids == [5, 6, 7, 101] + [100] * 4 + [102, 101] + [100] * 16 + [102]
    assert lay.gen_mask[0].tolist() == [0] * 4 + [1] * 4 + [0, 0] + [1] * 16 + [0]
    assert lay.image_grid_thw.tolist() == [[1, 2, 8], [1, 2, 32]]
    assert lay.last_scale_slots.tolist() == list(range(10, 26))


def test_query_rows_are_one_by_s_squared_centred_on_the_block_start():
    lay = append_query_blocks([5, 6, 7], (4,), PATCH)
    pos, _ = rope_index(lay.input_ids, TOKENS, lay.image_grid_thw)
    t, h, w = (pos[a, 0].tolist() for a in range(3))
    start = 4  # text 0..2, <image> at 3, the block's T position = 3 + 1
    assert t[4:20] == [start] * 16 and h[4:20] == [start] * 16
    assert w[4:20] == [k - 7 + start for k in range(16)]   # ⌊(16 − 1)/2⌋ = 7
    assert t[20] == start + 1                                # </image> resumes at max T + 1


def test_connector_attends_both_ways():
    cfg = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1, "vocab_size": 8, "max_position_embeddings": 64, "rope_theta": 10000.0}
    conn = Connector(cfg, device="cpu")
    gen = torch.Generator().manual_seed(0)
    state = {n: torch.randn(p.shape, generator=gen) * 0.2 for n, p in conn.model.named_parameters()}
    conn.model.load_state_dict(state, strict=False, assign=True)
    x = torch.randn(1, 6, 16, generator=gen)
    with torch.inference_mode():
        a = conn(x)
        y = x.clone()
        y[0, -1] += 1.0   # changing the LAST token changes the FIRST output: not causal
        b = conn(y)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4
