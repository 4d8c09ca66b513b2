"""Checkpoint loading through the real code path, and clear errors naming file and tensor."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.loader import CheckpointError, CheckpointFiles, resolve_checkpoint
from engine.models.thinker.model import load_model


@pytest.fixture()
def ckpt(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def _shards(path):
    return sorted(path.glob("model-*.safetensors"))


def test_sharded_checkpoint_loads_every_tensor(ckpt):
    m = load_model(ckpt, dtype="fp32", device="cpu", pack_cpu_experts=False)  # the weights as stored
    files = CheckpointFiles.open(ckpt)
    assert len(_shards(ckpt)) > 1
    name = "model.model.layers.1.mlp.experts.3.up_proj.weight"
    expected = load_file(str(ckpt / files.weight_map[name]))[name]
    assert torch.equal(m.llm.model.layers[1].mlp.experts.up_proj[3], expected)
    assert m.llm.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32  # kept fp32 for routing


def test_single_file_checkpoint_loads(ckpt):
    merged = {}
    for shard in _shards(ckpt):
        merged.update(load_file(str(shard)))
        shard.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    save_file(merged, str(ckpt / "model.safetensors"))
    assert load_model(ckpt, dtype="fp32", device="cpu").llm is not None


def test_missing_shard_is_named(ckpt):
    _shards(ckpt)[1].unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        load_model(ckpt, device="cpu")


def test_corrupt_shard_is_named(ckpt):
    shard = _shards(ckpt)[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(ckpt, device="cpu")


def _rewrite(ckpt, edit):
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = _shards(ckpt)[0]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    index_path.write_text(json.dumps(index))
    return sorted(tensors)


def test_missing_tensor_is_named(ckpt):
    victim = {}

    def drop(t):
        victim["name"] = next(k for k in t if "attention.dense" in k)
        del t[victim["name"]]
    _rewrite(ckpt, drop)
    with pytest.raises(CheckpointError, match=f"'{victim['name']}' is missing"):
        load_model(ckpt, device="cpu")


def test_misshaped_tensor_is_named_with_shapes(ckpt):
    victim = {}

    def reshape(t):
        victim["name"] = next(k for k in t if k.endswith("q_norm.weight"))
        t[victim["name"]] = torch.ones(7)
    _rewrite(ckpt, reshape)
    with pytest.raises(CheckpointError, match=rf"'{victim['name']}' has shape \[7\], expected \[128\]"):
        load_model(ckpt, device="cpu")


@pytest.mark.parametrize("stored", [torch.float8_e4m3fn, torch.int32])
@pytest.mark.parametrize("expert_dtype", ["bf16", "int8"])
def test_a_quantised_or_integer_tensor_is_refused_not_cast(ckpt, stored, expert_dtype):
    """An FP8 (or integer) tensor where a weight belongs is a quantised checkpoint whose scales a cast would
    ignore: a clear error naming the shard, the tensor and its stored dtype, never a silently wrong model.
    Both a dense weight and a routed expert (the plain and the quantise-while-loading paths)."""
    victims = ["model.model.layers.0.attention.query_key_value.weight", "model.model.layers.1.mlp.experts.2.up_proj.weight"]
    for victim in victims:
        _rewrite(ckpt, lambda t: t.update({victim: t[victim].to(stored)}) if victim in t else None)
    with pytest.raises(CheckpointError, match=r"tensor '.*' is stored as (F8_E4M3|I32), expected F32, F16, BF16"):
        load_model(ckpt, dtype="fp32", device="cpu", expert_dtype=expert_dtype)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_fp16_and_bf16_checkpoints_load_as_their_values(ckpt, stored):
    name = "model.model.layers.0.attention.query_key_value.weight"
    _rewrite(ckpt, lambda t: t.update({k: v.to(stored) for k, v in t.items() if v.is_floating_point()}))
    m = load_model(ckpt, dtype="fp32", device="cpu", pack_cpu_experts=False)  # the weights as stored
    expected = load_file(str(ckpt / CheckpointFiles.open(ckpt).weight_map[name]))[name].float()
    assert torch.equal(m.llm.model.layers[0].attention.query_key_value.weight, expected)


@pytest.mark.parametrize("options", [{}, {"expert_dtype": "int8"}, {"linear_dtype": "int8"}])
def test_unexpected_tensor_is_named_before_any_tensor_is_read(ckpt, options):
    _rewrite(ckpt, lambda t: t.update({"model.model.layers.0.surprise.weight": torch.ones(2)}))
    read = []
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.model.layers.0.surprise.weight'"):
        load_model(ckpt, device="cpu", progress=lambda *a: read.append(a), **options)
    assert read == []  # not after minutes of loading the rest


def test_encoder_tensors_without_a_sub_config_are_unexpected(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("vision_config", None)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected tensor '(vision|linear_proj)\."):
        load_model(ckpt, device="cpu")


@pytest.mark.parametrize("damage", ["not_a_map", "names_an_absent_tensor", "shard_holds_an_unlisted_tensor",
                                    "last_shard_truncated"])
def test_an_index_that_disagrees_with_its_shards_is_named_before_any_tensor_is_read(ckpt, damage):
    """model.safetensors.index.json and the shards' headers are checked against each other when the checkpoint is
    opened: a clear error naming the file and the tensor, before a (200 GB) load starts, never a crash and never
    a tensor quietly left out."""
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, last = _shards(ckpt)[0], _shards(ckpt)[-1]
    if damage == "not_a_map":
        index["weight_map"] = list(index["weight_map"])
        expected = "weight_map"
    elif damage == "names_an_absent_tensor":
        index["weight_map"]["model.model.layers.0.input_layernorm.weight"] = last.name  # stored in the first shard
        expected = rf"{last.name}: tensor 'model.model.layers.0.input_layernorm.weight' is listed in .* not stored"
    elif damage == "shard_holds_an_unlisted_tensor":
        tensors = load_file(str(first))
        tensors["model.model.layers.0.surprise.weight"] = torch.ones(2)
        save_file(tensors, str(first))
        expected = rf"{first.name}: holds tensor 'model.model.layers.0.surprise.weight' that .* does not list"
    else:
        last.write_bytes(last.read_bytes()[:-64])
        expected = rf"{last.name}: cannot read safetensors header"
    index_path.write_text(json.dumps(index))
    progress = []
    with pytest.raises(CheckpointError, match=expected):
        load_model(ckpt, device="cpu", progress=lambda *a: progress.append(a))
    assert progress == []  # refused when opened, not half-way through the load


def test_an_index_naming_a_shard_outside_the_checkpoint_is_refused(ckpt, tmp_path):
    """A weight_map value is a shard's file name beside the index; '../other/x.safetensors' (or an absolute path)
    was opened wherever it pointed, so an index could make the load read a file outside the checkpoint."""
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = _shards(ckpt)[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / first.name).write_bytes(first.read_bytes())
    for name in (f"../elsewhere/{first.name}", str(outside / first.name)):
        moved = {k: (name if v == first.name else v) for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps({**index, "weight_map": moved}))
        with pytest.raises(CheckpointError, match="is not a file name in the checkpoint folder"):
            load_model(ckpt, device="cpu")


def test_resolve_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_checkpoint(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="expected a checkpoint directory"):
        resolve_checkpoint(f)
    # A hub id while offline (tests set HF_HUB_OFFLINE=1): a clear error, no network access.
    with pytest.raises(CheckpointError, match="hub"):
        resolve_checkpoint("inclusionAI/Ming-flash-omni-2.0")
    # a mistyped relative folder has the shape of a hub id: the error says no such folder either, and where it looked
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=rf"ckpts/ming: no such local directory \({tmp_path}/ckpts/ming\).*hub"):
        resolve_checkpoint("ckpts/ming")
    # --model "$UNSET": Path("") is the current folder, which was then read as the checkpoint
    (tmp_path / "config.json").write_text("{}")
    for empty in ("", "  "):
        with pytest.raises(CheckpointError, match="the checkpoint is an empty name: give a checkpoint directory"):
            resolve_checkpoint(empty)


def _tensors(model):
    return {k: v for k, v in model.llm.state_dict().items() if v.device.type != "meta"}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_large_tensors_are_read_a_block_of_rows_at_a_time(tiny_checkpoint, monkeypatch, dtype):
    """A load never holds a whole large tensor twice (as read and as cast): tensors over READ_BLOCK_BYTES are
    copied into their parameter a block of rows at a time, with the same values as read in one piece (a copy
    and a bf16 -> fp32 cast are exact; fp32 -> bf16 rounds each value on its own)."""
    import engine.loader as loader
    whole = _tensors(load_model(tiny_checkpoint, dtype=dtype, device="cpu", pack_cpu_experts=False))
    blocks = []
    real_row_blocks = loader.TensorReader.row_blocks

    def spy(self, name, max_bytes=None):
        for r0, block in real_row_blocks(self, name, max_bytes):
            blocks.append((name, r0, block.shape[0], block.numel() * block.element_size()))
            yield r0, block
    monkeypatch.setattr(loader, "READ_BLOCK_BYTES", 4096)
    monkeypatch.setattr(loader.TensorReader, "row_blocks", spy)
    blocked = _tensors(load_model(tiny_checkpoint, dtype=dtype, device="cpu", pack_cpu_experts=False))
    embedding = [b for b in blocks if b[0].endswith("word_embeddings.weight")]
    assert len(embedding) > 10 and {b[1] for b in embedding} == set(range(0, embedding[-1][1] + 1, embedding[1][1]))
    assert all(size <= 4096 for name, _, rows, size in blocks if rows > 1)
    assert whole.keys() == blocked.keys()
    for k in whole:
        torch.testing.assert_close(blocked[k], whole[k], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_int8_linears_are_quantised_as_they_are_read(tiny_checkpoint, monkeypatch, dtype):
    """With --linear-dtype int8 the linears (attention, dense MLP, shared experts, lm_head) are never held
    unquantised: each block of rows read is quantised at once, to what quantising the loaded weight gives
    (scales, as the int8 kernel keeps them, within 1e-6; values within one step: rows are quantised on their own
    either way)."""
    import engine.loader as loader
    from engine.kernels.dequant import quantize_int8_rows
    from engine.models.thinker.model import int8_linear_paths
    plain = load_model(tiny_checkpoint, dtype=dtype, device="cpu", pack_cpu_experts=False)
    whole_reads = []
    real_get = loader.TensorReader.get
    monkeypatch.setattr(loader.TensorReader, "get", lambda self, name: whole_reads.append(name) or real_get(self, name))
    monkeypatch.setattr(loader, "READ_BLOCK_BYTES", 4096)
    m = load_model(tiny_checkpoint, dtype=dtype, device="cpu", linear_dtype="int8")
    paths = int8_linear_paths(plain.llm)
    assert "lm_head" in paths and any(p.endswith("attention.dense") for p in paths)
    assert any(p.endswith("shared_experts.down_proj") for p in paths) and "model.layers.0.mlp.up_proj" in paths
    assert not [n for n in whole_reads if n.removeprefix("model.").removesuffix(".weight") in paths]
    for path in paths:
        packed = m.llm.get_submodule(path)
        assert type(packed).__name__ == "PackedLinear" and packed.weight.device.type == "meta"
        q_ref, scale_ref = quantize_int8_rows(plain.llm.get_submodule(path).weight)
        q, scale = packed.packed.q, packed.packed.scale
        torch.testing.assert_close(scale.float(), scale_ref.to(scale.dtype).float(), rtol=1e-6, atol=0)
        assert int((q.int() - q_ref.int()).abs().max()) <= 1


def test_a_misshaped_int8_linear_is_named(ckpt):
    victim = {}

    def reshape(t):
        victim["name"] = next(k for k in t if k.endswith("attention.dense.weight"))
        t[victim["name"]] = torch.ones(3, 5)
    _rewrite(ckpt, reshape)
    with pytest.raises(CheckpointError, match=rf"'{victim['name']}' has shape \[3, 5\], expected"):
        load_model(ckpt, device="cpu", linear_dtype="int8")


def test_plain_experts_are_read_fused_and_packed_in_place(tiny_checkpoint):
    """Plain experts bound for the CPU kernels are read one at a time into gate and up fused per expert (the
    layout those kernels read), so packing them makes no second copy of the layer: each packed [2I, H] matrix
    is the expert's slice of one [E, 2I, H] tensor, holding the checkpoint's gate then up rows."""
    m = load_model(tiny_checkpoint, dtype="fp32", device="cpu")
    bank = m.llm.model.layers[1].mlp.experts
    packed = bank.packed
    if packed is None or packed.onednn:
        pytest.skip("no native kernels and oneDNN packing here: the experts are not packed plainly")
    inter, hidden = packed.intermediate, packed.hidden
    step = 2 * inter * hidden * 4
    assert all(packed.gate_up[e].data_ptr() - packed.gate_up[0].data_ptr() == e * step for e in range(len(packed.gate_up)))
    files = CheckpointFiles.open(tiny_checkpoint)
    for e in (0, len(packed.gate_up) - 1):
        for proj, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, 2 * inter))):
            name = f"model.model.layers.1.mlp.experts.{e}.{proj}.weight"
            stored = load_file(str(tiny_checkpoint / files.weight_map[name]))[name].float()
            torch.testing.assert_close(packed.gate_up[e][rows], stored, rtol=0, atol=0)  # bf16 -> fp32 is exact


@pytest.mark.parametrize("expert_dtype", ["int8", "int4"])
def test_quantised_experts_are_stored_fused_and_packed_in_place(tiny_checkpoint, expert_dtype):
    """int8 / int4 experts for the CPU kernels are quantised into gate and up fused per expert (one [E, 2I, ...]
    tensor of values, one of scales), so packing them makes no concatenated copy: each expert's packed gate+up
    matrix reads that tensor in place, and the values are what quantising the expert's gate and up gives."""
    from engine.kernels.dequant import unpack_int4
    from engine.placement.quant import quantize
    m = load_model(tiny_checkpoint, dtype="fp32", device="cpu", expert_dtype=expert_dtype)
    packed = m.llm.model.layers[1].mlp.experts.packed
    mats = packed.gate_up
    if not all(hasattr(mat, "q") for mat in mats):
        pytest.skip("these experts are not packed as int8 / int4 matrices here")
    step = mats[1].q.data_ptr() - mats[0].q.data_ptr()
    assert step == mats[0].q.numel() * mats[0].q.element_size()  # consecutive slices of one tensor
    assert all(mats[e].q.data_ptr() - mats[0].q.data_ptr() == e * step for e in range(len(mats)))
    files = CheckpointFiles.open(tiny_checkpoint)
    e = len(mats) - 1
    inter = packed.intermediate
    for proj, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, 2 * inter))):
        name = f"model.model.layers.1.mlp.experts.{e}.{proj}.weight"
        q_ref, _ = quantize(load_file(str(tiny_checkpoint / files.weight_map[name]))[name].float(), expert_dtype)
        got, want = mats[e].q[rows], q_ref
        if expert_dtype == "int4":
            got, want = unpack_int4(got), unpack_int4(want)
        assert int((got.int() - want.int()).abs().max()) <= 1  # the same quantisation (a step at most apart)


@pytest.mark.parametrize("options", [{}, {"expert_dtype": "int4", "linear_dtype": "int8"}, {"expert_dtype": "int8"},
                                     {"pack_cpu_experts": False}])
def test_progress_counts_every_tensor_of_the_checkpoint_once(tiny_checkpoint, options):
    """Load progress is one count over the whole checkpoint (launch.py prints it every 10 %), whichever path
    reads a tensor (modules, int8 linears, fused or quantised experts): it rises by one per tensor and ends at
    the checkpoint's tensor count."""
    calls = []
    load_model(tiny_checkpoint, dtype="fp32", device="cpu", progress=lambda *a: calls.append(a), **options)
    total = len(CheckpointFiles.open(tiny_checkpoint).names())
    assert [c[0] for c in calls] == list(range(1, total + 1)) and {c[1] for c in calls} == {total}
    assert len({c[2] for c in calls}) == total  # each tensor named once


def test_the_progress_printer_prints_every_tenth_of_a_large_load_once():
    import io
    from engine.loader import LoadProgressPrinter
    out = io.StringIO()
    printer = LoadProgressPrinter(out, prefix="[", suffix="]")
    for done in range(1, 1001):
        printer(done, 1000, f"t{done}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[loading tensors: 1/1000 (0%)]" and lines[-1] == "[loading tensors: 1000/1000 (100%)]"
    assert len(lines) == 11
    quiet = io.StringIO()
    small = LoadProgressPrinter(quiet)
    for done in range(1, 51):
        small(done, 50, "t")
    assert quiet.getvalue() == ""  # a small checkpoint loads in moments


def test_a_hub_snapshot_fetches_every_file_the_engine_loads(tiny_checkpoint, tmp_path):
    """`--model org/name` downloads only the files HUB_PATTERNS allows: a snapshot of a checkpoint in the
    upstream layout (the tiny one mirrors it) must load whole, thinker, talker and image generator with its
    ByT5 glyph encoder (.pt files, spec §1.2)."""
    from huggingface_hub.utils import filter_repo_objects

    from engine.loader import HUB_PATTERNS
    from engine.runtime import Engine

    files = [f.relative_to(tiny_checkpoint).as_posix() for f in tiny_checkpoint.rglob("*") if f.is_file()]
    snapshot = tmp_path / "snapshot"
    for rel in filter_repo_objects(files, allow_patterns=HUB_PATTERNS):
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tiny_checkpoint / rel, snapshot / rel)
    engine = Engine.load(snapshot, dtype="fp32", device="cpu")
    assert engine.has_talker, engine.talker_error
    assert engine.has_image_generator and engine.image_generator.glyph is not None, engine.image_generator_error


@pytest.mark.parametrize("edit, named", [
    (lambda c: c["llm_config"].update(num_hidden_layers=None), "'num_hidden_layers' is None"),
    (lambda c: c["llm_config"].update(hidden_size="128px"), "'hidden_size' is '128px'"),
    (lambda c: c["llm_config"].update(rope_theta="big"), "llm_config: a value has the wrong type"),
    (lambda c: c.update(vision_config=["qwen3_moe_vit"]), "'vision_config' must be a JSON object"),
    (lambda c: c["vision_config"].update(depth="two"), "vision_config.*key 'depth' is 'two', not an integer"),
    (lambda c: c["vision_config"].update(num_heads=None), "vision_config.*key 'num_heads' is None, not an integer"),
    (lambda c: c["audio_config"]["whisper_encoder_config"].pop("n_state"), "audio_config: missing key 'n_state'"),
])
def test_a_config_value_of_the_wrong_type_or_missing_is_named_with_its_file(ckpt, edit, named):
    """config.json edited by hand (a null, a string, a list, a key left out): a ConfigError naming the file and
    the key, through the whole load (the CPU memory check reads the sub-configs first), never a TypeError or
    KeyError traceback."""
    from engine.models.thinker.config import ConfigError
    from engine.runtime import Engine

    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=named) as e:
        Engine.load(ckpt, device="cpu")
    assert str(ckpt / "config.json") in str(e.value)


def test_a_config_of_the_other_release_beside_the_shards_says_what_to_do(ckpt):
    """2.0 shards with the Preview's config.json (a hand-assembled folder, or one file of another download): the
    vision tower's tensors are not the ones the config describes; the error says so and what to do."""
    from engine.tiny import tiny_config

    (ckpt / "config.json").write_text(json.dumps(tiny_config("preview")))
    with pytest.raises(CheckpointError, match=r"unexpected tensor '.*the other release, 2.0 or Preview.*download the "
                                              r"whole checkpoint again"):
        load_model(ckpt, device="cpu")
