"""A network partition between two real network namespaces, and the link back up.

Two "hosts" (namespaces joined by one veth pair, 10.231.7.1 and .2), one launch/elastic.sh
agent each with its defaults for the store (node A's agent hosts it), loader workers on.
While both wait at step 3, B's link goes down: no FIN, no RST, the sockets stay open. A's
heartbeat names rank 1 silent and A trains alone; B's worker finds the store (or rank 0)
silent and leaves. The link comes back up: B writes nothing over A's run (it rejoins as a new node, or
its agent gives up), and the run finishes with each sample once per epoch.
"""
from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import nodes
import trainutil as tu

SUBNET = "10.231.7"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture()
def two_hosts():
    """{name: (namespace, interface, address)}; removed (with the veth pair) even on failure."""
    tag = uuid.uuid4().hex[:6]
    hosts = {"A": (f"rsA{tag}", f"va{tag}", f"{SUBNET}.1"),
             "B": (f"rsB{tag}", f"vb{tag}", f"{SUBNET}.2")}
    made = []
    try:
        for ns, _, _ in hosts.values():
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", hosts["A"][1], "type", "veth", "peer", "name", hosts["B"][1])
        for ns, dev, addr in hosts.values():
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (OSError, subprocess.SubprocessError) as exc:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        pytest.skip(f"network namespaces are not available here: {exc}")
    yield hosts
    for ns in made:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tu.shared_data(tmp_path_factory)


@pytest.mark.slow
def test_a_partitioned_node_is_left_behind_and_the_healed_one_harms_nothing(
        two_hosts, data, tmp_path):
    gates, run_dir, config, train = nodes.job(tmp_path, data, 2, *nodes.QUICK_DIST)
    (gates / "pause-at-3").touch()
    endpoint, job_id = f"{two_hosts['A'][2]}:{tu.free_port()}", f"p{tu.free_port()}"
    launches: dict[str, tu.Launch] = {}
    try:
        for name, (ns, dev, addr) in two_hosts.items():
            launches[name] = nodes.start_node(
                name, tmp_path, config, train, prefix=("ip", "netns", "exec", ns),
                RDZV_ENDPOINT=endpoint, RDZV_ID=job_id, LOCAL_ADDR=addr,
                # torchrun decides whether to host the store by the host name, which names
                # neither namespace's address: A is told so.
                GLOO_SOCKET_IFNAME=dev, RDZV_CONF=f"is_host={name == 'A'},{nodes.QUICK_RDZV}",
                RESNET_TEST_FAULT_GATES=str(gates))
            if name == "A":  # its agent hosts the store; B's must find it listening
                time.sleep(3)
        a, b = launches["A"], launches["B"]
        tu.wait_for(lambda: len(list(gates.glob("paused-at-3-rank-*"))) == 2,
                    tu.RUN_TIMEOUT_S, "both ranks at step 3", [a, b])
        assert set(nodes.workers(a)) == {0}, "A's agent (lower address) holds rank 0"

        ns_b, dev_b, _ = two_hosts["B"]
        _ip("-n", ns_b, "link", "set", dev_b, "down")  # the partition
        cut = time.monotonic()
        (gates / "pause-at-6").touch()
        (gates / "pause-at-3").unlink()
        detected = nodes.seconds_until(r"rank 1 \(host \S+\) has been silent for \d+ s", a,
                                       cut, 90)
        # B is cut off from the store and from rank 0 at once: it names whichever of the two
        # its watchdog finds silent first (on a busy machine, rank 0's beats may lag).
        nodes.seconds_until(r"rank 1 \(host \S+\): (the job store \S+ has not answered|rank 0 "
                            r"\(host \S+\) has been silent) for \d+ s.*; leaving the group", b,
                            cut, 90)
        alone = nodes.seconds_until(r"resumed from step-000000002: step 2, epoch 0, world "
                                    r"size 1", a, cut, tu.RUN_TIMEOUT_S)
        print(f"partition: detected after {detected:.0f} s, training alone after {alone:.0f} s")
        tu.wait_for(lambda: (gates / "paused-at-6-rank-0").exists(), tu.RUN_TIMEOUT_S,
                    "A alone at step 6", [a])

        _ip("-n", ns_b, "link", "set", dev_b, "up")  # healed
        (gates / "pause-at-6").unlink()
        assert a.wait(tu.RUN_TIMEOUT_S) == 0, a.tail()
        try:  # B rejoined and finished, or its agent gave up: either way it has ended
            b.wait(120)
        except AssertionError:
            pass
    finally:
        for launch in launches.values():
            launch.stop()
    audit = tu.read_audit(run_dir)
    assert list(audit) == list(range(1, 21))
    worlds = {step: len({rank for _, rank in recs}) for step, recs in audit.items()}
    assert worlds[3] == worlds[6] == 1, worlds  # after the partition: A alone
    code, report = tu.audit_command(run_dir)
    assert code == 0 and report.count(f"{tu.TRAIN_SAMPLES} distinct of {tu.TRAIN_SAMPLES}, "
                                      f"0 left out, 0 used twice") == 2, report
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert tu.trainer_state(run_dir / "checkpoints" / tu.latest(run_dir))["progress"]["step"] \
        == 20
    assert re.search(r"resumed from step-000000002: step 2, epoch 0, world size 1", a.output())
