"""Smoke test of benchmarks/bench_step.py on CPU: every configuration runs and prints a figure.

Not a timed test: the figures of a shared 2-core machine mean nothing; the point is that the
script still builds each configuration (including the engine ones through create_engine) and
reports it, so the GPU session that finally runs it does not find it broken.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"
CONFIGS = ["fp32", "bf16", "bf16_cl", "accelerate_ddp", "deepspeed_zero0"]


def _run(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_prints_a_figure_per_config(tmp_path):
    out = tmp_path / "bench.json"
    result = _run("--arch", "resnet18", "--batch-size", "8", "--image-size", "64", "--steps",
                  "3", "--warmup", "1", "--repeats", "1", "--configs", ",".join(CONFIGS),
                  "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# bench_step")
    assert any(line.startswith("# device: ") for line in lines)
    assert any(line.startswith("# CPU: ") and "cores" in line for line in lines)
    assert any("torch " in line and "deepspeed " in line and "accelerate " in line
               for line in lines)
    for name in CONFIGS:
        row = [line for line in lines if line.startswith(f"| {name} |")]
        assert len(row) == 1, result.stdout
        figure = row[0].split("|")[2].strip().replace(",", "")
        assert re.fullmatch(r"\d+\.\d", figure) and float(figure) > 0, row[0]
    results = json.loads(out.read_text())["results"]
    assert [r["config"] for r in results] == CONFIGS
    assert all(r["img_per_s"] > 0 and r["device"].split(":")[0] == "cpu" for r in results)


def test_unknown_config_is_refused():
    result = _run("--configs", "fp32,fp8", timeout=60)
    assert result.returncode == 2 and "unknown configuration(s) ['fp8']" in result.stderr
