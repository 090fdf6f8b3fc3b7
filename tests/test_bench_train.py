"""Smoke test of `resnet bench train` on CPU: every configuration runs and prints its figures.

Not a timed test: the figures of a shared 2-core machine mean nothing; the point is that the
command still builds each configuration (the engine ones through create_engine, the compiled
ones, the end-to-end ones through the shard loader and DeviceFeed) and reports every figure,
so the GPU session that finally runs it does not find it broken.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import trainutil as tu

SYNTHETIC = ["fp32", "bf16", "bf16_cl", "accelerate_ddp", "deepspeed_zero0", "bf16_cl_compile",
             "deepspeed_zero0_compile"]
CONFIGS = SYNTHETIC + ["e2e_cpu", "e2e_device"]
NUMBER = r"[\d,]+\.\d+"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "resnet", "bench", "train", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _positive(text: str) -> float:
    assert re.fullmatch(NUMBER, text.strip()), text
    value = float(text.replace(",", ""))
    assert value > 0, text
    return value


@pytest.mark.slow
def test_prints_every_figure_for_every_config(tmp_path_factory, tmp_path):
    data = tu.shared_data(tmp_path_factory)
    out = tmp_path / "bench.json"
    result = _run("--data", str(data), "--arch", "resnet18", "--batch-size", "8",
                  "--image-size", "32", "--steps", "3", "--warmup", "1", "--repeats", "2",
                  "--workers", "1", "--compile", "--compile-backend", "eager",
                  "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# bench train")
    assert any(line.startswith("# device: ") for line in lines)
    assert any(line.startswith("# CPU: ") and "cores" in line for line in lines)
    assert any("torch " in line and "deepspeed " in line and "accelerate " in line
               for line in lines)
    for name in CONFIGS:
        row = [line for line in lines if line.startswith(f"| {name} |")]
        assert len(row) == 1, result.stdout
        cells = [c.strip() for c in row[0].split("|")[2:-1]]
        rate, per_device, spread, percentiles, wait, peak, warmup = cells
        assert _positive(rate) == _positive(per_device)  # one process: one device
        low, high = (_positive(x) for x in spread.split(".."))
        assert low <= _positive(rate) <= high
        p50, p90, p99 = (_positive(x) for x in percentiles.split("/"))
        assert p50 <= p90 <= p99
        if name.startswith("e2e_"):
            assert re.fullmatch(r"\d+\.\d%", wait) and float(wait[:-1]) > 0, row[0]
        else:
            assert wait == "-"  # synthetic tensors: no loader
        _positive(peak), _positive(warmup)
    results = json.loads(out.read_text())["results"]
    assert [r["config"] for r in results] == CONFIGS
    assert all(r["img_per_s"] > 0 and r["device"].split(":")[0] == "cpu" for r in results)


def test_unknown_config_is_refused():
    result = _run("--configs", "fp32,fp8", timeout=60)
    assert result.returncode == 2 and "unknown configuration(s) ['fp8']" in result.stderr
    result = _run("--e2e", "gpu", timeout=60)
    assert result.returncode == 2 and "'e2e gpu'" in result.stderr
