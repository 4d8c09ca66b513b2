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


def test_unexpected_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.model.layers.0.surprise.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.model.layers.0.surprise.weight'"):
        load_model(ckpt, device="cpu")


def test_encoder_tensors_without_a_sub_config_are_unexpected(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("vision_config", None)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected tensor '(vision|linear_proj)\."):
        load_model(ckpt, device="cpu")


def test_resolve_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_checkpoint(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="expected a checkpoint directory"):
        resolve_checkpoint(f)
    # A hub id while offline (tests set HF_HUB_OFFLINE=1): a clear error, no network access.
    with pytest.raises(CheckpointError, match="hub"):
        resolve_checkpoint("inclusionAI/Ming-flash-omni-2.0")
