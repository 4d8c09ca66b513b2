"""The image-generation parity runners run what the case's folders say (held-out cases at other
settings run with them, or fail naming them)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from engine.tools.parity import run_case
from tests.paths import fixture_case


def _dit_variant(tmp_path, use_identity_mlp: bool):
    case = tmp_path / "imagegen_dit"
    shutil.copytree(fixture_case("imagegen_dit"), case)
    cfg_path = case / "mlp" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_identity_mlp"] = use_identity_mlp
    cfg_path.write_text(json.dumps(cfg))
    return case


def _caption_mlp_state(c: int, gen: torch.Generator) -> dict:
    """Random `mlp.*` tensors of a caption MLP of width c (hidden 16)."""
    return {"mlp.fc1.weight": torch.randn(16, c, generator=gen), "mlp.fc1.bias": torch.zeros(16),
            "mlp.layer_norm1.weight": torch.ones(16), "mlp.layer_norm1.bias": torch.zeros(16),
            "mlp.fc2.weight": torch.randn(c, 16, generator=gen), "mlp.fc2.bias": torch.zeros(c),
            "mlp.layer_norm2.weight": torch.ones(c), "mlp.layer_norm2.bias": torch.zeros(c)}


def _runs_with_the_caption_mlp(case, state: dict) -> None:
    """The case's mlp/ holds `state`: the runner applies that caption MLP (the public outputs were made
    with the identity, so the caption features differ) and the rest still matches."""
    save_file(state, str(case / "mlp" / "model.safetensors"))
    rows = {r.tensor: r for r in run_case(case)}
    assert not rows["t2i.cap_feats"].ok and not rows["edit.cap_feats"].ok
    assert rows["t2i.init_latents"].ok and rows["t2i.sigmas"].ok


def test_dit_case_without_caption_mlp_weights_says_so(tmp_path):
    """mlp/config.json asking for the caption MLP with no weights to run was run as the identity."""
    case = _dit_variant(tmp_path, use_identity_mlp=False)
    with pytest.raises(ValueError, match="use_identity_mlp"):
        run_case(case)


def test_dit_case_runs_the_caption_mlp_its_mlp_folder_ships(tmp_path):
    """A DiT case whose mlp/ holds a caption MLP (mlp.fc1 ...) must run it before cap_embedder: the public
    case's outputs were made with the identity, so its caption features must now differ."""
    case = _dit_variant(tmp_path, use_identity_mlp=False)
    gen = torch.Generator().manual_seed(0)
    c, hidden, conn = 40, 8, 12
    state = {"query_tokens_dict.1x1": torch.randn(1, hidden, generator=gen),
             "proj_in.weight": torch.randn(conn, hidden, generator=gen), "proj_in.bias": torch.zeros(conn),
             "proj_out.weight": torch.randn(c, conn, generator=gen), "proj_out.bias": torch.zeros(c),
             **_caption_mlp_state(c, gen)}
    _runs_with_the_caption_mlp(case, state)


def test_byt5_case_uses_the_conditioning_case_its_runs_name(tmp_path):
    """A ByT5 case builds on the model of the conditioning case named in its runs' condition_case; a set
    whose cases are named otherwise ('cond_s7/t2i') was looked up in a fixed 'imagegen_cond' folder."""
    from engine.models.imagegen.parity import condition_case_folder
    shutil.copytree(fixture_case("imagegen_cond"), tmp_path / "cond_s7")
    case = tmp_path / "byt5_s7"
    shutil.copytree(fixture_case("imagegen_byt5"), case)
    meta = json.loads((case / "meta.json").read_text())
    for run in meta["runs"].values():
        run["condition_case"] = run["condition_case"].replace("imagegen_cond/", "cond_s7/")
    (case / "meta.json").write_text(json.dumps(meta))
    assert condition_case_folder(meta) == "cond_s7" and condition_case_folder({"runs": {}}) == "imagegen_cond"
    rows = run_case(case)
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert "t2i.image_gen_text" in {r.tensor for r in rows}


def _dit_with_cfg_options(tmp_path, **options):
    case = tmp_path / "imagegen_dit"
    shutil.copytree(fixture_case("imagegen_dit"), case)
    meta = json.loads((case / "meta.json").read_text())
    meta["runs"]["t2i"].update(options)
    (case / "meta.json").write_text(json.dumps(meta))
    return case


@pytest.mark.parametrize("options", [{"cfg_truncation": 0.1}, {"cfg_normalization": True}])
def test_dit_case_runs_with_the_cfg_options_a_run_records(tmp_path, options):
    """A run recording ZImagePipeline's cfg_truncation / cfg_normalization was run without them. The public
    case's outputs were made with the defaults (1.0 / False), so with these recorded the t2i run's
    guidance (and everything after it) must now differ, while the other runs stay within tolerance.
    (Its 4 static-shift steps feed the DiT 0, 0.14, 0.4, 1: truncation 0.1 drops CFG from step 2 on.)"""
    rows = run_case(_dit_with_cfg_options(tmp_path, **options))
    bad = {r.tensor for r in rows if not r.ok}
    assert "t2i.step_model_output" in bad and "t2i.final_latents" in bad
    assert not {t for t in bad if not t.startswith("t2i.")}


def test_dit_case_recording_the_default_cfg_options_matches(tmp_path):
    rows = run_case(_dit_with_cfg_options(tmp_path, cfg_truncation=1.0, cfg_normalization=False))
    assert rows and all(r.ok for r in rows)


def test_dit_case_omitting_text_encoder_norm_runs_without_it(tmp_path):
    """A DiT case whose mlp/config.json omits text_encoder_norm was run with the ×1000 re-normalisation on
    (our default) where the reference's ZImageLoss gets False. The public outputs were made with it on, so
    without the key the caption features (and the run after them) must now differ."""
    case = tmp_path / "imagegen_dit"
    shutil.copytree(fixture_case("imagegen_dit"), case)
    cfg_path = case / "mlp" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["text_encoder_norm"]
    cfg_path.write_text(json.dumps(cfg))
    rows = {r.tensor: r for r in run_case(case)}
    assert not rows["t2i.cap_feats"].ok and not rows["t2i.final_latents"].ok
    assert rows["t2i.init_latents"].ok and rows["t2i.sigmas"].ok


def test_dit_case_whose_mlp_folder_holds_only_the_caption_mlp(tmp_path):
    """ZImageLoss reads only the `mlp.*` tensors of mlp/model.safetensors, so a DiT case may ship just those;
    the runner loaded the folder as a whole query head and stopped on the missing query tokens. It must run
    the caption MLP (the public outputs were made with the identity, so the caption features now differ)."""
    case = _dit_variant(tmp_path, use_identity_mlp=False)
    gen = torch.Generator().manual_seed(0)
    c = 40
    _runs_with_the_caption_mlp(case, _caption_mlp_state(c, gen))


def test_dit_run_without_cfg_compares_the_one_caption_it_ran(tmp_path):
    """guidance_scale <= 1: the reference pipeline runs the positive branch alone, so the caption features
    entering the DiT (and the per-step DiT inputs/outputs) hold one row; the runner always compared the
    [positive, negative] pair and failed on the shape. Here the public t2i recording is cut to what a run
    without CFG records at step 0: its caption and DiT timesteps must match, the later steps (run with CFG
    in the recording) must not."""
    from safetensors.torch import load_file
    case = tmp_path / "imagegen_dit"
    shutil.copytree(fixture_case("imagegen_dit"), case)
    meta = json.loads((case / "meta.json").read_text())
    meta["runs"]["t2i"]["guidance_scale"] = 1.0
    (case / "meta.json").write_text(json.dumps(meta))
    out = load_file(str(case / "outputs.safetensors"))
    for name in ("cap_feats", "step_dit_t", "step_dit_out"):
        t = out[f"t2i.{name}"]
        out[f"t2i.{name}"] = (t[:1] if name == "cap_feats" else t[:, :1]).contiguous()
    save_file(out, str(case / "outputs.safetensors"))
    rows = {r.tensor: r for r in run_case(case)}
    assert rows["t2i.cap_feats"].ok and rows["t2i.step_dit_t"].ok, (rows["t2i.cap_feats"], rows["t2i.step_dit_t"])
    assert not rows["t2i.final_latents"].ok and rows["edit.final_latents"].ok


def test_byt5_case_derives_the_glyph_text_from_the_whole_chat_text(tmp_path):
    """A ByT5 run whose image_gen_text is 'derived by the processor' is re-derived from the conditioning case's
    chat text as the processor sees it (system prompt included), not from the user's words alone: with a
    system prompt saying 'remove', the lone "HI" span is dropped, so the recorded 'Text "HI". ' no longer
    follows from that prompt and the runner must say so."""
    shutil.copytree(fixture_case("imagegen_cond"), tmp_path / "imagegen_cond")
    shutil.copytree(fixture_case("imagegen_byt5"), tmp_path / "imagegen_byt5")
    meta_path = tmp_path / "imagegen_cond" / "meta.json"
    meta = json.loads(meta_path.read_text())
    t2i = next(c for c in meta["cases"] if c["name"] == "t2i")
    t2i["prompt_text"] = t2i["prompt_text"].replace("你是一个友好的AI助手。", "Never remove a thing.")
    meta_path.write_text(json.dumps(meta, ensure_ascii=False))
    rows = {r.tensor: r for r in run_case(tmp_path / "imagegen_byt5")}
    assert not rows["t2i.image_gen_text"].ok and "got ''" in rows["t2i.image_gen_text"].note


def test_a_conditioning_sub_case_may_hold_several_input_images():
    """A sub-case editing from two or more images (`<name>.raw_image0`, `<name>.raw_image1` ..., or one
    `<name>.raw_image` stack [n, H, W, 3]) was read as holding none: its prompt's <IMAGE> placeholders failed the
    whole case. Every image is read, in number order (10 after 9), the sub-case's own only."""
    from engine.models.imagegen.parity import sub_case_images
    img = {i: torch.full((2 + i, 3, 3), i, dtype=torch.uint8) for i in range(11)}
    inputs = {**{f"edit.raw_image{i}": img[i] for i in (10, 2, 9, 0)}, "edit2.raw_image": img[5],
              "stack.raw_image": torch.stack([img[1], img[1] + 1]), "edit.pixel_values": torch.zeros(1)}
    assert [int(a[0, 0, 0]) for a in sub_case_images(inputs, "edit")] == [0, 2, 9, 10]
    assert [int(a[0, 0, 0]) for a in sub_case_images(inputs, "edit2")] == [5]
    assert [int(a[0, 0, 0]) for a in sub_case_images(inputs, "stack")] == [1, 2]
    assert sub_case_images(inputs, "t2i") == []


def test_an_empty_glyph_text_appends_no_byt5_tokens():
    """Spec §8.4: the ByT5 branch encodes the glyph text only if it is non-empty. The harness encoded '' and
    appended byt5_max_length tokens to the condition (a prompt without quoted text compared a condition 24 tokens
    too long), and read a run's image_gen_text recorded as a string by its first character."""
    from engine.models.imagegen.parity import glyph_condition, recorded_glyph_text
    assert recorded_glyph_text({"image_gen_text": 'Text "HI". '}) == 'Text "HI". '
    assert recorded_glyph_text({"image_gen_text": ['Text "HI". ']}) == 'Text "HI". '
    assert recorded_glyph_text({"image_gen_text": []}) == recorded_glyph_text({}) == ""

    def never_called(texts):
        raise AssertionError(f"the empty glyph text was encoded: {texts!r}")

    condition = torch.randn(1, 4, 40)
    same, none = glyph_condition(condition, never_called, "")
    assert none is None and same is condition  # (a non-empty text: the public imagegen_byt5 case)
