"""From a prompt to the DiT condition (spec §8.2, §8.3, §3.6):

1. append one query block per scale after the prompt: `<image>` `<imagePatch>`×s² `</image>`;
2. fill every `<imagePatch>` slot (input images first, then the learned query tokens of each scale),
   route them through the image gate, lay each query block out as a 1 × s² grid (grid (1, 2, 2s²));
3. one causal, non-cached thinker forward; the final-norm hidden states at the LAST scale's query
   positions;
4. proj_in -> bidirectional Qwen2 connector (transformers' Qwen2Model, causal flags off) -> proj_out
   -> L2 normalisation. The negative condition is zeros, or (the Preview) a negative prompt's condition made by
   this same pass (engine.imagine).

Module names follow `mlp/model.safetensors` (`query_tokens_dict.<s>x<s>`, `proj_in`, `proj_out`,
`mlp.*`) and `connector/` (a Qwen2ForCausalLM whose `model.*` we run; its embedding table and LM head
are unused and not loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.loader import CheckpointError, CheckpointFiles, load_module
from engine.models.imagegen.config import ImageGenError, QueryHeadConfig
from engine.models.thinker.layers import Numerics
from engine.models.thinker.llm import BailingMoeV2ForCausalLM, MultimodalInputs
from engine.models.thinker.positions import PositionTokens, rope_index
from engine.models.thinker.projectors import l2_normalize

# The reference writes the block wrappers as `<imagePatch>` + 1 and + 2 (spec §8.2); the tokenizer
# keeps `<image>` and `</image>` at exactly those ids in both releases.
IMAGE_START_OFFSET, IMAGE_END_OFFSET = 1, 2


class QueryHead(nn.Module):
    """`mlp/`: learned query tokens per scale, proj_in (thinker -> connector width), proj_out
    (connector -> condition width)."""

    def __init__(self, cfg: QueryHeadConfig):
        super().__init__()
        self.config = cfg
        self.query_tokens_dict = nn.ParameterDict(
            {f"{s}x{s}": nn.Parameter(torch.empty(s * s, cfg.llm_hidden)) for s in cfg.scales})
        self.proj_in = nn.Linear(cfg.llm_hidden, cfg.connector_hidden)
        self.proj_out = nn.Linear(cfg.connector_hidden, cfg.c_dim)

    def query_embeds(self) -> torch.Tensor:
        """[Σ s², H]: every scale's query tokens, in block order."""
        return torch.cat([self.query_tokens_dict[f"{s}x{s}"] for s in self.config.scales])


class CaptionMLP(nn.Module):
    """The DiT wrapper's optional `mlp` (ToClipMLP, spec §8.5): Linear, LayerNorm, ReLU, Linear, LayerNorm."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        hidden, c_in = shapes["mlp.fc1.weight"]
        out, _ = shapes["mlp.fc2.weight"]
        self.fc1 = nn.Linear(c_in, hidden)
        self.layer_norm1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, out)
        self.layer_norm2 = nn.LayerNorm(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm2(self.fc2(F.relu(self.layer_norm1(self.fc1(x)))))


class Connector(nn.Module):
    """The `connector/` Qwen2 run bidirectionally on inputs_embeds (positions 0…L−1, spec §8.3).

    transformers' Qwen2Model with `is_causal` off on the config (bidirectional mask) and on every
    attention layer (so SDPA is not told to mask causally). Upstream passes an all-ones float mask
    that is added to the scores: a constant, so it changes nothing and is not reproduced."""

    def __init__(self, config_dict: dict, device: torch.device | str = "meta"):
        super().__init__()
        from transformers import Qwen2Config, Qwen2Model
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

        cfg = Qwen2Config(**{k: v for k, v in config_dict.items() if not k.startswith("_")})
        cfg._attn_implementation = "sdpa"
        cfg.is_causal = False
        cfg.use_cache = False
        with torch.device("meta"):
            model = Qwen2Model(cfg)
        model.embed_tokens = None  # inputs_embeds only: the token table stays on disk
        for layer in model.layers:
            layer.self_attn.is_causal = False
        with torch.device("cpu"):
            model.rotary_emb = Qwen2RotaryEmbedding(config=cfg)  # inv_freq computed in fp32, never cast
        model.rotary_emb.to(device)
        self.model = model
        self.config = cfg

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
        return self.model(inputs_embeds=inputs_embeds, position_ids=positions, use_cache=False).last_hidden_state

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype, device: torch.device | str) -> "Connector":
        import json
        folder = Path(folder)
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ImageGenError(f"{folder / 'config.json'}: cannot read the connector config ({e})") from e
        conn = cls(config, device=device)
        files = CheckpointFiles.open(folder)
        with files.reader() as reader:
            consumed = load_module(conn.model, reader, "model.", dtype, device)
        unused = {"lm_head.weight", "model.embed_tokens.weight"}
        unknown = [n for n in files.names() if n not in consumed and n not in unused]
        if unknown:
            raise CheckpointError(f"{folder}: unexpected tensor '{unknown[0]}'"
                                  + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        conn.model.rotary_emb.to(device)
        return conn.eval()


@dataclass
class QueryLayout:
    """The prompt with its query blocks appended, as the thinker sees it."""

    input_ids: torch.Tensor          # [1, L'] with the query blocks
    gen_mask: torch.Tensor           # [1, L'] 1 on the query <imagePatch> slots
    image_grid_thw: torch.Tensor     # [n, 3]: input images' grids, then (1, 2, 2s²) per scale
    last_scale_slots: torch.Tensor   # [s_last²] positions of the last scale's query tokens


def append_query_blocks(prompt_ids: list[int], scales: tuple[int, ...], image_patch_token: int,
                        input_grids: torch.Tensor | None = None) -> QueryLayout:
    """Append `<image>` `<imagePatch>`×s² `</image>` per scale after the prompt (spec §8.2, §3.6)."""
    ids = list(prompt_ids)
    gen = [0] * len(ids)
    grids = [] if input_grids is None else [tuple(int(v) for v in g) for g in input_grids]
    last_start = 0
    for s in scales:
        ids.append(image_patch_token + IMAGE_START_OFFSET)
        gen.append(0)
        last_start = len(ids)
        ids += [image_patch_token] * (s * s)
        gen += [1] * (s * s)
        ids.append(image_patch_token + IMAGE_END_OFFSET)
        gen.append(0)
        grids.append((1, 2, 2 * s * s))  # merged by 2x2 -> one row of s² tokens
    s_last = scales[-1]
    return QueryLayout(input_ids=torch.tensor([ids], dtype=torch.long), gen_mask=torch.tensor([gen], dtype=torch.long),
                       image_grid_thw=torch.tensor(grids, dtype=torch.long),
                       last_scale_slots=torch.arange(last_start, last_start + s_last * s_last))


@dataclass
class ConditionTrace:
    """Everything the condition pass computed (parity compares each against the reference)."""

    layout: QueryLayout
    slot_embeds: torch.Tensor        # [N, H] written into the <imagePatch> slots
    inputs_embeds: torch.Tensor      # [1, L', H]
    position_ids: torch.Tensor       # [3, 1, L']
    image_mask: torch.Tensor         # [1, L'] image-gate tokens
    last_scale_hidden: torch.Tensor  # [1, s², H]
    connector_out: torch.Tensor      # [1, s², C_conn]
    condition: torch.Tensor          # [1, s², C] L2-normalised, fp32


def condition_from_prompt(llm: BailingMoeV2ForCausalLM, numerics: Numerics, head: QueryHead, connector: Connector,
                          prompt_ids: list[int], image_embeds: torch.Tensor | None = None,
                          image_grid_thw: torch.Tensor | None = None) -> ConditionTrace:
    """The thinker pass with the learned queries and the connector path (spec §8.2-§8.3).
    Call under torch.inference_mode()."""
    cfg = llm.config
    layout = append_query_blocks(prompt_ids, head.config.scales, cfg.image_patch_token, image_grid_thw)
    dev = llm.model.word_embeddings.weight.device
    ids = layout.input_ids.to(dev)
    queries = head.query_embeds()
    slots = queries if image_embeds is None else torch.cat([image_embeds.to(queries.device, queries.dtype), queries])
    positions, _ = rope_index(ids, PositionTokens.from_config(cfg), layout.image_grid_thw.to(dev), None)
    embeds, image_mask, _ = llm.prepare_inputs(ids, MultimodalInputs(image_embeds=slots))
    # One causal forward without a cache; the model's output is the final RMSNorm (spec §8.2).
    hidden = llm.model(embeds, positions, numerics, image_mask=image_mask)
    last = hidden[:, layout.last_scale_slots.to(hidden.device)]
    x = head.proj_in(last.to(head.proj_in.weight.device, head.proj_in.weight.dtype))
    conn_out = connector(x.to(next(connector.parameters()).dtype))
    # The reference runs proj_out and the normalisation under bf16 autocast, where F.normalize's norm is taken in
    # fp32 and the division promotes: the condition is the fp32 normalisation of proj_out's output, and stays
    # fp32 up to the DiT (the pipeline and the x1000 wrapper never cast it).
    cond = l2_normalize(head.proj_out(conn_out.to(head.proj_out.weight.dtype)).float())
    return ConditionTrace(layout=layout, slot_embeds=slots, inputs_embeds=embeds, position_ids=positions,
                          image_mask=image_mask, last_scale_hidden=last, connector_out=conn_out, condition=cond)


def load_caption_mlp(folder: str | Path, dtype: torch.dtype, device: torch.device | str) -> CaptionMLP | None:
    """The DiT wrapper's caption MLP alone from the `mlp.*` tensors of `folder`'s safetensors (what ZImageLoss
    reads), or None when none ship. No query tokens or projections are needed."""
    from engine.models.imagegen.config import safetensors_names
    folder = Path(folder)
    shapes = {k: v for k, v in safetensors_names(folder).items() if k.startswith("mlp.")}
    if not shapes:
        return None
    with torch.device("meta"):
        caption = CaptionMLP(shapes)
    files = CheckpointFiles.open(folder)
    with files.reader() as reader:
        load_module(caption, reader, "mlp.", dtype, device)
    return caption.eval()


def load_query_head(folder: str | Path, dtype: torch.dtype, device: torch.device | str,
                    cfg: QueryHeadConfig | None = None) -> tuple[QueryHead, CaptionMLP | None]:
    """`mlp/` -> (query head, caption MLP or None when the config asks for the identity)."""
    folder = Path(folder)
    cfg = cfg or QueryHeadConfig.from_folder(folder)
    with torch.device("meta"):
        head = QueryHead(cfg)
        caption = None if cfg.use_identity_mlp or not cfg.caption_mlp_shapes else CaptionMLP(cfg.caption_mlp_shapes)
    files = CheckpointFiles.open(folder)
    with files.reader() as reader:
        consumed = load_module(head, reader, "", dtype, device)
        if caption is not None:
            consumed |= load_module(caption, reader, "mlp.", dtype, device)
    unknown = [n for n in files.names() if n not in consumed and not n.startswith("mlp.")]
    if unknown:
        raise CheckpointError(f"{folder}: unexpected tensor '{unknown[0]}'")
    if not cfg.use_identity_mlp and caption is None:
        raise ImageGenError(f"{folder}: use_identity_mlp is false but no 'mlp.*' weights ship")
    return head.eval(), (caption.eval() if caption is not None else None)
