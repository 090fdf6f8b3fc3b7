"""launch/ec2_bootstrap.sh puts the shard cache (data.cache_dir) on an instance-store disk."""
from __future__ import annotations

import shlex

from test_launch import EC2_ENV, FAKE_LSBLK, _fake, _run, config  # noqa: F401  (a fixture)


def _exec_line(result) -> list[str]:
    assert result.returncode == 0, result.stderr
    return shlex.split(next(line for line in result.stdout.splitlines()
                            if line.startswith("exec ")))


def test_instance_store_becomes_the_shard_cache(tmp_path, config):  # noqa: F811
    _fake(tmp_path / "bin", "lsblk", FAKE_LSBLK)
    result = _run("ec2_bootstrap.sh", config, path_prepend=tmp_path / "bin",
                  **dict(EC2_ENV, EBS_DEVICE=""))
    assert _exec_line(result)[-1] == "data.cache_dir=/mnt/shard-cache"
    assert "+ mount /dev/nvme1n1 /mnt/shard-cache" in result.stdout
    assert "data volume: /dev/nvme2n1" in result.stderr  # checkpoints stay on EBS


def test_cache_off_or_a_chosen_directory(tmp_path, config):  # noqa: F811
    _fake(tmp_path / "bin", "lsblk", FAKE_LSBLK)
    env = dict(EC2_ENV, EBS_DEVICE="")
    off = _run("ec2_bootstrap.sh", config, path_prepend=tmp_path / "bin", SHARD_CACHE="off",
               **env)
    assert not any(a.startswith("data.cache_dir") for a in _exec_line(off))
    chosen = _run("ec2_bootstrap.sh", config, path_prepend=tmp_path / "bin",
                  SHARD_CACHE="/data/cache", **env)
    assert _exec_line(chosen)[-1] == "data.cache_dir=/data/cache"
