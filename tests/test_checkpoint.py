"""The checkpoint manager on its own: atomic completion, latest pointer, keep-k, leftovers,
the S3 mirror and a restore from it onto an empty disk. A stub stands in for the accelerator
(the training tests cover Accelerate + DeepSpeed's own save_state)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from resnet.data import storage
from resnet.checkpoint.errors import CheckpointError
from resnet.checkpoint.manager import CheckpointManager
from resnet.runfolder import STATE_FILE, find_latest


class StubAccelerator:
    is_main_process = is_local_main_process = True
    process_index = 0

    def __init__(self) -> None:
        self.weights = 0

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "weights.json").write_text(json.dumps(self.weights))

    def load_state(self, path: str) -> None:
        self.weights = json.loads((Path(path) / "weights.json").read_text())


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def _manager(run_dir: Path, keep: int = 2, mirror: str = "", mirror_wait_s: float = 60.0):
    acc, part = StubAccelerator(), Counter()
    return CheckpointManager(acc, run_dir, {"counter": part}, keep=keep, mirror=mirror,
                             mirror_wait_s=mirror_wait_s), acc, part


def test_save_makes_a_complete_checkpoint_and_latest_points_at_it(tmp_path):
    ckpt, acc, part = _manager(tmp_path)
    assert ckpt.prepare() is None
    acc.weights, part.value = 5, 7
    path = ckpt.save(10)
    assert path.name == "step-000000010" and (path / STATE_FILE).is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000000010"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    acc.weights, part.value = 0, 0
    ckpt.load(find_latest(tmp_path / "checkpoints"))
    assert (acc.weights, part.value) == (5, 7)


def test_keeps_the_last_k(tmp_path):
    ckpt, _, _ = _manager(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        "step-000000003", "step-000000004"]


def test_after_a_rollback_the_checkpoint_just_written_is_kept_and_latest(tmp_path):
    """Pruning goes by the order of writing: after resuming from an older checkpoint (a NaN,
    an older mirror copy) the new one has a lower step than checkpoints written before it."""
    import shutil

    ckpt, acc, _ = _manager(tmp_path, keep=2)
    folder = tmp_path / "checkpoints"
    ckpt.save(10)
    shutil.copytree(folder / "step-000000010", tmp_path / "mirror-copy")
    for step in (20, 30):
        ckpt.save(step)
    shutil.copytree(tmp_path / "mirror-copy", folder / "step-000000010")  # restored
    ckpt.load(folder / "step-000000010")  # the rollback
    acc.weights = 15
    ckpt.save(15)
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-000000015", "step-000000030"]
    assert (folder / "latest").read_text() == "step-000000015"
    (folder / "latest").unlink()  # lost: the fallback is the last written, not the highest step
    assert find_latest(folder).name == "step-000000015"
    ckpt.save(16)
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-000000015", "step-000000016"]


def test_a_half_written_checkpoint_is_ignored_and_cleaned(tmp_path):
    ckpt, _, _ = _manager(tmp_path)
    ckpt.save(4)
    half = tmp_path / "checkpoints" / ".tmp-step-000000008"
    half.mkdir()
    (half / "weights.json").write_text("1")  # killed before trainer_state.json and the rename
    assert find_latest(tmp_path / "checkpoints").name == "step-000000004"
    assert ckpt.prepare().name == "step-000000004"
    assert not half.exists()


def test_a_stale_latest_pointer_falls_back_to_the_newest_complete(tmp_path):
    ckpt, _, _ = _manager(tmp_path)
    ckpt.save(4)
    (tmp_path / "checkpoints" / "latest").write_text("step-000000099")
    assert find_latest(tmp_path / "checkpoints").name == "step-000000004"


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint.keep must be at least 1"):
        _manager(tmp_path, keep=0)


def test_mirror_to_s3_and_restore_on_an_empty_disk(tmp_path, s3_server):
    mirror = f"s3://{s3_server.bucket}/runs/r1"
    ckpt, acc, part = _manager(tmp_path / "node1", mirror=mirror)
    ckpt.prepare()
    acc.weights, part.value = 3, 30
    ckpt.save(6)
    ckpt.close()  # waits for the background upload and reports its failure
    assert storage.read_bytes(f"{mirror}/latest") == b"step-000000006"
    assert storage.exists(f"{mirror}/step-000000006/{STATE_FILE}")

    # A replacement node: nothing on its disk.
    fresh, acc2, part2 = _manager(tmp_path / "node2", mirror=mirror)
    latest = fresh.prepare()
    assert latest is not None and latest.name == "step-000000006"
    fresh.load(latest)
    assert (acc2.weights, part2.value) == (3, 30)


def test_a_missing_mirror_bucket_is_refused_before_training(tmp_path, s3_server):
    ckpt, _, _ = _manager(tmp_path, mirror="s3://no-such-bucket-anywhere/run")
    with pytest.raises(CheckpointError, match="failed on 1 rank.*bucket 'no-such-bucket-anywhere' "
                                              "does not exist"):
        ckpt.prepare()


def test_a_failed_upload_is_reported_at_the_end_within_the_wait_never_raised(tmp_path,
                                                                             s3_server, capsys):
    import time

    client = s3_server.client()
    client.create_bucket(Bucket="short-lived")
    ckpt, _, _ = _manager(tmp_path, mirror="s3://short-lived/run", mirror_wait_s=1.0)
    ckpt.prepare()
    client.delete_bucket(Bucket="short-lived")  # the mirror goes away during training
    ckpt.save(1)
    started = time.monotonic()
    assert ckpt.close() is False  # said, not raised: the training itself is done
    assert time.monotonic() - started < 30  # mirror_wait_s, not data.io_timeout_s (120 s)
    err = capsys.readouterr().err
    assert "mirroring step-000000001 to s3://short-lived/run failed" in err
    assert "does not hold the newest checkpoint step-000000001" in err
    assert "mirror_wait_s=1 s" in err and "does not exist" in err
    assert find_latest(tmp_path / "checkpoints").name == "step-000000001"  # local one kept


def test_an_s3_outage_never_stops_saving_and_the_newest_is_mirrored_when_it_returns(
        tmp_path, s3_server, capsys, monkeypatch):
    import time

    # Each upload gives up after 10 s: long enough that saves waiting for it (30 s) are told
    # apart from saves that do not (under a second) on a busy machine; it costs the test the
    # wait for the first failed upload below.
    monkeypatch.setenv("RESNET_IO_TIMEOUT_S", "10")
    mirror = f"{s3_server.url}/run"
    ckpt, _, _ = _manager(tmp_path, keep=1, mirror=mirror)
    ckpt.prepare()
    ckpt.save(1)
    assert ckpt.close() is True and ckpt.mirror_metrics() == {"mirror_lag_steps": 0}
    s3_server.stop()
    started = time.monotonic()
    for step in (2, 3, 4):
        ckpt.save(step)  # never waits for the mirror
    assert time.monotonic() - started < 10  # waiting for it: 3 uploads of 10 s
    time.sleep(1)
    assert ckpt.mirror_metrics() == {"mirror_lag_steps": 3}
    local = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert "step-000000004" in local and len(local) <= 2  # + the one whose upload is retried
    err, deadline = "", time.monotonic() + 60
    while "mirroring" not in err and time.monotonic() < deadline:  # an attempt has failed
        time.sleep(0.2)
        err += capsys.readouterr().err
    s3_server.start()
    assert ckpt.close() is True  # the newest goes up when S3 is back
    assert ckpt.mirror_metrics() == {"mirror_lag_steps": 0}
    assert storage.read_bytes(f"{mirror}/latest") == b"step-000000004"
    assert [n for n in storage.listdir(mirror) if n.startswith("step-")] == ["step-000000004"]
    err += capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "mirroring" in line]
    assert len(warnings) == 1 and "training goes on" in warnings[0]  # rate-limited


class CountingAccelerator(StubAccelerator):
    def __init__(self, main: bool) -> None:
        super().__init__()
        self.is_main_process = self.is_local_main_process = main
        self.process_index = 0 if main else 1
        self.barriers = 0

    def wait_for_everyone(self) -> None:
        self.barriers += 1


def test_a_repeated_save_takes_the_same_barriers_on_every_rank(tmp_path):
    # Rank 1 on another node with its own disk (run.dir local + mirror) never sees rank 0's
    # renamed checkpoint: "already saved at this step" must not be decided from the disk, or
    # rank 0 skips barriers that rank 1 enters (the epoch-end save, then finish(), same step).
    ranks = []
    for main, node in ((True, "node0"), (False, "node1")):
        acc = CountingAccelerator(main)
        ranks.append((CheckpointManager(acc, tmp_path / node, {"counter": Counter()}), acc))
    for step in (5, 5, 6, 6):
        for manager, _ in ranks:
            manager.save(step)
    assert ranks[0][1].barriers == ranks[1][1].barriers
    # After a resume the loaded step counts as saved on every rank, too.
    for manager, acc in ranks:
        manager.load(tmp_path / "node0" / "checkpoints" / "step-000000006")
        before = acc.barriers
        manager.save(6)
        assert acc.barriers == before


def test_a_stale_checkpoint_of_an_earlier_run_is_replaced_not_kept(tmp_path):
    old, acc, part = _manager(tmp_path)
    part.value = 1  # an earlier run in the same run.dir (checkpoint.resume=false now)
    old.save(3)
    new, acc2, part2 = _manager(tmp_path)
    part2.value = 2
    new.save(3)
    new.load(tmp_path / "checkpoints" / "step-000000003")
    assert part2.value == 2


def test_keep_1_with_a_mirror_does_not_prune_the_checkpoint_being_uploaded(tmp_path,
                                                                        monkeypatch):
    import threading

    real, uploaded = storage.upload_dir, []
    started, release = threading.Event(), threading.Event()

    def held_upload(local: str, url: str, **options) -> dict:
        started.set()
        release.wait(60)  # the next checkpoint is saved (and pruning runs) meanwhile
        files = real(local, url, **options)
        uploaded.append(Path(url).name)
        return files

    monkeypatch.setattr(storage, "upload_dir", held_upload)
    mirror = tmp_path / "mirror"
    ckpt, _, _ = _manager(tmp_path / "run", keep=1, mirror=str(mirror))
    ckpt.prepare()
    ckpt.save(1)
    # Step 1's upload under way (on a busy machine the uploader could otherwise start later,
    # find step 2 newer and upload only that, as it should).
    assert started.wait(60)
    ckpt.save(2)
    release.set()
    assert ckpt.close() is True
    assert uploaded == ["step-000000001", "step-000000002"]  # step 1 was not pruned mid-upload
    assert (mirror / "latest").read_text() == "step-000000002"
    assert sorted(p.name for p in mirror.glob("step-*")) == ["step-000000002"]  # keep 1 there too


def test_load_restarts_the_micro_step_count_at_an_optimizer_step_boundary(tmp_path):
    # accelerate's load_state restores its micro-step counter (3 steps at accumulation 1);
    # resumed at accumulation 2 (world size halved, global batch kept), 3 % 2 would make the
    # first micro-batch an optimizer step.
    class MicroSteps(StubAccelerator):
        step = 0

        def load_state(self, path: str) -> None:
            super().load_state(path)
            self.step = 3

    acc = MicroSteps()
    ckpt = CheckpointManager(acc, tmp_path, {"counter": Counter()})
    ckpt.save(3)
    ckpt.load(tmp_path / "checkpoints" / "step-000000003")
    assert acc.step == 0


def test_contents_reach_the_disk_before_the_checkpoint_becomes_visible(tmp_path, monkeypatch):
    import os

    from resnet.checkpoint import files as ck

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ck.os, "fsync", lambda fd: (events.append(
        ("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(ck.os, "replace", lambda a, b: (events.append(
        ("replace", str(b))), real_replace(a, b))[1])
    ckpt, _, _ = _manager(tmp_path)
    ckpt.save(3)
    final = str(tmp_path / "checkpoints" / "step-000000003")
    visible = events.index(("replace", final))
    flushed = {path for kind, path in events[:visible] if kind == "fsync"}
    folder = f"{tmp_path}/checkpoints/.tmp-step-000000003"
    assert {f"{folder}/weights.json", folder} <= flushed  # the tensors, and the folder's entries
    assert any(p.startswith(f"{folder}/.tmp-{STATE_FILE}") for p in flushed)  # written, renamed
    assert ("fsync", str(tmp_path / "checkpoints")) in events[visible:]


# ------------------------------------------------------------------------------ nodes agree
# Each node's rank reports (where, newest local checkpoint), and rank 0 the mirror's newest;
# `gather` stands in for the all-gathers over ranks, with the other node's answers fixed
# (`other`: where, newest local checkpoint, the mirror's newest if it is rank 0).


def _node(run_dir: Path, mirror: str = "", *, rank: int, other: tuple):
    """A rank of a 2-rank job; the other rank's view is `other`, and its other collective
    steps succeed (with rank 0's mirror read in `other`)."""
    acc, part = StubAccelerator(), Counter()
    acc.process_index = rank

    def gather(mine):  # (result, error) of a preparing step, a view, or a space shortfall
        if isinstance(mine, tuple) and isinstance(mine[0], str) and mine[0].startswith("rank "):
            theirs = other[:2]  # its view: (where, newest local checkpoint)
        elif isinstance(mine, tuple):
            theirs = (other[2], None)  # its result of the mirror read (rank 0 reads it)
        else:
            theirs = None  # no shortfall on the other node
        return [mine, theirs] if rank == 0 else [theirs, mine]

    return CheckpointManager(acc, run_dir, {"counter": part}, keep=3, mirror=mirror,
                             gather=gather), acc, part


def _trained(run_dir: Path, mirror: str, steps) -> None:
    ckpt, acc, part = _manager(run_dir, keep=3, mirror=mirror)
    ckpt.prepare()
    for step in steps:
        acc.weights, part.value = step, step
        ckpt.save(step)
        ckpt.close()  # wait for the upload


@pytest.mark.parametrize("local_steps", [(), (4,)], ids=["empty disk", "disk behind"])
def test_a_node_with_its_own_disk_restores_the_mirrors_newest(tmp_path, local_steps):
    mirror = str(tmp_path / "mirror")
    _trained(tmp_path / "node0", mirror, [4, 8])
    if local_steps:  # this node's disk kept step 4 from before it was lost
        _trained(tmp_path / "node1", str(tmp_path / "old-mirror"), local_steps)
    node0_view = ("rank 0 on host-a", "step-000000008", "step-000000008")
    ckpt, acc, part = _node(tmp_path / "node1", mirror, rank=1, other=node0_view)
    chosen = ckpt.prepare()
    assert chosen == tmp_path / "node1" / "checkpoints" / "step-000000008"
    ckpt.load(chosen)
    assert (acc.weights, part.value) == (8, 8)


def test_a_node_ahead_of_the_mirror_resumes_where_every_node_can(tmp_path):
    """Rank 0's disk holds step 12, whose upload never finished (the mirror says 8); the other
    node has nothing. Both resume from 8, and rank 0 drops its unmirrored 12 (a fork)."""
    mirror = tmp_path / "mirror"
    _trained(tmp_path / "node0", str(mirror), [4, 8, 12])
    storage.write_bytes(str(mirror / "latest"), b"step-000000008")
    storage.remove(str(mirror / "step-000000012"))
    ckpt, _, _ = _node(tmp_path / "node0", str(mirror), rank=0,
                       other=("rank 1 on host-b", None, None))
    assert ckpt.prepare().name == "step-000000008"
    assert sorted(p.name for p in (tmp_path / "node0" / "checkpoints").glob("step-*")) == [
        "step-000000004", "step-000000008"]
    assert find_latest(tmp_path / "node0" / "checkpoints").name == "step-000000008"


def test_nodes_that_see_different_checkpoints_without_a_mirror_are_an_error(tmp_path):
    _trained(tmp_path / "run", "", [4, 8])
    ckpt, _, _ = _node(tmp_path / "run", rank=0,
                       other=("rank 1 on host-b (/elsewhere/checkpoints)", "step-000000004", None))
    with pytest.raises(CheckpointError, match=r"has step-000000008, rank 1 on host-b "
                                                 r"\(/elsewhere/checkpoints\) has step-000000004"):
        ckpt.prepare()
    ckpt, _, _ = _node(tmp_path / "run", rank=0, other=("rank 1 on host-b", None, None))
    with pytest.raises(CheckpointError, match="rank 1 on host-b has none"):
        ckpt.prepare()  # the node that sees nothing would train from step 0


def test_every_node_on_a_shared_run_dir_resumes_its_newest(tmp_path):
    _trained(tmp_path / "run", str(tmp_path / "mirror"), [4, 8])
    storage.write_bytes(str(tmp_path / "mirror" / "latest"), b"step-000000004")  # lagging
    ckpt, _, _ = _node(tmp_path / "run", str(tmp_path / "mirror"), rank=1,
                       other=("rank 0 on host-a", "step-000000008", "step-000000004"))
    assert ckpt.prepare().name == "step-000000008"


@pytest.mark.parametrize("name", ["../../outside", "/etc", "step-1", "step-000000001/../.."])
def test_a_mirror_pointer_that_is_not_a_checkpoint_name_is_refused(tmp_path, name):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "latest").write_text(name)
    ckpt, _, _ = _manager(tmp_path / "run", mirror=str(mirror))
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ckpt.prepare()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mirror", "run"]


def test_a_full_disk_during_a_save_removes_the_partial_and_keeps_the_previous(tmp_path):
    import errno

    from resnet.checkpoint.diskspace import CheckpointSpaceError

    class FullAt4(StubAccelerator):
        def save_state(self, path: str) -> None:
            super().save_state(path)  # part of it written
            if path.endswith("step-000000004"):
                raise OSError(errno.ENOSPC, "No space left on device", path)

    acc = FullAt4()
    ckpt = CheckpointManager(acc, tmp_path, {"counter": Counter()}, keep=2)
    ckpt.save(2)
    with pytest.raises(CheckpointSpaceError, match=r"no space left writing checkpoint "
                                                   r"step-000000004 to .*checkpoints .*rank 0.*No "
                                                   r"space left on device.*needs about 0.00 GiB "
                                                   r"\(the size of step-000000002\).*"
                                                   r"step-000000002 is intact"):
        ckpt.save(4)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-000000002"]
    assert (folder / "latest").read_text() == "step-000000002"


def test_a_disk_too_full_for_the_next_checkpoint_refuses_the_start(tmp_path, monkeypatch):
    from resnet.checkpoint import diskspace

    ckpt, _, _ = _manager(tmp_path)
    ckpt.save(2)
    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: 10)
    again, _, _ = _manager(tmp_path)
    with pytest.raises(diskspace.CheckpointSpaceError, match=r"not enough space for the next "
                                                             r"checkpoint: rank 0 .* has 0.00 GiB "
                                                             r"free"):
        again.prepare()
