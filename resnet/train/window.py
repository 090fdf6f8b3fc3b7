"""The figures of one log window: loss, top-1/top-5 and throughput since the last log line.

The sums stay on the device where the steps put them (created there on first use), so the
steps between two log lines never wait for the host; `summarise` reduces them over ranks in
one all-reduce.
"""
from __future__ import annotations

import time
from typing import Callable

import torch


class LogWindow:
    """Throughput and loss over the steps since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.loss_sum = torch.zeros(())
        self.hits = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, samples
        self._fresh = True  # the zeros above are on the CPU, not yet where the steps run
        self.steps = self.samples = self.skipped = 0
        self.wait = 0.0
        self._wait_start = 0.0

    def start_wait(self) -> None:
        self._wait_start = time.perf_counter()

    def end_wait(self) -> None:
        self.wait += time.perf_counter() - self._wait_start

    def _on(self, device: torch.device) -> None:
        if self._fresh:  # new zeros there, not a copy of the CPU ones
            self.loss_sum = torch.zeros((), device=device)
            self.hits = torch.zeros(3, dtype=torch.float64, device=device)
            self._fresh = False

    def add(self, loss: torch.Tensor, samples: int, skipped: int) -> None:
        self._on(loss.device)
        self.loss_sum += loss
        self.steps += 1
        self.samples += samples
        self.skipped += skipped

    def add_hits(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if labels.numel() == 0:
            return
        self._on(labels.device)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        self.hits[:2] += torch.stack([top5[:, 0].sum(), top5.any(dim=1).sum()])
        self.hits[2] += labels.numel()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def summarise(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], world_size: int,
                  device: torch.device) -> dict:
        """The window's figures over all ranks (`reduce_sum` sums a tensor over them): loss,
        top1, top5, img_per_s (+ per device), data_wait_frac, step_time_s, and the count of
        corrupt samples skipped (`skipped`). Every rank calls it at the same step, on the
        device of its steps (a window of only empty batches never moved its sums there).
        Resets the window."""
        totals = torch.cat([self.loss_sum.reshape(1).to(device, torch.float64),
                            self.hits.to(device),
                            torch.tensor([self.skipped], dtype=torch.float64).to(device)])
        loss_sum, top1, top5, seen, skipped = reduce_sum(totals).tolist()
        elapsed = max(self.elapsed(), 1e-9)
        img_s = self.samples / elapsed  # samples of all ranks
        figures = {
            "loss": loss_sum / world_size / max(self.steps, 1),  # the mean over ranks
            "top1": top1 / max(seen, 1), "top5": top5 / max(seen, 1),
            "img_per_s": img_s, "img_per_s_per_device": img_s / world_size,
            "data_wait_frac": self.wait / elapsed, "step_time_s": elapsed / max(self.steps, 1),
            "skipped": int(skipped),
        }
        self.reset()
        return figures
