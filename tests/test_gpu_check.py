"""benchmarks/gpu_check.sh: its plan fits the budget, and in its tiny CPU mode every step works.

The GPU check runs once, on a machine lent for minutes; a broken step there wastes the loan,
and a phase cut by the budget leaves its check "not determined". The dry run (no work) checks
the plan: the phases, their caps within the budget with margin, end-to-end rows inside one
epoch. Tiny mode runs the same steps (generate + pack, crop check, sync check, `resnet bench
train` synthetic and end to end, two torchrun trainings with the audit on, one killed
mid-epoch by the fault hook and restarted, compare_runs) on a CPU with tiny sizes, and on a
CPU the resume must be bitwise exact. Its 4 bench rows get every check of
tests/test_bench_train.py (tests/bench_figures.py), which runs only the other configurations.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import bench_figures as bf

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
PHASES = ["imports", "generate", "pack", "crops", "syncs", "bench_train", "train_a", "train_b",
          "compare"]


def _script_env(tmp_path, **more) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RESNET_TEST_", "GPU_CHECK_", "ACCELERATE_", "WANDB_"))}
    env.update(OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"), **more)
    return env


def test_dry_run_plans_every_phase_within_the_budget(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT)], env=_script_env(tmp_path, GPU_CHECK_DRY="1"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    caps = dict(re.findall(r"^== (\w+) \(at most (\d+) s\)", result.stdout, re.M))
    assert list(caps) == PHASES
    total = sum(int(c) for c in caps.values())
    assert total <= 480 - 45, caps  # one H100 run of 8 minutes, with margin
    assert f"dry run: 9 phases, caps {total} s of the 480 s budget" in result.stdout
    # The rows the tiny check's test checks (bench_figures.IN_GPU_CHECK) are what it runs.
    synthetic = [c for c in bf.IN_GPU_CHECK if not c.startswith("e2e_")]
    e2e = [c[len("e2e_"):] for c in bf.IN_GPU_CHECK if c.startswith("e2e_")]
    assert f"--configs {','.join(synthetic)} --e2e {','.join(e2e)}" in result.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # ran nothing


@pytest.mark.parametrize("setting,message", [
    ({"GPU_CHECK_BUDGET_S": "400"}, "the phase caps add up to 430 s, more than the budget"),
    ({"GPU_CHECK_IMAGES": "2000"}, "14 batches per end-to-end row, but one epoch of 2000 "
                                   "images has 7: raise GPU_CHECK_IMAGES")])
def test_a_plan_that_cannot_hold_is_refused_before_any_work(tmp_path, setting, message):
    result = subprocess.run(["bash", str(SCRIPT)],
                            env=_script_env(tmp_path, GPU_CHECK_DRY="1", **setting),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.timeout(3300)  # the tiny mode's budget (3000 s) is a hang guard for a busy machine
def test_tiny_gpu_check_runs_every_step_and_resume_is_exact(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(SCRIPT)], env=_script_env(tmp_path, GPU_CHECK_TINY="1"),
                            capture_output=True, text=True, timeout=3200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "all steps passed" in summary and "resume exact: yes" in summary
    compare = (out / "compare.log").read_text()
    assert "restarts [0, 1]" in compare  # the worker really was killed and restarted
    assert "final weights: " in compare and "bitwise identical" in compare
    assert "resumed from step-000000004" in (out / "train_b.log").read_text()
    # Every figure of its 4 rows, checked as tests/test_bench_train.py checks the others.
    bf.check_output((out / "bench_train.log").read_text(), out / "bench_train.json",
                    bf.IN_GPU_CHECK)
    summary_rows = [line for line in summary.splitlines() if line.startswith("| ")]
    assert len(summary_rows) == 5, summary  # the table's head and the 4 configurations
    assert summary.startswith("headline: deepspeed_zero0 ")
    assert "x the plain compiled step (bf16_cl_compile" in summary.splitlines()[0]
    assert re.search(r"^crop check: mean \|device - cpu\| [\d.]+ .*: ok$", summary, re.M)
    assert re.search(r"^steady-state syncs: 0 in \d+ steps .*: ok$", summary, re.M)
    assert "img/s" in (out / "end_to_end.txt").read_text()
    # Only small files come back from a GPU machine: no images, shards or checkpoints in OUT.
    assert all(p.stat().st_size < 5_000_000 for p in out.rglob("*") if p.is_file())


def _compare_runs():
    import importlib.util

    path = SCRIPT.parent / "compare_runs.py"
    spec = importlib.util.spec_from_file_location("compare_runs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(run_dir: Path, segments: dict[int, range], keys=lambda step: [f"k{step}"],
              weight: float = 1.0) -> Path:
    """A run dir with audit files (restart -> steps it trained) and final weights."""
    import torch
    from safetensors.torch import save_file

    (run_dir / "audit").mkdir(parents=True)
    for restart, steps in segments.items():
        lines = [json.dumps({"step": s, "micro": 0, "epoch": 0, "rank": 0, "keys": keys(s)})
                 for s in steps]
        (run_dir / "audit" / f"restart{restart:03d}-rank000.jsonl").write_text(
            "\n".join(lines) + "\n")
    (run_dir / "final").mkdir()
    save_file({"w": torch.full((2,), weight)}, str(run_dir / "final" / "model.safetensors"))
    return run_dir


def test_compare_runs_verdicts(tmp_path, capsys):
    compare_runs = _compare_runs()
    base = _fake_run(tmp_path / "a", {0: range(1, 11)})
    # Killed after step 7, resumed from the checkpoint at step 5: steps 6, 7 trained twice.
    good = _fake_run(tmp_path / "b", {0: range(1, 8), 1: range(6, 11)})
    assert compare_runs.main([str(base), str(good)]) == 0
    out = capsys.readouterr().out
    assert "steps 6..10" in out and "resume exact: yes" in out

    other_samples = _fake_run(tmp_path / "c", {0: range(1, 8), 1: range(6, 11)},
                              keys=lambda s: [f"k{s}" if s != 8 else "other"])
    assert compare_runs.main([str(base), str(other_samples)]) == 1
    out = capsys.readouterr().out
    assert "step 8 micro 0 rank 0: other samples" in out and "resume exact: no" in out

    other_weights = _fake_run(tmp_path / "d", {0: range(1, 8), 1: range(6, 11)}, weight=1.5)
    assert compare_runs.main([str(base), str(other_weights)]) == 1
    assert "1 of 1 tensors differ, max |diff| 0.5" in capsys.readouterr().out

    never_restarted = _fake_run(tmp_path / "e", {0: range(1, 11)})
    assert compare_runs.main([str(base), str(never_restarted)]) == 2
    assert "never restarted" in capsys.readouterr().err
