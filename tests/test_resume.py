"""resume() and preflight's local_resume_point on their own: what they refuse, and why.

A stub stands in for the accelerator (test_checkpoint.py's); the training tests cover the same
paths through Accelerate and DeepSpeed (test_zero_resume.py: universal loading on another
world size, and a ZeRO checkpoint that cannot convert)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnet.checkpoint import universal
from resnet.checkpoint.errors import CheckpointError, ResumeError
from resnet.checkpoint.manager import CheckpointManager
from resnet.checkpoint.resume import PROGRESS, RunIdentity, local_resume_point, resume
from test_checkpoint import Counter, StubAccelerator

FINGERPRINT = "f" * 64


class Saved:
    """The trainer's saved progress, as TrainerState writes it."""

    def __init__(self, **fields) -> None:
        self.fields = {"step": 6, "samples_seen": 96, "global_batch": 16, "world_size": 2,
                       "zero_stage": 0, "fingerprint": FINGERPRINT, **fields}

    def state_dict(self) -> dict:
        return dict(self.fields)

    def load_state_dict(self, state: dict) -> None:
        self.fields = dict(state)


def _saved_run(run_dir: Path, step: int = 6, **fields) -> Path:
    """A run.dir whose newest checkpoint holds `fields` as its progress."""
    manager = CheckpointManager(StubAccelerator(), run_dir, {PROGRESS: Saved(**fields)})
    return manager.save(step)


def _zero_shards(checkpoint: Path, ranks: int, declared: bool = True) -> None:
    """The DeepSpeed files of a ZeRO checkpoint of `ranks` processes (contents: a stand-in)."""
    model_dir = checkpoint / universal.MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save({universal.INFO_KEY: {}} if declared else {}, model_dir / universal.MODEL_STATES)
    for rank in range(ranks):
        torch.save({}, model_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


def _local(run_dir: Path, resume_: bool = True, world_size: int = 2, global_batch: int = 16,
           fingerprint: str = FINGERPRINT):
    return local_resume_point(run_dir, resume=resume_, fingerprint=fingerprint,
                              global_batch=global_batch, world_size=world_size)


# ------------------------------------------------------------------ before any process group

def test_a_fresh_run_dir_is_a_fresh_start(tmp_path):
    assert _local(tmp_path / "run") is None


def test_the_saved_global_batch_wins_and_same_world_size_loads_plainly(tmp_path):
    checkpoint = _saved_run(tmp_path / "run")
    found = _local(tmp_path / "run", global_batch=64)  # configured otherwise: the run keeps 16
    assert (found.checkpoint, found.global_batch, found.load_universal) == (checkpoint, 16, False)


def test_checkpoints_where_a_fresh_start_was_asked_for_are_refused(tmp_path):
    _saved_run(tmp_path / "run", step=5)
    with pytest.raises(ResumeError, match=r"already holds checkpoints \(newest: step-000000005\) "
                                          r"and checkpoint.resume=false"):
        _local(tmp_path / "run", resume_=False)


def test_a_checkpoint_of_another_data_set_is_refused(tmp_path):
    _saved_run(tmp_path / "run")
    with pytest.raises(ResumeError, match="was trained on another data set .*use a new run.dir"):
        _local(tmp_path / "run", fingerprint="0" * 64)


def test_a_checkpoint_without_a_global_batch_is_refused_naming_the_setting(tmp_path):
    _saved_run(tmp_path / "run", global_batch=0)  # (never written so; a damaged file)
    with pytest.raises(ResumeError, match="trained with global batch 0; set "
                                          "train.global_batch_size=0"):
        _local(tmp_path / "run")


def test_zero_shards_of_another_world_size_load_universally_when_they_convert(tmp_path):
    _zero_shards(_saved_run(tmp_path / "run", zero_stage=1), ranks=2)
    assert _local(tmp_path / "run", world_size=3).load_universal is True


def test_zero_shards_missing_here_are_refused_saying_what_works(tmp_path):
    _zero_shards(_saved_run(tmp_path / "run", zero_stage=2), ranks=1)  # rank 1's is elsewhere
    with pytest.raises(ResumeError, match="holds ZeRO-2 optimizer shards for 2 processes, and "
                                          "this run has 1, and 1 of its files are not in this "
                                          "run.dir.*Restart with 2 processes"):
        _local(tmp_path / "run", world_size=1)


def test_zero_shards_written_before_they_were_declared_are_refused(tmp_path):
    _zero_shards(_saved_run(tmp_path / "run", zero_stage=1), ranks=2, declared=False)
    with pytest.raises(ResumeError, match="written before checkpoints carried DeepSpeed's "
                                          "universal_checkpoint_info"):
        _local(tmp_path / "run", world_size=1)


# ------------------------------------------------------------------ resume(), every rank

class PlainModel:
    """A prepared model whose engine was not started to load universal checkpoints."""


class UniversalModel:
    def load_universal_checkpoint(self) -> bool:
        return True


def _resume(run_dir: Path, model=None, gather=lambda item: [item], world_size: int = 2,
            fingerprint: str = FINGERPRINT):
    saved, counter = Saved(step=0), Counter()
    manager = CheckpointManager(StubAccelerator(), run_dir, {PROGRESS: saved, "c": counter},
                                gather=gather)
    latest = resume(manager, model or PlainModel(), RunIdentity(fingerprint, 16, world_size),
                    resumed_at=lambda: (saved.fields["step"], 0, saved.fields["fingerprint"]))
    return latest, saved


def test_resume_loads_the_newest_checkpoint_or_starts_fresh(tmp_path):
    latest, saved = _resume(tmp_path / "fresh")
    assert latest is None and saved.fields["step"] == 0
    checkpoint = _saved_run(tmp_path / "run", step=6)
    latest, saved = _resume(tmp_path / "run")
    assert latest == checkpoint and saved.fields["step"] == 6


def test_resume_refuses_a_checkpoint_of_another_data_set(tmp_path):
    """Preflight checked the local checkpoint; one that came from the mirror is checked here."""
    _saved_run(tmp_path / "run")
    with pytest.raises(ResumeError, match="was trained on another data set"):
        _resume(tmp_path / "run", fingerprint="0" * 64)


def test_resume_refuses_zero_shards_found_only_after_start(tmp_path):
    """ZeRO shards of another world size, but the engine was started without universal
    loading (preflight did not see them: they came from the mirror)."""
    checkpoint = _saved_run(tmp_path / "run", zero_stage=1)
    _zero_shards(checkpoint, ranks=2)
    (checkpoint / universal.MODEL_DIR / universal.DONE).write_text("{}")  # converted before
    with pytest.raises(ResumeError, match="found only after start \\(on the mirror\\); start "
                                          "again to convert it"):
        _resume(tmp_path / "run", world_size=1)


def test_a_failed_conversion_stops_every_rank_naming_it(tmp_path):
    _zero_shards(_saved_run(tmp_path / "run", zero_stage=1), ranks=2)  # shards of no tensors
    with pytest.raises(CheckpointError, match="converting .*step-000000006 to a universal "
                                              "checkpoint failed on 1 rank\\(s\\): rank 0 on "):
        _resume(tmp_path / "run", model=UniversalModel(), world_size=1)


def test_ranks_that_resumed_at_different_points_are_an_error_naming_both(tmp_path):
    _saved_run(tmp_path / "run", step=6)

    def gather(item):  # another rank, on a disk of its own, loaded an older copy
        if isinstance(item, tuple) and len(item) == 3:
            where, name, (step, epoch, data) = item
            return [item, ("rank 1 on node-b", "step-000000004", (4, epoch, data))]
        return [item]

    with pytest.raises(CheckpointError, match="ranks resumed from different points: rank 0 on "
                                              ".* loaded step-000000006 .*rank 1 on node-b "
                                              "loaded step-000000004"):
        _resume(tmp_path / "run", gather=gather)
