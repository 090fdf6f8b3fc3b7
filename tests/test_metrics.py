"""Monitoring: metrics.jsonl, W&B offline (read back from the files wandb writes), failures."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import wandb
from accelerate import Accelerator

from resnet.config import load_config, to_dict
from resnet.train import metrics
from resnet.logs import RateLimitedLogger
from resnet.progress import ProgressBar
from wandb_records import read_run, run_files


@pytest.fixture(autouse=True)
def _wandb_local(tmp_path, monkeypatch):
    """W&B never goes online here: offline by default, state kept under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # if anything leaked: loopback
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def _cfg(run_dir, mode="offline", **extra):
    overrides = [f"run.dir={run_dir}", f"wandb.mode={mode}"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(overrides=overrides)


def _logger(run_dir, mode="offline", **extra):
    cfg = _cfg(run_dir, mode, **extra)
    accelerator = Accelerator(log_with=metrics.tracker_for(cfg), project_dir=str(run_dir))
    return metrics.RunLogger(accelerator, cfg, run_dir), cfg


def _jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_disabled_writes_jsonl_only(tmp_path):
    logger, cfg = _logger(tmp_path, mode="disabled")
    assert metrics.tracker_for(cfg) is None
    logger.start(to_dict(cfg))
    for step in range(3):
        logger.log({"loss": np.float32(2.0 - step), "lr": 0.1, "bad": float("nan")}, step=step)
    logger.finish()
    lines = _jsonl(tmp_path)
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert lines[2]["loss"] == 0.0 and lines[0]["bad"] is None and "time" in lines[0]
    assert not (tmp_path / "wandb").exists()


def test_offline_run_holds_metrics_and_config_and_restart_keeps_id(tmp_path):
    logger, cfg = _logger(tmp_path)
    logger.start(to_dict(cfg))
    for step in range(5):
        logger.log({"loss": 1.0 / (step + 1), "img_per_s": 100.0 + step}, step=step)
    logger.log({"val_top1": 0.5}, step=4)  # an eval at the same step merges into its row
    logger.finish()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()

    # Restart after a rollback to step 2: steps 3 and 4 are replayed.
    logger, cfg = _logger(tmp_path)
    logger.start(to_dict(cfg))
    for step in range(3, 8):
        logger.log({"loss": 0.1 * step}, step=step)
    logger.finish()

    first, second = (read_run(path) for path in run_files(tmp_path))
    assert first["run_id"] == second["run_id"] == run_id
    assert first["config"]["train"]["epochs"] == cfg.train.epochs
    assert first["config"]["wandb"]["mode"] == "offline"
    assert [row["_step"] for row in first["history"]] == [0, 1, 2, 3, 4]
    assert first["history"][4]["val_top1"] == 0.5 and first["history"][4]["loss"] == 0.2
    assert first["history"][1]["img_per_s"] == 101.0
    # Replayed steps go to the jsonl file only; W&B continues after its last step.
    assert [row["_step"] for row in second["history"]] == [5, 6, 7]
    assert [line["step"] for line in _jsonl(tmp_path)] == [0, 1, 2, 3, 4, 4, 3, 4, 5, 6, 7]


def test_online_without_credentials_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    modes = []
    real_init = wandb.init

    def checked_init(*args, **kwargs):
        modes.append(kwargs["mode"])
        assert kwargs["mode"] != "online", "a test must never go online"
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", checked_init)
    logger, cfg = _logger(tmp_path, mode="online")
    logger.start(to_dict(cfg))
    logger.log({"loss": 1.0}, step=0)
    logger.finish()
    assert modes == ["offline"] and logger.mode == "offline"
    assert run_files(tmp_path)


def test_online_init_failure_retries_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr(metrics, "has_credentials", lambda env=None: True)
    real_init = wandb.init

    def unreachable(*args, **kwargs):
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("simulated: api.wandb.ai unreachable")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", unreachable)
    logger, cfg = _logger(tmp_path, mode="online")
    logger.start(to_dict(cfg))
    assert logger.wandb_active and logger.mode == "offline"
    logger.finish()


def test_init_failure_does_not_stop_training(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated init failure")

    monkeypatch.setattr(wandb, "init", broken)
    logger, cfg = _logger(tmp_path)
    logger.start(to_dict(cfg))
    assert not logger.wandb_active and logger.mode == "disabled"
    assert logger.accelerator.trackers == []
    logger.log({"loss": 1.0}, step=0)
    logger.log_predictions(0, np.zeros((2, 3, 8, 8), np.uint8), [0, 1], [[0], [1]], None)
    logger.finish()
    assert [line["step"] for line in _jsonl(tmp_path)] == [0]
    assert "simulated init failure" in capsys.readouterr().err


def test_log_failure_disables_wandb_and_training_goes_on(tmp_path, monkeypatch, capsys):
    logger, cfg = _logger(tmp_path)
    logger.start(to_dict(cfg))
    logger.log({"loss": 1.0}, step=0)
    run = logger.accelerator.get_tracker("wandb", unwrap=True)

    def broken(*args, **kwargs):
        raise ConnectionError("simulated log failure")

    monkeypatch.setattr(run, "log", broken)
    logger.log({"loss": 0.9}, step=1)
    logger.log({"loss": 0.8}, step=2)
    assert not logger.wandb_active and logger.accelerator.trackers == []
    logger.finish()
    run.finish()  # the test's own clean-up of the run the logger let go
    assert [line["step"] for line in _jsonl(tmp_path)] == [0, 1, 2]
    assert capsys.readouterr().err.count("simulated log failure") == 1


def test_prediction_table_is_capped(tmp_path):
    logger, cfg = _logger(tmp_path, **{"wandb.val_table_rows": 3})
    logger.start(to_dict(cfg))
    images = np.random.default_rng(0).integers(0, 255, (10, 3, 16, 16), dtype=np.uint8)
    top5 = np.tile(np.arange(5), (10, 1))
    logger.log_predictions(7, images, list(range(10)), top5, [f"class{i}" for i in range(10)])
    logger.finish()
    history = read_run(run_files(tmp_path)[0])["history"]
    rows = [row for row in history if "val_predictions/nrows" in row]
    assert rows and rows[0]["val_predictions/nrows"] == 3 and rows[0]["_step"] == 7
    table_file = run_files(tmp_path)[0].parent / "files" / rows[0]["val_predictions/path"]
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["image", "label", "top5", "top1_correct"]
    assert [row[1:] for row in table["data"]] == [
        ["class0", "class0, class1, class2, class3, class4", True],
        ["class1", "class0, class1, class2, class3, class4", False],
        ["class2", "class0, class1, class2, class3, class4", False],
    ]


def test_resolve_mode_and_credentials(tmp_path):
    assert metrics.resolve_mode("online", {}) == "online"
    assert metrics.resolve_mode("online", {"WANDB_MODE": "offline"}) == "offline"
    assert metrics.resolve_mode("offline", {"WANDB_MODE": "online"}) == "offline"
    assert metrics.resolve_mode("offline", {"WANDB_DISABLED": "true"}) == "disabled"
    netrc_file = tmp_path / "netrc"
    assert not metrics.has_credentials({"NETRC": str(netrc_file)})
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc_file.chmod(0o600)
    assert metrics.has_credentials({"NETRC": str(netrc_file)})
    assert metrics.has_credentials({"WANDB_API_KEY": "x", "NETRC": "/nonexistent"})


def test_system_metrics_restart_count(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert metrics.system_metrics("cpu") == {"restart_count": 2}


def test_rate_limited_logger():
    now = [0.0]
    out = io.StringIO()
    log = RateLimitedLogger(rank=0, every_s=10, clock=lambda: now[0], stream=out)
    assert log.info("slow data", key="data")
    assert not log.info("slow data again", key="data")
    now[0] = 11
    assert log.info("slow data", key="data")
    assert "[rank 0] INFO: slow data (1 similar lines suppressed)" in out.getvalue()
    quiet = RateLimitedLogger(rank=3, stream=out)
    assert not quiet.info("progress") and quiet.warning("bad shard")
    assert "[rank 3] WARNING: bad shard" in out.getvalue()


def test_progress_bar():
    out = io.StringIO()
    bar = ProgressBar(total=10, initial=4, stream=out)
    bar.update(6, loss=1.5, img_per_s=1234.0, epoch=0.6)
    bar.close()
    assert "6/10" in out.getvalue() and "img/s 1,234" in out.getvalue()
    ProgressBar(10, enabled=False).update(3)  # other ranks: nothing happens
