"""The figures `resnet bench train` prints, checked the same way wherever it runs: every
configuration is run once in the suite, some by tests/test_bench_train.py and the others by the
tiny GPU check (tests/test_gpu_check.py), and each row gets every check here."""
from __future__ import annotations

import json
import re
from pathlib import Path

# Every configuration the suite runs (all but accelerate_ddp_compile), and those of them the
# tiny GPU check runs (its default GPU_CHECK_BENCH_CONFIGS and --e2e cpu,device).
CONFIGS = ["fp32", "bf16", "bf16_cl", "accelerate_ddp", "deepspeed_zero0", "bf16_cl_compile",
           "deepspeed_zero0_compile", "e2e_cpu", "e2e_device"]
IN_GPU_CHECK = ["bf16_cl_compile", "deepspeed_zero0", "e2e_cpu", "e2e_device"]
NUMBER = r"[\d,]+\.\d+"


def positive(text: str) -> float:
    assert re.fullmatch(NUMBER, text.strip()), text
    value = float(text.replace(",", ""))
    assert value > 0, text
    return value


def check_header(lines: list[str]) -> None:
    """The header: the hardware and the versions of the step's libraries."""
    # Not necessarily the first line: the GPU check's log holds stderr too.
    assert any(line.startswith("# bench train") for line in lines), lines[:3]
    assert any(line.startswith("# device: ") for line in lines)
    assert any(line.startswith("# CPU: ") and "cores" in line for line in lines)
    assert any("torch " in line and "deepspeed " in line and "accelerate " in line
               for line in lines)


def check_row(lines: list[str], name: str) -> None:
    """`name`'s one row, every figure in it: positive, consistent, in its format."""
    row = [line for line in lines if line.startswith(f"| {name} |")]
    assert len(row) == 1, "\n".join(lines)
    cells = [c.strip() for c in row[0].split("|")[2:-1]]
    rate, per_device, spread, percentiles, wait, peak, warmup = cells
    assert positive(rate) == positive(per_device)  # one process: one device
    low, high = (positive(x) for x in spread.split(".."))
    assert low <= positive(rate) <= high
    p50, p90, p99 = (positive(x) for x in percentiles.split("/"))
    assert p50 <= p90 <= p99
    if name.startswith("e2e_"):
        assert re.fullmatch(r"\d+\.\d%", wait) and float(wait[:-1]) > 0, row[0]
    else:
        assert wait == "-"  # synthetic tensors: no loader
    positive(peak), positive(warmup)


def check_output(output: str, json_path: Path, names: list[str]) -> None:
    """A CPU run's printed header and rows of `names`, and its JSON results, in that order."""
    lines = output.splitlines()
    check_header(lines)
    for name in names:
        check_row(lines, name)
    results = json.loads(json_path.read_text())["results"]
    assert [r["config"] for r in results] == names
    assert all(r["img_per_s"] > 0 and r["device"].split(":")[0] == "cpu" for r in results)
