"""Was a resumed run exact? Compare it with an uninterrupted run of the same command.

    python benchmarks/compare_runs.py BASELINE_RUN_DIR RESUMED_RUN_DIR

Both runs must have had `audit.sample_keys=true`. Reads `run.dir/audit/` (resnet.train.audit:
the sample keys of every micro-batch of every step, per rank and start of the processes) and
`run.dir/final/model.safetensors`, and prints:

- where the resumed run restarted (the first step its last restart trained);
- whether every step from there on trained the same samples, in the same micro-batches and
  ranks, as the baseline (and the steps before it too);
- whether the final weights are bitwise equal (else how many tensors differ, and by how much);
- the loss of both runs at the logged steps after the restart, from metrics.jsonl;
- `resume exact: yes` or `resume exact: no` (exit status 0 or 1; 2 when the runs cannot be
  compared, e.g. the resumed run has no restart).

Bitwise equal weights need deterministic kernels on a GPU (cuDNN picks non-deterministic
algorithms by default): run both with benchmarks/deterministic_train.py, as gpu_check.sh does.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from resnet.report import read_metrics
from resnet.runfolder import METRICS_FILE
from resnet.train.audit import audit_files
from resnet.train.audit import read_audit as read_steps

RESTART = re.compile(r"restart(\d+)$")


class CompareError(Exception):
    """The two runs cannot be compared (missing files, no restart)."""


def read_audit(run_dir: Path) -> tuple[dict, list[str]]:
    """({(step, micro, rank): (epoch, keys)}, start ids in order), as the run finally trained.

    A step that a killed attempt trained but did not checkpoint is trained again by the next
    start; resnet.train.audit keeps the later start's records.
    """
    starts = list(audit_files(run_dir))
    if not starts:
        raise CompareError(f"{Path(run_dir) / 'audit'} has no audit files: run with "
                           f"audit.sample_keys=true")
    records = {(step, micro, rank): (r["epoch"], r["keys"])
               for step, recs in read_steps(run_dir).items() for (micro, rank), r in recs.items()}
    return records, starts


def restarts(starts: list[str]) -> list[int]:
    """torchrun restart counts of the starts (their ids end in -restartNNN)."""
    return [int(m[1]) if (m := RESTART.search(s)) else -1 for s in starts]


def first_step_of_start(run_dir: Path, start: str) -> int:
    steps = [rec["step"] for path in audit_files(run_dir)[start]
             for rec in map(json.loads, filter(None, path.read_text().splitlines()))
             if isinstance(rec, dict)]
    if not steps:
        raise CompareError(f"start {start} of {run_dir} trained no step")
    return min(steps)


def compare_audit(base: dict, resumed: dict, start: int) -> list[str]:
    """Differences (at most 5 described) between two audits, for steps >= start."""
    problems = []
    base_keys = {k for k in base if k[0] >= start}
    resumed_keys = {k for k in resumed if k[0] >= start}
    for key in sorted(base_keys ^ resumed_keys)[:5]:
        where = "baseline" if key in base_keys else "resumed run"
        problems.append(f"step {key[0]} micro {key[1]} rank {key[2]} only in the {where}")
    for key in sorted(base_keys & resumed_keys):
        if base[key] != resumed[key]:
            problems.append(f"step {key[0]} micro {key[1]} rank {key[2]}: other samples "
                            f"(epoch {base[key][0]} vs {resumed[key][0]})")
        if len(problems) >= 5:
            break
    return problems


def compare_weights(base_dir: Path, resumed_dir: Path) -> tuple[bool, str]:
    import torch
    from safetensors.torch import load_file

    paths = [Path(d) / "final" / "model.safetensors" for d in (base_dir, resumed_dir)]
    for path in paths:
        if not path.is_file():
            raise CompareError(f"{path} is missing: did the run finish?")
    a, b = (load_file(str(p)) for p in paths)
    if a.keys() != b.keys():
        return False, f"different tensor names ({len(a.keys() ^ b.keys())} differ)"
    differ, worst = 0, 0.0
    for name in a:
        if a[name].shape != b[name].shape or not torch.equal(a[name], b[name]):
            differ += 1
            if a[name].shape == b[name].shape and a[name].is_floating_point():
                worst = max(worst, (a[name].double() - b[name].double()).abs().max().item())
    if differ == 0:
        return True, f"{len(a)} tensors bitwise identical"
    return False, f"{differ} of {len(a)} tensors differ, max |diff| {worst:.3g}"


def logged_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; the later line wins (a restart logs replayed steps again)."""
    path = Path(run_dir) / METRICS_FILE
    return read_metrics(path).get("loss", {}) if path.is_file() else {}


def compare(base_dir: Path, resumed_dir: Path, out=sys.stdout) -> bool:
    base, base_starts = read_audit(base_dir)
    resumed, starts = read_audit(resumed_dir)
    if len(starts) < 2:
        raise CompareError(f"{resumed_dir} has audit files of one start only: the run was "
                           f"never restarted, so there is no resume to check")
    start = first_step_of_start(resumed_dir, starts[-1])
    last = max(k[0] for k in resumed)
    print(f"baseline: {base_dir} (restarts {restarts(base_starts)}); resumed: {resumed_dir} "
          f"(restarts {restarts(starts)}); the last restart trained steps {start}..{last}",
          file=out)
    after = compare_audit(base, resumed, start)
    before = compare_audit({k: v for k, v in base.items() if k[0] < start},
                           {k: v for k, v in resumed.items() if k[0] < start}, 0)
    n_after = sum(1 for k in resumed if k[0] >= start)
    print(f"audit from step {start} on ({n_after} micro-batches): "
          f"{'identical' if not after else 'DIFFERENT'}", file=out)
    print(f"audit before step {start}: {'identical' if not before else 'DIFFERENT'}", file=out)
    for line in (after + before)[:5]:
        print(f"  {line}", file=out)
    same_weights, detail = compare_weights(base_dir, resumed_dir)
    print(f"final weights: {detail}", file=out)
    a, b = logged_losses(base_dir), logged_losses(resumed_dir)
    common = sorted(s for s in a.keys() & b.keys() if s >= start)
    if common:
        worst = max(abs(a[s] - b[s]) for s in common)
        print(f"loss at {len(common)} logged steps from {start} on: max |diff| {worst:.3g} "
              f"(step {common[-1]}: {a[common[-1]]:.6f} vs {b[common[-1]]:.6f})", file=out)
    exact = not after and not before and same_weights
    print(f"resume exact: {'yes' if exact else 'no'}", file=out)
    return exact


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("baseline", type=Path, help="run.dir of the uninterrupted run")
    p.add_argument("resumed", type=Path, help="run.dir of the interrupted, resumed run")
    args = p.parse_args(argv)
    try:
        return 0 if compare(args.baseline, args.resumed) else 1
    except CompareError as exc:
        print(f"compare_runs: error: {exc}", file=sys.stderr)
        print("resume exact: no (cannot compare)")
        return 2


if __name__ == "__main__":
    sys.exit(main())
