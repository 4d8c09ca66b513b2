"""The planner counts the talker / image generator sub-folders by their weight files and keeps them
resident when the GPUs have room, otherwise moves them in on demand with room kept on GPU 0."""

import json

import pytest

from engine.models.thinker.config import MingConfig
from engine.placement.planner import (GENERATOR_WORKSPACE, DeviceSpec, PlanError, generator_sizes, model_sizes,
                                     plan_placement, render)
from tests.placement.test_planner import spec_config_dict

GB = 10**9


def _checkpoint(tmp_path, image_gb=13, talker_gb=3):
    """A 2.0-shaped config.json with sparse weight files standing in for the generator folders."""
    (tmp_path / "config.json").write_text(json.dumps(spec_config_dict()))
    for folder, gb in (("transformer", image_gb - 1), ("vae", 0.5), ("connector", 0.5), ("talker", talker_gb)):
        (tmp_path / folder).mkdir()
        with open(tmp_path / folder / "diffusion_pytorch_model.safetensors", "wb") as f:
            f.truncate(int(gb * GB))
    return MingConfig.from_file(tmp_path)


def test_sizes_come_from_the_files(tmp_path, tiny_checkpoint):
    sizes = model_sizes(_checkpoint(tmp_path))
    got = {m.name: m.nbytes for m in sizes.generators}
    assert got == {"image_generator": 13 * GB, "talker": 3 * GB}
    tiny = {m.name: m.nbytes for m in generator_sizes(tiny_checkpoint)}
    def weights(*folders):
        return sum(p.stat().st_size for d in folders for p in (tiny_checkpoint / d).rglob("*")
                   if p.suffix in (".safetensors", ".pt"))
    assert tiny == {"image_generator": weights("mlp", "connector", "transformer", "vae", "byt5"),
                    "talker": weights("talker")}


def test_generators_resident_when_the_gpus_have_room(tmp_path):
    plan = plan_placement(_checkpoint(tmp_path), DeviceSpec.parse("4x80GB", "512GB"))
    assert all(m.device.startswith("cuda:") for m in plan.generators) and len(plan.generators) == 2
    assert "resident on cuda" in render(plan)


def test_on_one_gpu_they_are_moved_in_on_demand_with_room_kept(tmp_path):
    cfg = _checkpoint(tmp_path)
    devices = DeviceSpec.parse("141GB", "512GB")
    alone = plan_placement(cfg, devices, generators="ignore")
    plan = plan_placement(cfg, devices)
    assert {m.name: m.device for m in plan.generators} == {"image_generator": "cpu>cuda:0", "talker": "cpu>cuda:0"}
    assert plan.gpu_experts < alone.gpu_experts                      # room for the largest one is kept free
    assert alone.gpus[0].memory_bytes - plan.gpus[0].memory_bytes == 13 * GB + GENERATOR_WORKSPACE
    assert "moved to cuda:0 on demand" in render(plan) and any("kept free" in n for n in plan.notes)


def test_without_a_gpu_they_live_in_host_memory_and_count_there(tmp_path):
    cfg = _checkpoint(tmp_path)
    devices = DeviceSpec.parse("none", "200GB")
    alone = plan_placement(cfg, devices, "int4", kv_tokens=8192, generators="ignore")
    plan = plan_placement(cfg, devices, "int4", kv_tokens=8192)
    assert {m.name: m.device for m in plan.generators} == {"image_generator": "cpu", "talker": "cpu"}
    # both generators' weights and one workspace (they run one at a time) leave host memory
    assert alone.host.free_bytes - plan.host.free_bytes == 16 * GB + GENERATOR_WORKSPACE
    assert "run on the CPU" in render(plan)
    tight = DeviceSpec((), alone.host.memory_bytes - alone.host.free_bytes + GB)
    plan_placement(cfg, tight, "int4", kv_tokens=8192, generators="ignore")  # the thinker alone fits
    with pytest.raises(PlanError, match="--generators ignore"):
        plan_placement(cfg, tight, "int4", kv_tokens=8192)
    with pytest.raises(PlanError, match="generators must be one of"):
        plan_placement(cfg, tight, "int4", generators="maybe")


def test_an_fp32_load_doubles_the_generators(tmp_path):
    sizes = model_sizes(_checkpoint(tmp_path), dtype="fp32")
    assert {m.name: m.nbytes for m in sizes.generators} == {"image_generator": 26 * GB, "talker": 6 * GB}


def test_cli_leaves_the_generators_out_when_asked(tmp_path, capsys):
    from engine.placement.planner import main
    _checkpoint(tmp_path)
    argv = ["--config", str(tmp_path), "--gpus", "none", "--cpu-mem", "72GB", "--expert-dtype", "int4",
            "--linear-dtype", "int8", "--host-reserve", "3GB", "--kv-tokens", "8192"]
    assert main(argv) == 2 and "--generators ignore" in capsys.readouterr().err  # 16 GB of generators too many
    assert main(argv + ["--generators", "ignore"]) == 0 and "Generators" not in capsys.readouterr().out
