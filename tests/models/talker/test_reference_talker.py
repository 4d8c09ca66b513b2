"""Our talker (the real loader, from files; our prompt builder, embedding substitution and AR loop)
against tests/models/talker/reference_talker.py, a plain re-derivation of upstream BailingTalker2, at many
tiny configurations the fixtures never use: DiT / aggregator widths, depths, heads (not dividing the
width), mlp ratios, qk_norm, pe_attn_head; talker patch, history, CFM steps (tabled and linspace);
LLM head_dim / kv heads / activation / RoPE theta / sliding window; omitted keys; sampler settings with
the SDE term on; speakers (CAM++ and zero), instructions, cloning with prompt latents shorter and longer
than the history; both releases. The noise is drawn from one seeded generator on both sides, each in
its own order. fp32; tolerance 1e-5 relative (hidden states, patches, stop probabilities)."""

import copy

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from engine.models.talker.cfm import SamplingParams
from engine.models.talker.generate import NoiseSource, generate_patches
from engine.models.talker.model import load_talker
from engine.models.talker.prompt import build_preview_prompt, build_prompt
from engine.models.talker.tiny import tiny_tokenizer_files
from engine.models.talker.tokenizer import TalkerTokenizer
from tests.models.talker import reference_talker as ref
from tests.models.talker.variants import OMIT, drop_omitted, random_state, write_folder

REL_TOL = 1e-5
MAX_PATCHES = 14
SPEECH = "Please generate speech based on the following description.\n"


def _llm(**over):
    d = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "vocab_size": 288, "max_position_embeddings": 4096, "hidden_act": "silu",
         "use_sliding_window": False, "sliding_window": None, "tie_word_embeddings": True}
    d.update(over)
    return d


def _talker(flow=None, agg=None, **top):
    d = {"architectures": ["BailingTalker2"],
         "flowmodel": {"in_channels": 64, "hidden_size": 24, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0,
                       "cfg_dropout_prob": 0.1, "attn_backend": "torch", "attn_mask_enabled": False, "dropout": 0.0,
                       "qk_norm": None, "pe_attn_head": None, "llm_cond_dim": 32},
         "aggregator": {"in_channels": 64, "hidden_size": 20, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
                        "attn_backend": "torch", "attn_mask_enabled": False, "dropout": 0.1, "qk_norm": None,
                        "pe_attn_head": None},
         "steps": 10, "patch_size": 4, "history_patch_size": 32, "cfg_strength": 2.0, "torch_dtype": "float32"}
    d["flowmodel"].update(flow or {})
    d["aggregator"].update(agg or {})
    d.update(top)
    return d


# name: (talker config, llm config, release, request)
VARIANTS = {
    "fixture_like": (_talker(), _llm(), "2.0", {}),
    "qk_norm_pe_heads_steps7_patch2": (
        _talker(flow={"qk_norm": "rms_norm", "pe_attn_head": 2, "num_heads": 3, "mlp_ratio": 1.5},
                agg={"qk_norm": "rms_norm", "depth": 3}, steps=7, patch_size=2, history_patch_size=10),
        _llm(), "2.0", {"speakers": 1}),
    "linspace_steps_heads_not_dividing": (
        _talker(flow={"hidden_size": 26, "num_heads": 4}, agg={"hidden_size": 34, "num_heads": 4, "pe_attn_head": 1},
                steps=3, patch_size=3, history_patch_size=3),
        _llm(), "2.0", {"instruction": '{"情感": "高兴"}'}),
    "omitted_keys": (
        _talker(flow={"mlp_ratio": OMIT, "qk_norm": OMIT, "pe_attn_head": OMIT, "in_channels": OMIT,
                      "cfg_dropout_prob": OMIT, "dropout": OMIT},
                agg={"mlp_ratio": OMIT, "in_channels": OMIT, "qk_norm": OMIT, "pe_attn_head": OMIT},
                cfg_strength=OMIT),
        _llm(rope_theta=OMIT, rms_norm_eps=OMIT, hidden_act=OMIT, use_sliding_window=OMIT, sliding_window=OMIT,
             max_position_embeddings=OMIT, tie_word_embeddings=OMIT), "2.0", {}),
    "llm_sliding_window": (_talker(), _llm(use_sliding_window=True, sliding_window=9, max_window_layers=1),
                           "2.0", {"speakers": 2}),
    # a 148-token prefill: the window (all layers) fills during the decode steps
    "llm_sliding_window_fills_in_decode": (_talker(steps=5), _llm(use_sliding_window=True, sliding_window=153,
                                                                 max_window_layers=0), "2.0", {}),
    "llm_head_dim_gelu_kv_null": (_talker(steps=5), _llm(head_dim=12, num_key_value_heads=None,
                                                         hidden_act="gelu_pytorch_tanh", num_hidden_layers=3,
                                                         rope_theta=500.0), "2.0", {"zero_speaker": True}),
    "sde_noise_on": (_talker(steps=6), _llm(), "2.0", {"sampling": (4.5, 0.3, 2.5)}),
    "clone_short_prompt": (_talker(), _llm(), "2.0", {"speakers": 1, "prompt_frames": 8, "prompt_text": "ab."}),
    "clone_long_prompt_history_12": (_talker(history_patch_size=12, steps=12), _llm(), "2.0",
                                     {"prompt_frames": 20, "prompt_text": "", "text": "Hi 你好, 12.5!"}),
    "bgm_text": (_talker(), _llm(), "2.0",
                 {"text": " Genre: pop. Mood: calm. Instrument: piano. Theme: sea. Duration: 9s."}),
    "preview": (_talker(cfg_strength=1.5, history_patch_size=OMIT), _llm(), "preview",
                {"prompt_frames": 12, "prompt_text": "xy"}),
    "preview_no_prompt_steps16": (_talker(cfg_strength=3.0, history_patch_size=OMIT, steps=16, patch_size=2),
                                  _llm(num_hidden_layers=1), "preview", {}),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/models/talker/conftest.py)


def _close(ours, theirs, what):
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(theirs.shape)}"
    err = (ours.float() - theirs.float()).abs().max().item()
    scale = max(theirs.abs().max().item(), 1.0)
    assert err <= REL_TOL * scale, f"{what}: max |ours - reference| = {err:.3g} (scale {scale:.3g})"


def _reference_ids(tok: Tokenizer, req: dict, n_patches: int, preview: bool) -> list[int]:
    """The upstream prompt pieces, each tokenised on its own (tokenizer.encode)."""
    enc = lambda s: tok.encode(s).ids  # noqa: E731
    text, prompt_text = req.get("text", "Hello, world. 好!"), req.get("prompt_text")
    if preview:
        return enc(prompt_text or "") + enc(text) + enc("<|endoftext|>")
    n_spk = 1 if req.get("zero_speaker") else req.get("speakers", 0)
    spk = [t for i in range(n_spk) for t in enc(f"  speaker_{i + 1}:") + enc("<|vision_start|>")
           + enc("<|vision_pad|>") + enc("<|vision_end|>\n")]
    bgm = all(k in text for k in ("Genre: ", "Mood: ", "Instrument: ", "Theme: ", "Duration: "))
    cloning = n_patches and prompt_text is not None
    instruction = req.get("instruction")
    return (enc("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n") + enc("<|im_start|>user\n") + enc(SPEECH)
            + spk + ([] if bgm else enc(" Text input:\n")) + (enc(prompt_text) if cloning else []) + enc(text)
            + enc("<|im_end|>\n") + enc("<|im_start|>assistant\n")
            + ((enc(instruction) + enc("<|im_end|>")) if instruction is not None else []) + enc("<audio>")
            + (enc("<audioPatch>") * n_patches if cloning else []))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_talker_matches_the_reference(tmp_path, name):
    talker_cfg, llm_cfg, release, req = VARIANTS[name]
    c = ref.talker_settings(drop_omitted(talker_cfg), drop_omitted(llm_cfg), release)
    state = random_state(ref.talker_state_entries(c), seed=len(name), fixed=ref.talker_buffers(c))
    state["stop_head.bias"] = torch.zeros(2)  # keep / stop about even: the loop stops a few patches after step 10
    files = {"config.json": talker_cfg, "llm/config.json": llm_cfg,
             **{f"llm/{k}": v for k, v in tiny_tokenizer_files().items()}}
    folder = write_folder(tmp_path / name, files, state)
    talker = load_talker(folder, release=release)
    tok = TalkerTokenizer(folder / "llm")
    ref_tok = Tokenizer.from_file(str(folder / "llm" / "tokenizer.json"))

    gen = torch.Generator().manual_seed(11)
    frames = req.get("prompt_frames")
    lat = torch.randn(1, frames, 64, generator=gen) if frames else None
    n_patches = frames // c["patch_size"] if frames else 0
    spk_192 = torch.randn(req.get("speakers", 0), 192, generator=gen) if req.get("speakers") else None
    text, prompt_text = req.get("text", "Hello, world. 好!"), req.get("prompt_text")
    preview = release == "preview"

    ids = _reference_ids(ref_tok, req, n_patches, preview)
    if preview:
        prompt = build_preview_prompt(tok, text, prompt_text, n_patches)
    else:
        n_spk = 1 if req.get("zero_speaker") else req.get("speakers", 0)
        prompt = build_prompt(tok, SPEECH, text, n_speakers=n_spk, prompt_text=prompt_text, n_prompt_patches=n_patches,
                              instruction=req.get("instruction"))
    assert prompt.ids == ids

    with torch.inference_mode():
        speakers = ref.speaker_vectors(spk_192, state, c, zero=bool(req.get("zero_speaker")))
        theirs_embeds = ref.prompt_embeddings(ids, state, c, ref_tok.token_to_id("<|vision_start|>"),
                                              ref_tok.token_to_id("<audio>"), speakers, lat)
        spk = talker.speaker_embedding(spk_192) if (speakers and not preview) else None
        lat_emb = talker.prompt_latent_embeddings(lat) if lat is not None else None
        embeds = talker.embed_prompt(prompt.ids, prompt.speaker_slots, spk, prompt.latent_slots, lat_emb)
        _close(embeds, theirs_embeds, "prefill embeddings")

        cfg, sigma, temperature = req.get("sampling", (2.0, 0.25, 0.0))
        if preview:
            cfg, sigma, temperature = talker.config.cfg_strength, 0.25, 0.0
        theirs = ref.generate(theirs_embeds, lat, state, c, torch.Generator().manual_seed(5), cfg, sigma, temperature,
                              max_patches=MAX_PATCHES)
        ours = []
        for patch in generate_patches(talker, embeds, lat, SamplingParams(cfg, sigma, temperature), NoiseSource(5)):
            ours.append(patch)
            if len(ours) == MAX_PATCHES:
                break
    assert [p.is_last for p in ours] == [last for _, _, last in theirs]
    _close(torch.tensor([p.stop_prob for p in ours]), torch.tensor([p for _, p, _ in theirs]), "stop probabilities")
    _close(torch.cat([p.latents for p in ours]), torch.cat([g for g, _, _ in theirs]), "patches")



def _write_case(case, name: str, c: dict, state: dict, tok: Tokenizer, ids: list[int], meta_case: dict, upstream: str,
                lat: torch.Tensor | None = None) -> None:
    """A `talker` parity case in the public case's format, its outputs computed by the reference."""
    import json

    from tests.models.talker.reference_qwen2 import qwen2_forward

    embeds = ref.prompt_embeddings(ids, state, c, tok.token_to_id("<|vision_start|>"), tok.token_to_id("<audio>"),
                                   prompt_lat=lat)
    trace: dict = {}
    out = ref.generate(embeds, lat, state, c, torch.Generator().manual_seed(2), trace=trace)
    n, cfm = len(out), trace["cfm"]
    outputs = {"prefill_inputs_embeds": embeds, "prefill_last_hidden_state": qwen2_forward(embeds, state, "model.", c["llm"]),
               "n_steps": torch.tensor(n), "stopped": torch.tensor(int(out[-1][2]), dtype=torch.uint8),
               "yield_is_last": torch.tensor([int(last) for _, _, last in out], dtype=torch.uint8),
               "step_gen_lat": torch.cat([g for g, _, _ in out]), "latents": torch.cat([g for g, _, _ in out], dim=1),
               "step_his_lat": torch.stack(trace["his"]), "step_llm_last_hidden": torch.stack(trace["h"]),
               "step_next_embeds": torch.stack(trace["next"]), "step_stop_logits": torch.stack(trace["logits"]),
               "step_stop_prob": torch.stack(trace["logits"]).softmax(-1),
               "step_cache_position": torch.tensor(trace["cache_position"], dtype=torch.long),
               "noise_y0": torch.stack(trace["y0"]),
               **{f"cfm_{k}": torch.stack([torch.stack(s[k]) for s in cfm]) for k in ("x", "t", "pred_cond", "pred_uncond")}}
    if "sde" in trace:
        outputs["noise_sde"] = torch.stack(trace["sde"])
    save_file({f"{name}.{k}": v.contiguous() for k, v in outputs.items()}, str(case / "outputs.safetensors"))
    inputs = {f"{name}.input_ids": torch.tensor([ids]), **({f"{name}.prompt_wav_lat": lat} if lat is not None else {})}
    save_file(inputs, str(case / "inputs.safetensors"))
    meta = {"case": case.name, "kind": "talker", "environment": {"upstream": upstream}, "cases": {name: meta_case}}
    (case / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))


def _case_folder(tmp_path, name: str, variant: str, stop_bias: float):
    talker_cfg, llm_cfg, release, req = VARIANTS[variant]
    c = ref.talker_settings(drop_omitted(talker_cfg), drop_omitted(llm_cfg), release)
    state = random_state(ref.talker_state_entries(c), seed=3, fixed=ref.talker_buffers(c))
    state["stop_head.bias"] = torch.tensor([0.0, stop_bias])
    files = {"config.json": talker_cfg, "llm/config.json": llm_cfg,
             **{f"llm/{k}": v for k, v in tiny_tokenizer_files().items()}}
    case = write_folder(tmp_path / name, files, state)
    return case, c, state, req, Tokenizer.from_file(str(case / "llm" / "tokenizer.json"))


def _run_ok(case, expected: set[str]) -> None:
    from engine.tools.parity import format_table, run_case

    rows = run_case(case)
    bad = [r for r in rows if not r.ok]
    assert rows and not bad, format_table(bad)
    assert expected <= {r.tensor for r in rows}


def test_a_preview_talker_case_runs_as_the_preview(tmp_path):
    """A held-out `talker` parity case made by the Preview tree (meta.json's environment.upstream names it):
    written here from the reference (cloning: prompt text + 12 prompt latent frames, CFG from the config,
    no SDE noise stored); the parity runner loads it as the Preview and every recorded output holds."""
    case, c, state, req, tok = _case_folder(tmp_path, "talker_preview", "preview", 1.0)
    ids = _reference_ids(tok, req, 3, preview=True)
    lat = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(1))
    _write_case(case, "clone", c, state, tok, ids, {"text": req.get("text", "Hello, world. 好!"), "prompt_text": req["prompt_text"],
                                               "prompt_latent_frames": 12},
                "inclusionAI/Ming (Ming-flash-omni Preview tree, commit e58533d)", lat)
    _run_ok(case, {"clone.step_gen_lat", "clone.cfm_pred_uncond", "inputs.clone.input_ids"})


def test_a_talker_case_ending_at_the_cache_bound(tmp_path):
    """A prefill 2 positions short of the 2048-position cache: upstream's loop runs 2 steps and ends by its
    bound, every yield flagged False (the stop head is never consulted before step 11). The case's
    yield_is_last / stopped / n_steps are the reference's flags, whatever our loop calls its final patch."""
    case, c, state, req, tok = _case_folder(tmp_path, "talker_bound", "fixture_like", 0.0)
    base = _reference_ids(tok, {"text": ""}, 0, preview=False)
    text = "a" * (ref.MAX_CACHE_LEN - 2 - len(base))
    ids = _reference_ids(tok, {"text": text}, 0, preview=False)
    assert len(ids) == ref.MAX_CACHE_LEN - 2
    _write_case(case, "long", c, state, tok, ids, {"prompt": SPEECH, "text": text, "prompt_text": None},
                "inclusionAI/Ming (Ming-flash-omni 2.0 release tree, commit 2a0c02ae)")
    _run_ok(case, {"long.yield_is_last", "long.n_steps", "long.stopped", "long.step_gen_lat"})
