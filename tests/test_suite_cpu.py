"""benchmarks/suite_cpu.py counts the CPU of every process a suite starts, orphans included.

The case that matters: a process that outlives its parent (as the loader's fork servers
outlive their training process) is reparented to the benchmark, not to init, so its CPU is in
the total and in its own row, and the benchmark waits for it.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "suite_cpu.py"

# Burns 0.6 CPU-seconds after pytest has ended (bounded at 20 s of wall time).
BURN = """import os, time
time.sleep(1)
end = time.monotonic() + 20
while sum(os.times()[:2]) < 0.6 and time.monotonic() < end:
    pass
"""
# The test starts a child that starts the burner in a session of its own and exits at once:
# the burner is an orphan, as torchrun's workers and the fork servers become.
ORPHANING_TEST = """import subprocess, sys
def test_leaves_an_orphan_behind():
    starter = ("import subprocess, sys; subprocess.Popen([sys.executable, 'burn.py'], "
               "start_new_session=True)")
    subprocess.run([sys.executable, "-c", starter], check=True, timeout=60)
"""


def test_an_orphan_that_outlives_pytest_is_counted_in_its_own_row(tmp_path):
    (tmp_path / "burn.py").write_text(BURN)
    (tmp_path / "test_orphan.py").write_text(ORPHANING_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--json", str(out), "--", "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist", "test_orphan.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    burner = figures["rows"]["script burn.py"]
    assert burner["processes"] == 1 and burner["cpu_s"] >= 0.3, figures
    # The total is exact (reaped children) and holds every sampled reading, the orphan's too.
    assert figures["cpu_s"] >= sum(row["cpu_s"] for row in figures["rows"].values()), figures
    assert figures["still_running"] == []
    assert "| script burn.py | 1 |" in result.stdout
    assert "still running after pytest: none" in result.stdout


def _load_suite_cpu():
    spec = importlib.util.spec_from_file_location("suite_cpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


suite_cpu = _load_suite_cpu()
PY = "/usr/bin/python3"


@pytest.mark.parametrize("cmdline, parent, expected", [
    ([PY, "-m", "resnet", "train", "run.dir=x"], None, "training process"),
    ([PY, "-u", "-m", "resnet.cli", "train"], "torchrun agent", "training process"),
    ([PY, "/venv/bin/resnet", "eval", "--weights", "w"], None, "resnet eval"),
    ([PY, "-m", "torch.distributed.run", "--nnodes", "1:2", "-m", "resnet", "train"], None,
     "torchrun agent"),
    ([PY, "/venv/bin/torchrun", "--standalone", "-m", "resnet", "train"], None,
     "torchrun agent"),
    ([PY, "-m", "accelerate.commands.launch", "-m", "resnet", "train"], None,
     "accelerate agent"),
    ([PY, "-c", "from multiprocessing.forkserver import main; main(3, 4, ['x'])"],
     "training process", "loader fork server"),
    ([PY, "-c", "from multiprocessing.forkserver import main; main(3, 4, ['x'])"],
     "loader fork server", "loader worker"),
    ([PY, "-u", "-c", "import sys;exec(eval(sys.stdin.readline()))"], "pytest main",
     "pytest worker (in-process tests)"),
    ([PY, "-m", "pytest", "-q"], None, "pytest main"),
    ([PY, "/work/tests/sync_count_helper.py", "deepspeed"], None,
     "script sync_count_helper.py"),
    (["/venv/lib/wandb/bin/wandb-core", "--port-filename", "f"], None, "W&B service"),
    (["bash", "-c", "true"], None, "other: bash"),
])
def test_each_kind_of_process_gets_its_row(cmdline, parent, expected):
    assert suite_cpu.kind(cmdline, parent) == expected


def test_a_json_path_in_no_folder_is_refused_before_the_suite_runs(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--json",
                             str(tmp_path / "missing" / "f.json"), "--", "--co", "-q"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"--json {tmp_path / 'missing' / 'f.json'}: no folder" in result.stderr
    assert "== suite_cpu" not in result.stdout and not (tmp_path / "missing").exists()
