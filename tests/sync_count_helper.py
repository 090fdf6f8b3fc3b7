"""Run by tests/test_sync_free.py in a process of its own (one Accelerator per process):
train a few steps in-process and count, from the third step's start to the next log step,
every call that forces a host-device sync on CUDA: a tensor's value read on the host
(.item(), .tolist(), .cpu(), bool(), torch.tensor(..., device=...)) and device-wide
synchronisations (torch.cuda.synchronize, DeepSpeed's accelerator synchronize, which its
throughput timer calls; on a CPU both are counted although they do nothing there). Prints one
JSON line: the call sites, the step counted to, and the sync debug mode it ran under (none
without CUDA).

    python tests/sync_count_helper.py RUN_DIR key=value ...
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch
from deepspeed.accelerator import get_accelerator

from resnet.config import load_config
from resnet.train import trainer as T

COUNTING = {"on": False}
# On CUDA, also let torch raise at any synchronising call (SYNC_DEBUG_MODE=error).
SYNC_DEBUG = os.environ.get("SYNC_DEBUG_MODE", "") if torch.cuda.is_available() else ""


def _counting(on: bool) -> None:
    COUNTING["on"] = on
    if SYNC_DEBUG:
        torch.cuda.set_sync_debug_mode(SYNC_DEBUG if on else "default")
CALLS: list[str] = []


def _site() -> str:
    stack = traceback.extract_stack()[:-2]
    frames = [f for f in stack if "/resnet/" in f.filename]
    here = f"{frames[-1].filename.split('/resnet/', 1)[-1]}:{frames[-1].lineno}" if frames \
        else "outside resnet"
    return f"{here} (innermost {stack[-1].filename.rsplit('/', 2)[-1]}:{stack[-1].lineno})"


def _counted(name, real):
    def wrapper(*args, **kwargs):
        if COUNTING["on"] and (name != "torch.tensor" or kwargs.get("device") is not None):
            CALLS.append(f"{name} at {_site()}")
        return real(*args, **kwargs)
    return wrapper


def main(run_dir: str, *overrides: str) -> None:
    for name in ("item", "tolist", "cpu"):
        setattr(torch.Tensor, name, _counted(f"Tensor.{name}", getattr(torch.Tensor, name)))
    torch.tensor = _counted("torch.tensor", torch.tensor)
    torch.Tensor.__bool__ = _counted("Tensor.__bool__", torch.Tensor.__bool__)
    torch.cuda.synchronize = _counted("torch.cuda.synchronize", torch.cuda.synchronize)
    accelerator = get_accelerator()  # DeepSpeed's singleton: its timers call this instance
    accelerator.synchronize = _counted("deepspeed accelerator synchronize",
                                       accelerator.synchronize)
    real_step, real_log = T.Trainer.train_step, T.Trainer._log_train

    def train_step(self, *args, **kwargs):
        if self.progress.step >= 2 and "counted_to" not in COUNTING:  # after 2 warm-up steps
            _counting(True)
        return real_step(self, *args, **kwargs)

    def log_train(self, *args, **kwargs):
        if COUNTING["on"]:
            _counting(False)
            COUNTING["counted_to"] = self.progress.step
        return real_log(self, *args, **kwargs)

    T.Trainer.train_step, T.Trainer._log_train = train_step, log_train
    T.train(load_config([], [f"run.dir={run_dir}", *overrides]))
    print("SYNC_CALLS " + json.dumps({"calls": CALLS, "counted_to": COUNTING.get("counted_to"),
                                      "sync_debug": SYNC_DEBUG}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
