"""Smoke test of `resnet bench train` on CPU: every configuration runs and prints its figures.

Not a timed test: the figures of a shared 2-core machine mean nothing; the point is that the
command still builds each configuration (the engine ones through create_engine, the compiled
ones, the end-to-end ones through the shard loader and DeviceFeed) and reports every figure,
so the GPU session that finally runs it does not find it broken. Each configuration costs a
process start, so each runs once in the suite: the tiny GPU check (tests/test_gpu_check.py)
runs bf16_cl_compile, deepspeed_zero0 and the end-to-end rows, this module the others, and
both check every row with tests/bench_figures.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import bench_figures as bf
from resnet.cli import build_parser, main
from resnet.train import bench

HERE = [c for c in bf.CONFIGS if c not in bf.IN_GPU_CHECK]
TINY = ["--arch", "resnet18", "--batch-size", "8", "--image-size", "32", "--steps", "3",
        "--warmup", "1", "--repeats", "2", "--compile-backend", "eager"]
# A hang guard per configuration, not a speed bound: the 5 configurations take 29 s together
# on a quiet 2-core machine, but deepspeed_zero0_compile alone timed out at 150 s beside
# another copy of the suite (load 18 on 2 cores).
CHILD_TIMEOUT_S = 400


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "resnet", "bench", "train", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_the_defaults_with_compile_and_data_choose_every_configuration():
    """`--compile` adds the compiled ones after the default ones, `--data` the end-to-end
    ones: the suite's configurations, in the order the table prints them."""
    args = build_parser().parse_args(["bench", "train", "--data", "shards", *TINY, "--compile"])
    assert bench.chosen_configs(args) == bf.CONFIGS


@pytest.mark.slow
@pytest.mark.timeout(len(HERE) * CHILD_TIMEOUT_S + 300)
def test_prints_every_figure_for_the_configs_the_gpu_check_does_not_run(tmp_path, capsys,
                                                                         monkeypatch):
    """The parent in this process (it only prints the header and the table), one child process
    per configuration, as `resnet bench train` runs them."""
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children's
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "bench.json"
    code = main(["bench", "train", *TINY, "--configs", ",".join(HERE),
                 "--timeout", str(CHILD_TIMEOUT_S),
                 "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err[-4000:]
    bf.check_output(printed.out, out, HERE)


def test_unknown_config_is_refused():
    result = _run("--configs", "fp32,fp8", timeout=60)
    assert result.returncode == 2 and "unknown configuration(s) ['fp8']" in result.stderr
    result = _run("--e2e", "gpu", timeout=60)
    assert result.returncode == 2 and "'e2e gpu'" in result.stderr
