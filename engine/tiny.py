"""The embedded default model: `python -m engine.tiny OUT_DIR` deterministically writes a tiny,
randomly initialised Ming checkpoint in the upstream layout (config.json, sharded safetensors
with upstream tensor names and an index, tokenizer files loadable by `tokenizers`).

It is loaded by the same code as the real checkpoint. Its weights are random: it produces
meaningless text and exists so the studio runs anywhere, and so tests exercise real code paths.
It holds the LLM, a Qwen3-style ViT with its projector, a Whisper-style audio encoder with its
projector, a tiny talker (engine.models.talker.tiny) and a tiny image head.

`--release preview` writes the Preview layout instead (spec §1.1, §1.4): a Qwen2.5-VL ViT (patch 14,
window attention with full-attention blocks, no absolute positions), rope_theta 600000, no interleaved
video timestamps, the Preview's processor settings, and the Preview's talker (§7.11: no speaker head,
16 kHz VAE without latent patching) and the Preview's image head (§8.10: the SD3-style DiT with its
caption MLP, engine.models.imagegen.tiny).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.command import output_file_problem
from engine.models.imagegen.tiny import write_tiny_image_head
from engine.models.thinker.config import MingConfig
from engine.loader import CheckpointError, checkpoint_entries
from engine.models.thinker.model import build_encoders, build_llm
from engine.models.thinker.tokenizer import byte_level_alphabet
from engine.models.talker.tiny import write_tiny_talker

# Bump when the generated files change, so cached copies are rebuilt.
TINY_VERSION = 5  # 3: word tokens; 4: tiny talker; 5: tiny image head
TINY_SEED = 20261122
TINY_NAME = f"ming-tiny-random-v{TINY_VERSION}"
RELEASES = ("2.0", "preview")
SHARD_COUNT = 2
# Folders being written beside the destination are named so; one this old is left by a killed write.
TEMP_PREFIX = ".tiny-"
STALE_TEMP_SECONDS = 3600

# The real tokenizer's special tokens with their real ids (a fact of the released tokenizer_config);
# the tiny vocabulary keeps them in the same relative order after the 256 byte tokens, so the
# relations the reference relies on (<image> = <imagePatch>+1, ...) hold.
REAL_SPECIAL_TOKENS = {
    "<|startoftext|>": 156891, "<|endoftext|>": 156892, "[CLS]": 156893, "[gMASK]": 156894,
    "<|role_end|>": 156895, "<tool_call>": 156896, "</tool_call>": 156897, "<tool_response>": 156898,
    "</tool_response>": 156899, "<role>": 157151, "</role>": 157152, "<|arithmetic_end|>": 157153,
    "<|number_end|>": 157154, "<|arithmetic_start|>": 157155, "<|number_start|>": 157156,
    "<imagePatch>": 157157, "<image>": 157158, "</image>": 157159, "<video>": 157160, "</video>": 157161,
    "<gen_imagePatch>": 157162, "<gen_image>": 157163, "</gen_image>": 157164, "<imageHere>": 157165,
    "<end_of_chunk>": 157166, "<end_of_audio>": 157167, "<audioPatch>": 157168, "<audio>": 157169,
    "</audio>": 157170, "<gen_audioPatch>": 157171, "<gen_audio>": 157172, "</gen_audio>": 157173,
    "<audioHere>": 157174, "<framePatch>": 157175, "<text>": 157176, "<asr>": 157177, "<tts>": 157178,
}
REAL_SPECIAL_BASE = min(REAL_SPECIAL_TOKENS.values())
BYTE_TOKENS = 256


def tiny_id(name: str) -> int:
    return BYTE_TOKENS + REAL_SPECIAL_TOKENS[name] - REAL_SPECIAL_BASE


def _vocab_size() -> int:
    n = BYTE_TOKENS + max(REAL_SPECIAL_TOKENS.values()) - REAL_SPECIAL_BASE + 1
    return int(math.ceil(n / 64) * 64)


def _check_release(release: str) -> str:
    if release not in RELEASES:
        raise ValueError(f"unknown release {release!r}; expected one of {', '.join(RELEASES)}")
    return release


def tiny_config(release: str = "2.0") -> dict:
    """A composite (BailingMM2) config.json in the 2.0 layout (Qwen3-style ViT, Whisper encoder), or with
    `release` "preview" in the Preview's (Qwen2.5-VL ViT, rope_theta 600000, no interleaved timestamps)."""
    _check_release(release)
    llm = {
        "architectures": ["BailingMoeV2ForCausalLM"], "model_type": "bailing_moe_v2",
        "vocab_size": _vocab_size(), "hidden_size": 128, "intermediate_size": 256,
        "moe_intermediate_size": 64, "num_hidden_layers": 4, "first_k_dense_replace": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
        "partial_rotary_factor": 0.5, "rope_theta": 2400000, "rope_scaling": {"factor": None, "type": "video_rope"},
        "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "hidden_act": "silu",
        "num_experts": 16, "num_experts_per_tok": 4, "num_shared_experts": 1, "n_group": 4, "topk_group": 2,
        "router_type": "MultiRouter", "use_expert_bias": True, "use_qk_norm": True, "norm_topk_prob": True,
        "moe_router_topk_scaling_factor": 2.5, "use_bias": False, "use_qkv_bias": False,
        "tie_word_embeddings": False, "eos_token_id": tiny_id("<|role_end|>"), "pad_token_id": tiny_id("<|endoftext|>"),
        "image_patch_token": tiny_id("<imagePatch>"), "video_patch_token": tiny_id("<framePatch>"),
        "image_start_token": tiny_id("<image>"),
        # Mirrors the released config, pitfall included (it is </image>; spec §1.4).
        "video_start_token": tiny_id("</image>"),
        "use_interleaved_frame_timestamp": True, "torch_dtype": "float32",
    }
    vision = {"model_type": "qwen3_moe_vit", "depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
              "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
              "in_channels": 3, "num_position_embeddings": 256, "out_hidden_size": 64,
              "deepstack_visual_indexes": []}
    if release == "preview":
        llm["rope_theta"] = 600000
        del llm["use_interleaved_frame_timestamp"]  # absent from the Preview's config (spec §1.1)
        # window 112 px = 4 merged tokens of 28 px; block 1 attends over the whole image, block 0 in windows
        vision = {"model_type": "qwen2_5_vit", "depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                  "hidden_act": "silu", "patch_size": 14, "spatial_patch_size": 14, "temporal_patch_size": 2,
                  "spatial_merge_size": 2, "in_channels": 3, "in_chans": 3, "window_size": 112,
                  "fullatt_block_indexes": [1], "tokens_per_second": 2,
                  # the Preview's modelling file builds linear_proj from the ViT's hard-coded image_emb_dim
                  # 8192, not from out_hidden_size: only 8192 makes a checkpoint the reference can load
                  "out_hidden_size": 8192}
    # n_ctx 3000 encoder positions = 60 s of audio (the real model has 15000 = 300 s).
    audio = {"whisper_encoder_config": {"n_mels": 128, "n_ctx": 3000, "n_state": 32, "n_head": 2, "n_layer": 2},
             "ds_kernel_size": 3, "ds_stride": 2, "norm_query_embeds": True}
    return {"architectures": ["BailingMM2NativeForConditionalGeneration"], "model_type": "bailingmm_moe_v2_lite",
            "llm_config": llm, "vision_config": vision, "audio_config": audio, "mlp_depth": 2, "torch_dtype": "float32",
            "studio_demo": {"random_weights": True, "generator": "engine.tiny", "version": TINY_VERSION,
                            "seed": TINY_SEED, "release": release}}


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Draws like the reference fixtures: norms 1+0.1N, biases 0.05N, expert_bias U(-0.15, 0.15),
    embedding tables 0.5N, other matrices N/sqrt(fan_in)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "expert_bias":
        return (torch.rand(shape, generator=gen) * 2 - 1) * 0.15
    if leaf == "bias":
        return 0.05 * torch.randn(shape, generator=gen)
    if len(shape) == 1:  # norm weights
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    if "word_embeddings" in name or "pos_embed" in name:
        return 0.5 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def tiny_state_dict(config: dict) -> dict[str, torch.Tensor]:
    """Random parameters in checkpoint order; persistent buffers (Whisper's sinusoids) keep the
    values the module computes, as in the real checkpoint."""
    cfg = MingConfig.from_dict(config, source="tiny")
    gen = torch.Generator().manual_seed(TINY_SEED)
    state: dict[str, torch.Tensor] = {}
    for prefix, module in {cfg.llm_weight_prefix: build_llm(cfg, "meta"), **build_encoders(cfg, "cpu").components()}.items():
        buffers = {prefix + n: b for n, b in module.named_buffers()}
        for name, shape in checkpoint_entries(module, prefix=prefix):
            value = buffers[name].clone() if name in buffers else _init_tensor(name, shape, gen)
            state[name] = value.float().contiguous()
    if not cfg.llm.tie_word_embeddings:  # a tied head is the embedding table, drawn as embeddings are
        _favour_word_tokens(state, f"{cfg.llm_weight_prefix}lm_head.weight")
    return state


def _favour_word_tokens(state: dict[str, torch.Tensor], head: str) -> None:
    """Scale the output head's rows so that the random model mostly emits whole words: word tokens
    x3, ASCII bytes x0.5, non-ASCII bytes (which alone are broken UTF-8) x0.02. Special tokens keep
    their rows, so replies still end (eos) now and then."""
    vocab = tiny_tokenizer_files()["tokenizer.json"]["model"]["vocab"]
    word_ids = [i for piece, i in vocab.items() if i >= BYTE_TOKENS and not piece.startswith("<")]
    w = state[head]
    w[word_ids] *= 3.0
    w[:128] *= 0.5
    w[128:BYTE_TOKENS] *= 0.02


def tiny_preprocessor_config(release: str = "2.0") -> dict:
    """The release's processor settings: 2.0 patch 16 (factor 32), interleaved video timestamps; Preview
    patch 14 (factor 28), min/max pixels 78400 / 2007040, no timestamp key (spec §1.1); merge 2, CLIP."""
    if _check_release(release) == "preview":
        return {"min_pixels": 78400, "max_pixels": 2007040, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_token": "<image>",
                "video_token": "<video>", "audio_token": "<audio>", "sampling_rate": 16000,
                "whisper_frontend_args": {"n_mels": 128}, "processor_class": "BailingMM2Processor"}
    return {"min_pixels": 4 * 32 * 32, "max_pixels": 16384 * 32 * 32, "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "image_token": "<image>", "video_token": "<video>",
            "audio_token": "<audio>", "use_interleaved_frame_timestamp": True, "sampling_rate": 16000,
            "whisper_frontend_args": {"n_mels": 128}, "processor_class": "BailingMM2Processor"}


# Whole-word tokens in the ids the special tokens leave free, so that a random reply reads as random
# words rather than as broken UTF-8 (random byte tokens mostly form invalid sequences). Encoding
# still goes byte by byte (no merges); these ids are only ever generated.
DEMO_WORDS = (
    "the model studio random demo weights words meaningless reply token image audio video speech music "
    "sound voice light river mountain ocean forest city garden window table chair book paper pencil "
    "coffee tea bread apple orange lemon cloud rain snow wind storm sun moon star planet rocket engine "
    "signal network pixel frame camera microphone speaker volume color blue green red yellow purple "
    "silver golden quiet loud gentle bright dark warm cold fast slow early late small large tiny huge "
    "happy calm curious brave clever simple strange honest open hidden ancient modern little great "
    "first last next every other many few some any each both again always never often maybe "
    "and or but so because while when where if then than with without under over between through "
    "about after before during across around inside outside toward against along "
    "is are was were be been being have has had do does did can could will would should might must "
    "say see look find make take give think know feel want try call ask tell show play run walk "
    "read write sing listen talk learn build draw paint move stop start turn keep hold bring carry "
    "time day night morning evening year week hour minute moment story song dream idea question answer "
    "friend teacher student child people family house road bridge train ship island valley desert "
    "field flower tree leaf stone sand glass metal wood fire water air earth shadow echo whisper"
).split()


def tiny_tokenizer_files() -> dict[str, dict]:
    """Byte-level BPE without merges: ids 0..255 are bytes, specials at their tiny ids, whole-word
    tokens (DEMO_WORDS, each with a leading space) in the free ids, the rest reserved."""
    alphabet = byte_level_alphabet()
    to_piece = {b: ch for ch, b in alphabet.items()}
    vocab = {ch: b for ch, b in alphabet.items()}
    specials = {tiny_id(n): n for n in REAL_SPECIAL_TOKENS}
    words = iter(DEMO_WORDS)
    reserved = []
    for i in range(BYTE_TOKENS, _vocab_size()):
        if i in specials:
            vocab[specials[i]] = i
            continue
        word = next(words, None)
        if word is None:
            vocab[f"<|reserved_{i}|>"] = i
            reserved.append(i)
        else:
            vocab["".join(to_piece[b] for b in (" " + word).encode())] = i
    added = [{"id": i, "content": specials.get(i, f"<|reserved_{i}|>"), "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True} for i in sorted([*specials, *reserved])]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    tokenizer_config = {
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
        "eos_token": "<|role_end|>", "pad_token": "<|role_end|>", "clean_up_tokenization_spaces": False,
        "model_max_length": 32768, "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }
    special_map = {"bos_token": "<|startoftext|>", "eos_token": "<|role_end|>", "pad_token": "<|role_end|>",
                   "cls_token": "[CLS]", "gmask_token": "[gMASK]"}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": special_map}


def write_tiny_checkpoint(out_dir: str | Path, release: str = "2.0", replace: bool = True) -> Path:
    """Write the tiny checkpoint of `release` ("2.0" or "preview") into out_dir (atomically: a
    half-written folder is never left). `replace` False keeps a checkpoint another process published
    at out_dir meanwhile (which that process may be reading) and discards this one."""
    _check_release(release)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=out_dir.parent))
    try:
        config = tiny_config(release)
        state = tiny_state_dict(config)
        names = list(state)
        per_shard = math.ceil(len(names) / SHARD_COUNT)
        weight_map, total = {}, 0
        for s in range(SHARD_COUNT):
            shard = f"model-{s + 1:05d}-of-{SHARD_COUNT:05d}.safetensors"
            part = {n: state[n] for n in names[s * per_shard:(s + 1) * per_shard]}
            save_file(part, str(tmp / shard), metadata={"format": "pt"})
            weight_map.update({n: shard for n in part})
            total += sum(t.numel() * t.element_size() for t in part.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(tiny_preprocessor_config(release), indent=2) + "\n")
        for fname, content in tiny_tokenizer_files().items():
            (tmp / fname).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_tiny_talker(tmp, release)
        flag = "" if release == "2.0" else " --release preview"
        (tmp / "README.md").write_text(
            f"# {TINY_NAME} ({release} layout)\n\nRandomly initialised demo weights generated by "
            f"`python -m engine.tiny{flag}` (seed {TINY_SEED}). They produce meaningless output. Load the real "
            "model with `python launch.py --model inclusionAI/Ming-flash-omni-2.0` (or a local directory).\n")
        write_tiny_image_head(tmp, TINY_SEED, release)
        # The old folder is renamed aside, not deleted in place: a start killed while it is removed would leave
        # a part of it (config.json and index with a shard gone) that the next start took for a checkpoint.
        aside = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=out_dir.parent)) if replace else None
        try:
            if aside is not None and (out_dir.exists() or out_dir.is_symlink()):
                os.rename(out_dir, aside / "old")
            try:
                os.rename(tmp, out_dir)  # atomic; refused onto a folder that is there (and not empty)
            except OSError:
                if replace or not out_dir.is_dir():
                    raise
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a config.json, a safetensors index and every shard the index names (what a start
    needs before it trusts a cached copy; anything less is written again)."""
    path = Path(path)
    try:
        index = json.loads((path / "model.safetensors.index.json").read_text(encoding="utf-8"))
        shards = set(index["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return (path / "config.json").is_file() and all((path / str(shard)).is_file() for shard in shards)


def remove_stale_temporaries(folder: str | Path, older_than_s: float = STALE_TEMP_SECONDS) -> None:
    """Delete the temporary folders of writes that were killed before they finished (SIGKILL, power loss: no
    `finally` ran), once they are older than any write still in progress could be."""
    now = time.time()
    for temp in Path(folder).glob(f"{TEMP_PREFIX}*"):
        try:
            if temp.is_dir() and now - temp.stat().st_mtime > older_than_s:
                shutil.rmtree(temp, ignore_errors=True)
        except OSError:
            pass  # removed by another start meanwhile


def default_cache_dir() -> Path:
    base = os.environ.get("MING_STUDIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ming-omni-studio")
    return Path(base)


def ensure_tiny_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """The tiny checkpoint in the cache, generated on first use. Processes that start together each write
    their own copy and the first to finish publishes it: the others keep it rather than replace it under
    a process that is already loading it. A cache folder that cannot be written is a CheckpointError
    naming it and saying what to do."""
    path = Path(cache_dir or default_cache_dir()) / TINY_NAME
    if not is_complete_checkpoint(path):
        try:
            remove_stale_temporaries(path.parent)
            write_tiny_checkpoint(path, replace=path.exists() or path.is_symlink())  # a damaged one is rewritten
        except OSError as e:
            raise CheckpointError(f"cannot write the tiny demo checkpoint into {path.parent} ({e}): set "
                                  "MING_STUDIO_CACHE to a writable folder, or load a checkpoint with --model") from e
    return path


def is_demo_checkpoint(path: str | Path) -> bool:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(cfg.get("studio_demo", {}).get("random_weights"))


def tree_digest(path: str | Path) -> str:
    """SHA-256 over every file of a folder (names and bytes), to show determinism."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def out_dir_problem(out_dir: str | Path) -> str | None:
    """Why `python -m engine.tiny OUT_DIR` must not write there (it replaces what OUT_DIR holds), or None: a file,
    or a folder with files in it that is not a tiny checkpoint (`python -m engine.tiny ~` would delete the home
    folder). A new path, an empty folder and an earlier tiny checkpoint are fine."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        if is_demo_checkpoint(out_dir) or not any(out_dir.iterdir()):
            return None
        return (f"{out_dir} is a folder with files in it that is not a tiny checkpoint, and writing would replace "
                "it: give a new or empty folder")
    if out_dir.is_symlink() and not out_dir.exists():
        return f"{out_dir} is a link to nothing ({os.readlink(out_dir)}): give a new or empty folder for the checkpoint"
    if out_dir.exists():
        return f"{out_dir} is a file, not a folder: give a new or empty folder for the checkpoint"
    where = output_file_problem(out_dir, makes_folders=True)  # the folders it would be made in
    return f"cannot make {out_dir}: {where}" if where else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--release", choices=RELEASES, default="2.0",
                    help="checkpoint layout: 2.0 (default) or preview (Qwen2.5-VL ViT, rope_theta 600000)")
    args = ap.parse_args(argv)
    problem = out_dir_problem(args.out_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        path = write_tiny_checkpoint(args.out_dir, release=args.release)
    except OSError as e:  # a parent that cannot be written, a full disk
        print(f"error: cannot write the tiny checkpoint into {args.out_dir} ({e.strerror or e}): choose a folder "
              "you can write to, on a disk with room", file=sys.stderr)
        return 1
    print(f"wrote {path} ({TINY_NAME}, {args.release} layout, sha256 {tree_digest(path)[:16]})")
    return 0


if __name__ == "__main__":
    from engine.command import run_command

    sys.exit(run_command(main))
