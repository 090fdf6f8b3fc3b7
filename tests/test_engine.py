import json

import pytest

import trainutil as tu
import zerorun
from resnet.config import load_config
from resnet.data.plan import MicroLayout
from resnet.train.engine import SetupError, deepspeed_config, micro_layout, settle


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
    ds = deepspeed_config(settle(cfg), _layout(32, 4, 2))
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (32, 2, 256)
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 1.0
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in ds and "fp16" not in ds


def test_a_user_deepspeed_json_is_the_base_and_its_autos_are_filled(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "gradient_clipping": "auto",
                                "zero_optimization": {"stage": 2, "overlap_comm": True},
                                "wall_clock_breakdown": True}))
    cfg = load_config([], [f"deepspeed.config_file={path}", "train.precision=fp32",
                           "train.batch_size=8", "train.grad_clip=2.0"])
    ds = deepspeed_config(settle(cfg), _layout(8, 2))
    assert ds["train_batch_size"] == 16 and ds["wall_clock_breakdown"] is True
    assert ds["gradient_clipping"] == 2.0  # "auto": ours
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # only the file's
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
        ds = deepspeed_config(settle(cfg), _layout(8, 3, 2))
        assert autos(shipped) and not autos(ds)
        assert ds["train_batch_size"] == 48
        for key, value in shipped.items():
            if isinstance(value, dict):  # its entries survive (ours may be added: no syncs)
                assert ds[key].items() >= value.items(), key
            elif value != "auto":
                assert ds[key] == value, key
def test_a_key_only_in_the_json_is_what_runs(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": 1.5,
                                "bf16": {"enabled": True}}))
    cfg = load_config([], [f"deepspeed.config_file={path}"])
    settled = settle(cfg).cfg
    assert (settled.deepspeed.zero_stage, settled.train.precision, settled.train.grad_clip) == \
        (1, "bf16", 1.5)
    ds = deepspeed_config(settle(cfg), _layout(1, 1))
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 1.5
    # Its bf16 module cast breaks BatchNorm (docs/gpu.md): the same precision by torch_autocast.
    assert "bf16" not in ds and ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    # Set nowhere: the defaults.
    plain = settle(load_config([], [])).cfg
    assert (plain.deepspeed.zero_stage, plain.train.precision, plain.train.grad_clip) == \
        (0, "bf16", 0.0)


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp32", "train.precision=fp32 but deepspeed.config_file=.* sets "
                             "torch_autocast=bf16"),
    ("deepspeed.zero_stage=0", "deepspeed.zero_stage=0 but .* sets zero_optimization.stage=1"),
    ("train.grad_clip=0", "train.grad_clip=0.0 but .* sets gradient_clipping=1.0"),
])
def test_a_key_set_differently_in_both_places_is_an_error_naming_both(tmp_path, override,
                                                                     message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0,
                                "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}))
    cfg = load_config([], [f"deepspeed.config_file={path}", override])
    with pytest.raises(SetupError, match=message):
        deepspeed_config(settle(cfg), _layout(1, 1))
    # The same value in both places is fine.
    same = load_config([], [f"deepspeed.config_file={path}", "train.precision=bf16",
                            "deepspeed.zero_stage=1", "train.grad_clip=1"])
    assert settle(same).cfg.deepspeed.zero_stage == 1


def test_a_json_batch_size_that_the_run_cannot_use_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 32}))
    cfg = load_config([], [f"deepspeed.config_file={path}", "train.batch_size=8"])
    with pytest.raises(SetupError, match="sets train_micro_batch_size_per_gpu=32, but this run "
                                         "needs 8"):
        deepspeed_config(settle(cfg), _layout(8, 2))


@pytest.mark.slow
def test_the_shipped_zero1_json_runs_as_written(tmp_path_factory):
    """configs/deepspeed/zero1.json as written, on the 2-process ZeRO-1 run that
    tests/test_zero_resume.py resumes (tests/zerorun.py stopped_run: 7 steps, then a
    SIGTERM; once per session): DeepSpeed itself reports the stage and precision, and each
    checkpoint holds exactly the per-rank optimizer shards. configs/deepspeed/zero0.json runs
    as written in tests/test_stop_signals.py's DeepSpeed case."""
    run_dir, out = zerorun.stopped_run(tmp_path_factory, 1)
    assert tu.checkpoints(run_dir) == ["step-000000004", zerorun.STOPPED_AT]
    tu.assert_shipped_json_ran(run_dir, out, stage=1, shards=2)


def test_fp16_needs_zero0_and_a_missing_json_is_named(tmp_path):
    with pytest.raises(SetupError, match="fp16 under DeepSpeed needs deepspeed.zero_stage=0"):
        deepspeed_config(settle(load_config([], ["train.precision=fp16",
                                                 "deepspeed.zero_stage=1"])), _layout(1, 1))
    with pytest.raises(SetupError, match="config_file not found"):
        settle(load_config([], [f"deepspeed.config_file={tmp_path}/x.json"]))
