"""rope_index against positions built constructively from a prompt's layout (spec §3.1, §3.4-§3.6), not from
its token ids: several images (odd and even merged grids, image-generation query rows), 2.0 videos of 1-3
temporal patches as timestamped frames, audio spans and text interleaved, in a left-padded batch of two; and
the Preview layout, whose frame tokens stay 1-D text (§1.4)."""

from dataclasses import dataclass, field

import torch

from engine.models.thinker.positions import PositionTokens, decode_positions, rope_index

IMAGE_PATCH, FRAME_PATCH, IMAGE_START, IMAGE_END, VIDEO, VIDEO_END, AUDIO, AUDIO_PATCH, AUDIO_END = range(900, 909)
MERGE = 2
T_SCALE = 2  # the temporal stride generate() uses (§3.1)
TOKENS_2_0 = PositionTokens(image_patch=IMAGE_PATCH, video_patch=FRAME_PATCH, image_start=IMAGE_START,
                            video_start=IMAGE_END, interleaved_video=True, spatial_merge_size=MERGE)
# the Preview's code has no interleaved path, and its config's video_start_token is the id of </image>
TOKENS_PREVIEW = PositionTokens(image_patch=IMAGE_PATCH, video_patch=FRAME_PATCH, image_start=IMAGE_START,
                                video_start=IMAGE_END, interleaved_video=False, spatial_merge_size=MERGE)


@dataclass
class Layout:
    """Token ids and, beside them, the (T, H, W) positions the spec gives each token, built as the prompt grows."""

    ids: list = field(default_factory=list)
    pos: list = field(default_factory=list)
    image_grids: list = field(default_factory=list)
    video_grids: list = field(default_factory=list)
    next_t: int = 0  # where the next text token goes: the last block's largest T + 1, or the last text's + 1

    def text(self, *ids: int) -> "Layout":
        for i in ids:
            self.ids.append(i)
            self.pos.append((self.next_t,) * 3)
            self.next_t += 1
        return self

    def _block(self, patch: int, t: int, rows: int, cols: int) -> None:
        """One merged block of t x rows x cols tokens at T = start + 2 i, H / W centred on T (§3.1)."""
        start = self.next_t
        for i in range(t):
            for j in range(rows):
                for k in range(cols):
                    p_t = start + T_SCALE * i
                    self.ids.append(patch)
                    self.pos.append((p_t, p_t + j - (rows - 1) // 2, p_t + k - (cols - 1) // 2))
        self.next_t = start + T_SCALE * (t - 1) + 1

    def image(self, rows: int, cols: int) -> "Layout":
        self.text(IMAGE_START)
        self._block(IMAGE_PATCH, 1, rows, cols)
        self.image_grids.append((1, rows * MERGE, cols * MERGE))
        return self.text(IMAGE_END, 10)

    def query(self, scale: int) -> "Layout":
        """An image-generation query block: grid (1, 2, 2 s^2), one row of s^2 tokens (§3.6)."""
        self.text(IMAGE_START)
        self._block(IMAGE_PATCH, 1, 1, scale * scale)
        self.image_grids.append((1, MERGE, MERGE * scale * scale))
        return self.text(IMAGE_END)

    def video_2_0(self, t: int, rows: int, cols: int) -> "Layout":
        """t temporal patches, each a timestamp then its own <image> frame block at t = 1 (§3.4)."""
        for frame in range(t):
            self.text(40 + frame, 41, IMAGE_START)
            self._block(FRAME_PATCH, 1, rows, cols)
            self.text(IMAGE_END)
        self.video_grids.append((t, rows * MERGE, cols * MERGE))
        return self.text(10)

    def video_preview(self, t: int, rows: int, cols: int) -> "Layout":
        """<video> + all frames' patches + </video>: no block is detected, every token is text (§1.4, §3.4)."""
        self.text(VIDEO, *[FRAME_PATCH] * (t * rows * cols), VIDEO_END, 10)
        self.video_grids.append((t, rows * MERGE, cols * MERGE))
        return self

    def video_fixed(self, t: int, rows: int, cols: int) -> "Layout":
        """The Preview layout read with <video> as the block start (§1.4's fix): one block, T stepping by 2."""
        self.text(VIDEO)
        self._block(FRAME_PATCH, t, rows, cols)
        self.video_grids.append((t, rows * MERGE, cols * MERGE))
        return self.text(VIDEO_END, 10)

    def audio(self, n: int) -> "Layout":
        return self.text(AUDIO, *[AUDIO_PATCH] * n, AUDIO_END)  # audio spans are text positions (§3.5)


def _grids(rows: list) -> torch.Tensor | None:
    return torch.tensor(rows) if rows else None


def _check_batch(layouts: list[Layout], tokens: PositionTokens) -> None:
    """Right-aligned rows (left padding); padded slots take position 1; delta = max T + 1 - padded length."""
    length = max(len(lay.ids) for lay in layouts) + 3
    ids = torch.zeros(len(layouts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    want = torch.ones(3, len(layouts), length, dtype=torch.long)
    for b, lay in enumerate(layouts):
        n = len(lay.ids)
        ids[b, length - n:] = torch.tensor(lay.ids)
        mask[b, length - n:] = 1
        want[:, b, length - n:] = torch.tensor(lay.pos).T
    pos, delta = rope_index(ids, tokens, _grids([g for lay in layouts for g in lay.image_grids]),
                            _grids([g for lay in layouts for g in lay.video_grids]), mask)
    assert pos.tolist() == want.tolist()
    assert delta.view(-1).tolist() == [lay.next_t - length for lay in layouts]
    # decode continues every row at its next T on all three axes (§2.9)
    assert decode_positions(length, delta)[:, :, 0].tolist() == [[lay.next_t for lay in layouts]] * 3


def test_images_videos_audio_and_queries_interleaved_in_a_padded_batch():
    first = (Layout().text(1, 2, 3).image(3, 5).audio(7).video_2_0(3, 1, 3).text(4)
             .image(2, 2).video_2_0(1, 3, 1).query(2).text(5, 6))
    second = Layout().text(7).video_2_0(2, 5, 3).audio(3).image(1, 1).image(4, 3).query(3).audio(2).text(8, 9, 10)
    _check_batch([first, second], TOKENS_2_0)


def test_blocks_back_to_back_and_a_prompt_ending_in_a_block():
    lay = Layout().image(3, 3)
    lay.text(IMAGE_START)
    lay._block(IMAGE_PATCH, 1, 5, 1)  # a 5 x 1 image right after the first, nothing after it
    lay.image_grids.append((1, 5 * MERGE, MERGE))
    _check_batch([lay, Layout().video_2_0(3, 3, 3)], TOKENS_2_0)


def test_preview_layout_numbers_frames_as_text_but_images_in_3d():
    first = Layout().text(1, 2).image(3, 5).video_preview(2, 3, 3).audio(4).image(2, 3).text(3)
    second = Layout().video_preview(3, 1, 3).text(4).image(5, 3)
    _check_batch([first, second], TOKENS_PREVIEW)


def test_preview_videos_with_the_video_token_fixed_step_t_by_two():
    fixed = PositionTokens(image_patch=IMAGE_PATCH, video_patch=FRAME_PATCH, image_start=IMAGE_START,
                           video_start=VIDEO, interleaved_video=False, spatial_merge_size=MERGE)
    first = Layout().text(1).video_fixed(3, 3, 5).image(2, 3).audio(2).video_fixed(2, 2, 2).text(3)
    _check_batch([first, Layout().image(1, 3).video_fixed(1, 3, 1)], fixed)
