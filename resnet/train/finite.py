"""Non-finite losses and updates: noted on the device every step, read only when it matters.

A step is bad when its loss is not finite, or when its update left a weight that is not
finite (a finite loss with inf/NaN gradients). Both are kept as "the first bad step" in one
device tensor, so a step costs no host sync (one foreach max-abs over the parameters); the
trainer reads it, reduced to the earliest step over all ranks, before each checkpoint and log
line, so no checkpoint ever holds weights that a NaN reached. A step that a loss scaler
skipped for overflow (fp16) leaves the weights finite and is not bad.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

NO_STEP = 2**62  # "no bad step yet"


def weights_finite(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A device bool: every element of every parameter is finite (max |x| cannot overflow)."""
    with torch.no_grad():
        return torch.stack(torch._foreach_norm(list(params), float("inf"))).isfinite().all()


class NonFiniteWatch:
    def __init__(self, device: torch.device) -> None:
        # [first step with a non-finite loss, first step whose update made a weight non-finite]
        self.first = torch.full((2,), NO_STEP, dtype=torch.long, device=device)

    def note(self, step: int, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        bad = torch.stack([~torch.isfinite(loss.detach()).all(), ~weights_finite(params)])
        self.first = torch.where(bad & (self.first == NO_STEP), step, self.first)

    def earliest(self, reduce_max: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
        """What went wrong first on any rank (None: nothing). `reduce_max` is the element-wise
        maximum over ranks; negated, it gives the minimum: the first bad step, not the last."""
        loss_step, weight_step = (-reduce_max(-self.first)).tolist()
        if loss_step == weight_step == NO_STEP:
            return None
        if loss_step <= weight_step:
            return f"non-finite loss at step {loss_step}"
        return (f"non-finite gradients at step {weight_step} (the loss was finite; the update "
                f"made the weights non-finite)")
