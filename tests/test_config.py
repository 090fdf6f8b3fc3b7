import pytest

from resnet.config import Config, ConfigError, load_config, save_config, to_yaml, validate


def test_defaults_then_yaml_then_command_line(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 3\n  batch_size: 64\noptim:\n  lr: 0.5\n")
    cfg = load_config([path], ["train.epochs=5", "seed=7"])
    assert cfg.train.epochs == 5  # command line beats YAML
    assert cfg.train.batch_size == 64  # YAML beats defaults
    assert cfg.optim.lr == 0.5
    assert cfg.optim.momentum == Config().optim.momentum  # default kept
    assert cfg.seed == 7


def test_unknown_key_names_the_key_and_close_matches():
    with pytest.raises(ConfigError, match=r"train\.epocs.*did you mean train\.epochs"):
        load_config([], ["train.epocs=3"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*learning_rate"):
        load_config([path])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config([], ["train.epochs=many"])


def test_choice_outside_the_allowed_values():
    with pytest.raises(ConfigError, match=r"optim\.schedule='step'"):
        load_config([], ["optim.schedule=step"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], ["train.epochs"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(["nope.yaml"])


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config([], ["data.train=s3://bucket/imagenet", "train.precision=fp16",
                           "optim.lr=0.25", "wandb.mode=disabled"])
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    assert load_config([path]) == cfg
    assert "s3://bucket/imagenet" in to_yaml(cfg)


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    for path in files:
        load_config([path])


def test_unknown_key_lists_the_group_keys():
    with pytest.raises(ConfigError, match=r"optim has: lr, momentum"):
        load_config([], ["optim.learning_rate=0.1"])


def test_empty_value_clears_a_text_setting():
    assert load_config([], ["data.val=s3://b/x", "data.val="]).data.val == ""


@pytest.mark.parametrize("override, message", [
    # the two that failed late: a division by zero in the loop, a bare ValueError after the
    # engine existed
    ("train.log_every_steps=0", "train.log_every_steps=0: must be at least 1"),
    ("checkpoint.keep=0", "checkpoint.keep=0: must be at least 1"),
    ("model.arch=resnet51", "model.arch='resnet51' is not one of"),
    ("train.epochs=0", "train.epochs=0: must be at least 1"),
    ("train.batch_size=0", "train.batch_size=0: must be at least 1"),
    ("train.global_batch_size=-1", "train.global_batch_size=-1: must be at least 0"),
    ("train.max_steps=-1", "train.max_steps=-1: must be at least 0"),
    ("train.eval_every_steps=-1", "train.eval_every_steps=-1: must be at least 0"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0: must be at least 0"),
    ("train.label_smoothing=1.5", "train.label_smoothing=1.5: must be between 0 and 1"),
    ("train.compile_backend=", "train.compile_backend=: must be a torch.compile backend"),
    ("model.num_classes=-1", "model.num_classes=-1: must be at least 0"),
    ("data.scale_min=0", "data.scale_min=0.0, data.scale_max=1.0: must satisfy 0 <"),
    ("data.scale_max=1.5", "data.scale_min=0.08, data.scale_max=1.5: must satisfy"),
    ("data.ratio_min=2", "data.ratio_min=2.0, data.ratio_max=1.33.*: must satisfy 0 <"),
    ("data.eval_crop_ratio=0", "data.eval_crop_ratio=0.0: must be in \\(0, 1\\]"),
    ("data.image_size=0", "data.image_size=0: must be at least 1"),
    ("data.eval_image_size=-1", "data.eval_image_size=-1: must be at least 0"),
    ("data.min_image_size=16", "progressive resizing needs 32 <= data.min_image_size"),
    ("data.resize_start_epoch=-1", "data.resize_start_epoch=-1: must be at least 0"),
    ("data.resize_end_epoch=-1", "data.resize_end_epoch=-1: must be at least 0"),
    ("data.hflip=2", "data.hflip=2.0: must be between 0 and 1"),
    ("data.workers=-1", "data.workers=-1: must be at least 0"),
    ("data.prefetch_factor=0", "data.prefetch_factor=0: must be at least 1"),
    ("data.io_timeout_s=0", "data.io_timeout_s=0.0: must be more than 0"),
    ("data.worker_timeout_s=-1", "data.worker_timeout_s=-1.0: must be at least 0"),
    ("data.cache_limit_gb=-1", "data.cache_limit_gb=-1 is negative"),
    ("optim.lr=-0.1", "optim.lr=-0.1: must be at least 0"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0: must be at least 0"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs=-1.0: must be at least 0"),
    ("optim.momentum=1.5", "optim.momentum=1.5: must be between 0 and 1"),
    ("optim.final_lr_ratio=2", "optim.final_lr_ratio=2.0: must be between 0 and 1"),
    ("optim.onecycle_pct_start=2", "optim.onecycle_pct_start=2.0: must be between 0 and 1"),
    ("optim.onecycle_div_factor=0", "optim.onecycle_div_factor=0.0: must be more than 0"),
    ("optim.onecycle_final_div_factor=0",
     "optim.onecycle_final_div_factor=0.0: must be more than 0"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps=-1: must be at least 0"),
    ("checkpoint.every_minutes=-1", "checkpoint.every_minutes=-1.0: must be at least 0"),
    ("checkpoint.mirror_wait_s=-1", "checkpoint.mirror_wait_s=-1.0: must be at least 0"),
    ("wandb.val_table_rows=-1", "wandb.val_table_rows=-1: must be at least 0"),
    ("run.dir=", "run.dir=: must be a directory"),
    ("dist.heartbeat_period_s=0", "dist.heartbeat_period_s=0.0: must be more than 0 seconds"),
    ("dist.heartbeat_timeout_s=8", "dist.heartbeat_timeout_s=8.0 is shorter than 5 heartbeat"),
    ("dist.collective_timeout_s=0", "dist.collective_timeout_s=0.0: must be more than 0"),
])
def test_validate_names_each_key_out_of_range(override, message):
    with pytest.raises(ConfigError, match=message):  # (a choice is refused while loading)
        validate(load_config([], [override]))


def test_validate_passes_the_defaults_and_the_shipped_configs():
    from pathlib import Path

    validate(Config())
    for path in sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")):
        validate(load_config([path]))
