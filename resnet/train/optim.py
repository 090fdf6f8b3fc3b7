"""Parameter groups, SGD, and learning-rate schedules as pure functions of the step.

No scheduler object holds state: the trainer sets each group's learning rate from
`lr_at(step)` before every optimizer step, so a resumed run needs only the step number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from resnet.config import OptimConfig

REFERENCE_BATCH = 256  # optim.lr is given per 256 images (Goyal et al.)


def parameter_groups(model: nn.Module, weight_decay: float, bn_bias_decay: bool) -> list[dict]:
    """Weight decay on conv and linear weights only: BatchNorm and biases are 1-D tensors."""
    if bn_bias_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr * global_batch / REFERENCE_BATCH


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.SGD:
    groups = parameter_groups(model, cfg.weight_decay, cfg.bn_bias_decay)
    return torch.optim.SGD(groups, lr=peak_lr(cfg, global_batch), momentum=cfg.momentum,
                           nesterov=cfg.nesterov)


@dataclass(frozen=True)
class Schedule:
    """Learning rate at an optimizer step (0-based), for a run of `total_steps` steps."""

    cfg: OptimConfig
    peak: float
    total_steps: int
    steps_per_epoch: int

    def __call__(self, step: int) -> float:
        step = min(max(step, 0), max(self.total_steps - 1, 0))
        if self.cfg.schedule == "onecycle":
            return self._onecycle(step)
        warmup = int(round(self.cfg.warmup_epochs * self.steps_per_epoch))
        warmup = min(warmup, max(self.total_steps - 1, 0))
        if step < warmup:
            return self.peak * (step + 1) / (warmup + 1)
        if self.cfg.schedule == "constant":
            return self.peak
        progress = (step - warmup) / max(self.total_steps - 1 - warmup, 1)
        floor = self.peak * self.cfg.final_lr_ratio
        if self.cfg.schedule == "cosine":
            return floor + (self.peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (self.peak - floor) * (1 - progress)  # linear

    def _onecycle(self, step: int) -> float:
        # Same shape as torch.optim.lr_scheduler.OneCycleLR (cosine annealing, two phases).
        initial = self.peak / self.cfg.onecycle_div_factor
        final = initial / self.cfg.onecycle_final_div_factor
        rise_end = float(self.cfg.onecycle_pct_start * self.total_steps) - 1
        if step <= rise_end:
            return _cos_anneal(initial, self.peak, step / max(rise_end, 1e-9))
        fall = (step - rise_end) / max(self.total_steps - 1 - rise_end, 1e-9)
        return _cos_anneal(self.peak, final, fall)


def _cos_anneal(start: float, end: float, fraction: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * min(fraction, 1.0)) + 1)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
