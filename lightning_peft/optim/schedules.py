"""Learning-rate schedules built from the run's total number of optimizer steps."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["SCHEDULES", "linear_warmup_decay", "warmup_schedule"]

SCHEDULES = ("linear", "cosine", "constant")


def warmup_schedule(optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.1, decay: str = "linear") -> LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of the steps, then ``linear`` or ``cosine`` decay to zero, or ``constant``."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if decay not in SCHEDULES:
        raise ValueError(f"Unknown schedule {decay!r}; choose one of {SCHEDULES}")
    total = max(1, int(total_steps))
    warmup = int(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if decay == "linear":
            return 1.0 - progress
        if decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return LambdaLR(optimizer, factor)


def linear_warmup_decay(optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to zero (BERT's schedule)."""
    return warmup_schedule(optimizer, total_steps, warmup_ratio, "linear")
