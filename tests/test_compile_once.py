"""train.compile=true compiles the model once (issue 21): over 5 training steps under DeepSpeed
(and DDP), Dynamo hands one graph to the backend, with no graph break. Counted with an eager
backend that records each graph (tests/compile_count_helper.py), so it runs on a CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import trainutil as tu

HELPER = Path(__file__).with_name("compile_count_helper.py")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "ddp"])
def test_five_steps_compile_one_graph(tmp_path_factory, tmp_path, engine):
    data = tu.shared_data(tmp_path_factory)
    env = tu.env("compile-count")
    env["PYTHONPATH"] = str(tu.REPO)  # no fault shim
    cmd = [sys.executable, str(HELPER), str(tmp_path / "run"), f"data.train={data}",
           "data.val=", "model.arch=resnet18", "data.image_size=32", "data.workers=0",
           "train.batch_size=8", "train.global_batch_size=16", "train.max_steps=5",
           "train.log_every_steps=5", "checkpoint.every_steps=0", "checkpoint.every_minutes=0",
           "wandb.mode=disabled", "train.precision=bf16", f"deepspeed.engine={engine}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("COMPILE_COUNTS "))
    counts = json.loads(line.split(" ", 1)[1])
    assert counts["steps"] == 5
    assert counts["graphs"] == 1 and counts["graph_breaks"] == 0, counts
