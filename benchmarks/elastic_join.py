"""How long a node joining a running elastic job takes to bring it to the larger world size.

    python benchmarks/elastic_join.py [--repeats 3] [--out DIR]

On localhost, two torchrun agents started with launch/elastic.sh play the nodes (one worker
each, CPU, gloo, tiny ResNet-18 at 32 px on generated data). Agent A trains alone; once it has
written a checkpoint, agent B starts, and the figure is the time from B's start to the log line
in which rank 0 resumes at world size 2 (B's rendezvous, the restart of A's worker, both
processes' start-up, the resume). Prints each repeat and the median, with the machine.

tests/test_elastic.py proves that joins happen (and at which step); this prints how long they
take, which depends on the machine and its load, so it is a figure and not a test assertion.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from resnet.data import synthetic
from resnet.data.pack import PackOptions, pack
from resnet.envinfo import cpu_model

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # per wait; a join that takes longer is reported as a failure
TRAIN = ["model.arch=resnet18", "model.channels_last=false", "data.image_size=32",
         "data.workers=0", "train.batch_size=8", "train.precision=fp32", "train.epochs=100",
         "checkpoint.every_steps=2", "checkpoint.every_minutes=0", "wandb.mode=disabled",
         "data.val="]


def make_data(root: Path) -> Path:
    synthetic.write_imagefolder(root / "src", 4, {"train": 40}, size=(40, 32), seed=0)
    pack(str(root / "src"), str(root / "data"), "imagefolder",
         PackOptions(samples_per_shard=20, workers=1), progress=False, log=lambda *a, **k: None)
    return root / "data"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agent(run_dir: Path, data: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               PYTHONPATH=str(REPO), MIN_NODES="1", MAX_NODES="2", NPROC_PER_NODE="1",
               MAX_RESTARTS="3", RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID=f"bench{port}",
               RDZV_CONF="join_timeout=120,last_call_timeout=2,keep_alive_interval=1,"
                         "keep_alive_max_attempt=3")
    config = run_dir.parent / "elastic.yaml"
    config.write_text("seed: 0\n")
    with open(log, "ab") as out:
        return subprocess.Popen(["bash", str(REPO / "launch" / "elastic.sh"), str(config),
                                 f"data.train={data}", f"run.dir={run_dir}", *TRAIN],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)


def stop(agent: subprocess.Popen) -> None:
    """The agent and everything under it: torchrun starts workers in sessions of their own."""
    try:
        tree = psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for proc in [*tree, agent]:
        try:
            proc.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    agent.wait(timeout=30)


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {what} within {TIMEOUT_S} s")
        time.sleep(0.2)


def one_join(root: Path, data: Path) -> float:
    root.mkdir(parents=True)
    run_dir, port = root / "run", free_port()
    a = start_agent(run_dir, data, port, root / "a.txt")
    b = None
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "latest").is_file(), "first checkpoint")
        started = time.monotonic()
        b = start_agent(run_dir, data, port, root / "b.txt")
        resumed = re.compile(r"resumed from step-\d+: step \d+, epoch \d+, world size 2")
        wait_for(lambda: resumed.search((root / "a.txt").read_text(errors="replace")
                                        + (root / "b.txt").read_text(errors="replace")),
                 "resume at world size 2")
        return time.monotonic() - started
    finally:
        for agent in (b, a):
            if agent is not None:
                stop(agent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="keep the logs here (default: a temporary directory)")
    args = parser.parse_args()
    print(f"# {os.cpu_count()} cores, {cpu_model()}, load average "
          f"{os.getloadavg()[0]:.1f}; Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        data = make_data(root / "data")
        seconds = []
        for i in range(args.repeats):
            seconds.append(one_join(root / f"join-{i}", data))
            print(f"join {i + 1}: world size 2 after {seconds[-1]:.1f} s", flush=True)
    print(f"median join: {statistics.median(seconds):.1f} s over {len(seconds)}")


if __name__ == "__main__":
    main()
