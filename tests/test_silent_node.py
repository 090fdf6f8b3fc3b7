"""A node that goes silent without closing its sockets, thaws, and the first node lost.

Two launch/elastic.sh agents on loopback with the rendezvous service of launch/rendezvous.sh,
loader workers on (the forkserver, data.workers=2). One run proves, in order:

1. the node of rank 0 (the first started: ranks follow the agents' process ids on one host)
   freezes between a checkpoint's last collective and its publication (its worker stops
   itself at the fence; the test SIGSTOPs the rest of its tree): the other node names rank 0
   as silent, leaves, and trains alone from the previous checkpoint;
2. thawed, the frozen rank 0 finds itself fenced and leaves without publishing: no stale
   step-4 checkpoint, `latest` unchanged; its agent rejoins and the job grows back to 2;
3. the first node is then SIGKILLed (tree and all): the other finishes alone, its rendezvous
   store intact;
and every sample is used once per epoch.
"""
from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

import nodes
import trainutil as tu

DETECT_LIMIT_S = 90  # detection with dist.heartbeat_timeout_s=5, on a loaded 2-core machine


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tu.shared_data(tmp_path_factory)


def _gate(gates: Path, step: int, on: bool) -> None:
    if on:
        (gates / f"pause-at-{step}").touch()
    else:
        (gates / f"pause-at-{step}").unlink(missing_ok=True)


def _paused(gates: Path, step: int, ranks: int) -> bool:
    return len(list(gates.glob(f"paused-at-{step}-rank-*"))) >= ranks


@pytest.mark.slow
def test_frozen_first_node_is_left_fenced_rejoins_then_killed(data, tmp_path):
    gates, run_dir, config, train = nodes.job(tmp_path, data, 2, *nodes.QUICK_DIST)
    service, rdzv = nodes.start_rendezvous(tmp_path)
    launches: dict[str, tu.Launch] = {}
    try:
        env = dict(rdzv, RDZV_CONF=f"{rdzv['RDZV_CONF']},{nodes.QUICK_RDZV}",
                   RDZV_ID=f"t{tu.free_port()}", RESNET_TEST_FAULT_GATES=str(gates),
                   RESNET_TEST_FAULT_STOP_AT_FENCE="publishing checkpoint step-000000004",
                   RESNET_TEST_FAULT_RANK="0")
        for name in "AB":
            launches[name] = nodes.start_node(name, tmp_path, config, train, **env)
        a, b = launches["A"], launches["B"]

        # 1. rank 0 stops itself at the fence before publishing step 4; freeze its node.
        stopped: dict = {}
        tu.wait_for(lambda: stopped.update(
            (n, w) for n, l in launches.items() if (w := nodes.stopped_worker(l))) or stopped,
            tu.RUN_TIMEOUT_S, "rank 0 frozen before publishing step 4", [a, b])
        assert list(stopped) == ["A"], "ranks follow the agents' pids: A holds rank 0"
        _gate(gates, 3, True)  # the survivor, alone from step 2, waits before step 4
        frozen = nodes.tree(a)
        nodes.signal_tree(frozen, signal.SIGSTOP)
        t_freeze = time.monotonic()
        detected = nodes.seconds_until(r"rank 0 \(host \S+\) has been silent for \d+ s", b,
                                       t_freeze, DETECT_LIMIT_S)
        alone = nodes.seconds_until(r"resumed from step-000000002: step 2, epoch 0, world "
                                    r"size 1", b, t_freeze, tu.RUN_TIMEOUT_S)
        print(f"frozen rank 0: detected after {detected:.0f} s, training alone after "
              f"{alone:.0f} s")
        tu.wait_for(lambda: _paused(gates, 3, 1), tu.RUN_TIMEOUT_S, "B alone at step 3", [b])

        # 2. thawed: rank 0 leaves (its fence, or its watchdog on waking, sees the lease
        # long expired) without publishing; nothing of it reaches run_dir.
        nodes.signal_tree(frozen, signal.SIGCONT)
        nodes.seconds_until(r"rank 0 \(host \S+\): .*leaving the group", a, time.monotonic(), 60)
        tu.wait_for(lambda: not any(p.is_running() and p.status() != "zombie"
                                    for p in stopped.values()), 30, "the fenced rank's exit")
        assert not (run_dir / "checkpoints" / "step-000000004").exists()
        assert tu.latest(run_dir) == "step-000000002"
        _gate(gates, 12, True)
        # Its agent joins as a new node: B's worker is stopped (at the gate, or past it on a
        # loaded machine where the rejoin outlasts the gate's 120 s) and the job resumes at 2.
        tu.wait_for(lambda: re.search(r"resumed from step-\d+: step \d+, epoch 0, "
                                      r"world size 2", a.output() + b.output()),
                    tu.RUN_TIMEOUT_S, "the job back at world size 2", [a, b])
        _gate(gates, 3, False)

        # 3. both at step 12: SIGKILL the first node's whole tree.
        tu.wait_for(lambda: _paused(gates, 12, 2), tu.RUN_TIMEOUT_S, "both at step 12", [a, b])
        nodes.kill_tree(a)
        _gate(gates, 12, False)
        assert b.wait(tu.RUN_TIMEOUT_S) == 0, b.tail()
    finally:
        for launch in launches.values():
            nodes.signal_tree(nodes.tree(launch), signal.SIGCONT)
            launch.stop()
        service.stop()
    out = b.output()
    assert re.search(r"resumed from step-000000012: step 12, epoch 1, world size 1", out), \
        out[-4000:]
    audit = tu.read_audit(run_dir)
    assert list(audit) == list(range(1, 21))
    worlds = {step: len({rank for _, rank in recs}) for step, recs in audit.items()}
    assert worlds[1] == 2 and worlds[13] == worlds[20] == 1, worlds
    code, report = tu.audit_command(run_dir)
    assert code == 0 and report.count(f"{tu.TRAIN_SAMPLES} distinct of {tu.TRAIN_SAMPLES}, "
                                      f"0 left out, 0 used twice") == 2, report
    assert (run_dir / "final" / "model.safetensors").is_file()
