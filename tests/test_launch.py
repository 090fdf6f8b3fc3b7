"""Launch scripts: dry runs print the exact command, missing variables fail, SLURM requeues."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
LIB = LAUNCH / "lib.sh"  # sourced by the scripts, not run
SCRIPTS = sorted(p for p in LAUNCH.glob("*.sh") if p != LIB) + [LAUNCH / "slurm.sbatch"]
# Variables the scripts read; cleared so the caller's environment cannot leak into a test.
SCRIPT_VARS = ("NUM_GPUS", "ACCELERATE_CONFIG", "MAIN_PORT", "MAIN_ADDR", "NUM_MACHINES",
               "MACHINE_RANK", "GPUS_PER_NODE", "MIN_NODES", "MAX_NODES", "NPROC_PER_NODE",
               "MAX_RESTARTS", "RDZV_ENDPOINT", "RDZV_ID", "SLURM_JOB_ID", "SLURM_NNODES",
               "SLURM_JOB_NODELIST", "SLURM_GPUS_ON_NODE", "CONFIG", "CHECKPOINT_MIRROR",
               "REPO_URL", "EBS_DEVICE", "EBS_VOLUME_ID", "TRAIN_OVERRIDES", "DATA_TRAIN",
               "DATA_VAL", "WANDB_API_KEY", "DRY_RUN")


@pytest.fixture
def config(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text("train:\n  epochs: 1\n")
    return str(path)


def _run(script, *args, dry=True, path_prepend=None, **env):
    full = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    if dry:
        full["DRY_RUN"] = "1"
    if path_prepend:
        full["PATH"] = f"{path_prepend}:{full['PATH']}"
    full.update(env)
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=full, capture_output=True,
                          text=True, timeout=30)


def _command(result) -> list[str]:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return shlex.split(lines[0])


def _fake(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text("#!/usr/bin/env bash\n" + body)
    exe.chmod(0o755)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS), str(LIB)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_help(script):
    result = _run(script, "-h", dry=False)
    assert result.returncode == 0 and "Usage:" in result.stdout


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh", "elastic.sh",
                                    "slurm.sbatch"])
def test_missing_config_and_bad_override(script, config):
    result = _run(script)
    assert result.returncode != 0 and "missing CONFIG" in result.stderr
    result = _run(script, "nope.yaml")
    assert result.returncode != 0 and "config file not found: nope.yaml" in result.stderr
    result = _run(script, config, "--epochs", NUM_GPUS="2", GPUS_PER_NODE="2", NPROC_PER_NODE="2")
    assert result.returncode != 0 and "'--epochs' is not of the form key=value" in result.stderr


def test_single_node_dry_run(config):
    cmd = _command(_run("single_node.sh", config, "train.epochs=10", "run.name=a b",
                        NUM_GPUS="8"))
    assert cmd == ["accelerate", "launch", "--config_file",
                   str(REPO / "configs/accelerate/deepspeed_single_node.yaml"),
                   "--num_machines", "1", "--num_processes", "8", "--main_process_port", "29500",
                   "-m", "resnet.cli", "train", "--config", config, "train.epochs=10",
                   "run.name=a b"]


def test_single_node_detects_gpus(tmp_path, config):
    _fake(tmp_path / "bin", "nvidia-smi", 'printf "GPU 0: H100\\nGPU 1: H100\\n"\n')
    cmd = _command(_run("single_node.sh", config, path_prepend=tmp_path / "bin"))
    assert cmd[cmd.index("--num_processes") + 1] == "2"


def test_multi_node_dry_run(config):
    cmd = _command(_run("multi_node.sh", config, "train.epochs=1", NUM_MACHINES="2",
                        MACHINE_RANK="1", MAIN_ADDR="10.0.0.1", GPUS_PER_NODE="8",
                        MAIN_PORT="29501"))
    assert cmd == ["accelerate", "launch", "--config_file",
                   str(REPO / "configs/accelerate/multi_node.yaml"),
                   "--num_machines", "2", "--machine_rank", "1",
                   "--main_process_ip", "10.0.0.1", "--main_process_port", "29501",
                   "--num_processes", "16", "-m", "resnet.cli", "train", "--config", config,
                   "train.epochs=1"]


def test_multi_node_missing_and_bad_variables(config):
    result = _run("multi_node.sh", config, NUM_MACHINES="2", GPUS_PER_NODE="8")
    assert result.returncode == 2 and "MACHINE_RANK is not set" in result.stderr
    result = _run("multi_node.sh", config, NUM_MACHINES="2", MACHINE_RANK="2",
                  MAIN_ADDR="h", GPUS_PER_NODE="8")
    assert result.returncode == 2 and "is not below NUM_MACHINES" in result.stderr


def test_elastic_dry_run(config):
    cmd = _command(_run("elastic.sh", config, "train.epochs=3", MIN_NODES="1", MAX_NODES="4",
                        RDZV_ENDPOINT="10.0.0.1:29400", NPROC_PER_NODE="8", RDZV_ID="job7"))
    assert cmd == ["env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                   "RESNET_JOB_STORE=10.0.0.1:29400",  # the heartbeats' store (c10d only)
                   "torchrun", "--nnodes", "1:4", "--nproc-per-node", "8", "--max-restarts", "3",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1:29400",
                   "--rdzv-id", "job7", "-m", "resnet.cli", "train", "--config", config,
                   "train.epochs=3"]
    cmd = _command(_run("elastic.sh", config, MIN_NODES="1", RDZV_ENDPOINT="h:1",
                        NPROC_PER_NODE="1", RDZV_CONF="last_call_timeout=5,join_timeout=60"))
    assert cmd[cmd.index("--rdzv-conf") + 1] == "last_call_timeout=5,join_timeout=60"
    cmd = _command(_run("elastic.sh", config, MIN_NODES="1", RDZV_ENDPOINT="h:2379",
                        NPROC_PER_NODE="1", RDZV_BACKEND="etcd-v2"))
    assert "--rdzv-backend" in cmd and cmd[cmd.index("--rdzv-backend") + 1] == "etcd-v2"
    assert not any(part.startswith("RESNET_JOB_STORE=") for part in cmd)


def test_elastic_missing_and_bad_variables(config):
    result = _run("elastic.sh", config, MIN_NODES="1", NPROC_PER_NODE="2")
    assert result.returncode == 2 and "RDZV_ENDPOINT is not set" in result.stderr
    result = _run("elastic.sh", config, MIN_NODES="3", MAX_NODES="2", RDZV_ENDPOINT="h:1",
                  NPROC_PER_NODE="2")
    assert result.returncode == 2 and "MIN_NODES <= MAX_NODES" in result.stderr


SLURM_ENV = dict(SLURM_JOB_ID="123", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[07-08]",
                 SLURM_GPUS_ON_NODE="4")


def test_slurm_dry_run(tmp_path, config):
    _fake(tmp_path / "bin", "scontrol", 'echo gpu07; echo gpu08\n')
    cmd = _command(_run("slurm.sbatch", config, "train.epochs=2", path_prepend=tmp_path / "bin",
                        **SLURM_ENV))
    assert cmd == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1",
                   "torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--max-restarts", "2",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu07:29500", "--rdzv-id", "123",
                   "-m", "resnet.cli", "train", "--config", config, "train.epochs=2"]


def test_slurm_outside_a_job(config):
    result = _run("slurm.sbatch", config)
    assert result.returncode == 2 and "submit this script with sbatch" in result.stderr


def test_slurm_time_limit_signal_checkpoints_then_requeues(tmp_path, config):
    """SIGUSR1 (sent by --signal=B:USR1@120): SIGTERM reaches the step, then `scontrol requeue`."""
    log = tmp_path / "calls.log"
    _fake(tmp_path / "bin", "scontrol", f'echo "scontrol $*" >> {log}\n')
    _fake(tmp_path / "bin", "srun",
          f'trap \'echo "srun got TERM" >> {log}; exit 0\' TERM\n'
          f'echo "srun started" >> {log}\n'
          'for _ in $(seq 300); do sleep 0.1; done\nexit 1\n')
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    env.update(SLURM_ENV, MAIN_ADDR="gpu07", PATH=f"{tmp_path / 'bin'}:{env['PATH']}")
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), config], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not (log.exists() and "srun started" in log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "fake srun did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert log.read_text().splitlines() == ["srun started", "srun got TERM", "scontrol requeue 123"]
    assert "time limit near" in err


EC2_ENV = dict(REPO_URL="https://git.example.invalid/resnet.git",
               CHECKPOINT_MIRROR="s3://bucket/runs/r50", EBS_DEVICE="/dev/nvme1n1")


def test_ec2_bootstrap_dry_run(config):
    result = _run("ec2_bootstrap.sh", config, "train.epochs=2", DATA_TRAIN="s3://bucket/shards",
                  WANDB_API_KEY="secret-key", **EC2_ENV)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mkfs.ext4 -L resnet-data /dev/nvme1n1   # only when blkid finds no file system" in out
    assert "/data ext4 defaults,nofail" in out
    assert "+ git clone --branch main https://git.example.invalid/resnet.git /opt/resnet/src" in out
    assert "+ /opt/resnet/venv/bin/pip install -e /opt/resnet/src" in out
    exec_line = next(line for line in out.splitlines() if line.startswith("exec "))
    assert shlex.split(exec_line) == [
        "exec", "/opt/resnet/src/launch/single_node.sh", config, "run.dir=/data/runs/resnet",
        "checkpoint.mirror=s3://bucket/runs/r50", "data.train=s3://bucket/shards",
        "train.epochs=2"]
    assert "Restart=on-failure" in out and "WantedBy=multi-user.target" in out
    assert "+ systemctl enable --now resnet-spot-watch.service resnet-train.service" in out
    assert "secret-key" not in out  # a dry run never prints the key


def test_ec2_bootstrap_overrides_from_environment(config):
    result = _run("ec2_bootstrap.sh", CONFIG=config, TRAIN_OVERRIDES="a.b=1 c.d=2", **EC2_ENV)
    exec_line = next(line for line in result.stdout.splitlines() if line.startswith("exec "))
    assert shlex.split(exec_line)[-2:] == ["a.b=1", "c.d=2"]


def test_ec2_bootstrap_missing_variables(config):
    env = dict(EC2_ENV, CHECKPOINT_MIRROR="")
    result = _run("ec2_bootstrap.sh", config, **env)
    assert result.returncode == 2 and "CHECKPOINT_MIRROR is not set" in result.stderr
    result = _run("ec2_bootstrap.sh", config, **dict(EC2_ENV, CHECKPOINT_MIRROR="/local/dir"))
    assert result.returncode == 2 and "must be an s3:// URL" in result.stderr
    result = _run("ec2_bootstrap.sh", **EC2_ENV)
    assert result.returncode == 2 and "CONFIG is not set" in result.stderr


@pytest.mark.parametrize("name", ["deepspeed_single_node.yaml", "multi_node.yaml"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "configs/accelerate" / name))
    assert cfg.distributed_type in ("MULTI_GPU", "DEEPSPEED")


def test_no_gpu_is_a_clear_error(tmp_path, config):
    """nvidia-smi present but listing no GPU: `grep -c` fails under pipefail; say so."""
    _fake(tmp_path / "bin", "nvidia-smi", 'echo "No devices were found"; exit 6\n')
    result = _run("single_node.sh", config, path_prepend=tmp_path / "bin")
    assert result.returncode == 2
    assert "NUM_GPUS is not set and nvidia-smi lists no GPU" in result.stderr


@pytest.mark.parametrize("value", ["08", "1x", "-1", ""])
def test_integers_are_plain_decimals(config, value):
    result = _run("multi_node.sh", config, NUM_MACHINES="2", MACHINE_RANK=value,
                  MAIN_ADDR="h", GPUS_PER_NODE="8")
    assert result.returncode == 2
    assert (f"MACHINE_RANK must be a non-negative integer, got '{value}'" in result.stderr
            or "MACHINE_RANK is not set" in result.stderr), result.stderr
    assert "value too great for base" not in result.stderr


def test_slurm_integers_are_plain_decimals(config):
    result = _run("slurm.sbatch", config, MAIN_ADDR="gpu07", MAX_RESTARTS="08", **SLURM_ENV)
    assert result.returncode == 2
    assert "MAX_RESTARTS must be a non-negative integer, got '08'" in result.stderr


def _ec2_functions(tmp_path) -> Path:
    """The bootstrap script without its last line (`main "$@"`), to call one function."""
    text = (LAUNCH / "ec2_bootstrap.sh").read_text()
    assert text.rstrip().endswith('main "$@"')
    lib = tmp_path / "ec2_functions.sh"
    lib.write_text(text.rstrip()[: -len('main "$@"')])
    return lib


def test_ec2_env_file_is_never_readable_by_others(tmp_path):
    """The file with the W&B key exists with mode 600 before its chmod, whatever the umask."""
    log = tmp_path / "modes.log"
    _fake(tmp_path / "bin", "chmod", f'stat -c %a "$2" >> {log}\nexec /bin/chmod "$@"\n')
    target = tmp_path / "etc" / "train.env"
    script = f'umask 022; source {_ec2_functions(tmp_path)}; DRY_RUN=0; ' \
             f'write_file {target} 600 <<<"WANDB_API_KEY=secret"'
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert log.read_text().split() == ["600"]
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    assert target.read_text() == "WANDB_API_KEY=secret\n"


def test_ec2_unit_stops_restarting_a_repeated_failure(config):
    out = _run("ec2_bootstrap.sh", config, **EC2_ENV).stdout
    unit = out[out.index("resnet-train.service (mode 644)"):]
    unit = unit[: unit.index("+ end of")]
    assert "StartLimitIntervalSec=3600" in unit and "StartLimitBurst=5" in unit
    assert "StartLimitIntervalSec=0" not in unit
    assert "systemctl reset-failed resnet-train" in unit


# lsblk on a Nitro instance: root disk, an instance-store NVMe and the EBS data volume.
FAKE_LSBLK = r'''
case "$*" in
  "-dpno NAME,TYPE") printf '/dev/nvme0n1 disk\n/dev/nvme1n1 disk\n/dev/nvme2n1 disk\n' ;;
  "-no NAME /dev/nvme0n1") printf 'nvme0n1\nnvme0n1p1\n' ;;
  "-no NAME "*) echo "${3#/dev/}" ;;
  "-no MOUNTPOINT /dev/nvme0n1") printf '\n/\n' ;;
  "-no MOUNTPOINT "*) echo ;;
  "-dno MODEL /dev/nvme1n1") echo "Amazon EC2 NVMe Instance Storage        " ;;
  "-dno MODEL /dev/nvme2n1") echo "Amazon Elastic Block Store              " ;;
  *) echo "fake lsblk: unexpected $*" >&2; exit 1 ;;
esac
'''


def test_ec2_never_picks_an_instance_store_disk(tmp_path, config):
    _fake(tmp_path / "bin", "lsblk", FAKE_LSBLK)
    env = dict(EC2_ENV, EBS_DEVICE="")
    result = _run("ec2_bootstrap.sh", config, path_prepend=tmp_path / "bin", **env)
    assert result.returncode == 0, result.stderr
    assert "data volume: /dev/nvme2n1" in result.stderr
    assert "skipping /dev/nvme1n1: instance store" in result.stderr
    alone = FAKE_LSBLK.replace("/dev/nvme2n1 disk\\n", "")
    _fake(tmp_path / "bin", "lsblk", alone)
    result = _run("ec2_bootstrap.sh", config, path_prepend=tmp_path / "bin", **env)
    assert result.returncode == 2 and "found 0 unused disks" in result.stderr
