"""Where the test suite's time goes: its CPU-seconds by the kind of process that spent them.

    python benchmarks/suite_cpu.py [--json FILE] [-- PYTEST_ARGS...]

Runs `python -m pytest -q` (the README's test command; PYTEST_ARGS replace `-q`) and prints
its wall time, the CPU-seconds of every process it started, with the share of the cores that
is, and a table by kind of process: training processes, torchrun and Accelerate agents, the
loader's fork servers and their workers, pytest's own workers (the in-process tests), W&B's
service, ...

On a machine the suite keeps busy throughout, wall time is CPU-seconds over cores, so the
table says what a faster suite has to remove. pytest's `--durations` cannot say it: a test's
time there includes waiting for other tests' processes, and processes nobody waits for (the
fork servers, started by each training process with loader workers, outlive it briefly and
are reparented) are counted nowhere.

How it counts: this process makes itself the child subreaper (prctl), so every process the
suite starts, orphaned or not, stays its descendant and is reaped here; the total is then
exact (getrusage of the reaped children). The table is sampled: every 0.25 s each live
descendant's CPU time is read, and its kind is told from its command line; the CPU of
processes shorter than a sample, and of each one's last fraction of a second, is the
"unsampled" row. Processes still running 60 s after pytest exits are listed (a leak).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

PR_SET_CHILD_SUBREAPER = 36
SAMPLE_S = 0.25
REAP_WAIT_S = 60
PYTEST_WORKER = "import sys;exec(eval(sys.stdin.readline()))"  # how pytest-xdist starts one


def kind(cmdline: list[str], parent_kind: str | None) -> str:
    """The kind of process a command line belongs to (the table's rows)."""
    text = " ".join(cmdline)
    if "multiprocessing.forkserver" in text:
        # The server's DataLoader workers are forks of it, with its command line.
        return "loader worker" if parent_kind == "loader fork server" else "loader fork server"
    if "torch.distributed.run" in text or any(Path(a).name == "torchrun" for a in cmdline[:2]):
        return "torchrun agent"
    if "accelerate.commands.launch" in text or "accelerate launch" in text:
        return "accelerate agent"
    if PYTEST_WORKER in text:
        return "pytest worker (in-process tests)"
    if "pytest" in cmdline[1:3] or any(Path(a).name == "pytest" for a in cmdline[:2]):
        return "pytest main"
    for i, arg in enumerate(cmdline):
        if (arg == "resnet.cli" or Path(arg).name == "resnet") and i + 1 < len(cmdline):
            sub = cmdline[i + 1]
            return "training process" if sub == "train" else f"resnet {sub}"
        if arg.endswith(".py") and i <= 2:
            return f"script {Path(arg).name}"
    name = Path(cmdline[0]).name if cmdline else "?"
    if name.startswith("wandb"):
        return "W&B service"
    if "chrom" in text:
        return "browser (demo test)"
    return f"other: {name}"


class Sampler(threading.Thread):
    """Reads each live descendant's CPU time every SAMPLE_S; keeps the last reading."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.me = psutil.Process()
        self.cpu: dict[tuple[int, float], float] = {}
        self.kinds: dict[tuple[int, float], str] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(SAMPLE_S)

    def sample(self) -> None:
        kinds_by_pid = {}
        for proc in sorted(self.me.children(recursive=True), key=lambda p: p.pid):
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    times = proc.cpu_times()
                    if key not in self.kinds:
                        parent = kinds_by_pid.get(proc.ppid())
                        self.kinds[key] = kind(proc.cmdline(), parent)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            kinds_by_pid[proc.pid] = self.kinds[key]
            self.cpu[key] = times.user + times.system

    def table(self) -> dict[str, tuple[int, float]]:
        rows: dict[str, list] = defaultdict(lambda: [0, 0.0])
        for key, seconds in self.cpu.items():
            rows[self.kinds[key]][0] += 1
            rows[self.kinds[key]][1] += seconds
        return {k: (n, s) for k, (n, s) in rows.items()}


def reap_all(deadline_s: float) -> list[str]:
    """Wait for every remaining descendant (reparented here) to end; the ones still running
    at the deadline, as 'pid command'."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return []
        if pid == 0:
            time.sleep(0.2)
    left = []
    for proc in psutil.Process().children(recursive=True):
        try:
            left.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            continue
    return left


def report(wall: float, total: float, rows: dict, left: list[str], cores: int) -> str:
    sampled = sum(s for _, s in rows.values())
    lines = [f"wall {wall:.0f} s on {cores} cores; CPU {total:,.0f} s "
             f"({total / (wall * cores):.0%} of the cores)",
             "", "| processes | count | CPU-s | each | share |", "|---|---:|---:|---:|---:|"]
    for name, (count, seconds) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        if seconds >= 0.5:
            lines.append(f"| {name} | {count} | {seconds:,.0f} | {seconds / count:.2f} | "
                         f"{seconds / total:.0%} |")
    lines.append(f"| unsampled (short processes, last ticks) | | {total - sampled:,.0f} | | "
                 f"{(total - sampled) / total:.0%} |")
    lines += ["", f"at full use of {cores} cores this is {total / cores:.0f} s of wall time; "
              f"8 minutes on {cores} cores is {480 * cores:,} CPU-s"]
    lines.append("still running after pytest: " + ("; ".join(left) if left else "none"))
    return "\n".join(lines)


def become_subreaper() -> None:
    """Orphaned descendants are reparented to this process instead of init (Linux 3.4+)."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None:
        sys.exit("suite_cpu: no prctl here: it needs Linux (PR_SET_CHILD_SUBREAPER)")
    if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(f"suite_cpu: prctl(PR_SET_CHILD_SUBREAPER) failed: "
                 f"{os.strerror(ctypes.get_errno())}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments (-q)")
    args = parser.parse_args()
    pytest_args = args.pytest_args or ["-q"]
    if args.json and not args.json.parent.is_dir():  # found out now, not after the suite ran
        sys.exit(f"suite_cpu: --json {args.json}: no folder {args.json.parent}")
    become_subreaper()
    sampler = Sampler()
    start = time.monotonic()
    pytest = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args])
    sampler.start()
    code = pytest.wait()
    wall = time.monotonic() - start
    left = reap_all(REAP_WAIT_S)  # the sampler reads the late ones meanwhile
    sampler.done.set()
    sampler.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    rows = sampler.table()
    cores = os.cpu_count() or 1
    print("\n== suite_cpu: python -m pytest " + " ".join(pytest_args))
    print(report(wall, total, rows, left, cores))
    own = resource.getrusage(resource.RUSAGE_SELF)
    print(f"this benchmark's own sampling: {own.ru_utime + own.ru_stime:.0f} CPU-s (not in the "
          f"total)")
    if args.json:
        args.json.write_text(json.dumps({
            "pytest_exit": code, "wall_s": wall, "cpu_s": total, "cores": cores,
            "rows": {k: {"processes": n, "cpu_s": s} for k, (n, s) in rows.items()},
            "still_running": left}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
