"""Restarts on CPU: SIGKILL of a worker under torchrun, an agent lost from a 2-node elastic job,
SIGTERM, and a kill inside a checkpoint write. Faults are placed exactly by the test-only shim
tests/fault_shim/sitecustomize.py (environment variables; it patches the product from outside).

The exact-restart tests run the same command as the uninterrupted 2-process run of
tests/trainutil.py (2 epochs of 10 steps, a checkpoint every 4 steps) and compare the final
weights bit for bit and the audit (which samples each rank used at each step) record for record.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

import trainutil as tu

from resnet.train.audit import audit_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    data, run_dir, code, out = tu.baseline_run(tmp_path_factory)
    assert code == 0, out[-4000:]
    return data, run_dir


def _same_as_baseline(run_dir: Path, baseline_dir: Path, resumed_at: int) -> None:
    audit, reference = tu.read_audit(run_dir), tu.read_audit(baseline_dir)
    assert list(audit) == list(reference) == list(range(1, 21))
    for step in range(resumed_at + 1, 21):  # from the resumed step on, record for record
        assert {k: r["keys"] for k, r in audit[step].items()} == \
            {k: r["keys"] for k, r in reference[step].items()}, step
    tu.assert_bit_identical(tu.final_weights(run_dir), tu.final_weights(baseline_dir))


def test_sigterm_writes_a_checkpoint_and_the_next_start_resumes_from_it(baseline, tmp_path):
    """SIGTERM to torchrun's whole process group (as srun, systemd or `kill -TERM -PGID` do)
    mid-epoch, off the checkpoint grid, while both ranks wait for step 7's batches from their
    2 loader workers: torchrun passes it to each worker's process group, loader workers
    included, which must live on to hand the batches over; step 7 is saved."""
    data, reference = baseline
    run_dir, gates = tmp_path / "run", tmp_path / "gates"
    gates.mkdir()
    (gates / "pause-fetch-at-6").touch()
    cmd = tu.torchrun_cmd(2, *tu.overrides(data, run_dir, *tu.BASELINE))
    launch = tu.Launch(cmd, tmp_path / "log.txt", RESNET_TEST_FAULT_GATES=str(gates))
    try:
        tu.wait_for(lambda: len(list(gates.glob("paused-fetch-at-6-rank-*"))) == 2,
                    tu.RUN_TIMEOUT_S, "both ranks fetching step 7's batches", [launch])
        launch.signal_group(signal.SIGTERM)  # the agent passes it on to its workers
        code = launch.wait()
    finally:
        launch.stop()
    out = launch.output()
    assert code != 0
    stopped = re.findall(r"stopped by signal 15 at step (\d+); checkpoint saved", out)
    assert stopped == ["7", "7"], out[-4000:]  # a checkpoint the interval would not write
    name = "step-000000007"
    assert tu.latest(run_dir) == name
    assert tu.trainer_state(run_dir / "checkpoints" / name)["progress"]["step"] == 7
    assert not (run_dir / "final").exists()

    code, out = tu.run(cmd, tmp_path / "log2.txt")
    assert code == 0, out[-4000:]
    assert tu.resumed_from(out) == [name]
    _same_as_baseline(run_dir, reference, resumed_at=7)
    tu.assert_each_sample_once(run_dir, epochs=2)


def test_a_kill_inside_a_checkpoint_write_then_a_sigkill_mid_epoch_both_restart_exactly(
        baseline, tmp_path):
    """One launch, which torchrun restarts after each of two faults (the test shim holds the
    rank at the fault, the test checks the run folder there, then SIGKILLs the rank):

    - first attempt: rank 0 dies inside step 8's checkpoint write, after save_state into the
      temporary folder, before trainer_state.json and the rename: step 4 stays the newest
      complete checkpoint and `latest`;
    - the restart resumes from step 4 (the half-written step 8 removed at its start), and rank
      1 dies right after step 6, mid-epoch, off the checkpoint grid: step 4 is still the newest;
    - the second restart resumes from step 4 again, redoes steps 5, 6, ... and from step 5 on
      trains record for record and bit for bit as the uninterrupted run."""
    data, reference = baseline
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    ckpt = run_dir / "checkpoints"
    partial = ckpt / ".tmp-step-000000008"
    launch = tu.Launch(tu.torchrun_cmd(2, *tu.overrides(data, run_dir, *tu.BASELINE),
                                       max_restarts=2), tmp_path / "log.txt",
                       RESNET_TEST_FAULT_AFTER_STEP="8,6", RESNET_TEST_FAULT_IN_CHECKPOINT="1,0",
                       RESNET_TEST_FAULT_RANK="0,1", RESNET_TEST_FAULT_HOLD=hold)
    try:
        tu.wait_for(hold.exists, tu.RUN_TIMEOUT_S, "rank 0 inside step 8's checkpoint write",
                    [launch])
        assert partial.is_dir() and (partial / "pytorch_model").is_dir(), sorted(os.listdir(ckpt))
        assert not (partial / "trainer_state.json").exists()
        assert tu.checkpoints(run_dir) == ["step-000000004"]
        assert tu.latest(run_dir) == "step-000000004"
        _kill_the_held(hold)

        tu.wait_for(hold.exists, tu.RUN_TIMEOUT_S, "rank 1 after step 6 of the restart",
                    [launch])
        assert not partial.exists()
        assert tu.checkpoints(run_dir) == ["step-000000004"]
        assert tu.latest(run_dir) == "step-000000004"
        _kill_the_held(hold)
        code = launch.wait()
    finally:
        launch.stop()
    out = launch.output()
    assert code == 0, out[-4000:]
    assert tu.resumed_from(out) == ["step-000000004"] * 2
    starts = list(audit_files(run_dir).values())
    assert len(starts) == 3 and all(len(files) == 2 for files in starts)
    assert max(tu.steps_of(starts[0][0])) == 8  # rank 0 of the first attempt trained step 8
    assert tu.steps_of(starts[1][0])[0] == 5  # the restart redid 5, 6, ...
    assert max(tu.steps_of(starts[1][1])) == 6  # ... and rank 1 died after step 6
    again = starts[2][0].read_text().splitlines()  # rank 0 after the second restart
    assert again[0].startswith('{"step": 5, "micro": 0')
    assert not partial.exists()
    _same_as_baseline(run_dir, reference, resumed_at=4)


def _kill_the_held(hold: Path) -> None:
    """SIGKILL the rank the shim holds (its id in `hold`), then clear `hold` for the next."""
    os.kill(int(hold.read_text()), signal.SIGKILL)
    hold.unlink()


def test_two_agents_one_killed_the_other_finishes_at_world_size_one(baseline, tmp_path):
    """Two torchrun agents as two nodes (--nnodes 1:2, c10d). The second agent and its worker
    are SIGKILLed while its worker holds after step 6 (checkpoint at 4); the first agent's
    worker fails on the next collective, is restarted alone, resumes from step 4 with 2
    micro-batches per step, and the epoch still uses every sample exactly once."""
    data, _ = baseline
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    port = tu.free_port()
    train = tu.overrides(data, run_dir, "train.epochs=1", "checkpoint.every_steps=4",
                         tu.LOADER_WORKERS, val=False)

    def agent() -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2",
                "--nproc-per-node", "1", "--max-restarts", "3", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"t{port}",
                "--rdzv-conf", "join_timeout=120,last_call_timeout=3,keep_alive_interval=1,"
                "keep_alive_max_attempt=3", "--monitor-interval", "0.5",
                "-m", "resnet", "train", *train]

    # As docs/operations.md says for plain torchrun: without it, agent 2 joining after agent 1
    # already started alone (a slow machine) makes both agents exit in their rendezvous.
    store = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    first = tu.Launch(agent(), tmp_path / "agent1.txt", **store)  # hosts the c10d store
    second = None
    try:
        tu.wait_for(lambda: _listening(port), 60, "the c10d store", [first])
        second = tu.Launch(agent(), tmp_path / "agent2.txt", RESNET_TEST_FAULT_AFTER_STEP=6,
                           RESNET_TEST_FAULT_HOLD=hold, **store)
        tu.wait_for(hold.exists, tu.RUN_TIMEOUT_S, "agent 2's worker holding after step 6",
                    [first, second])
        assert tu.checkpoints(run_dir) == ["step-000000004"]
        worker = int(hold.read_text())
        os.killpg(second.proc.pid, signal.SIGKILL)  # the agent ...
        os.killpg(worker, signal.SIGKILL)  # ... and its worker (torchrun gives it a session)
        second.proc.wait(timeout=10)
        code = first.wait(tu.RUN_TIMEOUT_S)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    out = first.output()
    assert code == 0, out[-4000:]
    assert tu.resumed_from(out) == ["step-000000004"]
    assert "world size 1" in out

    audit = tu.read_audit(run_dir)
    assert list(audit) == list(range(1, 11))
    for step in range(1, 5):  # two ranks, one micro-batch each
        assert sorted(r for _, r in audit[step]) == [0, 1], step
    for step in range(5, 11):  # after the rollback: one rank, two micro-batches
        assert sorted(audit[step]) == [(0, 0), (1, 0)], step
    keys = tu.keys_of(audit, tu.epoch_steps(audit, 0))
    assert len(keys) == tu.TRAIN_SAMPLES
    assert sorted(keys) == sorted(tu.train_keys(data))
    state = tu.trainer_state(run_dir / "checkpoints" / "step-000000010")["progress"]
    assert (state["world_size"], state["global_batch"]) == (1, 16)
    assert (run_dir / "final" / "model.safetensors").is_file()
    tu.assert_each_sample_once(run_dir, epochs=1)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_an_s3_mirror_outage_mid_run_never_stops_training(baseline, tmp_path, s3_server):
    """S3 (moto) stops after step 4's checkpoint is mirrored and comes back after step 12:
    training goes on, bit for bit as without a mirror, warns (rate-limited), logs
    mirror_lag_steps, and the mirror ends with the newest checkpoint, pruned to keep-3."""
    from resnet.data import storage

    data, reference = baseline
    run_dir, gates = tmp_path / "run", tmp_path / "gates"
    gates.mkdir()
    for step in (4, 12):
        (gates / f"pause-at-{step}").touch()
    mirror = f"{s3_server.url}/runs/outage"
    launch = tu.Launch(tu.torchrun_cmd(2, *tu.overrides(data, run_dir, *tu.BASELINE,
                                                        f"checkpoint.mirror={mirror}",
                                                        "data.io_timeout_s=3")),
                       tmp_path / "log.txt", RESNET_TEST_FAULT_GATES=str(gates))
    try:
        def paused(step):
            return len(list(gates.glob(f"paused-at-{step}-rank-*"))) == 2

        def mirrored(name):
            try:
                return storage.read_bytes(f"{mirror}/latest").decode() == name
            except FileNotFoundError:
                return False

        tu.wait_for(lambda: paused(4) and mirrored("step-000000004"), tu.RUN_TIMEOUT_S,
                    "step 4 mirrored", [launch])
        s3_server.stop()
        (gates / "pause-at-4").unlink()
        tu.wait_for(lambda: paused(12), tu.RUN_TIMEOUT_S, "step 12 trained without S3",
                    [launch])
        assert "step-000000012" in tu.checkpoints(run_dir)
        tu.wait_for(lambda: "mirroring step-" in launch.output(), 60, "a failed upload said",
                    [launch])
        s3_server.start()
        (gates / "pause-at-12").unlink()
        code = launch.wait()
    finally:
        launch.stop()
    out = launch.output()
    assert code == 0, out[-4000:]
    assert "Traceback" not in out
    failed = [line for line in out.splitlines() if "mirroring step-" in line]
    assert 1 <= len(failed) <= 3 and "training goes on" in failed[0], failed
    lag = {m["step"]: m["mirror_lag_steps"] for m in tu.metrics(run_dir) if "mirror_lag_steps" in m}
    assert lag[5] == 0 and lag[10] >= 4  # step 8's checkpoint was not mirrored by step 10
    assert storage.read_bytes(f"{mirror}/latest") == b"step-000000020"
    names = [n for n in storage.listdir(mirror) if n.startswith("step-")]
    assert "step-000000020" in names and len(names) <= 3
    tu.assert_bit_identical(tu.final_weights(run_dir), tu.final_weights(reference))


def _gated_single_process(data, tmp_path, **extra_env):
    """`resnet train` (one process, W&B offline, audit on, 2 loader workers) held before step 4
    by a gate. The tests signal its whole process group, as a terminal's Ctrl-C does: the
    loader workers get the signal too."""
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "pause-at-3").touch()
    launch = tu.Launch(tu.resnet_cmd("train", *tu.overrides(
        data, tmp_path / "run", "train.max_steps=8", "wandb.mode=offline", tu.LOADER_WORKERS,
        val=False)),
        tmp_path / "log.txt", RESNET_TEST_FAULT_GATES=str(gates), WANDB_MODE="offline",
        WANDB_SILENT="true", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), **extra_env)
    tu.wait_for(lambda: list(gates.glob("paused-at-3-*")), tu.RUN_TIMEOUT_S, "step 3 done",
                [launch])
    return launch


def test_sigterm_closes_the_audit_and_wandb_with_its_exit_code(tmp_path_factory, tmp_path):
    from wandb_records import records, run_files

    data = tu.shared_data(tmp_path_factory)
    launch = _gated_single_process(data, tmp_path)
    try:
        launch.signal_group(signal.SIGTERM)
        code = launch.wait()
    finally:
        launch.stop()
    assert code == 143, launch.tail()
    run_dir = tmp_path / "run"
    assert "step-000000004" in tu.checkpoints(run_dir)
    (wandb_file,) = run_files(run_dir)
    exits = [r.exit.exit_code for r in records(wandb_file) if r.WhichOneof("record_type") == "exit"]
    assert exits == [143]  # not recorded as a run that finished (exit 0)
    (audit_file,) = (run_dir / "audit").glob("*-rank000.jsonl")
    assert audit_file.read_text().endswith("\n")
    assert max(tu.read_audit(run_dir)) == 4


def test_a_second_ctrl_c_exits_at_once(tmp_path_factory, tmp_path):
    import time

    data = tu.shared_data(tmp_path_factory)
    launch = _gated_single_process(data, tmp_path)
    try:
        launch.signal_group(signal.SIGINT)  # checkpoint at the end of the step, then exit
        time.sleep(0.1)
        launch.signal_group(signal.SIGINT)  # no: now
        code = launch.wait(10)
        # The loader workers and their server ignore Ctrl-C; they end with the trainer.
        tu.wait_for(lambda: not tu.tagged(launch.tag), 30, "the loader processes ending", [])
    finally:
        launch.stop()
    assert code == -signal.SIGINT, launch.tail()
    assert "Ctrl-C again exits at once" in launch.output()


def test_a_full_disk_at_a_checkpoint_stops_every_rank_and_the_restart_fails_fast(
        tmp_path_factory, tmp_path):
    """ENOSPC on rank 1 inside step 4's checkpoint write (test shim): both ranks stop with the
    message, the partial checkpoint is gone, step 2 intact and `latest`. A start on a disk
    that cannot hold the next checkpoint stops at once, before training."""
    data = tu.shared_data(tmp_path_factory)
    run_dir = tmp_path / "run"
    args = tu.overrides(data, run_dir, "train.max_steps=6", "checkpoint.every_steps=2",
                        tu.LOADER_WORKERS, val=False)
    code, out = tu.run(tu.torchrun_cmd(2, *args), tmp_path / "log.txt",
                       RESNET_TEST_FAULT_ENOSPC_AT_STEP=4, RESNET_TEST_FAULT_RANK=1)
    assert code != 0
    said = [line for line in out.splitlines() if "no space left writing checkpoint" in line]
    assert len(said) == 2, out[-4000:]  # one line per rank, the same message
    assert "step-000000004" in said[0] and "step-000000002 is intact" in said[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest", "step-000000002"]
    assert tu.latest(run_dir) == "step-000000002"
    assert max(tu.read_audit(run_dir)) == 4  # steps 3 and 4 were trained, then it stopped

    code, out = tu.run(tu.torchrun_cmd(2, *args, max_restarts=1), tmp_path / "log.txt",
                       RESNET_TEST_FAULT_DISK_FREE=1000)
    assert code != 0
    assert out.count("not enough space for the next checkpoint") >= 2, out[-4000:]
    assert max(tu.read_audit(run_dir)) == 4  # no step trained again, restart after restart
