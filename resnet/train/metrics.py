"""Metrics sinks: W&B through Accelerate's tracker, and `run.dir/metrics.jsonl`.

The jsonl file is the record that always exists; W&B is best effort. Whatever W&B does (no
credentials, no network, an exception at init or at log time) training goes on: the logger
says so once and carries on with the jsonl file alone. Only the main process writes anything.

The W&B run id lives in `run.dir/wandb_run_id`, so every restart of the same run directory
(torchrun restarts, SLURM requeues, a spot replacement) resumes the same W&B run.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import signal
import string
import time
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import torch

from resnet.logs import RateLimitedLogger, verbose
from resnet.runfolder import METRICS_FILE

RUN_ID_FILE = "wandb_run_id"
WANDB_TRACKER = "wandb"
# wandb.init blocks up to init_timeout when the server is unreachable, and finish() blocks
# until uploads end: bound both so W&B costs at most a minute or so at each end of a run.
INIT_TIMEOUT_S = 30.0
FINISH_TIMEOUT_S = 60.0
# Strictness order of the modes: an environment variable may only make W&B more local.
_MODE_RANK = {"disabled": 0, "offline": 1, "dryrun": 1, "online": 2}


def resolve_mode(cfg_mode: str, env: Mapping[str, str] = os.environ) -> str:
    """The W&B mode to use: the config's, unless WANDB_MODE / WANDB_DISABLED ask for less.

    CI sets WANDB_MODE=offline or disabled; that must win over a config that says online, so a
    test can never reach the network. An environment asking for *more* (online) is ignored.
    """
    mode = cfg_mode
    if env.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    env_mode = env.get("WANDB_MODE", "").lower()
    if env_mode in _MODE_RANK and _MODE_RANK[env_mode] < _MODE_RANK[mode]:
        mode = "offline" if env_mode == "dryrun" else env_mode
    return mode


def has_credentials(env: Mapping[str, str] = os.environ) -> bool:
    """True when wandb could authenticate: WANDB_API_KEY, or a netrc entry for the W&B host."""
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def tracker_for(cfg) -> str | None:
    """What to give `Accelerator(log_with=...)`: "wandb", or None when W&B is disabled."""
    return None if resolve_mode(cfg.wandb.mode) == "disabled" else WANDB_TRACKER


def restart_count(env: Mapping[str, str] = os.environ) -> int:
    """How many times torchrun has restarted the workers (0 outside torchrun)."""
    try:
        return int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def system_metrics(device) -> dict:
    """Per-process system numbers for the log line: restart count, peak GPU memory on CUDA."""
    out: dict[str, Any] = {"restart_count": restart_count()}
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        out["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def load_or_create_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory, created (atomically) on first use."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    # W&B ids are short lowercase alphanumerics; any unique string of that form works.
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def last_logged_step(jsonl_path: Path) -> int | None:
    """The largest step in an existing metrics.jsonl (None if there is none)."""
    last = None
    try:
        with open(jsonl_path) as f:
            for line in f:
                try:
                    step = json.loads(line).get("step")
                except (ValueError, AttributeError):
                    continue  # a line cut short by a crash
                if isinstance(step, int) and (last is None or step > last):
                    last = step
    except FileNotFoundError:
        return None
    return last


def _plain(value: Any) -> Any:
    """A JSON-ready number from tensors and numpy scalars; NaN/inf become None (valid JSON)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """The trainer's one handle on monitoring: `start`, `log`, `log_predictions`, `finish`."""

    def __init__(self, accelerator, cfg, run_dir: Path) -> None:
        self.accelerator = accelerator
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.is_main = accelerator.is_main_process
        self.log_lines = RateLimitedLogger.for_accelerator(accelerator)
        self.run_id: str | None = None
        self.mode = resolve_mode(cfg.wandb.mode)
        self.wandb_active = False
        self._first_wandb_step = 0  # W&B refuses steps below the last one it has
        self._jsonl = None

    # ---- start -------------------------------------------------------------------------
    def start(self, config: dict) -> None:
        """Open metrics.jsonl and the W&B run (resumed by id); never raises for W&B problems."""
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        jsonl_path = self.run_dir / METRICS_FILE
        last = last_logged_step(jsonl_path)
        self._first_wandb_step = 0 if last is None else last + 1
        self._jsonl = open(jsonl_path, "a", buffering=1)
        if self.mode == "disabled" or not self._accelerator_has_wandb():
            self.mode = "disabled"
            return
        if self.mode == "online" and not has_credentials():
            self._say("no W&B credentials (WANDB_API_KEY or a netrc entry): logging offline; "
                      "upload later with `wandb sync`")
            self.mode = "offline"
        self.run_id = load_or_create_run_id(self.run_dir)
        self._init_wandb(config)

    def _accelerator_has_wandb(self) -> bool:
        return any(str(t) == WANDB_TRACKER for t in getattr(self.accelerator, "log_with", []))

    def _init_wandb(self, config: dict) -> None:
        """init_trackers in the configured mode; an online failure falls back to offline once."""
        modes = [self.mode] + (["offline"] if self.mode == "online" else [])
        for mode in modes:
            try:
                self.accelerator.init_trackers(
                    self.cfg.wandb.project, config=config, init_kwargs=self._init_kwargs(mode)
                )
            except Exception as exc:  # wandb raises many types; none may stop training
                self._drop_wandb_trackers()
                self._say(f"W&B init failed in {mode} mode: {exc!r}")
                continue
            self.mode, self.wandb_active = mode, True
            run = self.accelerator.get_tracker(WANDB_TRACKER, unwrap=True)
            # A resumed online run knows its own last step; steps at or below it are refused.
            self._first_wandb_step = max(self._first_wandb_step, int(getattr(run, "step", 0) or 0))
            self._say(f"W&B run {self.run_id} ({mode}) in {self.run_dir}", warn=False)
            return
        self.mode = "disabled"
        self._say("W&B disabled for this run; metrics still go to " + METRICS_FILE)

    def _init_kwargs(self, mode: str) -> dict:
        import wandb

        # quiet: no start banner and no run summary on the console (our own line says where
        # the run is); RESNET_LOG_LEVEL=debug brings them back.
        settings = {"finish_timeout": FINISH_TIMEOUT_S, "quiet": not verbose()}
        if "WANDB_INIT_TIMEOUT" not in os.environ:  # let the user's own setting win
            settings["init_timeout"] = INIT_TIMEOUT_S
        return {WANDB_TRACKER: {
            "id": self.run_id,
            "resume": "allow",
            "mode": mode,
            "dir": str(self.run_dir),
            "name": self.cfg.wandb.name or self.cfg.run.name or None,
            "entity": self.cfg.wandb.entity or None,
            "settings": wandb.Settings(**settings),
        }}

    # ---- logging -----------------------------------------------------------------------
    def log(self, metrics: dict, step: int) -> None:
        """Append one line to metrics.jsonl and send the same numbers to W&B."""
        if not self.is_main:
            return
        values = {key: _plain(value) for key, value in metrics.items()}
        self._write_jsonl({"step": int(step), "time": round(time.time(), 3), **values})
        self._send(values, step)

    def log_predictions(self, step: int, images_uint8, labels: Sequence[int], top5_indices,
                        class_names: Sequence[str] | None = None) -> None:
        """A W&B table of validation samples (image, label, top-5), at most val_table_rows."""
        if not (self.is_main and self.wandb_active):
            return
        try:
            table = self._predictions_table(images_uint8, labels, top5_indices, class_names)
        except Exception as exc:  # a bad shape must not end an evaluation
            self._say(f"prediction table skipped: {exc!r}", key="table")
            return
        self._send({"val_predictions": table}, step)

    def _predictions_table(self, images, labels, top5, class_names):
        import numpy as np
        import wandb

        rows = max(0, int(self.cfg.wandb.val_table_rows))
        images = _as_uint8(_to_numpy(images)[:rows])
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC, what wandb.Image expects
        labels = [int(v) for v in _to_numpy(labels)[:rows]]
        top5 = _to_numpy(top5)[:rows]

        def name(index: int) -> str:
            return class_names[index] if class_names else str(index)

        table = wandb.Table(columns=["image", "label", "top5", "top1_correct"])
        for image, label, guesses in zip(images, labels, top5):
            guesses = [int(g) for g in np.atleast_1d(guesses)]
            correct = bool(guesses) and guesses[0] == label
            table.add_data(wandb.Image(np.ascontiguousarray(image)), name(label),
                           ", ".join(name(g) for g in guesses), correct)
        return table

    def _write_jsonl(self, record: dict) -> None:
        if self._jsonl is None:
            return
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        except (OSError, TypeError, ValueError) as exc:
            self._say(f"could not write {METRICS_FILE}: {exc!r}", key="jsonl")

    def _send(self, values: dict, step: int) -> None:
        """accelerator.log guarded; steps W&B would refuse (replayed after a rollback) skipped."""
        if not self.wandb_active:
            return
        if step < self._first_wandb_step:
            self._say(f"step {step} was already sent to W&B before a restart (it accepts steps "
                      f">= {self._first_wandb_step}): sent to {METRICS_FILE} only",
                      key="replay", warn=False)
            return
        try:
            self.accelerator.log(values, step=int(step))
        except Exception as exc:
            self._disable(f"W&B log failed at step {step}: {exc!r}")
            return
        # The same step may be logged again (eval after train): W&B merges it into one row.
        self._first_wandb_step = int(step)

    # ---- ending ------------------------------------------------------------------------
    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run (bounded by FINISH_TIMEOUT_S) and the jsonl file. A non-zero
        `exit_code` (a stop by signal) goes to W&B too, SIGTERM's marked as a preemption, so the
        run is not recorded as finished; the next start resumes it."""
        if not self.is_main:
            return
        if self.wandb_active:
            for tracker in self._wandb_trackers():
                try:
                    if exit_code and getattr(tracker, "run", None) is not None:
                        if exit_code == 128 + signal.SIGTERM:
                            tracker.run.mark_preempting()
                        tracker.run.finish(exit_code=exit_code)
                    else:
                        tracker.finish()
                except Exception as exc:
                    self._say(f"W&B finish failed: {exc!r}")
            self._drop_wandb_trackers()  # so accelerator.end_training() does not finish twice
            self.wandb_active = False
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def _disable(self, reason: str) -> None:
        self._drop_wandb_trackers()
        self.wandb_active = False
        self._say(f"{reason}; W&B disabled for the rest of this run, metrics continue in "
                  f"{self.run_dir / METRICS_FILE}")

    def _wandb_trackers(self) -> list:
        return [t for t in getattr(self.accelerator, "trackers", []) if t.name == WANDB_TRACKER]

    def _drop_wandb_trackers(self) -> None:
        """Remove wandb from the accelerator, so its own log/end_training never touch it again."""
        trackers = getattr(self.accelerator, "trackers", None)
        if trackers is not None:
            trackers[:] = [t for t in trackers if t.name != WANDB_TRACKER]

    def _say(self, message: str, key: str | None = None, warn: bool = True) -> None:
        (self.log_lines.warning if warn else self.log_lines.info)(message, key=key)


def _to_numpy(value):
    import numpy as np

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _as_uint8(images):
    """uint8 as given; anything else (normalised floats) stretched to 0..255 per image."""
    import numpy as np

    if images.dtype == np.uint8:
        return images
    images = images.astype(np.float32)
    axes = tuple(range(1, images.ndim))
    low, high = images.min(axis=axes, keepdims=True), images.max(axis=axes, keepdims=True)
    return ((images - low) / np.maximum(high - low, 1e-6) * 255).astype(np.uint8)
