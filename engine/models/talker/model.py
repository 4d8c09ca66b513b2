"""BailingTalker2, the talker of both releases (spec §7.1, §7.11): module tree named like the checkpoint

  model.*        Qwen2 LLM (talker/llm/config.json), run on inputs_embeds
  cfm.model.*    flow-matching DiT (talker/config.json "flowmodel")
  aggregator.*   latent patch -> next LLM input (talker/config.json "aggregator")
  stop_head.*    Linear(H -> 2)
  spk_head.*     Linear(192 -> H), CAM++ vector -> the speaker slot (2.0 only: the Preview has none)

and `load_talker(folder)`, which builds it on the meta device and reads `talker/*.safetensors` through
engine.loader (missing, mis-shaped or unexpected tensors are CheckpointErrors naming the file).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from engine.loader import CheckpointFiles, check_unexpected, load_module
from engine.models.talker.backbone import Qwen2Backbone
from engine.models.talker.cfm import CFM
from engine.models.talker.config import TalkerConfig, TalkerConfigError
from engine.models.talker.dit import DiT, Aggregator


class BailingTalker2(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Backbone(cfg.llm)
        self.cfm = CFM(DiT(cfg.flow), cfg.steps)
        self.aggregator = Aggregator(cfg.aggregator, cfg.llm.hidden_size)
        self.stop_head = nn.Linear(cfg.llm.hidden_size, 2)
        self.spk_head = None if cfg.preview else nn.Linear(cfg.speaker_dim, cfg.llm.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.stop_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.stop_head.weight.device

    def speaker_vectors(self, spk: torch.Tensor) -> torch.Tensor:
        """CAM++ vectors in any layout that lists them in speaker order ([n, 192], a stack of [1, 192]
        vectors [n, 1, 192], or one batch row [1, n, 192]) -> [n, 192]: speaker i fills slot i (spec §7.2)."""
        width = self.config.speaker_dim
        if spk.dim() == 0 or spk.shape[-1] != width or spk.numel() == 0:
            raise TalkerConfigError(f"speaker vectors must be CAM++ vectors of {width} values each "
                                    f"([n, {width}]), got shape {list(spk.shape)}")
        return spk.reshape(-1, width)

    def speaker_embedding(self, spk: torch.Tensor | None) -> torch.Tensor:
        """CAM++ vectors (see `speaker_vectors`) -> speaker slot embeddings [n, H]; None -> one zero vector
        (the voice-design slot, which the reference fills with zeros in the LLM space)."""
        if spk is None:
            return torch.zeros(1, self.config.llm.hidden_size, dtype=self.dtype, device=self.device)
        if self.spk_head is None:
            raise TalkerConfigError("the Preview talker has no speaker head (spec §7.11): it takes no speaker vector")
        return self.spk_head(self.speaker_vectors(spk).to(self.device, self.dtype))

    def prompt_latent_embeddings(self, latents: torch.Tensor) -> torch.Tensor:
        """Prompt latents [1, N_f, 64] (N_f a multiple of the patch) -> [N_f / patch, H] (spec §7.4)."""
        p = self.config.patch_size
        patches = latents.to(self.device, self.dtype).reshape(-1, p, latents.shape[-1])
        return self.aggregator(patches)[:, 0]

    def embed_prompt(self, ids: list[int], speaker_slots: list[int], speaker_embeds: torch.Tensor | None,
                     latent_slots: list[int], latent_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [1, L, H] with the speaker and prompt-latent slots substituted (spec §7.2).
        Latent slots past the ids are appended (the Preview's prompt latents follow its tokens, §7.11)."""
        x = self.model.embed_tokens(torch.tensor([ids], device=self.device))
        extra = max(latent_slots, default=-1) + 1 - len(ids)
        if extra > 0:
            x = torch.cat([x, x.new_zeros(1, extra, x.shape[-1])], dim=1)
        if speaker_slots:
            x[0, speaker_slots] = speaker_embeds[:len(speaker_slots)].to(x.dtype)
        if latent_slots:
            x[0, latent_slots] = latent_embeds[:len(latent_slots)].to(x.dtype)
        return x

    def stop_probability(self, h: torch.Tensor) -> torch.Tensor:
        """softmax(stop_head(h))[..., 1], taken in the talker dtype as the reference does (in bf16 it
        is rounded before the p > 0.5 test), returned as fp32."""
        return torch.softmax(self.stop_head(h), dim=-1)[..., 1].float()


def build_talker(cfg: TalkerConfig, device: torch.device | str = "meta") -> BailingTalker2:
    with torch.device(device):
        return BailingTalker2(cfg)


def load_talker(folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                progress=None, release: str = "2.0") -> BailingTalker2:
    folder = Path(folder)
    cfg = TalkerConfig.from_folder(folder, release)
    if cfg.flow.llm_cond_dim != cfg.llm.hidden_size:
        raise TalkerConfigError(
            f"{folder / 'config.json'}: flowmodel.llm_cond_dim {cfg.flow.llm_cond_dim} differs from the talker LLM's "
            f"hidden_size {cfg.llm.hidden_size}; the DiT condition is the LLM hidden state, so they must agree")
    t0 = time.perf_counter()
    module = build_talker(cfg, "meta")
    files = CheckpointFiles.open(folder)
    with files.reader() as reader:
        consumed = load_module(module, reader, "", dtype, device, keep_fp32=(), progress=progress)
    if cfg.preview:  # upstream's Preview class has no spk_head: from_pretrained drops one a folder holds
        consumed |= {n for n in files.names() if n.startswith("spk_head.")}
    check_unexpected(files, consumed)
    # non-persistent buffers (the LLM's RoPE inv_freq) are rebuilt on the device, rounded to the model
    # dtype as the reference's .to(dtype) rounds them
    module.model.rotary = type(module.model.rotary)(cfg.llm.head_dim, cfg.llm.rope_theta, dtype).to(device)
    module.eval()
    module.load_seconds = time.perf_counter() - t0
    return module
