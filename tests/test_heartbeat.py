"""The heartbeat's judgement with a fake clock, and the dist.* settings that cannot work."""
from __future__ import annotations

import pytest

from resnet.config import Config, ConfigError, DistConfig, load_config, validate
from resnet.train.liveness import DONE, STORE, PeerWatch, Silence
from resnet.train.preflight import preflight


def test_silence_shorter_than_the_timeout_is_tolerated_and_longer_is_named():
    watch = PeerWatch([3], timeout_s=30.0, now=1000.0)
    for t in range(1000, 1100, 2):  # beats every 2 s: never silent
        watch.saw(3, t, now=float(t))
        watch.store_answered(float(t))
        assert watch.silent(float(t) + 1.9) is None
    # rank 3 stops at 1098; the store still answers
    for t in range(1100, 1128, 2):
        watch.saw(3, 1098, now=float(t))  # the same counter: no progress
        watch.store_answered(float(t))
    assert watch.silent(1128.0) is None  # 30 s exactly: not yet
    assert watch.silent(1128.5) == Silence(3, 30.5)
    watch.saw(3, 1099, now=1129.0)  # it moves again: tolerated again
    assert watch.silent(1130.0) is None


def test_a_store_that_stops_answering_is_named_as_the_store():
    watch = PeerWatch([1], timeout_s=10.0, now=0.0)
    watch.saw(1, 5, now=1.0)
    watch.store_answered(1.0)
    assert watch.silent(11.0) is None
    found = watch.silent(12.0)
    assert found == Silence(STORE, 11.0)


def test_the_lease_is_judged_with_its_own_shorter_limit():
    watch = PeerWatch([1], timeout_s=30.0, now=0.0)
    watch.saw(1, 1, now=0.0)
    watch.store_answered(0.0)
    assert watch.silent(27.0) is None
    assert watch.silent(27.0, within=26.0) == Silence(STORE, 27.0)


def test_a_rank_that_finished_is_no_longer_watched():
    watch = PeerWatch([2], timeout_s=5.0, now=0.0)
    watch.saw(2, 7, now=1.0)
    watch.saw(2, DONE, now=2.0)
    watch.store_answered(100.0)
    assert watch.silent(100.0) is None


def test_a_peer_that_never_beats_is_silent_from_the_start():
    watch = PeerWatch([1], timeout_s=5.0, now=0.0)
    watch.store_answered(6.0)
    assert watch.silent(6.0) == Silence(1, 6.0)


@pytest.mark.parametrize("override, key", [
    ("dist.heartbeat_timeout_s=0", "dist.heartbeat_timeout_s=0"),
    ("dist.heartbeat_timeout_s=-5", "dist.heartbeat_timeout_s=-5"),
    ("dist.heartbeat_period_s=0", "dist.heartbeat_period_s=0"),
    ("dist.collective_timeout_s=0", "dist.collective_timeout_s=0"),
    ("dist.collective_timeout_s=-1", "dist.collective_timeout_s=-1"),
    ("dist.heartbeat_timeout_s=8", "dist.heartbeat_timeout_s=8.0 is shorter than 5 heartbeat "
                                   "periods (dist.heartbeat_period_s=2.0)"),
])
def test_a_timeout_that_cannot_work_is_an_error_naming_the_key(override, key, tmp_path):
    cfg = load_config([], [override, f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg, world_size=2)
    assert key in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_defaults_are_valid():
    validate(Config())
    assert DistConfig().heartbeat_timeout_s >= 5 * DistConfig().heartbeat_period_s


# ------------------------------------------------------------------------------ the fence


@pytest.fixture()
def store():
    import torch.distributed as dist

    from trainutil import free_port

    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    yield master, port


def _membership(port: int, generation: int, **cfg):
    import torch.distributed as dist

    from resnet.train.liveness import Membership

    return Membership(DistConfig(**cfg), 0, ["host-a", "host-b"], generation,
                      lambda: dist.TCPStore("127.0.0.1", port, is_master=False),
                      "the test store", "job")


class Left(Exception):
    pass


def _leave_raises(membership, monkeypatch):
    def leave(reason):
        raise Left(reason)

    monkeypatch.setattr(membership, "leave", leave)


def test_the_fence_passes_a_current_member_and_stops_one_whose_group_was_replaced(
        store, monkeypatch):
    master, port = store
    generation = master.add("resnet/liveness/job/generation", 1)
    member = _membership(port, generation)
    _leave_raises(member, monkeypatch)
    member.check("writing checkpoint step-000000004")  # current: returns
    master.add("resnet/liveness/job/generation", 1)  # a newer group started meanwhile
    with pytest.raises(Left, match=r"before writing checkpoint step-000000004: this group "
                                   r"\(generation 1\) was replaced by generation 2"):
        member.check("writing checkpoint step-000000004")


def test_the_fence_stops_a_rank_that_has_not_heard_its_peer_within_the_lease(
        store, monkeypatch):
    import time

    _, port = store
    member = _membership(port, 0, heartbeat_period_s=2.0, heartbeat_timeout_s=30.0)
    _leave_raises(member, monkeypatch)
    member.watch = PeerWatch([1], 30.0, now=time.monotonic() - 27.0)  # lease: 30 - 2 x 2
    with pytest.raises(Left, match="before logging metrics: the test store has not answered"):
        member.check("logging metrics")


def test_leaving_names_the_reason_dumps_the_stacks_fences_the_group_and_exits_75(
        store):
    import subprocess
    import sys

    master, port = store
    master.add("resnet/liveness/job/generation", 3)
    # Only what leaving needs: the test module's imports would double the start-up time.
    script = ("import torch.distributed as dist\n"
              "from resnet.config import DistConfig\n"
              "from resnet.train.liveness import Membership\n"
              f"store = lambda: dist.TCPStore('127.0.0.1', {port}, is_master=False)\n"
              "Membership(DistConfig(), 0, ['host-a', 'host-b'], 3, store, 'the test store',"
              " 'job').leave('rank 1 (host host-b) has been silent for 31 s')\n")
    from trainutil import REPO

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 75, done.stderr
    assert "rank 0 (host host-a): rank 1 (host host-b) has been silent for 31 s; leaving" \
        in done.stderr
    assert "Current thread" in done.stderr or "Thread 0x" in done.stderr  # faulthandler
    assert master.add("resnet/liveness/job/generation", 0) == 4  # the old group is fenced
