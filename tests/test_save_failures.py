"""A full disk inside DeepSpeed's save_checkpoint (issue 20, item 4), on 2 real ranks.

The test shim (tests/fault_shim/sitecustomize.py, RESNET_TEST_FAULT_ENOSPC_INSIDE) raises
ENOSPC from DeepSpeed's own checkpoint engine while it writes step 4's checkpoint: rank 0's
model file, or rank 1's ZeRO-1 optimizer shard. That rank would leave save_checkpoint before
DeepSpeed's barriers while the other waits in them: a hang for the process group's 30 minutes.
Both ranks must stop, promptly, with the one message.
"""
from __future__ import annotations

import time

import pytest

import trainutil as tu

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("rank,zero_stage", [(0, 0), (1, 1)], ids=["rank0-model-file",
                                                                 "rank1-zero-shard"])
def test_no_space_inside_deepspeeds_save_stops_every_rank_with_one_message(
        tmp_path_factory, tmp_path, rank, zero_stage):
    data = tu.shared_data(tmp_path_factory)
    run_dir = tmp_path / "run"
    args = tu.overrides(data, run_dir, "train.max_steps=6", "checkpoint.every_steps=2",
                        f"deepspeed.zero_stage={zero_stage}", val=False)
    started = time.monotonic()
    code, out = tu.run(tu.torchrun_cmd(2, *args), tmp_path / "log.txt",
                       RESNET_TEST_FAULT_ENOSPC_AT_STEP=4, RESNET_TEST_FAULT_ENOSPC_INSIDE=1,
                       RESNET_TEST_FAULT_RANK=rank)
    assert code != 0
    # Not the process group's 30-minute timeout (bounded for a busy machine, not for speed).
    assert time.monotonic() - started < tu.RUN_TIMEOUT_S
    said = [line for line in out.splitlines() if "no space left writing checkpoint" in line]
    assert len(said) == 2, out[-4000:]  # one line per rank, the same message
    assert f"rank {rank} on" in said[0] and "(test shim)" in said[0]
    assert "step-000000004" in said[0] and "step-000000002 is intact" in said[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest", "step-000000002"]
    assert tu.latest(run_dir) == "step-000000002"
