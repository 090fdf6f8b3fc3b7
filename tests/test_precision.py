"""Mixed precision stays correct under both engines (issue 11), on what a CPU allows.

bf16 autocast under DeepSpeed ZeRO-0 (its torch_autocast section) and under Accelerate's DDP:
the convolutions run in bf16, parameters and BatchNorm running statistics stay fp32 and both
move. fp16: DeepSpeed ZeRO-0's torch_autocast brings a GradScaler that works on a CPU (the
first steps overflow at scale 65536 and are skipped, then training moves); Accelerate has no
fp16 on a CPU (it would silently train in fp32), so the engine refuses it there; with CUDA the
DDP fp16 test checks its loss scaler.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HELPER = Path(__file__).with_name("precision_helper.py")
REPO = Path(__file__).resolve().parents[1]


def _steps(tmp_path, engine: str, precision: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "RESNET_TEST_"))
           and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(HELPER), engine, precision, str(steps),
                           str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=480)  # a hang guard for a busy machine, as RUN_TIMEOUT_S
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PRECISION "))
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.parametrize("engine", ["deepspeed", "ddp"])
def test_bf16_computes_in_bf16_and_keeps_weights_and_batchnorm_stats_fp32(tmp_path, engine):
    r = _steps(tmp_path, engine, "bf16", 2)
    assert r["inside"] == ["bfloat16"]
    assert r["params"] == ["float32"] and r["bn_buffers"] == ["float32"]
    assert r["weights_moved"] > 0 and r["bn_stats_moved"] and r["loss_finite"]
    assert r["loss_scale"] is None  # bf16 needs no loss scaling


def test_fp16_under_deepspeed_zero0_scales_the_loss(tmp_path):
    r = _steps(tmp_path, "deepspeed", "fp16", 8)
    assert r["inside"] == ["float16"]
    assert r["params"] == ["float32"] and r["bn_buffers"] == ["float32"]
    # The scaler skipped the overflowing first steps (halving 65536 each time), then stepped.
    assert r["loss_scale"] is not None and r["loss_scale"] < 65536
    assert r["weights_moved"] > 0 and r["bn_stats_moved"] and r["loss_finite"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the DDP fp16 test runs")
def test_fp16_under_ddp_is_refused_without_cuda(tmp_path):
    r = _steps(tmp_path, "ddp", "fp16", 1)
    assert "train.precision=fp16 with deepspeed.engine=ddp needs CUDA" in r["setup_error"]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: Accelerate has no fp16 autocast or GradScaler on a CPU "
                           "(the engine refuses it there; see the test above)")
def test_fp16_under_ddp_on_cuda_scales_the_loss(tmp_path):
    r = _steps(tmp_path, "ddp", "fp16", 8)
    assert r["inside"] == ["float16"] and r["loss_scale"] is not None
    assert r["params"] == ["float32"] and r["bn_buffers"] == ["float32"]
    assert r["weights_moved"] > 0 and r["loss_finite"]
