"""The ZeRO runs several test modules check: 2 processes under ZeRO-1 or ZeRO-2, stopped
mid-epoch by a SIGTERM, once per test session (tests/trainutil.py once_per_session).
tests/test_zero_resume.py resumes them on other world sizes; ZeRO-1 runs
configs/deepspeed/zero1.json as written (bf16), so tests/test_engine.py checks that shipped JSON
on the same run."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import trainutil as tu

TRAIN = ("train.epochs=1", "checkpoint.every_steps=4")
STOPPED_AT = "step-000000007"  # rank 0 gets SIGTERM while held after step 6


def args(data: Path, run_dir: Path, stage: int, *more: str) -> list[str]:
    """The stopped run's command line, and its resumes' (`more` added)."""
    if stage == 1:
        return tu.shipped_json_overrides(data, run_dir, "zero1", *TRAIN, *more, val=False)
    return tu.overrides(data, run_dir, f"deepspeed.zero_stage={stage}", *TRAIN, *more,
                        val=False)


def stopped_run(tmp_path_factory, stage: int) -> tuple[Path, str]:
    """(run_dir, output) of 2 processes under ZeRO-`stage`, stopped by SIGTERM mid-epoch (once
    per stage and test session, whichever xdist worker asks first)."""
    data = tu.shared_data(tmp_path_factory)

    def make(root: Path) -> dict:
        run_dir, hold = root / "run", root / "hold"
        launch = tu.Launch(tu.torchrun_cmd(2, *args(data, run_dir, stage)), root / "log.txt",
                           RESNET_TEST_FAULT_AFTER_STEP=6, RESNET_TEST_FAULT_RANK=0,
                           RESNET_TEST_FAULT_HOLD=hold)
        try:
            tu.wait_for(hold.exists, tu.RUN_TIMEOUT_S, "rank 0 holding after step 6", [launch])
            os.kill(int(hold.read_text()), signal.SIGTERM)  # as a spot notice to its node
            hold.unlink()
            code = launch.wait(120)
        finally:
            launch.stop()
        assert code != 0 and "stopped by signal 15 at step 7" in launch.output(), launch.tail()
        assert tu.latest(run_dir) == STOPPED_AT
        shards = run_dir / "checkpoints" / STOPPED_AT / "pytorch_model"
        assert len(list(shards.glob("zero_pp_rank_*_optim_states.pt"))) == 2
        return {"run_dir": str(run_dir), "out": launch.output()}

    made = tu.once_per_session(tmp_path_factory, f"zero{stage}", make)
    return Path(made["run_dir"]), made["out"]
