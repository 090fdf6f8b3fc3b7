"""A stop signal to the launcher's whole process group saves the step reached, whatever the
loader's worker count and engine, and the same command resumes there, each sample once.

torchrun, srun, systemd and a terminal's Ctrl-C signal a whole process group; torchrun passes
the signal on to each worker's process group, which holds the worker's loader processes (the
forkserver and its DataLoader workers). Both ranks are held after step 3 by the test-only gates
(tests/fault_shim), and no checkpoint is due by the step count, so the one found is the
signal's:

- held while fetching step 4's batches (the common case: a signal lands while the trainer waits
  for data): the loader workers must survive the signal to hand them over; step 4 trains, then
  the checkpoint;
- held inside step 4 with the fetch after it blocked for good (data that does not come): the
  stop must not need more data; step 4 trains, then the checkpoint.

The DDP case is also the test of `deepspeed.engine=ddp` on two processes: Accelerate's own DDP
(on CPU it must be told cpu=True, or it would leave the two processes undistributed;
engine.check_distributed refuses that) trains, saves Accelerate's model.safetensors, resumes,
evaluates at the epoch's end, and `resnet eval` reads its checkpoint.

The 2-worker DeepSpeed SIGTERM case, bit for bit against the uninterrupted run, is
tests/test_fault_tolerance.py's test_sigterm_writes_a_checkpoint_and_the_next_start_resumes_from_it;
the one-process Ctrl-C cases are there too.
"""
from __future__ import annotations

import json
import re
import signal
import sys

import pytest

import trainutil as tu

from resnet.train.audit import audit_files

pytestmark = pytest.mark.slow

REACHED = 4  # held after step 3 and signalled: step 4 trains, then the checkpoint


@pytest.mark.parametrize("engine, workers, sig, held", [
    ("ddp", 4, signal.SIGTERM, "fetching"),
    ("deepspeed", 0, signal.SIGINT, "no more data"),
], ids=["ddp-4-workers-SIGTERM-while-fetching", "deepspeed-0-workers-SIGINT-no-more-data"])
def test_a_stop_signal_to_torchruns_group_saves_the_step_reached_and_resumes_there(
        tmp_path_factory, tmp_path, engine, workers, sig, held):
    """The DeepSpeed case runs configs/deepspeed/zero0.json as written (bf16): DeepSpeed itself
    reports ZeRO-0 and bf16, and its checkpoints hold no optimizer shards."""
    data = tu.shared_data(tmp_path_factory)
    run_dir, gates = tmp_path / "run", tmp_path / "gates"
    gates.mkdir()
    if held == "fetching":
        (gates / "pause-fetch-at-3").touch()
        paused = "paused-fetch-at-3-rank-*"
    else:
        (gates / "pause-at-3").touch()
        (gates / f"block-fetch-at-{REACHED}").touch()
        paused = "paused-at-3-rank-*"
    args = ("train.epochs=1", f"deepspeed.engine={engine}", f"data.workers={workers}")
    if engine == "ddp":
        cmd = tu.torchrun_cmd(2, *tu.overrides(data, run_dir, *args, val=True))
    else:
        cmd = tu.torchrun_cmd(2, *tu.shipped_json_overrides(data, run_dir, "zero0", *args,
                                                            val=False))
    launch = tu.Launch(cmd, tmp_path / "log.txt", RESNET_TEST_FAULT_GATES=str(gates))
    try:
        tu.wait_for(lambda: len(list(gates.glob(paused))) == 2, tu.RUN_TIMEOUT_S,
                    f"both ranks held after step 3, {held}", [launch])
        launch.signal_group(sig)
        launch.wait()
    finally:
        launch.stop()
    out = launch.output()
    stopped = re.findall(rf"stopped by signal {int(sig)} at step (\d+); checkpoint saved", out)
    assert stopped == [str(REACHED)] * 2, out[-4000:]  # each rank says so once
    assert "exited unexpectedly" not in out
    name = f"step-{REACHED:09d}"
    assert tu.checkpoints(run_dir) == [name] and tu.latest(run_dir) == name
    assert tu.trainer_state(run_dir / "checkpoints" / name)["progress"]["step"] == REACHED

    code, out = tu.run(cmd, tmp_path / "log2.txt")
    assert code == 0, out[-4000:]
    assert tu.resumed_from(out) == [name]
    first, second = audit_files(run_dir).values()
    # Nothing trained after the save, and the resumed run starts right after it.
    assert tu.steps_of(first[0]) == list(range(1, REACHED + 1))
    assert tu.steps_of(second[0])[0] == REACHED + 1
    assert list(tu.read_audit(run_dir)) == list(range(1, 11))
    tu.assert_each_sample_once(run_dir, epochs=1)
    if engine == "ddp":
        _ddp_checkpoints_evaluate(run_dir, data, tmp_path)
    else:
        tu.assert_shipped_json_ran(run_dir, out, stage=0, shards=0)


def _ddp_checkpoints_evaluate(run_dir, data, tmp_path) -> None:
    """DDP's checkpoints hold Accelerate's model.safetensors; the resumed run evaluated at the
    epoch's end, and `resnet eval` reads a DDP checkpoint."""
    step_10 = run_dir / "checkpoints" / "step-000000010"
    assert (step_10 / "model.safetensors").is_file()
    # The stop at step 4 came before any evaluation: the epoch's end (10) is the resume's.
    assert [m["step"] for m in tu.metrics(run_dir) if "val_top1" in m] == [10]
    code, out = tu.run(tu.resnet_cmd("eval", "--weights", str(step_10), "--data", str(data),
                                     "--workers", "0"), tmp_path / "eval.txt")
    assert code == 0, out[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["val_samples"] == 32


def test_a_process_that_fails_with_its_loader_workers_running_still_exits(tmp_path_factory,
                                                                          tmp_path):
    """The loader workers ignore SIGTERM, and multiprocessing's exit handler ends daemon
    children with SIGTERM, then joins them: a process that fails with an epoch's iterator
    alive (a trainer whose peer was lost) would wait forever. It exits."""
    data = tu.shared_data(tmp_path_factory)
    script = (f"from resnet.data.stream import AugmentParams, ShardLoader\n"
              f"loader = ShardLoader({str(data)!r}, 'train', rank=0, world_size=1, "
              f"batch_size=4, global_batch=4, workers=2, seed=0, train=True, "
              f"augment=AugmentParams(image_size=32))\n"
              f"batches = iter(loader)\n"
              f"next(batches)\n"
              f"raise RuntimeError('a lost peer')\n")
    code, out = tu.run([sys.executable, "-c", script], tmp_path / "log.txt")
    assert code == 1 and "RuntimeError: a lost peer" in out, out[-3000:]
