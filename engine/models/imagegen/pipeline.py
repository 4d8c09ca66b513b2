"""The image generator as named components loaded from a checkpoint's sub-folders (diffusers style):

  query_head   `mlp/`         learned query tokens, proj_in, proj_out          (engine.models.imagegen.condition)
  caption_mlp  `mlp/` mlp.*   the DiT wrapper's ToClipMLP, or None for identity
  connector    `connector/`   bidirectional Qwen2 (transformers)
  glyph        `byt5/`        ByT5 encoder + mapper for quoted text, or None when the folder is absent
  transformer  `transformer/` diffusers ZImageTransformer2DModel (2.0), or the Preview's SD3-style DiT
                              (engine.models.imagegen.sd3), by the folder's `_class_name`
  vae          `vae/`         diffusers AutoencoderKL
  scheduler    `scheduler/`   FlowMatchEulerDiscreteScheduler config (a fresh scheduler per request)

Weights rest on `home` and run on `compute`; when they differ (not enough GPU memory to keep them
resident) `on_compute()` moves them in for a request and back afterwards.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.models.imagegen.buckets import DEFAULT_BASE, REFERENCE_BASES, bucket_table
from engine.models.imagegen.condition import CaptionMLP, Connector, QueryHead, load_query_head
from engine.models.imagegen.config import (SD3, ZIMAGE, ImageGenError, QueryHeadConfig, dit_kind,
                                           has_image_generator, missing_component_configs, missing_folders)
from engine.models.imagegen.diffusion import DIT_FRAME_PATCH, DIT_PATCH, vae_scale_factor
from engine.models.imagegen.glyph import GlyphEncoder
from engine.models.imagegen.preview import LatentRGB

DEMO_BUCKET_KEY = "image_gen_bucket_base"  # in config.json's `studio_demo` block (tiny demo only)
# The Preview's default bucket table: image_gen_highres False -> the 512 table (spec §8.7).
PREVIEW_DEFAULT_BASE = 512


def _bucket_bases(root: Path, kind: str = ZIMAGE) -> tuple[tuple[int, ...], int]:
    try:
        demo = json.loads((root / "config.json").read_text(encoding="utf-8")).get("studio_demo") or {}
    except (OSError, json.JSONDecodeError):
        demo = {}
    base = demo.get(DEMO_BUCKET_KEY)
    if base:
        bucket_table(int(base))  # validates
        return (int(base),), int(base)
    return REFERENCE_BASES, (PREVIEW_DEFAULT_BASE if kind == SD3 else DEFAULT_BASE)


def _longest_side(base: int) -> int:
    return max(max(hw) for _, hw in bucket_table(base))


@dataclass
class ImageGenerator:
    root: Path
    head_config: QueryHeadConfig
    query_head: QueryHead
    caption_mlp: CaptionMLP | None
    connector: Connector
    glyph: GlyphEncoder | None
    transformer: nn.Module
    vae: nn.Module
    scheduler_config: dict
    dtype: torch.dtype
    home: torch.device
    compute: torch.device
    kind: str = ZIMAGE               # which DiT: ZIMAGE (2.0) or SD3 (Preview)
    bucket_bases: tuple[int, ...] = REFERENCE_BASES
    default_base: int = DEFAULT_BASE
    load_seconds: float = 0.0
    _latent_rgb: LatentRGB | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, root: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             home: str | torch.device | None = None) -> "ImageGenerator":
        """Load every component from `root`'s sub-folders onto `home` (default: `device`), to run on `device`."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

        t0 = time.perf_counter()
        root = Path(root)
        if not has_image_generator(root):
            raise ImageGenError(f"{root}: no image generator (missing {', '.join(missing_folders(root))})")
        if absent := missing_component_configs(root):
            raise ImageGenError(f"{root}: the image generator is incomplete: no {', '.join(absent)} (download those "
                                "folders of the checkpoint again)")
        compute = torch.device(device)
        home = torch.device(home) if home is not None else compute
        head_cfg = QueryHeadConfig.from_folder(root / "mlp")
        kind = dit_kind(root, head_cfg)
        head, caption = load_query_head(root / "mlp", dtype, home, head_cfg)
        connector = Connector.load(root / "connector", dtype, home)
        glyph = GlyphEncoder.load(root / "byt5", dtype, home) if (root / "byt5").is_dir() else None
        folder = "transformer"  # the diffusers component being read, which the error names
        try:
            if kind == SD3:
                from engine.models.imagegen.sd3 import SD3Transformer2DModel
                transformer = SD3Transformer2DModel.load(root / folder, dtype, home)
            else:
                transformer = ZImageTransformer2DModel.from_pretrained(str(root), subfolder=folder, torch_dtype=dtype,
                                                                       local_files_only=True)
            folder = "vae"
            vae = AutoencoderKL.from_pretrained(str(root), subfolder=folder, torch_dtype=dtype, local_files_only=True)
            folder = "scheduler"
            scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(str(root), subfolder=folder,
                                                                                local_files_only=True))
        except (OSError, ValueError, RuntimeError) as e:
            raise ImageGenError(f"{root / folder}: cannot load the diffusion component {folder}/ ({e})") from e
        gen = cls(root=root, head_config=head_cfg, query_head=head, caption_mlp=caption, connector=connector,
                  glyph=glyph, transformer=transformer.eval().to(home), vae=vae.eval().to(home),
                  scheduler_config=scheduler_config, dtype=dtype, home=home, compute=compute, kind=kind)
        gen.bucket_bases, gen.default_base = _bucket_bases(root, kind)
        if kind == SD3:  # the tables the DiT's position table covers (the Preview's 1024 table does not)
            unit = gen.vae_scale * gen.dit_patch
            fits = tuple(b for b in gen.bucket_bases
                         if _longest_side(b) // unit <= transformer.config.pos_embed_max_size)
            gen.bucket_bases = fits or gen.bucket_bases
        gen.validate()
        gen.load_seconds = time.perf_counter() - t0
        return gen

    def validate(self) -> None:
        """The components must fit together (widths, channels, bucket multiples)."""
        tcfg, vcfg, hc = self.transformer.config, self.vae.config, self.head_config
        cap_in = hc.c_dim if self.caption_mlp is None else self.caption_mlp.fc2.out_features
        problems = []
        cap_dim = tcfg.joint_attention_dim if self.kind == SD3 else tcfg.cap_feat_dim
        if cap_dim != cap_in:
            problems.append(f"the DiT expects caption width {cap_dim} but the condition is {cap_in} wide")
        if self.kind == SD3 and tcfg.out_channels != tcfg.in_channels:
            problems.append(f"the DiT predicts {tcfg.out_channels} channels for {tcfg.in_channels} latent channels")
        if tcfg.in_channels != vcfg.latent_channels:
            problems.append(f"the DiT takes {tcfg.in_channels} latent channels, the VAE makes {vcfg.latent_channels}")
        patches = list(zip(tcfg.all_patch_size, tcfg.all_f_patch_size)) if self.kind == ZIMAGE else []
        if self.kind == ZIMAGE and (DIT_PATCH, DIT_FRAME_PATCH) not in patches:
            problems.append(f"the DiT embeds (patch, frame patch) {patches} but the pipeline patchifies "
                            f"({DIT_PATCH}, {DIT_FRAME_PATCH})")
        if self.glyph is not None and self.glyph.settings.sdxl_channels != hc.c_dim:
            problems.append(f"ByT5 maps to {self.glyph.settings.sdxl_channels} channels, the condition is {hc.c_dim}")
        if self.connector.hidden_size != hc.connector_hidden:
            problems.append(f"proj_in makes {hc.connector_hidden} channels, the connector is {self.connector.hidden_size} wide")
        unit = self.vae_scale * self.dit_patch
        for base in self.bucket_bases:
            bad = [hw for _, hw in bucket_table(base) if hw[0] % unit or hw[1] % unit]
            if bad:
                problems.append(f"bucket table {base} has sizes that are not multiples of {unit} (e.g. {bad[0]})")
            if self.kind == SD3 and _longest_side(base) // unit > tcfg.pos_embed_max_size:
                problems.append(f"bucket table {base} needs {_longest_side(base) // unit} patches a side; "
                                f"pos_embed holds {tcfg.pos_embed_max_size}")
        if problems:
            raise ImageGenError(f"{self.root}: the image generator's parts do not fit together: " + "; ".join(problems))

    # ------------------------------------------------------------------ facts
    @property
    def dit_patch(self) -> int:
        """Latent pixels per DiT token side: the Preview DiT's config.patch_size (diffusers' SD3 pipeline reads it for
        μ and the size unit), the 2.0 pipeline's fixed DIT_PATCH."""
        return int(self.transformer.config.patch_size) if self.kind == SD3 else DIT_PATCH

    @property
    def vae_scale(self) -> int:
        return vae_scale_factor(self.vae)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def components(self) -> dict[str, nn.Module]:
        mods = {"query_head": self.query_head, "caption_mlp": self.caption_mlp, "connector": self.connector,
                "glyph": self.glyph, "transformer": self.transformer, "vae": self.vae}
        return {k: v for k, v in mods.items() if v is not None}

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.components().values() for p in m.parameters())

    def parameters_count(self) -> int:
        return sum(p.numel() for m in self.components().values() for p in m.parameters())

    @property
    def resident(self) -> bool:
        return self.home == self.compute

    def describe(self) -> str:
        where = (f"resident on {self.compute}" if self.resident
                 else f"in {self.home} memory, moved to {self.compute} for each image")
        n = self.nbytes()
        size = f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
        return f"image generator {size} {where}"

    # ------------------------------------------------------------------ running
    @contextmanager
    def on_compute(self):
        """Weights on the compute device for the duration (moved in and back when not resident)."""
        if self.resident:
            yield self
            return
        for m in self.components().values():
            m.to(self.compute)
        try:
            yield self
        finally:
            for m in self.components().values():
                m.to(self.home)
            if self.compute.type == "cuda":
                torch.cuda.empty_cache()

    def latent_rgb(self) -> LatentRGB:
        """The preview map (fitted on first use, see engine.models.imagegen.preview)."""
        if self._latent_rgb is None:
            self._latent_rgb = LatentRGB.fit(self.vae)
        return self._latent_rgb

    def compile_transformer(self) -> None:
        """CUDA only: compile the DiT's repeated blocks (diffusers' regional compilation)."""
        if self.compute.type != "cuda":
            raise ImageGenError("compiling the DiT is only supported on CUDA devices")
        if self.kind == SD3:
            for blocks in (self.transformer.transformer_blocks, self.transformer.noise_refiner,
                           self.transformer.ref_image_refiner):
                for block in blocks:
                    block.compile(fullgraph=True)
            return
        self.transformer.compile_repeated_blocks(fullgraph=True)
