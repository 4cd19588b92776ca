"""Build a module's optimizer (and per-step scheduler) from factories, over the parameters that train."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["OptimizerFactory", "SchedulerFactory", "configure_optimizers"]

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


def configure_optimizers(module: pl.LightningModule, optimizer: OptimizerFactory | None, scheduler: SchedulerFactory | None, default_lr: float) -> Any:
    """What ``configure_optimizers`` returns: ``optimizer(params)`` (default AdamW at ``default_lr``) over the
    parameters with ``requires_grad``, plus ``scheduler(optimizer, total_steps=...)`` stepped every step."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("No trainable parameters: every parameter of the model is frozen.")
    opt = (optimizer or (lambda ps: torch.optim.AdamW(ps, lr=default_lr)))(params)
    if scheduler is None:
        return opt
    sched = scheduler(opt, total_steps=module.trainer.estimated_stepping_batches)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
