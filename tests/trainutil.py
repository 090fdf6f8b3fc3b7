"""Helpers for the multi-process training tests: tiny data, bounded launches, audit reading.

Every launch is a subprocess in its own session with a timeout; every process a test starts
carries a unique RESNET_TEST_TAG in its environment, so `kill_tagged` can end exactly those
(torchrun starts its workers in sessions of their own, out of reach of a process-group kill).
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from resnet.cli import main as cli_main
from resnet.train import audit

REPO = Path(__file__).resolve().parents[1]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 40, 8
TRAIN_SAMPLES = CLASSES * TRAIN_PER_CLASS  # 160: 10 steps of global batch 16
BATCH = 8
# A hang guard, not a speed bound: the suite runs on 4 xdist workers on 2 cores, and must pass
# beside another copy of itself (a few minutes a run at worst).
RUN_TIMEOUT_S = 480
# Tiny and deterministic: resnet18 at 32 px on 40x32 images, fp32, no workers, no W&B.
TINY = ["model.arch=resnet18", "model.channels_last=false", "data.image_size=32",
        "data.workers=0", f"train.batch_size={BATCH}", "train.precision=fp32",
        "train.label_smoothing=0", "train.log_every_steps=5", "optim.schedule=onecycle",
        "optim.lr=0.4", "checkpoint.every_minutes=0", "wandb.mode=disabled",
        "audit.sample_keys=true"]

# Faults are injected from outside the product by tests/fault_shim/sitecustomize.py, which
# every launch puts first on PYTHONPATH (a no-op unless a RESNET_TEST_FAULT_* variable is set).
SHIM = REPO / "tests" / "fault_shim"
FAULT_VARS = ("RESNET_TEST_FAULT_AFTER_STEP", "RESNET_TEST_FAULT_IN_CHECKPOINT",
              "RESNET_TEST_FAULT_HOLD", "RESNET_TEST_FAULT_RANK", "RESNET_TEST_FAULT_GATES",
              "RESNET_TEST_WANDB_FAULT", "RESNET_TEST_SAVE_AFTER_RESUME",
              "RESNET_TEST_FAULT_INF_GRAD_AT_STEP", "RESNET_TEST_FAULT_ENOSPC_AT_STEP",
              "RESNET_TEST_FAULT_DISK_FREE", "RESNET_TEST_FAULT_STOP_AT_FENCE",
              "RESNET_TEST_FAULT_ENOSPC_INSIDE")
LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID",
                 "GROUP_RANK", "ROLE_RANK", "ACCELERATE_USE_DEEPSPEED")


def make_data(root: Path, train_per_class: int = TRAIN_PER_CLASS,
              val_per_class: int = VAL_PER_CLASS) -> Path:
    """Generate and pack the tiny labelled set once: 8 train shards of 20, 2 val shards."""
    from resnet.data import synthetic
    from resnet.data.pack import PackOptions, pack

    src, packed = root / "src", root / "data"
    synthetic.write_imagefolder(src, CLASSES, {"train": train_per_class, "val": val_per_class},
                                size=(40, 32), seed=0)
    pack(str(src), str(packed), "imagefolder", PackOptions(samples_per_shard=20, workers=1),
         progress=False, log=lambda *a, **k: None)
    return packed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(tag: str, **extra: str) -> dict:
    """A clean environment: one thread per process, no launcher or fault variables leaking in."""
    e = {k: v for k, v in os.environ.items() if k not in FAULT_VARS + LAUNCHER_VARS}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             WANDB_MODE="disabled", RESNET_TEST_TAG=tag,
             PYTHONPATH=os.pathsep.join([str(SHIM), str(REPO)]))
    e.update({k: str(v) for k, v in extra.items()})
    return e


def overrides(data: Path, run_dir: Path, *more: str, val: bool = True) -> list[str]:
    return [f"data.train={data}", f"data.val={data}" if val else "data.val=",
            f"run.dir={run_dir}",
            *TINY, *more]


def shipped_json_overrides(data: Path, run_dir: Path, name: str, *more: str,
                           val: bool = True) -> list[str]:
    """`overrides` that run configs/deepspeed/NAME.json as written: without TINY's
    train.precision (the JSON's torch_autocast sets bf16; another value would be an error)."""
    json_file = REPO / "configs" / "deepspeed" / f"{name}.json"
    return [a for a in overrides(data, run_dir, f"deepspeed.config_file={json_file}", *more,
                                 val=val) if not a.startswith("train.precision=")]


def assert_shipped_json_ran(run_dir: Path, out: str, stage: int, shards: int) -> None:
    """configs/deepspeed/zeroSTAGE.json ran as written: DeepSpeed itself reports the stage and
    bf16; every checkpoint holds the model states, `shards` per-rank optimizer shards and the
    stage; config.yaml says bf16 and the stage."""
    import yaml

    assert f"engine: DeepSpeed ZeRO-{stage}, precision bf16" in out, out[-4000:]
    for name in checkpoints(run_dir):
        step = run_dir / "checkpoints" / name
        model = step / "pytorch_model"
        assert (model / "mp_rank_00_model_states.pt").is_file(), name
        assert sorted(p.name for p in model.glob("zero_pp_rank_*optim_states.pt")) == [
            f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(shards)], name
        assert trainer_state(step)["progress"]["zero_stage"] == stage
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["train"]["precision"], saved["deepspeed"]["zero_stage"]) == ("bf16", stage)


def torchrun_cmd(nproc: int, *train_args: str, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
            "--monitor-interval", "0.5", "-m", "resnet", "train", *train_args]


def resnet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "resnet", *args]


class Launch:
    """A subprocess in its own session, output to a log file, ended for sure on `stop`."""

    def __init__(self, cmd: list[str], log: Path, **extra_env: str) -> None:
        self.tag = uuid.uuid4().hex
        self.log = log
        self.cmd = cmd
        self.started = time.monotonic()
        with open(log, "ab") as out:
            out.write(f"$ {' '.join(cmd)}\n".encode())
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env=env(self.tag, **extra_env), cwd=REPO,
                                         start_new_session=True)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"timed out after {timeout} s: {self.cmd}\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM the launcher (it passes it on), then SIGKILL whatever is left of the run."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        kill_tagged(self.tag)
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def signal_group(self, sig: int) -> None:
        """`sig` to the launcher's whole process group, as a terminal's Ctrl-C, srun or
        `kill -TERM -PGID` send it (its loader workers get it too)."""
        os.killpg(self.proc.pid, sig)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return self.output()[-n:]


def run(cmd: list[str], log: Path, timeout: float = RUN_TIMEOUT_S, **extra_env: str):
    """Run to completion (bounded); returns (exit code, this run's output)."""
    before = log.stat().st_size if log.exists() else 0
    launch = Launch(cmd, log, **extra_env)
    try:
        code = launch.wait(timeout)
    finally:
        launch.stop()
    return code, log.read_text(errors="replace")[before:]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tagged(tag: str) -> list[int]:
    """The live processes whose environment carries RESNET_TEST_TAG=tag (ours only)."""
    needle, pids = f"RESNET_TEST_TAG={tag}".encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment carries RESNET_TEST_TAG=tag (ours only)."""
    for pid in tagged(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


def wait_for(predicate, timeout: float, what: str, launches=()) -> None:
    """Poll (bounded); fail early if a launch ended meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for launch in launches:
            if launch.proc.poll() is not None:
                raise AssertionError(f"ended (code {launch.proc.returncode}) while waiting for "
                                     f"{what}\n{launch.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.1)


# ------------------------------------------------------------------------------ run folders


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_bit_identical(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"


def resumed_from(output: str) -> list[str]:
    return re.findall(r"resumed from (step-\d+)", output)


def steps_of(audit_file: Path) -> list[int]:
    """The steps one rank of one start trained (its audit file), in order."""
    return sorted({json.loads(line)["step"] for line in audit_file.read_text().splitlines()})


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ audit


read_audit = audit.read_audit


def audit_command(*run_dirs: Path) -> tuple[int, str]:
    """`resnet audit RUN_DIR...` through the CLI's entry point in this process (the command's
    interpreter start is not what the training tests check): exit code and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = cli_main(["audit", *map(str, run_dirs)])
    return code, printed.getvalue()


def assert_each_sample_once(run_dir: Path, epochs: int) -> None:
    """What users run to prove it: `resnet audit` finds every sample once in every epoch."""
    code, report = audit_command(run_dir)
    assert code == 0, report
    assert report.count(f"{TRAIN_SAMPLES} distinct of {TRAIN_SAMPLES}, 0 left out, "
                        f"0 used twice") == epochs, report


def keys_of(audit: dict, steps) -> list[str]:
    """Every key the given steps trained on, in (step, rank, micro) order."""
    out: list[str] = []
    for step in steps:
        for _, rec in sorted(audit[step].items(), key=lambda kv: (kv[0][1], kv[0][0])):
            out.extend(rec["keys"])
    return out


def epoch_steps(audit: dict, epoch: int) -> list[int]:
    return [s for s, recs in audit.items() if any(r["epoch"] == epoch for r in recs.values())]


def train_keys(data: Path) -> set[str]:
    """Every train key of the packed set, read from the shards."""
    import tarfile

    keys = set()
    for shard in sorted(data.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            keys.update(m.name.rsplit(".", 1)[0] for m in tar.getmembers())
    return keys


# ------------------------------------------------------------------------------ shared runs

# The loader as production runs it (data.workers defaults to 4): worker processes from the
# forkserver, in the trainer's process group. Fault tests use it unless they are about
# something else on purpose; TINY's 0 keeps the other tests light.
LOADER_WORKERS = "data.workers=2"
# The uninterrupted reference: 2 processes, 2 epochs of 10 steps, a checkpoint every 4 steps
# (kept: 12, 16, 20). The fault tests run the same command and compare against it.
BASELINE = ["train.epochs=2", "checkpoint.every_steps=4", LOADER_WORKERS]
_SHARED: dict = {}


def _session_folder(tmp_path_factory) -> Path:
    """The folder all of this session's pytest-xdist workers share (each worker's own temp
    folder is one of its children); without xdist, the session's temp folder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once_per_session(tmp_path_factory, name: str, make) -> dict:
    """`make(folder) -> dict` (JSON) run once per test session, whichever xdist worker asks
    first (the others wait on the lock and read its result): the data set and the baseline
    run are made once for the whole suite, not once per worker."""
    if name not in _SHARED:
        folder = _session_folder(tmp_path_factory) / f"shared-{name}"
        folder.mkdir(exist_ok=True)
        with open(folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = folder / "result.json"
            if not done.exists():
                done.write_text(json.dumps(make(folder)))
        _SHARED[name] = json.loads(done.read_text())
    return _SHARED[name]


def shared_data(tmp_path_factory) -> Path:
    """Generated and packed once per test session (every multi-process module uses it)."""
    made = once_per_session(tmp_path_factory, "traindata",
                            lambda folder: {"data": str(make_data(folder))})
    return Path(made["data"])


def baseline_run(tmp_path_factory):
    """(data, run_dir, exit code, output) of the uninterrupted 2-process run, run once."""
    data = shared_data(tmp_path_factory)
    run_dir, code, out = shared_run(
        tmp_path_factory, "baseline",
        lambda run_dir: torchrun_cmd(2, *overrides(data, run_dir, *BASELINE)))
    return data, run_dir, code, out

def shared_run(tmp_path_factory, name: str, cmd, timeout: float = RUN_TIMEOUT_S,
               **extra_env: str):
    """(run_dir, exit code, output) of `cmd(run_dir)`, run once per test session for the
    several tests that check its artifacts."""
    def make(folder: Path) -> dict:
        run_dir = folder / "run"
        code, out = run(cmd(run_dir), folder / "log.txt", timeout, **extra_env)
        return {"run_dir": str(run_dir), "code": code, "out": out}

    made = once_per_session(tmp_path_factory, name, make)
    return Path(made["run_dir"]), made["code"], made["out"]
