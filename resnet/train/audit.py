"""The sample audit: which samples every step trained on, and the proof that each was used once.

With ``audit.sample_keys=true`` every rank appends one JSON line per micro-batch,
``{"step", "micro", "epoch", "rank", "keys"}``, to ``run.dir/audit/<start>-rank<NNN>.jsonl``.
`<start>` names one start of the training processes (a launch, a torchrun restart, a requeue):
rank 0 makes it (a counter past the starts already in the folder, then the UTC time) and every
rank uses rank 0's, so it sorts in start order whatever the clocks' time zones.

After a rollback to a checkpoint, a later start writes the steps after the checkpoint again,
possibly with another world size. Reading keeps, for each step, the records of the LAST start
that wrote it: that is what the final model was trained on.
"""
from __future__ import annotations

import heapq
import json
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from resnet.config import load_config
from resnet.data.format import load_manifest
from resnet.runfolder import AUDIT_DIR, CONFIG_FILE, FINAL_DIR, latest_checkpoint, read_state

_FILE = re.compile(r"(?P<start>.+)-rank(?P<rank>\d+)\.jsonl$")
_COUNTED = re.compile(r"(?P<n>\d{6})-\d{8}T")

Records = dict[int, dict[tuple[int, int], dict]]  # step -> {(micro, rank): record}


def new_start_id(restart: int, run_dir: Path | None = None) -> str:
    """`NNNNNN-YYYYmmddTHHMMSS.ffffffZ-restartRRR`: NNNNNN counts the starts in run_dir's audit
    folder (ordering them even if clocks disagree), the time is UTC."""
    counter = 1
    if run_dir is not None:
        found = [int(m["n"]) for p in (Path(run_dir) / AUDIT_DIR).glob("*.jsonl")
                 if (m := _COUNTED.match(p.name))]
        counter += max(found, default=0)
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{now % 1:.6f}"[1:] + "Z"
    return f"{counter:06d}-{stamp}-restart{restart:03d}"


class AuditLog:
    """One rank's audit file for one start; every line is flushed (a kill loses at most one)."""

    def __init__(self, run_dir: Path, rank: int, start_id: str) -> None:
        folder = Path(run_dir) / AUDIT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{start_id}-rank{rank:03d}.jsonl"
        self.file = open(self.path, "a")
        self.rank = rank

    def write(self, step: int, micro: int, epoch: int, keys: list[str]) -> None:
        record = {"step": step, "micro": micro, "epoch": epoch, "rank": self.rank, "keys": keys}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def audit_files(*run_dirs: Path) -> dict[str, list[Path]]:
    """{start id: its rank files}, in start order; a start's ranks may sit in several run.dirs
    (nodes with their own disks), and share the start id rank 0 drew."""
    starts: dict[str, list[Path]] = defaultdict(list)
    for run_dir in run_dirs:
        for path in sorted((Path(run_dir) / AUDIT_DIR).glob("*-rank*.jsonl")):
            match = _FILE.match(path.name)
            if match:
                starts[match["start"]].append(path)
    return {start: sorted(paths, key=lambda p: p.name) for start, paths in sorted(starts.items())}


def _records(path: Path):
    with open(path) as f:  # line by line: a rank's file of a long run need not fit in memory
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # the partial last line of a killed process


def read_audit(*run_dirs: Path) -> Records:
    """{step: {(micro, rank): record}} as the run finally used them (see the module doc)."""
    merged: Records = {}
    for paths in audit_files(*run_dirs).values():
        this_start: Records = defaultdict(dict)
        for path in paths:
            for rec in _records(path):
                this_start[rec["step"]][(rec["micro"], rec["rank"])] = rec
        merged.update(this_start)  # a later start's step replaces the earlier one's wholly
    return dict(sorted(merged.items()))


@dataclass(frozen=True)
class EpochUse:
    epoch: int
    steps: int
    samples: int  # sample uses
    unique: int
    duplicates: tuple[str, ...]  # keys used more than once in the epoch
    missing: int | None  # of the split's samples, not used (None: the split is unknown)


def _use(epoch: int, counts: Counter, steps: set[int], all_keys: set[str] | None) -> EpochUse:
    dupes = tuple(sorted(k for k, n in counts.items() if n > 1))
    missing = len(all_keys - set(counts)) if all_keys is not None else None
    return EpochUse(epoch, len(steps), sum(counts.values()), len(counts), dupes, missing)


def epoch_usage(audit: Records, all_keys: set[str] | None = None) -> list[EpochUse]:
    per_epoch: dict[int, Counter] = defaultdict(Counter)
    steps: dict[int, set[int]] = defaultdict(set)
    for step, records in audit.items():
        for rec in records.values():
            per_epoch[rec["epoch"]].update(rec["keys"])
            steps[rec["epoch"]].add(step)
    return [_use(epoch, counts, steps[epoch], all_keys)
            for epoch, counts in sorted(per_epoch.items())]


def _complete_steps(path: Path) -> Iterator[int]:
    """The step of each complete line, read from its prefix (no JSON parse of the keys)."""
    with open(path) as f:
        for line in f:
            if line.startswith('{"step": ') and line.endswith("}\n"):
                yield int(line[9:line.index(",")])


def _stream(path: Path, start: int, winner: dict[int, int]) -> Iterator[tuple[int, dict]]:
    for rec in _records(path):
        if winner.get(rec["step"]) == start:
            yield rec["step"], rec


def stream_usage(*run_dirs: Path, all_keys: set[str] | None = None) -> Iterator[EpochUse]:
    """`epoch_usage(read_audit(...))` one epoch at a time, in memory for one epoch's keys (plus
    one int per step): a first pass reads only each line's step to find the start that last
    wrote it, a second merges every file in step order and hands each epoch on as it ends."""
    starts = list(audit_files(*run_dirs).values())
    winner: dict[int, int] = {}
    for index, paths in enumerate(starts):  # in start order: a later start wins the step
        for path in paths:
            winner.update((step, index) for step in _complete_steps(path))
    merged = heapq.merge(*(_stream(path, index, winner) for index, paths in enumerate(starts)
                           for path in paths), key=lambda item: item[0])
    epoch, counts, steps = None, Counter(), set()
    for step, rec in merged:
        if rec["epoch"] != epoch:
            if epoch is not None:
                yield _use(epoch, counts, steps, all_keys)
            epoch, counts, steps = rec["epoch"], Counter(), set()
        counts.update(rec["keys"])
        steps.add(step)
    if epoch is not None:
        yield _use(epoch, counts, steps, all_keys)


def check_run(*run_dirs: Path) -> tuple[list[str], bool]:
    """`resnet audit`: a line per epoch, and whether every epoch used each sample at most once
    and (when finished) left out fewer than one global batch. Several run.dirs are one run's
    node-local folders: config, checkpoints and final/ are read where they are."""
    run_dirs = tuple(Path(d) for d in run_dirs)
    usage = list(stream_usage(*run_dirs))  # a few numbers per epoch; keys one epoch at a time
    if not usage:
        raise FileNotFoundError(f"no audit records under {run_dirs[0] / AUDIT_DIR} (train with "
                                f"audit.sample_keys=true)")
    configs = [d / CONFIG_FILE for d in run_dirs if (d / CONFIG_FILE).is_file()]
    if not configs:
        raise FileNotFoundError(f"no {CONFIG_FILE} in {', '.join(map(str, run_dirs))}")
    cfg = load_config([configs[0]])
    total = load_manifest(cfg.data.train).split("train").samples
    latest = next(filter(None, (latest_checkpoint(d) for d in run_dirs)), None)
    global_batch = read_state(latest)["progress"]["global_batch"] if latest else 1
    finished = any((d / FINAL_DIR).is_dir() for d in run_dirs)
    lines, ok = [], True
    for use in usage:
        left_out = total - use.unique
        complete = finished or use.epoch != usage[-1].epoch
        line = (f"epoch {use.epoch}: {use.steps} steps, {use.samples} sample uses, "
                f"{use.unique} distinct of {total}, {left_out} left out, "
                f"{len(use.duplicates)} used twice")
        if use.duplicates:
            ok = False
            line += f" (e.g. {', '.join(use.duplicates[:3])})"
        if complete and left_out >= global_batch:
            ok = False
            line += f"; more than a global batch ({global_batch}) left out"
        elif not complete:
            line += " (epoch in progress)"
        lines.append(line)
    return lines, ok
