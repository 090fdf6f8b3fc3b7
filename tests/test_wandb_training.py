"""W&B through real training (issue 6): two processes under `accelerate launch --use_deepspeed`.

What the W&B unit tests (test_metrics.py) cannot show: that the trainer's own calls put the
metrics and the resolved config into the offline run, that only the main process touches W&B,
that a second start in the same run.dir continues the same run id, and that W&B failing inside
the training processes (injected by tests/fault_shim/sitecustomize.py, so the product has
no test hooks) never stops training. The offline runs are read back from the .wandb files with
tests/wandb_records.py. About 25 s per training start on a 2-core machine, four starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wandb_records import read_run, run_files

REPO = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().parent / "fault_shim"
CONFIG = REPO / "configs" / "quickstart.yaml"
TRAIN_TIMEOUT_S = 240
STEPS_PER_EPOCH = 12  # 4 classes x 48 train images / (batch 8 x 2 processes)
# Metrics every logged training step carries (resnet/train/trainer.py `_log_train`).
TRAIN_KEYS = ("loss", "lr", "img_per_s", "img_per_s_per_device", "data_wait_frac",
              "step_time_s", "samples_seen", "restart_count")
VAL_KEYS = ("val_loss", "val_top1", "val_top5")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """4 classes, 48 train / 16 val images each, 40x32 px, packed 32 per shard."""
    from resnet.data import synthetic
    from resnet.data.pack import PackOptions, pack

    root = tmp_path_factory.mktemp("wandb-data")
    synthetic.write_imagefolder(root / "src", 4, {"train": 48, "val": 16}, size=(40, 32))
    pack(str(root / "src"), str(root / "data"), "imagefolder",
         PackOptions(samples_per_shard=32, workers=1), progress=False, log=lambda *a: None)
    return root / "data"


def _env(tmp_path: Path, fault: str = "") -> dict:
    """Offline W&B with its state under tmp_path; nothing can reach a server."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "ACCELERATE_", "RESNET_TEST_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
               WANDB_BASE_URL="http://127.0.0.1:9",  # if anything went online: loopback
               NETRC=str(tmp_path / "no-netrc"))
    if fault:
        env["RESNET_TEST_WANDB_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIM), env.get("PYTHONPATH")]))
    return env


def _train(packed: Path, run_dir: Path, cwd: Path, epochs: int = 1, fault: str = "",
           processes: int = 2):
    """Under `accelerate launch`, or (processes=1) a plain `resnet train`: the same global
    batch of 16, so the same steps."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
                "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision",
                "no", "--dynamo_backend", "no"] if processes > 1 else [sys.executable]
    command = [
        *launcher, "-m", "resnet", "train", "--config", str(CONFIG), "train.global_batch_size=16",
        f"data.train={packed}", f"data.val={packed}", f"run.dir={run_dir}",
        "wandb.mode=offline", f"train.epochs={epochs}", "data.workers=0",
        "train.batch_size=8", "data.image_size=32", "train.log_every_steps=2",
        # Evaluate inside the epoch: the epoch-end evaluation of the last epoch is skipped
        # when the step budget ends with the epoch (reported against trainer.py).
        "train.eval_every_steps=6", "checkpoint.every_steps=0",
    ]
    result = subprocess.run(command, cwd=cwd, env=_env(cwd, fault), capture_output=True,
                            text=True, timeout=TRAIN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _by_step(lines: list[dict]) -> dict[int, dict]:
    """jsonl lines merged per step, the way W&B merges logs at the same step into one row."""
    rows: dict[int, dict] = {}
    for line in lines:
        rows.setdefault(line["step"], {}).update(
            {k: v for k, v in line.items() if k not in ("step", "time")})
    return rows


def _assert_history_matches(history: list[dict], lines: list[dict]) -> None:
    expected = _by_step(lines)
    assert [row["_step"] for row in history] == sorted(expected)
    for row in history:
        for key, value in expected[row["_step"]].items():
            assert row[key] == pytest.approx(value, rel=1e-9), (row["_step"], key)


def _assert_one_wandb_writer(run_dir: Path, cwd: Path, result, segments: int) -> None:
    """Only the main process started W&B: one run folder per start, none anywhere else."""
    assert len(list((run_dir / "wandb").glob("*run-*"))) == segments
    assert not (cwd / "wandb").exists()  # a rank logging without dir= would write here
    assert "[rank 1] INFO" not in result.stderr  # other ranks print warnings only


def test_offline_run_holds_metrics_config_and_resumes_same_id(packed, tmp_path):
    run_dir = tmp_path / "run"
    first = _train(packed, run_dir, tmp_path, epochs=1)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert (run_dir / "final" / "model.safetensors").is_file()
    _assert_one_wandb_writer(run_dir, tmp_path, first, segments=1)

    lines = _jsonl(run_dir)
    train_steps = [line["step"] for line in lines if "loss" in line]
    assert train_steps == list(range(2, STEPS_PER_EPOCH + 1, 2))
    assert sorted({line["step"] for line in lines if "val_top1" in line}) == [6, 12]
    (segment,) = run_files(run_dir)
    run = read_run(segment)
    assert run["run_id"] == run_id and segment.name == f"run-{run_id}.wandb"
    # The resolved config, as the trainer saw it (overrides applied over quickstart.yaml).
    assert run["config"]["train"]["epochs"] == 1
    assert run["config"]["train"]["batch_size"] == 8
    assert run["config"]["data"]["train"] == str(packed)
    assert run["config"]["model"]["arch"] == "resnet18"
    assert run["config"]["run"]["dir"] == str(run_dir)
    history = [row for row in run["history"] if "_step" in row]
    _assert_history_matches(history, lines)
    for row in history:
        assert all(key in row for key in TRAIN_KEYS)
        if row["_step"] in (6, 12):
            assert all(key in row for key in VAL_KEYS)
            assert "val_predictions/nrows" in row  # the W&B table of validation samples

    # A second start in the same run.dir resumes the checkpoint at step 12 and the W&B run id.
    second = _train(packed, run_dir, tmp_path, epochs=2)
    assert "resumed from step-000000012" in second.stderr
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    _assert_one_wandb_writer(run_dir, tmp_path, second, segments=2)
    old, new = (read_run(path) for path in run_files(run_dir))
    assert old["run_id"] == new["run_id"] == run_id
    assert new["config"]["train"]["epochs"] == 2
    lines2 = _jsonl(run_dir)[len(lines):]
    assert [line["step"] for line in lines2 if "loss" in line] == list(
        range(STEPS_PER_EPOCH + 2, 2 * STEPS_PER_EPOCH + 1, 2))
    assert {18, 24} <= {line["step"] for line in lines2 if "val_top1" in line}
    # W&B steps only increase: anything logged again at step 12 (an evaluation the first start
    # left for the epoch's end) goes to metrics.jsonl only; the new segment holds 14..24.
    history2 = [row for row in new["history"] if "_step" in row]
    _assert_history_matches(history2, [line for line in lines2 if line["step"] > 12])


@pytest.mark.parametrize("fault", ["init", "log:2"])
def test_wandb_failure_does_not_stop_training(packed, tmp_path, fault):
    """wandb.init raising, or Run.log raising from its 3rd call on, in the one process that
    writes W&B (the main one: the test above proves the others never do), so one process."""
    run_dir = tmp_path / "run"
    result = _train(packed, run_dir, tmp_path, epochs=1, fault=fault, processes=1)
    assert f"injected W&B fault: {'wandb.init' if fault == 'init' else 'Run.log call 3'}" \
        in result.stderr
    assert "W&B disabled" in result.stderr
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step-000000012").is_dir()
    lines = _jsonl(run_dir)
    assert [line["step"] for line in lines if "loss" in line] == list(
        range(2, STEPS_PER_EPOCH + 1, 2))
    assert sorted({line["step"] for line in lines if "val_top1" in line}) == [6, 12]
    assert not (tmp_path / "wandb").exists()
