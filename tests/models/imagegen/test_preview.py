"""The preview map recovers a VAE's colour meaning: fitted on a stand-in VAE whose latents are a known
linear function of the pooled pixels, it maps unseen latents back to their colours."""

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from engine.models.imagegen.preview import LatentRGB, preview_png, preview_size


class LinearVAE(nn.Module):
    """encode: 8x8 average pool, then a fixed 3 -> 4 channel map (+ offset); mode() returns it."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.mix.weight.copy_(torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, -0.5], [0.3, 0.0, 1.0], [0.5, 0.5, 0.5]])
                                  .view(4, 3, 1, 1))
            self.mix.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        self.config = SimpleNamespace(block_out_channels=[1, 1, 1, 1], shift_factor=0.1, scaling_factor=0.5)

    @property
    def dtype(self):
        return torch.float32

    def encode(self, x, return_dict=False):
        z = self.mix(nn.functional.avg_pool2d(x, 8))
        return (SimpleNamespace(mode=lambda: z),)


def test_fit_inverts_a_linear_vae_on_unseen_colours():
    vae = LinearVAE()
    rgb_map = LatentRGB.fit(vae)
    colour = torch.tensor([0.2, 0.7, 0.4]).view(1, 3, 1, 1).expand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = (vae.encode(colour)[0].mode() - 0.1) * 0.5
    rgb = rgb_map.to_rgb(z)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - np.array([51, 178, 102])).max() <= 2


def test_preview_png_has_the_requested_size_capped_for_big_images():
    from PIL import Image
    import io
    png = preview_png(np.zeros((4, 6, 3), np.uint8), (40, 60))
    assert Image.open(io.BytesIO(png)).size == (60, 40)
    assert preview_size((768, 1365)) == (288, 512) and preview_size((100, 60)) == (100, 60)
