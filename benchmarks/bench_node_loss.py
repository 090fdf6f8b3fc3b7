"""How long a node loss costs: detection, and training again at the smaller world size.

Two launch/elastic.sh agents on loopback (one worker each, the tests' tiny resnet18 data,
data.workers=2), everything else at its default: elastic.sh's torchrun settings (torch's last
call of 30 s, keep-alive 5 s x 3), dist.heartbeat_period_s=2, dist.heartbeat_timeout_s=30.
Both train to step 3 and wait there; then one node's whole process tree (launcher, agent,
worker, loader workers) is signalled, and the survivor's log is timed:

  kill         SIGKILL of the second node (the first hosts the c10d store, as by default)
  freeze       SIGSTOP of the second node (a power loss, a panic or a partition: no FIN)
  first-kill   SIGKILL of the first node, with launch/rendezvous.sh holding the store
  first-freeze SIGSTOP of the first node (it holds rank 0 and the group's store), same

detection: until the survivor's worker fails (kill: its collective's peer closed) or its
heartbeat names the silent rank (freeze); training: until it resumed at world size 1 (the
line rank 0 logs right before its first step). Median of --repeats runs per case.

    python benchmarks/bench_node_loss.py [--cases kill freeze first-kill] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import nodes  # noqa: E402  (the tests' node helpers: one place for them)
import trainutil as tu  # noqa: E402

DETECTED = {"kill": r"failed \(exitcode", "freeze": r"has been silent for|has not answered for"}
TRAINING = r"resumed from step-\d+: step \d+, epoch \d+, world size 1"
LIMIT_S = 400


def one_run(case: str, data: Path, root: Path) -> tuple[float, float]:
    gates, run_dir, config, train = nodes.job(root, data, 3)
    (gates / "pause-at-3").touch()
    service = None
    env = dict(RDZV_ID=f"b{tu.free_port()}", RESNET_TEST_FAULT_GATES=str(gates),
               MAX_RESTARTS="3")  # elastic.sh's default
    if case.startswith("first-"):
        service, rdzv = nodes.start_rendezvous(root)
        env.update(rdzv)
    else:
        env.update(RDZV_ENDPOINT=f"127.0.0.1:{tu.free_port()}")
    launches = {}
    try:
        launches["A"] = nodes.start_node("A", root, config, train, **env)
        if service is None:  # the first agent hosts the store: the second needs it up
            host, port = env["RDZV_ENDPOINT"].split(":")
            tu.wait_for(lambda: _listening(int(port)), 120, "the c10d store", [launches["A"]])
        launches["B"] = nodes.start_node("B", root, config, train, **env)
        tu.wait_for(lambda: len(list(gates.glob("paused-at-3-rank-*"))) == 2, LIMIT_S,
                    "both ranks at step 3", list(launches.values()))
        lost, survivor = (("A", "B") if case.startswith("first-") else ("B", "A"))
        kind = "freeze" if case.endswith("freeze") else "kill"
        offset = len(launches[survivor].output())
        procs = nodes.tree(launches[lost])
        start = time.monotonic()
        nodes.signal_tree(procs, signal.SIGSTOP if kind == "freeze" else signal.SIGKILL)
        (gates / "pause-at-3").unlink()

        def seconds(pattern: str) -> float:
            tu.wait_for(lambda: re.search(pattern, launches[survivor].output()[offset:]),
                        LIMIT_S, f"/{pattern}/", [launches[survivor]])
            return time.monotonic() - start

        return seconds(DETECTED[kind]), seconds(TRAINING)
    finally:
        for launch in launches.values():
            nodes.kill_tree(launch)
        if service is not None:
            service.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["kill", "freeze", "first-kill"],
                        choices=["kill", "freeze", "first-kill", "first-freeze"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(tu.REPO))
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}, "
          f"python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = tu.make_data(Path(tmp) / "data")
        rows = []
        for case in args.cases:
            runs = [one_run(case, data, Path(tempfile.mkdtemp(dir=tmp)))
                    for _ in range(args.repeats)]
            for detect, train in runs:
                print(f"{case}: detected {detect:.1f} s, training at world size 1 "
                      f"{train:.1f} s", flush=True)
            rows.append((case, statistics.median(r[0] for r in runs),
                         statistics.median(r[1] for r in runs)))
    print(f"\n| case | detection (s) | training again (s) |  (median of {args.repeats})")
    print("|---|---|---|")
    for case, detect, train in rows:
        print(f"| {case} | {detect:.0f} | {train:.0f} |")


if __name__ == "__main__":
    main()
