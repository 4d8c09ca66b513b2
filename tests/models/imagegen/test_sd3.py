"""The Preview's SD3-style image DiT (spec §8.10): its 3-axis RoPE, the caption MLP and pooled projection of its
wrapper, the 2- and 4-branch CFG, the tensor names of the upstream module, and the Preview tiny checkpoint
generating and editing through Engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.events import Done, ImageDone
from engine.models.imagegen.condition import CaptionMLP
from engine.models.imagegen.buckets import bucket_table
from engine.models.imagegen.config import SD3, ImageGenError, SD3DiTConfig
from engine.models.imagegen.sd3 import (SD3Transformer2DModel, apply_rope, caption_and_pooled, combine_guidance,
                                        denoise_sd3, dit_autocast, rope_freqs, rope_positions)

TINY = {"sample_size": 16, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 64,
        "num_attention_heads": 1, "joint_attention_dim": 24, "caption_projection_dim": 64, "pooled_projection_dim": 12,
        "out_channels": 4, "pos_embed_max_size": 16}


def test_rope_positions_and_frequencies_follow_the_preview_rule():
    """mm_rope.py QwenEmbedRope(scale_rope=True) as sd3_transformer.py builds it: axes 20/22/22, θ 10000; frame 0
    for the noisy latent, 1 for the reference; rows and columns centred (the lower half negative, from
    −(n − n//2)); text tokens at max(h//2, w//2) + j on all three axes; [image tokens, text tokens]."""
    frames, h, w, text = 2, 5, 4, 3
    pos = rope_positions(frames, h, w, text)
    assert pos.shape == (frames * h * w + text, 3)
    img = pos[:frames * h * w].reshape(frames, h, w, 3)
    assert img[0, ..., 0].eq(0).all() and img[1, ..., 0].eq(1).all()
    assert img[0, :, 0, 1].tolist() == [-3, -2, -1, 0, 1] and img[0, 0, :, 2].tolist() == [-2, -1, 0, 1]
    assert pos[frames * h * w:].tolist() == [[2, 2, 2], [3, 3, 3], [4, 4, 4]]
    freqs = rope_freqs(pos)
    assert freqs.dtype == torch.complex64 and freqs.shape == (len(pos), 32)
    angles = []
    for axis, d in enumerate((20, 22, 22)):  # e^{i·pos·θ^(−2k/d)} per axis, re-derived in float64
        angles += [pos[:, axis:axis + 1].double() * 10000.0 ** (-2 * k / d) for k in range(d // 2)]
    want = torch.polar(torch.ones(len(pos), 32, dtype=torch.float64), torch.cat(angles, dim=1))
    assert torch.allclose(torch.view_as_real(freqs).double(), torch.view_as_real(want), atol=1e-5)
    # applied on adjacent channel pairs (2k, 2k+1) of each head
    x = torch.randn(1, 2, 1, 64)
    f = rope_freqs(torch.tensor([[0, 0, 0], [1, 2, 3]]))
    out = apply_rope(x, f.unsqueeze(0))
    assert torch.allclose(out[0, 0], x[0, 0])
    a = float(f[1, 10].angle())  # the row axis' first pair: channels 20, 21 (after the frame axis' 10 pairs)
    c, s = math.cos(a), math.sin(a)
    x0, x1 = x[0, 1, 0, 20:22].tolist()
    assert out[0, 1, 0, 20:22].tolist() == pytest.approx([c * x0 - s * x1, s * x0 + c * x1], abs=1e-5)


def test_caption_mlp_and_pooled_projection():
    """SD3Model_withMLP: ToClipMLP C -> hidden -> D on the condition; the pooled projection is the mean over
    tokens of the MLP output, adaptive-average-pooled to pooled_projection_dim (D = 2P: adjacent pairs)."""
    mlp = CaptionMLP({"mlp.fc1.weight": (8, 5), "mlp.fc2.weight": (24, 8)})
    for p in mlp.parameters():
        torch.nn.init.normal_(p)
    cond = torch.randn(3, 7, 5)
    enc, pooled = caption_and_pooled(cond, mlp, 12, torch.float32)
    assert enc.shape == (3, 7, 24) and pooled.shape == (3, 12)
    mean = mlp(cond).mean(dim=1)
    assert torch.allclose(pooled, (mean[:, 0::2] + mean[:, 1::2]) / 2, atol=1e-5)
    _, zero_pooled = caption_and_pooled(torch.zeros(1, 7, 5), mlp, 12, torch.float32)
    assert zero_pooled.abs().sum() > 0  # the null branch's pooled input is the MLP of zeros, not zeros


def test_cfg_combines_two_or_four_branches():
    u, img, txt, full = (torch.full((1, 2, 2, 2), v) for v in (1.0, 2.0, 3.0, 5.0))
    assert torch.allclose(combine_guidance(torch.cat([u, txt]), 4.0, 2.0), u + 4.0 * (txt - u))  # 1 + 4 * 2
    four = combine_guidance(torch.cat([u, img, txt, full]), 4.0, 1.5)
    assert torch.allclose(four, u + 1.5 * (img - u) + 4.0 * (full - img))  # mode 1: 1 + 1.5 + 12
    assert float(four.flatten()[0]) == pytest.approx(14.5)


class _Recorder(torch.nn.Module):
    """A stand-in DiT that records what each call receives."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SD3DiTConfig(pooled_projection_dim=4)
        self.calls = []

    def forward(self, x, enc, pooled, t, ref):
        self.calls.append((x, enc, pooled, t, ref))
        return torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1, 1, 1).expand_as(x).clone()


@pytest.mark.parametrize("guidance, image_guidance, with_ref, branches", [
    (5.0, 2.0, True, 4), (5.0, 1.0, True, 2), (5.0, 2.0, False, 2), (1.0, 2.0, True, 1)])
def test_denoise_feeds_the_preview_branches(guidance, image_guidance, with_ref, branches):
    """pipeline_stable_diffusion_3.py: [null, text] (the reference in both), or with image_cfg > 1 and a
    reference [null/zero ref, null/ref, text/zero ref, text/ref]; the raw scheduler timestep; the guided
    output stepped as is. Without CFG (guidance <= 1) only the text branch runs."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    dit = _Recorder()
    mlp = CaptionMLP({"mlp.fc1.weight": (8, 5), "mlp.fc2.weight": (8, 8)})
    for p in mlp.parameters():
        torch.nn.init.normal_(p)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(2)
    cond = torch.randn(1, 3, 5)
    ref = torch.randn(1, 4, 2, 2) if with_ref else None
    steps = list(denoise_sd3(dit, mlp, sched, torch.zeros(1, 4, 2, 2), cond, guidance, image_guidance, ref))
    x, enc, pooled, t, ref_in = dit.calls[0]
    assert x.shape[0] == branches and torch.equal(t, sched.timesteps[0].expand(branches))
    text_enc = caption_and_pooled(cond, mlp, 4, torch.float32)[0][0]
    null_enc = caption_and_pooled(torch.zeros_like(cond), mlp, 4, torch.float32)[0][0]
    texts = {4: [0, 0, 1, 1], 2: [0, 1], 1: [1]}[branches]
    for b, is_text in enumerate(texts):  # (a batch and one row round differently in the MLP's matmuls)
        assert torch.allclose(enc[b], text_enc if is_text else null_enc, rtol=1e-5, atol=1e-6)
    if with_ref:
        refs = [0, 1, 0, 1] if branches == 4 else [1] * branches
        for b, has_ref in enumerate(refs):
            assert torch.equal(ref_in[b], ref[0] if has_ref else torch.zeros_like(ref[0]))
    else:
        assert ref_in is None
    out = torch.arange(branches, dtype=torch.float32)  # what the recorder answers per branch
    want = combine_guidance(out.view(-1, 1), guidance, image_guidance)
    assert torch.allclose(steps[0].model_output.flatten()[0], want.flatten()[0])
    dt = float(sched.sigmas[1] - sched.sigmas[0])
    assert torch.allclose(steps[0].latents_out, dt * steps[0].model_output)


def test_the_dit_runs_under_bf16_autocast_on_cuda_only():
    """Upstream's SD3Model_withMLP wraps its transformer in torch.cuda.amp.autocast(bfloat16), which is off on a CPU:
    a CUDA device gets that autocast, any other none (the DiT computes in its load dtype)."""
    import contextlib
    import warnings

    with warnings.catch_warnings():  # a CPU-only torch warns that CUDA autocast is off, and still builds it
        warnings.simplefilter("ignore", UserWarning)
        for device in ("cuda", torch.device("cuda:1")):
            ctx = dit_autocast(device)
            assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    for device in ("cpu", torch.device("cpu"), "meta"):
        assert isinstance(dit_autocast(device), contextlib.nullcontext)


def test_only_the_dit_forward_runs_in_the_autocast(monkeypatch):
    """Where the autocast is: around the DiT's forward, not around the caption MLP before it nor the CFG combine and
    the scheduler step after it (they run on the output as it comes, as the Preview pipeline does). A CPU autocast
    stands in for CUDA's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from engine.models.imagegen import sd3

    monkeypatch.setattr(sd3, "dit_autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    seen = {"dit": [], "mlp": [], "step": []}
    dit = _Recorder()
    dit.register_forward_hook(lambda *_: seen["dit"].append(torch.is_autocast_enabled("cpu")))
    mlp = CaptionMLP({"mlp.fc1.weight": (8, 5), "mlp.fc2.weight": (8, 8)})
    mlp.register_forward_hook(lambda *_: seen["mlp"].append(torch.is_autocast_enabled("cpu")))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(2)
    step = sched.step
    monkeypatch.setattr(sched, "step", lambda *a, **k: seen["step"].append(torch.is_autocast_enabled("cpu"))
                        or step(*a, **k))
    list(denoise_sd3(dit, mlp, sched, torch.zeros(1, 4, 2, 2), torch.randn(1, 3, 5), 5.0, 2.0, torch.randn(1, 4, 2, 2)))
    assert seen == {"dit": [True, True], "mlp": [False], "step": [False, False]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_preview_dit_computes_in_bf16_on_cuda(preview_engine):
    """On CUDA an fp32-loaded Preview DiT's layers compute in bf16 (the autocast) while its caption MLP stays in
    fp32; the edit is still made."""
    from engine.runtime import Engine

    engine = Engine.load(preview_engine.image_generator.root, dtype="fp32", device="cuda")
    gen = engine.image_generator
    dtypes = {"dit": set(), "mlp": set()}
    hooks = [gen.transformer.proj_out.register_forward_hook(lambda m, i, o: dtypes["dit"].add(o.dtype)),
             gen.caption_mlp.register_forward_hook(lambda m, i, o: dtypes["mlp"].add(o.dtype))]
    try:
        photo = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        _image(list(engine.imagine("make it blue", images=[photo], steps=2, seed=5)))
    finally:
        for hook in hooks:
            hook.remove()
    assert dtypes == {"dit": {torch.bfloat16}, "mlp": {torch.float32}}


def test_every_tensor_name_exists_in_the_upstream_module():
    """The Preview's SD3Transformer2DModel is diffusers' SD3 transformer (pos_embed, time_text_embed,
    context_embedder, transformer_blocks, norm_out, proj_out) plus `ref_pos_embed` (a second PatchEmbed) and two
    SD3SingleTransformerBlock refiners per stream (`noise_refiner`, `ref_image_refiner`); its RoPE modules hold
    no tensors. Our module expects exactly those names and shapes."""
    from diffusers import SD3Transformer2DModel as DiffusersSD3
    from diffusers.models.transformers.transformer_sd3 import SD3SingleTransformerBlock

    cfg = SD3DiTConfig(**TINY, dual_attention_layers=(0,), qk_norm="rms_norm")
    with torch.device("meta"):
        ours = SD3Transformer2DModel(cfg)
        base = DiffusersSD3(**TINY, dual_attention_layers=(0,), qk_norm="rms_norm")
        block = SD3SingleTransformerBlock(cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim)
    upstream = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    upstream.update({"ref_" + k: v for k, v in upstream.items() if k.startswith("pos_embed.")})
    for stream in ("noise_refiner", "ref_image_refiner"):
        for i in range(2):
            upstream.update({f"{stream}.{i}.{k}": tuple(v.shape) for k, v in block.state_dict().items()})
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == upstream
    for name in ("ref_pos_embed.proj.weight", "ref_pos_embed.pos_embed", "noise_refiner.1.attn.to_q.weight",
                 "ref_image_refiner.0.norm1.linear.weight", "transformer_blocks.0.attn.add_q_proj.weight",
                 "transformer_blocks.0.attn2.to_k.weight", "transformer_blocks.1.norm1_context.linear.weight",
                 "time_text_embed.text_embedder.linear_1.weight", "context_embedder.weight", "norm_out.linear.weight"):
        assert name in mine


def _image(events):
    done = [e for e in events if isinstance(e, ImageDone)]
    assert done and isinstance(events[-1], Done), events[-1]
    return done[0], events[-1]


def test_preview_tiny_checkpoint_generates_and_edits_through_the_engine(preview_engine):
    """`engine.tiny --release preview` writes the Preview's image head in the upstream layout and Engine.imagine
    runs it: text to image and an edit (4-branch CFG with the reference), the same pixels for the same seed."""
    import json

    gen = preview_engine.image_generator
    assert gen is not None, preview_engine.image_generator_error
    assert gen.kind == SD3 and gen.caption_mlp is not None
    assert json.loads((gen.root / "transformer" / "config.json").read_text())["_class_name"] == "SD3Transformer2DModel"
    first, done = _image(list(preview_engine.imagine("a red cat", steps=2, seed=5)))
    assert (first.width, first.height) == (256, 256) and done.result["seed"] == 5
    again, _ = _image(list(preview_engine.imagine("a red cat", steps=2, seed=5)))
    other, _ = _image(list(preview_engine.imagine("a red cat", steps=2, seed=6)))
    assert again.image == first.image and other.image != first.image
    photo = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    edit, done = _image(list(preview_engine.imagine("make it blue", images=[photo], steps=2, seed=5)))
    assert done.result["task"] == "edit" and edit.image != first.image
    plain, _ = _image(list(preview_engine.imagine("make it blue", images=[photo], steps=2, seed=5,
                                                  image_guidance=1.0)))
    assert plain.image != edit.image  # image_cfg 1: the 2-branch CFG


@pytest.mark.parametrize("guidance, image_guidance, branches", [(5.0, 2.0, 4), (5.0, 1.0, 2), (5.0, 0.5, 2),
                                                                (1.0, 2.0, 1)])
def test_an_edits_image_guidance_at_most_1_skips_the_image_unconditional_branches(preview_engine, guidance,
                                                                                   image_guidance, branches):
    """Spec §8.10: the reference's own CFG (the 4-branch [null/zero ref, null/ref, text/zero ref, text/ref] batch) runs
    only with image_guidance > 1; at most 1 the edit's DiT runs [null, text], both with the reference, and without
    CFG (guidance <= 1) the text branch alone. Counted on the tiny Preview's DiT, once per step."""
    batches = []
    hook = preview_engine.image_generator.transformer.register_forward_hook(
        lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        photo = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        _image(list(preview_engine.imagine("make it blue", images=[photo], steps=3, seed=5, size="32x32",
                                           guidance=guidance, image_guidance=image_guidance)))
    finally:
        hook.remove()
    assert batches == [branches] * 3


def test_preview_returns_the_bucket_size_picture(preview_engine):
    """The Preview's generate() leaves its resize to the requested size commented out: an edit (and a text to
    image request with an aspect) comes back at the bucket it diffused at, not resized to the source's aspect
    as 2.0 does; an explicit size is still met."""
    photo = np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    edit, done = _image(list(preview_engine.imagine("make it blue", images=[photo], steps=1, seed=1)))
    bucket = (done.result["diffusion_width"], done.result["diffusion_height"])
    assert (edit.width, edit.height) == bucket == (288, 208)
    wide, done = _image(list(preview_engine.imagine("a cat", aspect="16:9", steps=1, seed=1)))
    assert (wide.width, wide.height) == (done.result["diffusion_width"], done.result["diffusion_height"])
    sized, _ = _image(list(preview_engine.imagine("a cat", size="100x60", steps=1, seed=1)))
    assert (sized.width, sized.height) == (100, 60)


def test_preview_requests_refuse_the_zimage_pipeline_options(preview_engine):
    ev = list(preview_engine.imagine("a cat", steps=1, cfg_truncation=0.5))
    assert "Z-Image" in ev[-1].message and ev[-1].code == "invalid_request"


def test_preview_glyph_text_follows_the_preview_processor(preview_engine):
    """The quoted text a Preview request renders through ByT5 is extracted by the Preview processor's rules."""
    _, done = _image(list(preview_engine.imagine("Write '" + "x" * 25 + "' on a sign", steps=1, seed=1)))
    assert done.result["glyph_text"] == f'Text "{"x" * 25}". '


# The Preview DiT at another patch size: each latent pixel its own token (the tiny's demo table's longest side, 512
# pixels, is 64 tokens then, so its position table holds 64 rows a side), and a scheduler that shifts dynamically.
PATCH_1_TRANSFORMER = {"patch_size": 1, "pos_embed_max_size": 64}
DYNAMIC_SHIFT = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                 "base_shift": 0.5, "max_shift": 1.15}


@pytest.fixture(scope="module")
def patch_1_engine(preview_engine, tmp_path_factory):
    """The tiny Preview (a copy of preview_engine's) with its DiT at transformer/config.json patch_size 1 and a
    dynamically shifting scheduler."""
    import json
    import shutil

    from engine.models.imagegen.tiny import PREVIEW_SCHEDULER, PREVIEW_TRANSFORMER, write_preview_transformer
    from engine.runtime import Engine

    root = tmp_path_factory.mktemp("preview-patch-1") / "p"
    shutil.copytree(preview_engine.model.path, root, ignore=shutil.ignore_patterns("transformer"))
    write_preview_transformer(root, torch.Generator().manual_seed(0), {**PREVIEW_TRANSFORMER, **PATCH_1_TRANSFORMER})
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({**PREVIEW_SCHEDULER, **DYNAMIC_SHIFT}))
    return Engine.load(root, dtype="fp32", device="cpu")


def test_the_preview_dit_patch_size_comes_from_its_config(patch_1_engine, monkeypatch):
    """diffusers' SD3 pipeline reads transformer.config.patch_size for μ (image tokens (H/8/p)·(W/8/p)) and the size
    unit (VAE factor x p). The engine used a literal 2: at patch 1 it shifted the schedule for a quarter of the
    tokens, and its size unit let a bucket through that the DiT's position table does not hold."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    from engine.models.imagegen import sd3

    gen = patch_1_engine.image_generator
    assert gen is not None, patch_1_engine.image_generator_error
    sigmas = []
    denoise = sd3.denoise_sd3
    monkeypatch.setattr(sd3, "denoise_sd3", lambda t, m, scheduler, *a: sigmas.append(scheduler.sigmas) or denoise(
        t, m, scheduler, *a))
    picture, done = _image(list(patch_1_engine.imagine("a red cat", size="64x48", steps=2, seed=5)))
    assert (picture.width, picture.height) == (64, 48)
    h, w = done.result["diffusion_height"] // gen.vae_scale, done.result["diffusion_width"] // gen.vae_scale
    mu = calculate_shift(h * w, DYNAMIC_SHIFT["base_image_seq_len"], DYNAMIC_SHIFT["max_image_seq_len"],
                         DYNAMIC_SHIFT["base_shift"], DYNAMIC_SHIFT["max_shift"])
    expected = FlowMatchEulerDiscreteScheduler.from_config(gen.scheduler_config)
    expected.set_timesteps(2, mu=mu)
    torch.testing.assert_close(sigmas[0], expected.sigmas, atol=1e-6, rtol=0)
    longest = max(max(hw) for base in gen.bucket_bases for _, hw in bucket_table(base))
    patch = gen.transformer.config.patch_size
    assert longest // (gen.vae_scale * patch) <= gen.transformer.config.pos_embed_max_size


def test_a_preview_dit_patch_the_size_tables_do_not_cut_into_is_refused(preview_engine, tmp_path):
    """At patch_size 4 a token is 32 pixels a side (VAE factor 8 x 4): the tiny's demo table, multiples of 16, would
    leave half tokens. With the literal 2 the unit was 16 and the checkpoint loaded; it is refused at load, naming the
    unit."""
    import shutil

    from engine.models.imagegen.pipeline import ImageGenerator
    from engine.models.imagegen.tiny import PREVIEW_TRANSFORMER, write_preview_transformer

    root = tmp_path / "p"
    shutil.copytree(preview_engine.model.path, root, ignore=shutil.ignore_patterns("transformer"))
    write_preview_transformer(root, torch.Generator().manual_seed(0), {**PREVIEW_TRANSFORMER, "patch_size": 4})
    with pytest.raises(ImageGenError, match="not multiples of 32"):
        ImageGenerator.load(root)
