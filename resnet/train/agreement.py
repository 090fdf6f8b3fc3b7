"""Stop/save agreement among ranks without a barrier in every step.

Each rank has local reasons to checkpoint or stop (a signal, the wall-clock interval); they
must act at the same step. The flags of step k go into an all-reduce (max) on the CPU gloo
group with `async_op=True`; the trainer reads it after fetching step k+1's batches, so the
exchange overlaps the data wait, and acts on it at step k: every rank reads the same result
for the same step, so all save or stop at the same step. A rank that has a stop signal reads
it before fetching (a stop needs no more data); when it reads does not change what it reads.
One process needs no exchange: the result is its own flags.
"""
from __future__ import annotations

import torch


class Agreement:
    def __init__(self, engine) -> None:
        self.group, self.world_size = engine.control_group, engine.world_size
        self._pending = None  # (values, work) of the exchange started last

    def start(self, *flags: float) -> None:
        """Begin agreeing on `flags` (max over ranks); read with result()."""
        values = torch.tensor(flags, dtype=torch.float64)  # on the CPU: no device sync
        work = None
        if self.world_size > 1:
            work = torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX,
                                                group=self.group, async_op=True)
        self._pending = (values, work)

    def result(self) -> list[float]:
        """The agreed flags of the last start() (zeros when none is pending); waits for it."""
        if self._pending is None:
            return [0.0, 0.0]
        values, work = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        # A CPU tensor by construction (numpy() refuses a device tensor): reading it never
        # waits for the device.
        return values.numpy().tolist()
