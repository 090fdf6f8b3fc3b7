"""Test-only W&B fault injection for subprocesses, so product code needs no test hooks.

tests/test_wandb_training.py puts this folder first on PYTHONPATH; Python then imports this
module at start-up in every process (the launcher and each training rank). With
RESNET_TEST_WANDB_FAULT unset it does nothing. Otherwise, once `wandb` is imported:

    init      wandb.init raises (as an unreachable server or a bad setting would)
    log:N     Run.log works N times, then raises ConnectionError on every later call

wandb is patched lazily, when the program imports it, so processes that never use W&B (the
launcher) do not pay its import time.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

FAULT = os.environ.get("RESNET_TEST_WANDB_FAULT", "")


def _patch(wandb) -> None:
    if FAULT == "init":
        def failing_init(*args, **kwargs):
            raise RuntimeError("injected W&B fault: wandb.init")

        wandb.init = failing_init
    elif FAULT.startswith("log:"):
        from wandb.sdk import wandb_run

        allowed = int(FAULT.split(":", 1)[1])
        real_log = wandb_run.Run.log
        calls = [0]

        def failing_log(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] > allowed:
                raise ConnectionError(f"injected W&B fault: Run.log call {calls[0]}")
            return real_log(self, *args, **kwargs)

        wandb_run.Run.log = failing_log
    else:
        raise ValueError(f"RESNET_TEST_WANDB_FAULT={FAULT!r}: expected 'init' or 'log:N'")


class _PatchWandbOnImport(importlib.abc.MetaPathFinder):
    """Finds `wandb` like the normal path finder, and patches it right after it executes."""

    def find_spec(self, name, path=None, target=None):
        if name != "wandb":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if FAULT:
    sys.meta_path.insert(0, _PatchWandbOnImport())
