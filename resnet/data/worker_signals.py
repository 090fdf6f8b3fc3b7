"""Loader workers keep feeding their trainer through a stop signal, until it has saved.

The DataLoader workers' fork server imports this module first (stream.py names it in
`set_forkserver_preload`): importing it makes the server ignore SIGTERM and SIGINT, and every
worker it forks inherits that. Nothing else imports it.

Why: the stop signal reaches every process of the trainer's process group, and the server and
its workers are in it: torchrun SIGTERMs each worker's process group (when a node joins, and
when torchrun itself is stopped), a terminal's Ctrl-C and `kill -TERM -PGID` signal the group,
and srun/slurmstepd signal every process of the job step. With the default action the workers
died at once, the trainer's next batch (already queued: its tensors are handed over through the
dead worker's socket) failed with `DataLoader worker ... exited unexpectedly`, and the run ended
without the checkpoint the signal asked for. The server must live on too: when it dies, the
trainer reads its workers as exited.

A process group of their own would not do: slurmstepd and systemd (KillMode=control-group)
signal every process of the step or cgroup. Ignoring is safe because the workers end with their
trainer anyway: the DataLoader stops them when an epoch or the run ends, each watches the
trainer's pid (stream._exit_with) and ends when it ends, the server ends when the trainer's
end of its lifeline pipe closes, and SIGKILL (torchrun's, 30 s after its SIGTERM; systemd's
after TimeoutStopSec) still ends them.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

for _stop in STOP_SIGNALS:  # (see the docstring: this module runs only in the fork server)
    signal.signal(_stop, signal.SIG_IGN)
