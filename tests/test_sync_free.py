"""The sync-free steady state (issue 11): batches reach the device through DeviceFeed, counters
stay on the device, mean/std are copied once, and stop/save agreement needs no per-step
barrier; checkpoints still record exactly the batches the trained steps used.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainutil as tu
from resnet.data import device as D
from resnet.data.device import DeviceFeed
from resnet.data.stream import AugmentParams, ShardLoader
from resnet.train.agreement import Agreement
from shards_helper import make_shards

HELPER = Path(__file__).with_name("sync_count_helper.py")
AUG = AugmentParams(image_size=16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return str(make_shards(tmp_path_factory.mktemp("shards"), [9, 6, 11]))


def _loader(shards, decode="cpu"):
    return ShardLoader(shards, "train", rank=0, world_size=1, batch_size=2, global_batch=2,
                       workers=0, seed=0, train=True, augment=AUG, decode=decode)


# ------------------------------------------------------------------------------ the feed


@pytest.mark.parametrize("lookahead", [False, True])
def test_checkpointed_state_is_the_trained_batches_not_the_ones_read_ahead(shards, lookahead):
    """Read ahead (as on CUDA, forced here) or not, a mark after batch k makes state_dict()
    the loader's state after k batches; resuming from it gives exactly the remaining ones."""
    full = [b.keys for b in _loader(shards)]
    feed = DeviceFeed(_loader(shards), "cpu", lookahead=lookahead)
    it = iter(feed)
    took = [next(it).keys for _ in range(4)]
    feed.mark()
    extra = next(it)  # fetched before the step's stop/save agreement is read: not trained
    assert extra.keys == full[4]
    state = json.loads(json.dumps(feed.state_dict()))
    assert took == full[:4]
    resumed = DeviceFeed(_loader(shards), "cpu", lookahead=lookahead)
    resumed.load_state_dict(state)
    assert [b.keys for b in resumed] == full[4:]
    # The epoch's batches all out: the checkpoint takes the loader's live state (next epoch).
    assert [b.keys for b in it] == full[5:]
    assert feed.state_dict() == feed.loader.state_dict() and feed.loader.epoch == 1


def test_feed_hands_over_device_batches_and_decodes_on_the_device(shards):
    cpu = list(DeviceFeed(_loader(shards), "cpu"))
    dev = list(DeviceFeed(_loader(shards, decode="device"), "cpu"))
    assert [b.keys for b in cpu] == [b.keys for b in dev]
    for a, b in zip(cpu, dev):
        assert b.jpegs is None and b.images.dtype == torch.uint8
        assert a.images.shape == b.images.shape == (len(a), 3, 16, 16)
        assert torch.equal(a.labels, b.labels)


# ------------------------------------------------------------------------------ small parts


def test_normalize_copies_mean_std_once_and_keeps_the_numbers(monkeypatch):
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    reference = (x.float() - D.MEAN.view(1, 3, 1, 1)) / D.STD.view(1, 3, 1, 1)
    D.normalize(x, False)
    moved = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: (
        moved.append(self.dtype), real_to(self, *a, **k))[1])
    out = D.normalize(x, True)
    assert moved == [torch.uint8]  # the batch itself; mean/std are already on the device
    assert torch.equal(out, reference)
    assert out.is_contiguous(memory_format=torch.channels_last)
    floats = reference.clone()
    D.normalize(floats, False)
    assert torch.equal(floats, reference)  # never normalises its input in place


def test_agreement_on_one_process_returns_its_own_flags():
    agreement = Agreement(type("E", (), {"control_group": None, "world_size": 1})())
    assert agreement.result() == [0.0, 0.0]
    agreement.start(15.0, 0.0)
    assert agreement.result() == [15.0, 0.0]
    assert agreement.result() == [0.0, 0.0]  # read once


# ------------------------------------------------------------------------------ whole steps


def _count_syncs(data: Path, run_dir: Path, *more: str) -> dict:
    env = tu.env("sync-count")
    env["PYTHONPATH"] = str(tu.REPO)  # no fault shim: nothing patched but the counters
    cmd = [sys.executable, str(HELPER), str(run_dir), f"data.train={data}", f"data.val={data}",
           "model.arch=resnet18", "data.image_size=32", "data.workers=0",
           "train.batch_size=8", "train.global_batch_size=16", "train.max_steps=8",
           "train.log_every_steps=6", "checkpoint.every_steps=0", "checkpoint.every_minutes=0",
           "wandb.mode=disabled", *more]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=tu.RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SYNC_CALLS "))
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("engine,stage,precision,decode", [
    ("deepspeed", 0, "bf16", "cpu"), ("deepspeed", 1, "bf16", "cpu"), ("ddp", 0, "bf16", "cpu"),
    ("ddp", 0, "fp32", "device")])
def test_steady_state_steps_force_no_sync(tmp_path_factory, tmp_path, engine, stage, precision,
                                          decode):
    """Steps 3-6 (two accumulated micro-batches each, up to the log at step 6): no .item(),
    .tolist(), .cpu(), bool() or torch.tensor(..., device=...) anywhere in them, and no
    device-wide synchronisation (torch.cuda.synchronize, DeepSpeed's accelerator synchronize:
    its throughput timer, ZeRO-1/2's gradient-norm check)."""
    data = tu.shared_data(tmp_path_factory)
    result = _count_syncs(data, tmp_path / "run", f"deepspeed.engine={engine}",
                          f"deepspeed.zero_stage={stage}", f"train.precision={precision}",
                          f"data.decode={decode}")
    assert result["counted_to"] == 6
    assert result["calls"] == []


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: torch.cuda.set_sync_debug_mode has nothing to watch on "
                           "a CPU (the CPU test above counts the sync calls instead)")
def test_steady_state_steps_under_cuda_sync_debug_mode_error(tmp_path_factory, tmp_path):
    data = tu.shared_data(tmp_path_factory)
    os.environ["SYNC_DEBUG_MODE"] = "error"
    try:
        result = _count_syncs(data, tmp_path / "run", "deepspeed.engine=ddp",
                              "train.precision=bf16", "data.workers=1")
    finally:
        os.environ.pop("SYNC_DEBUG_MODE")
    assert result["counted_to"] == 6 and result["calls"] == []
