import pytest

from resnet.config import Config, ConfigError, load_config, save_config, to_yaml


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
