"""What a run leaves in its run.dir: every file and folder name, how to find its newest
complete checkpoint and its newest weights, and which run a path belongs to. The one place
these names are spelled.

    run.dir/
        config.yaml              the settled configuration the run trained with
        metrics.jsonl            one JSON line per logged step (resnet.train.metrics)
        console.log              everything `resnet quickstart`'s commands printed
        audit/                   which samples each step trained on (resnet.train.audit)
        checkpoints/
            step-000001200/      a complete checkpoint (resnet.checkpoint writes them)
                trainer_state.json
            latest               the name of the newest complete checkpoint
        final/
            model.safetensors    the final weights, classes.json beside them

Kept free of heavy imports, so that `resnet report` reads a run without loading torch.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CONSOLE_LOG = "console.log"
AUDIT_DIR = "audit"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
WEIGHTS_FILE = "model.safetensors"
CLASSES_FILE = "classes.json"

STATE_FILE = "trainer_state.json"  # in each checkpoint: the JSON-stateful parts
LATEST = "latest"
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_NAME = re.compile(r"step-\d{9}")  # what a checkpoint folder (and `latest`) may be called
# In trainer_state.json: the checkpoint's place in the order of writing (1 + the highest on
# disk). After a rollback a newer checkpoint can have a lower step than older ones: pruning
# and the fallback for a missing `latest` go by this order, never by the step in the name.
WRITTEN_ORDER = "written"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:09d}"


def step_of(name: str) -> int:
    return int(name[len(CHECKPOINT_PREFIX):])


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def written_key(checkpoint: Path) -> tuple[int, int]:
    """Sort key: the order of writing (checkpoints without one, from older versions, first),
    then the step."""
    try:
        order = int(read_state(checkpoint).get(WRITTEN_ORDER, 0))
    except (OSError, ValueError, AttributeError):
        order = 0
    return order, step_of(checkpoint.name)


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in `directory`, in the order they were written."""
    found = [p for p in directory.glob(f"{CHECKPOINT_PREFIX}*")
             if CHECKPOINT_NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=written_key)


def find_latest(directory: Path) -> Path | None:
    """The newest complete checkpoint in a checkpoints folder: `latest` if valid, else the
    last one written."""
    pointer = directory / LATEST
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = complete_checkpoints(directory)
    return complete[-1] if complete else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run."""
    return find_latest(Path(run_dir) / CHECKPOINTS_DIR)


def newest_weights(run_dir: Path) -> Path:
    """A run's final/ folder if it holds the final weights, else its newest complete
    checkpoint. FileNotFoundError if it has neither."""
    run_dir = Path(run_dir)
    if (run_dir / FINAL_DIR / WEIGHTS_FILE).is_file():
        return run_dir / FINAL_DIR
    newest = latest_checkpoint(run_dir)
    if newest is None:
        raise FileNotFoundError(f"{run_dir}: a run directory with neither {FINAL_DIR}/"
                                f"{WEIGHTS_FILE} nor a complete checkpoint")
    return newest


def run_dir_of(path: Path) -> Path | None:
    """The run folder a final/ or checkpoint folder (or a file in one) sits in: the nearest
    folder at most three levels up that holds config.yaml (None: none does)."""
    return next((folder for folder in (path, *path.parents)[:4]
                 if (folder / CONFIG_FILE).is_file()), None)
