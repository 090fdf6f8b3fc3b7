"""Helpers for tests (and benchmarks/bench_node_loss.py) that play nodes with launch/elastic.sh
agents on one machine: the rendezvous service, a node's whole process tree (launcher, agent,
worker, loader workers) to freeze, thaw or kill by id, and the workers' ranks."""
from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psutil

import trainutil as tu

ELASTIC = tu.REPO / "launch" / "elastic.sh"
RENDEZVOUS = tu.REPO / "launch" / "rendezvous.sh"
# What the tests shorten (they are not about torch's defaults; benchmarks/bench_node_loss.py
# measures those): detection in 5 s, a last call of 2 s, an agent's keep-alive lost in 3 s.
QUICK_DIST = ["dist.heartbeat_period_s=0.5", "dist.heartbeat_timeout_s=5"]
QUICK_RDZV = "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=120"


def job(root: Path, data: Path, epochs: int, *more: str) -> tuple[Path, Path, Path, list[str]]:
    """(gates, run_dir, config, train overrides) of a job on the tiny data, loader workers on,
    a checkpoint every 2 steps."""
    gates, run_dir, config = root / "gates", root / "run", root / "elastic.yaml"
    gates.mkdir()
    config.write_text("seed: 0\n")
    train = tu.overrides(data, run_dir, f"train.epochs={epochs}", "checkpoint.every_steps=2",
                         "data.workers=2", *more, val=False)
    return gates, run_dir, config, train


def start_rendezvous(tmp: Path) -> tuple[tu.Launch, dict[str, str]]:
    """launch/rendezvous.sh on a free port; returns it and the environment its first line gives."""
    launch = tu.Launch(["bash", str(RENDEZVOUS), str(tu.free_port())], tmp / "rendezvous.txt",
                       RDZV_HOST="127.0.0.1")
    found: dict[str, str] = {}

    def first_line() -> bool:
        lines = launch.output().splitlines()[1:]  # after the "$ command" line Launch writes
        if lines:
            found.update(item.split("=", 1) for item in lines[0].split())
        return bool(lines)

    tu.wait_for(first_line, 60, "the rendezvous service's first line", [launch])
    return launch, found


def start_node(name: str, tmp: Path, config: Path, train: list[str], prefix: tuple = (),
               **env: str) -> tu.Launch:
    """One node: launch/elastic.sh with one worker, MIN_NODES=1, MAX_NODES=2, and restarts to
    spare (each loss and each fenced rank spends one)."""
    settings = dict(MIN_NODES="1", MAX_NODES="2", NPROC_PER_NODE="1", MAX_RESTARTS="6")
    return tu.Launch([*prefix, "bash", str(ELASTIC), str(config), *train], tmp / f"{name}.txt",
                     **{**settings, **env})


def tree(launch: tu.Launch) -> list[psutil.Process]:
    """The node's processes: its launcher and every descendant (torchrun's workers sit in
    sessions of their own but are still its children)."""
    try:
        root = psutil.Process(launch.proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def signal_tree(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def workers(launch: tu.Launch) -> dict[int, psutil.Process]:
    """The node's training ranks, {RANK: process}: the agent's children (elastic.sh and
    `ip netns exec` exec, so the launcher's pid is torchrun's)."""
    out = {}
    try:
        children = psutil.Process(launch.proc.pid).children()
    except psutil.NoSuchProcess:
        return out
    for proc in children:
        try:
            environ = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in environ:
            out[int(environ["RANK"])] = proc
    return out


def stopped_worker(launch: tu.Launch) -> psutil.Process | None:
    for proc in workers(launch).values():
        try:
            if proc.status() == psutil.STATUS_STOPPED:
                return proc
        except psutil.NoSuchProcess:
            continue
    return None


def seconds_until(pattern: str, launch: tu.Launch, since: float, timeout: float,
                  others=()) -> float:
    """Seconds from `since` (monotonic) until `launch`'s log matches `pattern`."""
    tu.wait_for(lambda: re.search(pattern, launch.output()) is not None, timeout,
                f"/{pattern}/ in {launch.log.name}", [launch, *others])
    return time.monotonic() - since


def kill_tree(launch: tu.Launch) -> None:
    """SIGKILL the node's whole tree by id, as a power loss would end it."""
    procs = tree(launch)
    signal_tree(procs, signal.SIGCONT)  # (a frozen one included)
    signal_tree(procs, signal.SIGKILL)
    tu.kill_tagged(launch.tag)
    launch.proc.wait(timeout=30)
