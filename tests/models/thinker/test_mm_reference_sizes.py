"""The multimodal input path against the spec's §4.3 / §4.5 / §5.2-5.4 written out plainly here from the
checkpoint's tensors (sharing no code with the engine): the Qwen3 ViT (patch embedding as one matrix over the
(c, tau, y, x) vector, the bilinear align-corners position table reordered to merge-block order, 2-D rotary on
full-resolution patch coordinates, attention within each temporal slice, the merger over m x m blocks), the
Preview's Qwen2.5 ViT (RMSNorm, SwiGLU, attention within windows but in its full-attention blocks), the
vision projector, the Whisper encoder (sinusoids from their formula, key without bias, no mask, clips padded
to the longest), the audio projector's stride-2 conv, unit-norm rows, and where each row lands in the prompt's
embeddings (image rows in <imagePatch> slots, frame rows in <framePatch> slots, each clip at its span, word
embeddings elsewhere) with the two router masks. At configs the fixtures never use: merge sizes 1 / 2 / 3,
patch sizes 8 / 14 (and the Preview's 14), depths 1-3, head widths 8-16, Preview windows of 2 and 3 merged tokens (ragged at the
grid's edge) with and without a full-attention block, 80 mel bins, one to three encoder layers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from engine.models.thinker.model import load_model
from engine.runtime import Engine
from tests.models.thinker.variants import write_variant
from tests.tiny_tokenizer import tiny_tokenizer

# the Preview config's known pitfall (§1.4), said as a warning when it is read
pytestmark = pytest.mark.filterwarnings("ignore:.*video_start_token")
# the LLM only embeds here: a narrow one-layer one keeps the checkpoint small
SMALL_LLM = {"num_hidden_layers": 1, "first_k_dense_replace": 1, "hidden_size": 32, "head_dim": 16,
             "intermediate_size": 32}
# fp32 on both sides, summed in other orders (fused qkv, batched heads, SDPA): a few ulps of unit-norm rows
ATOL = 2e-5

CONFIGS = {
    "merge3_patch8_depth3_head8_mel80": ("2.0",
        {"patch_size": 8, "spatial_merge_size": 3, "depth": 3, "hidden_size": 24, "num_heads": 3,
         "intermediate_size": 40, "num_position_embeddings": 64, "out_hidden_size": 48},
        {"n_mels": 80, "n_state": 48, "n_head": 4, "n_layer": 3}),
    "merge1_patch14_depth1_head12": ("2.0",
        {"patch_size": 14, "spatial_merge_size": 1, "depth": 1, "hidden_size": 36, "num_heads": 3,
         "intermediate_size": 24, "num_position_embeddings": 100, "out_hidden_size": 16},
        {"n_state": 16, "n_head": 1, "n_layer": 1}),
    "merge2_patch8_depth2_head16_video": ("2.0",
        {"patch_size": 8, "spatial_merge_size": 2, "depth": 2, "hidden_size": 32, "num_heads": 2,
         "intermediate_size": 32, "num_position_embeddings": 36, "out_hidden_size": 40},
        {"n_state": 24, "n_head": 2, "n_layer": 2}),
    "preview_window2_full_block1_depth3": ("preview",
        {"patch_size": 14, "spatial_patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1], "depth": 3,
         "hidden_size": 32, "num_heads": 2, "intermediate_size": 24},
        {"n_state": 16, "n_head": 2, "n_layer": 1}),
    "preview_window3_no_full_block": ("preview",
        {"patch_size": 14, "spatial_patch_size": 14, "window_size": 84, "fullatt_block_indexes": [], "depth": 2,
         "hidden_size": 24, "num_heads": 2, "intermediate_size": 20},
        {"n_state": 16, "n_head": 1, "n_layer": 2}),
}


# --------------------------------------------------------------------------- the spec's encoders


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def merge_block_coords(t: int, h: int, w: int, m: int) -> list[tuple[int, int, int]]:
    """(frame, row, col) of each patch token in merge-block order (§4.1)."""
    return [(f, bh * m + i, bw * m + j) for f in range(t) for bh in range(h // m) for bw in range(w // m)
            for i in range(m) for j in range(m)]


def position_table(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[h, w, D] by the §4.3 step-2 formula: corners of linspace(0, G-1, n) coordinates, weighted bilinearly."""
    side = math.isqrt(table.shape[0])
    grid = table[:side * side].view(side, side, -1)
    out = torch.empty(h, w, table.shape[1])
    cols = np.linspace(0, side - 1, w)
    c0 = cols.astype(int)
    c1, dc = np.minimum(c0 + 1, side - 1), torch.tensor(cols - c0, dtype=torch.float32)[:, None]
    for i, r in enumerate(np.linspace(0, side - 1, h)):
        r0 = int(r)
        r1, dr = min(r0 + 1, side - 1), float(r - r0)
        out[i] = ((1 - dr) * (1 - dc) * grid[r0, c0] + (1 - dr) * dc * grid[r0, c1]
                  + dr * (1 - dc) * grid[r1, c0] + dr * dc * grid[r1, c1])
    return out


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate-half over the whole head: channel c pairs with c + d/2. x [L, heads, d], angles [L, d/2]."""
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def token_layout(grids: list[tuple[int, int, int]], m: int, window: int | None = None):
    """Per token in merge-block order: (row, col) and the key of the attention group it belongs to: its
    image's temporal slice, and with `window` (in patches) its window of that slice."""
    coords, groups = [], []
    for image, (t, h, w) in enumerate(grids):
        for f, r, c in merge_block_coords(t, h, w, m):
            coords.append((r, c))
            groups.append((image, f) + ((r // window, c // window) if window else ()))
    return torch.tensor(coords, dtype=torch.float64), torch.tensor(groups)


def rotary_angles(coords: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[row * inv_freq, col * inv_freq] with inv_freq = 10000^(-2k / (head_dim / 2)) (§4.3 step 3, §4.4 step 2)."""
    rot_dim = head_dim // 2
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    return torch.cat([coords[:, :1] * inv_freq, coords[:, 1:] * inv_freq], -1).float()


def attention(sd: dict, pre: str, y: torch.Tensor, heads: int, angles: torch.Tensor, allowed: torch.Tensor):
    head_dim = y.shape[1] // heads
    q, k, v = (y @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]).view(-1, 3, heads, head_dim).unbind(1)
    q, k = rotate(q, angles), rotate(k, angles)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
    o = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    return o.reshape(y.shape) @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]


def project(sd: dict, merged: torch.Tensor) -> torch.Tensor:
    """linear_proj (Linear, exact GELU, Linear) and unit rows (§4.5)."""
    y = F.gelu(merged @ sd["linear_proj.0.weight"].T + sd["linear_proj.0.bias"])
    return unit_rows(y @ sd["linear_proj.2.weight"].T + sd["linear_proj.2.bias"])


def spec_vit(sd: dict, vc: dict, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
    """The 2.0 Qwen3 ViT (§4.3), merger and projector."""
    m, heads, width = vc["spatial_merge_size"], vc["num_heads"], vc["hidden_size"]
    x = pixels @ sd["vision.patch_embed.proj.weight"].reshape(width, -1).T + sd["vision.patch_embed.proj.bias"]
    coords, groups = token_layout(grids, m)
    tables = [position_table(sd["vision.pos_embed.weight"], h, w) for _, h, w in grids]
    image_of = [image for image, (t, h, w) in enumerate(grids) for _ in range(t * h * w)]
    x = x + torch.stack([tables[i][int(r), int(c)] for i, (r, c) in zip(image_of, coords.tolist())])
    angles, same_slice = rotary_angles(coords, width // heads), (groups[:, None] == groups[None]).all(-1)
    for k in range(vc["depth"]):
        pre = f"vision.blocks.{k}."
        y = F.layer_norm(x, (width,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], 1e-6)
        x = x + attention(sd, pre, y, heads, angles, same_slice)
        y = F.layer_norm(x, (width,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], 1e-6)
        y = F.gelu(y @ sd[pre + "mlp.linear_fc1.weight"].T + sd[pre + "mlp.linear_fc1.bias"], approximate="tanh")
        x = x + y @ sd[pre + "mlp.linear_fc2.weight"].T + sd[pre + "mlp.linear_fc2.bias"]
    y = F.layer_norm(x, (width,), sd["vision.merger.norm.weight"], sd["vision.merger.norm.bias"], 1e-6)
    y = y.reshape(-1, m * m * width)  # m*m consecutive tokens: one merge block
    y = F.gelu(y @ sd["vision.merger.linear_fc1.weight"].T + sd["vision.merger.linear_fc1.bias"])
    return project(sd, y @ sd["vision.merger.linear_fc2.weight"].T + sd["vision.merger.linear_fc2.bias"])


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def spec_vit_preview(sd: dict, vc: dict, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
    """The Preview's Qwen2.5 ViT (§4.4): no position table, windows of window_size / patch_size patches in
    each slice (the grid's ragged edge makes smaller windows) except in the full-attention blocks; tokens stay
    in merge-block order throughout, so there is no permutation to undo."""
    m, heads, width = vc["spatial_merge_size"], vc["num_heads"], vc["hidden_size"]
    x = pixels @ sd["vision.patch_embed.proj.weight"].reshape(width, -1).T  # no bias
    coords, windows = token_layout(grids, m, window=vc["window_size"] // vc["patch_size"])
    angles = rotary_angles(coords, width // heads)
    same_window = (windows[:, None] == windows[None]).all(-1)
    same_slice = (windows[:, None, :2] == windows[None, :, :2]).all(-1)
    for k in range(vc["depth"]):
        pre = f"vision.blocks.{k}."
        allowed = same_slice if k in vc["fullatt_block_indexes"] else same_window
        x = x + attention(sd, pre, rms(x, sd[pre + "norm1.weight"]), heads, angles, allowed)
        y = rms(x, sd[pre + "norm2.weight"])
        gate = F.silu(y @ sd[pre + "mlp.gate_proj.weight"].T + sd[pre + "mlp.gate_proj.bias"])
        up = y @ sd[pre + "mlp.up_proj.weight"].T + sd[pre + "mlp.up_proj.bias"]
        x = x + (gate * up) @ sd[pre + "mlp.down_proj.weight"].T + sd[pre + "mlp.down_proj.bias"]
    y = rms(x, sd["vision.merger.ln_q.weight"]).reshape(-1, m * m * width)
    y = F.gelu(y @ sd["vision.merger.mlp.0.weight"].T + sd["vision.merger.mlp.0.bias"])
    return project(sd, y @ sd["vision.merger.mlp.2.weight"].T + sd["vision.merger.mlp.2.bias"])


def sinusoids(length: int, channels: int) -> torch.Tensor:
    half = channels // 2
    inc = math.log(10000) / (half - 1)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * torch.exp(-inc * torch.arange(half))[None]
    return torch.cat([angle.sin(), angle.cos()], 1).float()


def spec_whisper_clip(sd: dict, ac: dict, mel: torch.Tensor) -> torch.Tensor:
    """One (padded) clip [T, n_mels] -> projected rows [T3, H] before normalisation."""
    width, heads = ac["n_state"], ac["n_head"]
    x = F.gelu(F.conv1d(mel.T[None], sd["audio.conv1.weight"], sd["audio.conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, sd["audio.conv2.weight"], sd["audio.conv2.bias"], stride=2, padding=1))[0].T
    x = x + sinusoids(x.shape[0], width)
    for k in range(ac["n_layer"]):
        pre = f"audio.blocks.{k}."
        y = F.layer_norm(x, (width,), sd[pre + "attn_ln.weight"], sd[pre + "attn_ln.bias"], 1e-5)
        q = (y @ sd[pre + "attn.query.weight"].T + sd[pre + "attn.query.bias"]).view(-1, heads, width // heads)
        kk = (y @ sd[pre + "attn.key.weight"].T).view(-1, heads, width // heads)  # the key has no bias
        v = (y @ sd[pre + "attn.value.weight"].T + sd[pre + "attn.value.bias"]).view(-1, heads, width // heads)
        attn = (torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(width // heads)).softmax(-1)  # no mask
        x = x + torch.einsum("hqk,khd->qhd", attn, v).reshape(-1, width) @ sd[pre + "attn.out.weight"].T \
            + sd[pre + "attn.out.bias"]
        y = F.layer_norm(x, (width,), sd[pre + "mlp_ln.weight"], sd[pre + "mlp_ln.bias"], 1e-5)
        y = F.gelu(y @ sd[pre + "mlp.0.weight"].T + sd[pre + "mlp.0.bias"])
        x = x + y @ sd[pre + "mlp.2.weight"].T + sd[pre + "mlp.2.bias"]
    x = F.layer_norm(x, (width,), sd["audio.ln_post.weight"], sd["audio.ln_post.bias"], 1e-5)
    y = F.gelu(F.conv1d(x.T[None], sd["linear_proj_audio.0.weight"], sd["linear_proj_audio.0.bias"],
                        stride=2, padding=1))[0].T
    return y @ sd["linear_proj_audio.3.weight"].T + sd["linear_proj_audio.3.bias"]


def spec_audio(sd: dict, ac: dict, mels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each clip zero-padded to the longest and encoded with no mask; cut to its own T3; unit rows."""
    longest = max(len(mel) for mel in mels)
    out = []
    for mel in mels:
        padded = torch.cat([mel, mel.new_zeros(longest - len(mel), mel.shape[1])])
        t3 = ((len(mel) - 1) // 2) // 2 + 1
        out.append(unit_rows(spec_whisper_clip(sd, ac, padded)[:t3]))
    return out


# --------------------------------------------------------------------------- the test


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _clip(n: int, seed: int) -> tuple[np.ndarray, int]:
    return (0.2 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32), 16000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors of a few hundred rows: one thread, as Engine.load sets for a small model (several threads only
    contend on a busy 2-core machine: 2.8 s a config instead of 0.2 s measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=CONFIGS.values(), ids=CONFIGS.keys())
def variant(request, tmp_path_factory):
    release, vision, whisper = request.param
    root = tmp_path_factory.mktemp("variant")
    audio = {"whisper_encoder_config": {"n_mels": 128, "n_ctx": 3000, **whisper},
             "ds_kernel_size": 3, "ds_stride": 2, "norm_query_embeds": True}
    ckpt = write_variant(root / "ckpt", llm=SMALL_LLM, vision=vision, audio=audio, release=release)
    model = load_model(ckpt, dtype="fp32", device="cpu", pack_cpu_experts=False)  # the LLM only embeds here
    engine = Engine(model, tiny_tokenizer(root / "tok"), is_demo=True)
    full = json.loads((ckpt / "config.json").read_text())
    vit = spec_vit if release == "2.0" else spec_vit_preview
    return engine, load_file(str(ckpt / "model.safetensors")), full["vision_config"], \
        full["audio_config"]["whisper_encoder_config"], vit


def test_encoders_and_their_placement_in_the_prompt_follow_the_spec(variant):
    engine, sd, vc, ac, vit = variant
    parts = [{"type": "text", "text": "see "}, {"type": "image", "image": [_picture(64, 96, 1), _picture(40, 40, 2)]},
             {"type": "audio", "audio": [_clip(2400, 3), _clip(1001, 4)]}, {"type": "text", "text": "and"}]
    if engine.processor.settings.interleaved_video and 32 % (vc["patch_size"] * vc["spatial_merge_size"]) == 0:
        # (2.0 video frames are sized to multiples of 32)
        parts.append({"type": "video", "video": [_picture(32, 48, 5 + i) for i in range(3)],
                      "resized_height": 64, "resized_width": 96})
    prompt = engine.processor.build([{"role": "user", "content": parts}])
    mm = engine.encode_media(prompt)
    ids = torch.tensor([prompt.ids])
    with torch.inference_mode():
        embeds, image_mask, audio_mask = engine.model.llm.prepare_inputs(ids, mm)

    grids = [tuple(g) for g in prompt.image_grid_thw.tolist()]
    image_rows = vit(sd, vc, prompt.pixel_values, grids)
    video_rows = (vit(sd, vc, prompt.pixel_values_videos, [tuple(g) for g in prompt.video_grid_thw.tolist()])
                  if prompt.videos else torch.zeros(0, image_rows.shape[1]))
    clips = spec_audio(sd, ac, [a.feats for a in prompt.audios])

    tok, table = engine.tokenizer, sd["model.model.word_embeddings.weight"]
    expected = table[ids[0]].clone()
    image_slots = ids[0] == tok.token_id("<imagePatch>")
    frame_slots = ids[0] == tok.token_id("<framePatch>")
    assert int(image_slots.sum()) == len(image_rows) and int(frame_slots.sum()) == len(video_rows)
    expected[image_slots], expected[frame_slots] = image_rows, video_rows
    audio_slots = torch.zeros_like(image_slots)
    starts = [i + 1 for i, t in enumerate(prompt.ids) if t == tok.token_id("<audio>")]
    for start, rows in zip(starts, clips):
        expected[start:start + len(rows)] = rows
        audio_slots[start:start + len(rows)] = True
        assert prompt.ids[start + len(rows)] == tok.token_id("</audio>")

    np.testing.assert_allclose(embeds[0].numpy(), expected.numpy(), atol=ATOL, rtol=0)
    assert torch.equal(image_mask[0], image_slots | frame_slots)
    assert torch.equal(audio_mask[0], audio_slots)
