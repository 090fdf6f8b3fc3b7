"""The loader's worker processes: how they start, outlive stop signals, report a stall, and end
with their trainer.

stream.ShardLoader hands these to torch's DataLoader (its multiprocessing context, worker init
and timeout); the fork server preloads loader_server.py. Kept apart from what the workers
compute (stream.py) because it is about processes and signals, not samples.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import time
from typing import Iterator

import torch


# Workers start from a clean server process, not forked from the trainer, which has threads
# (checkpoint mirror, W&B, progress bar, gloo): a fork copies locks those threads may hold.
# The server imports stream.py (torch, torchvision, PIL) once, so each epoch's workers
# start by a cheap fork of it instead of importing everything again (loader_server.py).
WORKER_START = "forkserver"
SERVER_PRELOAD = ["resnet.data.loader_server"]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals() -> None:
    """Loader processes (the fork server and each worker) outlive a stop signal, so they keep
    feeding their trainer until it has saved the step it reached.

    The stop signal reaches every process of the trainer's process group, and the loader's
    are in it: torchrun SIGTERMs each worker's process group (when a node joins, and when
    torchrun itself is stopped), a terminal's Ctrl-C and `kill -TERM -PGID` signal the group,
    srun/slurmstepd every process of the job step. With the default action the workers died
    at once and the trainer's next batch failed (`DataLoader worker ... exited unexpectedly`;
    even a batch already queued, whose tensors come through the dead worker's socket): no
    checkpoint. The server must live on too: when it dies, the trainer reads its workers as
    exited. A process group of their own would not do: slurmstepd and systemd
    (KillMode=control-group) signal every process of the step or cgroup.

    Ignoring is safe because they end with their trainer anyway: the DataLoader stops the
    workers when an epoch or the run ends, each watches the trainer's pid (_exit_with), the
    server ends when the trainer's end of its lifeline pipe closes, and SIGKILL (torchrun's,
    30 s after its SIGTERM; systemd's after TimeoutStopSec) ends them all.
    """
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)


def default_stop_signals() -> None:
    """The fork server runs this in each child it forks. Python has one fork server per
    process, so a multiprocessing Pool or any library using the "forkserver" context gets its
    processes from ours too; they must keep the default actions (a Pool's terminate() sends
    SIGTERM and waits: with SIGTERM ignored it waited forever). The loader's own workers
    ignore the signals again in init_worker."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_DFL)


def worker_context():
    context = multiprocessing.get_context(WORKER_START)
    if WORKER_START == "forkserver":
        context.set_forkserver_preload(SERVER_PRELOAD)
    return context


def _kill_loader_workers() -> None:
    """At exit, SIGKILL this process's daemon children: its DataLoader workers, still running
    when an exception ends the process with an epoch's iterator alive (a lost peer's collective
    error). multiprocessing's own exit handler terminates daemon children with SIGTERM and then
    joins them, which waits forever for workers that ignore SIGTERM (ignore_stop_signals)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# Runs before multiprocessing's exit handler: atexit runs the last registered first, and
# multiprocessing.util registered its handler when torch was imported.
atexit.register(_kill_loader_workers)


class WorkerStuck(RuntimeError):
    """A DataLoader worker produced no batch within data.worker_timeout_s."""


def named_timeouts(batches: Iterator, workers: int, timeout_s: float, where: str):
    """The DataLoader's batches; its bare timeout becomes an error naming the stuck worker
    (batch i comes from worker i % workers: the DataLoader takes them round-robin)."""
    done = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as exc:
            if "timed out" not in str(exc):
                raise
            raise WorkerStuck(f"DataLoader worker {done % workers} ({where}, its batch {done} "
                              f"of this pass) produced nothing in {timeout_s:g} s "
                              f"(data.worker_timeout_s): a stuck read or decode") from None
        done += 1
        yield batch


def init_worker(_: int, environ: dict | None = None, trainer_pid: int | None = None) -> None:
    torch.set_num_threads(1)  # one decode per core; intra-op threads only oversubscribe
    # Reset to the defaults in every child of the server (default_stop_signals), and torch's
    # worker start installs a SIGTERM handler of its own (it ends the worker); this runs after
    # both.
    ignore_stop_signals()
    if environ is not None:  # the forkserver's environment is from when it started: use ours
        os.environ.clear()
        os.environ.update(environ)
    if trainer_pid is not None:
        _exit_with(trainer_pid)


def _exit_with(pid: int) -> None:
    """End this worker when the process that reads its batches ends.

    torch's worker watchdog watches the worker's parent, which here is the fork server, not
    the trainer: a SIGKILLed trainer (OOM, a lost node, a test's fault) would leave its workers
    waiting forever, and with them the server (they hold its lifeline pipe).
    """
    import select
    import threading

    def watch() -> None:
        try:
            ended = os.pidfd_open(pid)  # readable once the process has ended (Linux 5.3+)
        except ProcessLookupError:
            os._exit(1)
        except (AttributeError, OSError):
            ended = None
        if ended is not None:
            select.select([ended], [], [])
        else:
            while _running(pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="trainer-watch", daemon=True).start()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
