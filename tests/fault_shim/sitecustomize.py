"""Test-only fault injection for subprocesses, so the product carries no test hooks.

Tests put this folder first on PYTHONPATH (tests/trainutil.py `env`, tests/test_wandb_training.py,
benchmarks/gpu_check.sh); Python then imports this module at start-up in every process (the
launcher and each training rank). With no RESNET_TEST_* fault variable set it does nothing.
Modules are patched right after they execute, so a process that never imports them (the
launcher) pays nothing.

Training faults (resnet.train.trainer and accelerate's save_state), first attempt only
(TORCHELASTIC_RESTART_COUNT unset or 0), so an elastic restart runs clean; AFTER_STEP,
IN_CHECKPOINT and RANK may instead list one value per attempt (`8,6`: the first attempt's
fault at step 8, the first restart's at step 6; an empty item or an attempt past the list: no
fault), so one launch can meet a second fault in its restart:

    RESNET_TEST_FAULT_AFTER_STEP=N     once optimizer step N is done (its checkpoint, evaluation
                                       and log written), before step N+1 starts: the process
                                       SIGKILLs itself
    RESNET_TEST_FAULT_IN_CHECKPOINT=1  die inside step N's checkpoint write instead: right
                                       after accelerate's save_state into the temporary
                                       folder, before trainer_state.json and the rename that
                                       makes it visible
    RESNET_TEST_FAULT_HOLD=PATH        instead of dying at that point, write this process id to
                                       PATH (atomically) and wait (at most 120 s) until PATH is
                                       removed, so a test can kill or signal the run at a known
                                       point (every attempt that has a fault)
    RESNET_TEST_FAULT_RANK=R           only on global rank R (default: every rank); a list
                                       names the rank of each attempt's AFTER_STEP fault (and
                                       is refused beside the faults below, which take one)
    RESNET_TEST_FAULT_ENOSPC_AT_STEP=N (every attempt) accelerate's save_state into step N's
                                       temporary folder writes, then raises OSError(ENOSPC), as
                                       a full disk would (on RANK, if given)
    RESNET_TEST_FAULT_ENOSPC_INSIDE=1  raise that ENOSPC inside DeepSpeed's save_checkpoint
                                       instead: its checkpoint engine's first file write
                                       into step N's folder (rank 0: the model file; other
                                       ranks: their ZeRO shard), before DeepSpeed's barriers
    RESNET_TEST_FAULT_DISK_FREE=BYTES  shutil.disk_usage reports this many bytes free
    RESNET_TEST_FAULT_INF_GRAD_AT_STEP=N  (every attempt) optimizer step N's loss keeps its
                                       value but its gradient is multiplied by inf: a finite
                                       loss with non-finite gradients (on RANK, if given)

Freeze (first attempt only), for the fencing tests:

    RESNET_TEST_FAULT_STOP_AT_FENCE=TEXT  when the fence (resnet.train.liveness
                                       Membership.check) is asked about a write whose
                                       description contains TEXT, the process SIGSTOPs
                                       itself just before the check (on RANK, if given): a
                                       node frozen between a collective and a write; the
                                       test freezes the rest of the node and thaws it later

Gates (every rank, every attempt), for tests that must act while training is at a known step:

    RESNET_TEST_FAULT_GATES=DIR        before step N+1 starts, while DIR/pause-at-N exists, each
                                       rank writes DIR/paused-at-N-rank-R (its pid) and waits
                                       until the test removes pause-at-N or the rank is asked
                                       to stop (SIGTERM: torchrun restarts the group for a
                                       joining node), at most 120 s
                                       DIR/pause-fetch-at-N: the same, inside the fetch of the
                                       next step's batches (the loader's next batch not yet
                                       taken), writing DIR/paused-fetch-at-N-rank-R: a stop
                                       signal lands while the trainer waits for data
                                       DIR/block-fetch-at-N: as pause-fetch, but a stop signal
                                       does not end the wait: data that does not come

State probe (every rank, every attempt), for tests that compare what a resume loaded:

    RESNET_TEST_SAVE_AFTER_RESUME=DIR  right after the trainer resumed from a checkpoint, before
                                       any step, every rank writes accelerate's save_state into
                                       DIR (DeepSpeed: its shards at the new world size)

Device memory (every rank, every attempt), for train.auto_batch_size:

    RESNET_TEST_FAULT_OOM_ABOVE=R:N,...  on global rank R, a ResNet forward of more than N
                                       images raises torch.OutOfMemoryError (a device that
                                       fits N); a bare N applies to every rank

W&B faults (wandb), RESNET_TEST_WANDB_FAULT:

    init      wandb.init raises (as an unreachable server or a bad setting would)
    log:N     Run.log works N times, then raises ConnectionError on every later call
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import sys
import time
from pathlib import Path

HOLD_LIMIT_S = 120.0


def _int(name: str, value: str) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        raise SystemExit(f"fault shim: {name}={value!r} is not an integer") from None


def _env_int(name: str) -> int | None:
    return _int(name, os.environ.get(name, ""))


# ------------------------------------------------------------------------- training faults

ATTEMPT = _env_int("TORCHELASTIC_RESTART_COUNT") or 0
FIRST_ATTEMPT = ATTEMPT == 0


def _this_attempt(name: str) -> str:
    """A training fault's setting for this attempt: `V` is the first attempt's, `V0,V1,...`
    one per attempt."""
    items = os.environ.get(name, "").split(",")
    return items[ATTEMPT] if ATTEMPT < len(items) else ""


AFTER_STEP = _int("RESNET_TEST_FAULT_AFTER_STEP", _this_attempt("RESNET_TEST_FAULT_AFTER_STEP"))
IN_CHECKPOINT = _this_attempt("RESNET_TEST_FAULT_IN_CHECKPOINT") == "1"
HOLD = os.environ.get("RESNET_TEST_FAULT_HOLD", "")
_RANKS = os.environ.get("RESNET_TEST_FAULT_RANK", "")
PER_ATTEMPT_RANKS = "," in _RANKS
# A list names the rank of each attempt's AFTER_STEP fault; the other faults take one rank.
AFTER_STEP_RANK = _int("RESNET_TEST_FAULT_RANK",
                       _this_attempt("RESNET_TEST_FAULT_RANK") if PER_ATTEMPT_RANKS else _RANKS)
RANK = None if PER_ATTEMPT_RANKS else AFTER_STEP_RANK
INF_GRAD_AT = _env_int("RESNET_TEST_FAULT_INF_GRAD_AT_STEP")
ENOSPC_AT = _env_int("RESNET_TEST_FAULT_ENOSPC_AT_STEP")
DISK_FREE = _env_int("RESNET_TEST_FAULT_DISK_FREE")
ENOSPC_INSIDE = os.environ.get("RESNET_TEST_FAULT_ENOSPC_INSIDE") == "1"
if PER_ATTEMPT_RANKS and (INF_GRAD_AT is not None or ENOSPC_AT is not None
                          or os.environ.get("RESNET_TEST_FAULT_STOP_AT_FENCE")):
    raise SystemExit("tests/fault_shim: RESNET_TEST_FAULT_RANK lists ranks per attempt for "
                     "RESNET_TEST_FAULT_AFTER_STEP only; the other faults take one rank")


def _fires(step: int) -> bool:
    rank = int(os.environ.get("RANK", "0"))
    return step == AFTER_STEP and (AFTER_STEP_RANK is None or AFTER_STEP_RANK == rank)


def _hold_or_die() -> None:
    if HOLD:
        hold = Path(HOLD)
        written = hold.with_name(f"{hold.name}.{os.getpid()}")
        written.write_text(str(os.getpid()))
        os.replace(written, hold)  # the test never reads a half-written id
        deadline = time.monotonic() + HOLD_LIMIT_S
        while hold.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    os.kill(os.getpid(), signal.SIGKILL)


GATES = os.environ.get("RESNET_TEST_FAULT_GATES", "")


def _gate(trainer, name: str = "pause-at", signal_ends: bool = True) -> None:
    pause = Path(GATES) / f"{name}-{trainer.progress.step}"
    if not pause.exists():
        return
    rank = os.environ.get("RANK", "0")
    paused = "paused-" + name.split("-", 1)[1]  # what the test waits for
    (Path(GATES) / f"{paused}-{trainer.progress.step}-rank-{rank}").write_text(str(os.getpid()))
    deadline = time.monotonic() + HOLD_LIMIT_S
    while pause.exists() and not (signal_ends and trainer.stop.signum) and \
            time.monotonic() < deadline:
        time.sleep(0.05)


_TRAINER = []  # the process's trainer, once it resumed (the feed's gates read its step)


def _patch_feed(module) -> None:
    real_pull = module.DeviceFeed._pull

    def _pull(self, source):
        if _TRAINER:
            _gate(_TRAINER[0], "pause-fetch-at")
            _gate(_TRAINER[0], "block-fetch-at", signal_ends=False)
        return real_pull(self, source)

    module.DeviceFeed._pull = _pull


SAVE_AFTER_RESUME = os.environ.get("RESNET_TEST_SAVE_AFTER_RESUME", "")


def _patch_trainer(module) -> None:
    real_step, real_resume = module.Trainer.train_step, module.Trainer.resume

    def resume(self):
        real_resume(self)
        _TRAINER[:] = [self]
        if SAVE_AFTER_RESUME:
            self.engine.accelerator.save_state(SAVE_AFTER_RESUME)

    def train_step(self, *args, **kwargs):
        if AFTER_STEP is not None and not IN_CHECKPOINT and _fires(self.progress.step):
            _hold_or_die()  # step N done, N+1 not begun
        if GATES:
            _gate(self)
        return real_step(self, *args, **kwargs)

    module.Trainer.train_step = train_step
    module.Trainer.resume = resume
    if INF_GRAD_AT is not None:
        _patch_inf_grad(module)


def _patch_inf_grad(module) -> None:
    import torch

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    real_loss = module.Trainer._loss

    def _loss(self, images, labels):
        loss, logits = real_loss(self, images, labels)
        rank = int(os.environ.get("RANK", "0"))
        if self.progress.step + 1 == INF_GRAD_AT and (RANK is None or RANK == rank):
            loss = InfGrad.apply(loss)
        return loss, logits

    module.Trainer._loss = _loss


def _patch_save_state(module) -> None:
    real_save = module.Accelerator.save_state

    def save_state(self, output_dir=None, *args, **kwargs):
        result = real_save(self, output_dir, *args, **kwargs)
        name = Path(str(output_dir)).name  # the checkpoint manager's ".tmp-step-NNNNNNNNN"
        step = name.rsplit("-", 1)[-1]
        if IN_CHECKPOINT and name.startswith(".tmp-step-") and _fires(int(step)):
            _hold_or_die()
        rank = int(os.environ.get("RANK", "0"))
        if ENOSPC_AT is not None and not ENOSPC_INSIDE and \
                name == f".tmp-step-{ENOSPC_AT:09d}" and (RANK is None or RANK == rank):
            _no_space(output_dir)
        return result

    module.Accelerator.save_state = save_state


STOP_AT_FENCE = os.environ.get("RESNET_TEST_FAULT_STOP_AT_FENCE", "")


def _patch_fence(module) -> None:
    real_check = module.Membership.check

    def check(self, what: str) -> None:
        rank = int(os.environ.get("RANK", "0"))
        if FIRST_ATTEMPT and STOP_AT_FENCE in what and (RANK is None or RANK == rank):
            os.kill(os.getpid(), signal.SIGSTOP)
        return real_check(self, what)

    module.Membership.check = check


def _no_space(path) -> None:
    import errno

    raise OSError(errno.ENOSPC, "No space left on device (test shim)", str(path))


def _patch_deepspeed_writes(module) -> None:
    real_save = module.TorchCheckpointEngine.save

    def save(self, state_dict, path):
        rank = int(os.environ.get("RANK", "0"))
        if f"/.tmp-step-{ENOSPC_AT:09d}/" in str(path) and (RANK is None or RANK == rank):
            _no_space(path)
        return real_save(self, state_dict, path)

    module.TorchCheckpointEngine.save = save


# ------------------------------------------------------------------------------ W&B faults

WANDB_FAULT = os.environ.get("RESNET_TEST_WANDB_FAULT", "")


def _patch_wandb(wandb) -> None:
    if WANDB_FAULT == "init":
        def failing_init(*args, **kwargs):
            raise RuntimeError("injected W&B fault: wandb.init")

        wandb.init = failing_init
    elif WANDB_FAULT.startswith("log:"):
        from wandb.sdk import wandb_run

        allowed = int(WANDB_FAULT.split(":", 1)[1])
        real_log = wandb_run.Run.log
        calls = [0]

        def failing_log(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] > allowed:
                raise ConnectionError(f"injected W&B fault: Run.log call {calls[0]}")
            return real_log(self, *args, **kwargs)

        wandb_run.Run.log = failing_log
    else:
        raise ValueError(f"RESNET_TEST_WANDB_FAULT={WANDB_FAULT!r}: expected 'init' or 'log:N'")


# ------------------------------------------------------------------------------ the hook


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds each module like the normal path finder, and patches it right after it executes."""

    def __init__(self, patches: dict) -> None:
        self.patches = patches

    def find_spec(self, name, path=None, target=None):
        patch = self.patches.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _oom_limit() -> int | None:
    rank = os.environ.get("RANK", "0")
    for item in filter(None, os.environ.get("RESNET_TEST_FAULT_OOM_ABOVE", "").split(",")):
        who, _, limit = item.rpartition(":")
        if who in ("", rank):
            return int(limit)
    return None


OOM_ABOVE = _oom_limit()


def _patch_resnet_forward(module) -> None:
    import torch

    real_forward = module.ResNet.forward

    def forward(self, x):
        if x.shape[0] > OOM_ABOVE:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fault shim: {x.shape[0]} images "
                                         f"> {OOM_ABOVE})")
        return real_forward(self, x)

    module.ResNet.forward = forward


_patches = {}
if OOM_ABOVE is not None:
    _patches["torchvision.models.resnet"] = _patch_resnet_forward
if (AFTER_STEP is not None and not IN_CHECKPOINT) or GATES or SAVE_AFTER_RESUME or \
        INF_GRAD_AT is not None:
    _patches["resnet.train.trainer"] = _patch_trainer
if GATES:
    _patches["resnet.data.device"] = _patch_feed
if (AFTER_STEP is not None and IN_CHECKPOINT) or ENOSPC_AT is not None:
    _patches["accelerate.accelerator"] = _patch_save_state
if STOP_AT_FENCE:
    _patches["resnet.train.liveness"] = _patch_fence
if ENOSPC_AT is not None and ENOSPC_INSIDE:
    _patches["deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine"] = \
        _patch_deepspeed_writes
if DISK_FREE is not None:
    import shutil

    def _disk_usage(path, _real=shutil.disk_usage):
        return _real(path)._replace(free=DISK_FREE)

    shutil.disk_usage = _disk_usage
if WANDB_FAULT:
    _patches["wandb"] = _patch_wandb
if _patches:
    sys.meta_path.insert(0, _PatchOnImport(_patches))
