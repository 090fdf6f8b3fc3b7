import json

import pytest

from resnet.config import load_config
from resnet.data.plan import MicroLayout
from resnet.train.engine import SetupError, deepspeed_config, micro_layout


def _layout(batch: int, world: int, accumulation: int = 1) -> MicroLayout:
    return MicroLayout(batch * world * accumulation, world, accumulation)


def test_accumulation_keeps_the_global_batch():
    assert micro_layout(512, 128, 2).accumulation == 2
    assert micro_layout(512, 256, 2).accumulation == 1
    uneven = micro_layout(512, 64, 3)  # 3 x 64 does not divide 512: 56/57 x 3
    assert (uneven.accumulation, uneven.largest) == (3, 57)
    with pytest.raises(SetupError, match="fewer samples than the 9 processes"):
        micro_layout(8, 64, 9)


def test_deepspeed_config_from_our_keys():
    cfg = load_config([], ["train.batch_size=32", "train.grad_clip=1.0", "deepspeed.zero_stage=1",
                           "train.precision=bf16"])
    ds = deepspeed_config(cfg, _layout(32, 4, 2))
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (32, 2, 256)
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 1.0
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in ds and "fp16" not in ds


def test_a_user_deepspeed_json_is_the_base_and_its_autos_are_filled(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "bf16": {"enabled": True},
                                "zero_optimization": {"stage": 2, "overlap_comm": True},
                                "wall_clock_breakdown": True}))
    cfg = load_config([], [f"deepspeed.config_file={path}", "deepspeed.zero_stage=1",
                           "train.precision=fp32", "train.batch_size=8"])
    ds = deepspeed_config(cfg, _layout(8, 2))
    assert ds["train_batch_size"] == 16 and ds["wall_clock_breakdown"] is True
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}  # our stage wins
    assert "bf16" not in ds  # its BatchNorm cast crashes (docs/gpu.md); torch_autocast instead
    assert "torch_autocast" not in ds  # fp32


def test_shipped_deepspeed_jsons_load():
    """Each shipped JSON is the base of the config: its own settings survive, its "auto"s are
    filled, and the stage in the file is the one its name says."""
    def autos(d):
        return [k for k, v in d.items() if v == "auto" or isinstance(v, dict) and autos(v)]

    for stage in (0, 1):
        path = f"configs/deepspeed/zero{stage}.json"
        shipped = json.loads(open(path).read())
        assert shipped["zero_optimization"]["stage"] == stage
        cfg = load_config([], [f"deepspeed.config_file={path}", f"deepspeed.zero_stage={stage}",
                               "train.precision=bf16", "train.batch_size=8"])
        ds = deepspeed_config(cfg, _layout(8, 3, 2))
        assert autos(shipped) and not autos(ds)
        assert ds["train_batch_size"] == 48
        for key, value in shipped.items():
            if value != "auto":
                assert ds[key] == value, key


def test_fp16_needs_zero0_and_a_missing_json_is_named(tmp_path):
    with pytest.raises(SetupError, match="fp16 under DeepSpeed needs deepspeed.zero_stage=0"):
        deepspeed_config(load_config([], ["train.precision=fp16", "deepspeed.zero_stage=1"]),
                         _layout(1, 1))
    with pytest.raises(SetupError, match="config_file not found"):
        deepspeed_config(load_config([], [f"deepspeed.config_file={tmp_path}/x.json"]), _layout(1, 1))
