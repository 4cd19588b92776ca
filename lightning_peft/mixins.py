"""``FinetuningMixin``: ``configure_optimizers`` with layer-wise learning rates, for new LightningModules."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .discriminative import discriminative_plan
from .layer_groups import layer_groups
from .models.schedules import warmup_schedule
from .param_groups import split_param_group

__all__ = ["FinetuningConfig", "FinetuningMixin", "OPTIMIZERS"]

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class FinetuningConfig:
    """Optimizer and schedule of :class:`FinetuningMixin` (every field has a usable default).

    ``layer_decay`` < 1 gives each layer group ``lr * layer_decay ** depth`` (depth 0 = head);
    ``scheduler`` is ``linear``, ``cosine`` or ``constant`` after ``warmup_ratio`` of linear warm-up,
    stepped every optimizer step. ``optimizer_kwargs`` go to the optimizer (e.g. ``momentum`` for SGD).
    """

    lr: float = 2e-5
    layer_decay: float = 1.0
    head_lr_mult: float = 1.0
    weight_decay: float = 0.01
    no_weight_decay: bool | list[str] = True
    optimizer: str = "adamw"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    scheduler: str = "linear"
    warmup_ratio: float = 0.1
    groups: list[Any] | None = None
    backbone: str | list[str] | None = None

    @classmethod
    def coerce(cls, value: "FinetuningConfig | Mapping[str, Any] | None") -> "FinetuningConfig":
        """Accept a config, a mapping (e.g. from Hydra or ``hparams``) or ``None`` (defaults); reject unknown keys."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"Unknown finetuning option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**dict(value))

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")


class FinetuningMixin:
    """Add to a new ``LightningModule`` to get ``configure_optimizers`` from ``self.finetuning``.

    ``self.finetuning`` is a :class:`FinetuningConfig` or a mapping of its fields (default: all
    defaults). Builds one param group per layer group (and weight-decay class) of the trainable
    parameters, with real learning rates, the chosen optimizer and a per-step warm-up schedule.
    The same placement rules as the :class:`~lightning_peft.DiscriminativeLR` callback.

    Example:
        >>> class MyModel(FinetuningMixin, pl.LightningModule):  # doctest: +SKIP
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.finetuning = FinetuningConfig(lr=1e-4, layer_decay=0.8)
    """

    finetuning: FinetuningConfig | Mapping[str, Any] | None = None

    def finetuning_param_groups(self) -> list[dict[str, Any]]:
        """The param groups ``configure_optimizers`` uses: trainable parameters only, split by placement."""
        cfg = FinetuningConfig.coerce(self.finetuning)
        groups = layer_groups(self, cfg.groups, cfg.backbone)
        plan = discriminative_plan(groups, cfg.layer_decay, cfg.head_lr_mult, cfg.no_weight_decay)
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("No trainable parameters: every parameter of the model is frozen.")
        return split_param_group({"lr": cfg.lr, "weight_decay": cfg.weight_decay}, named, plan)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = FinetuningConfig.coerce(self.finetuning)
        optimizer = OPTIMIZERS[cfg.optimizer](self.finetuning_param_groups(), lr=cfg.lr, **cfg.optimizer_kwargs)
        scheduler = warmup_schedule(optimizer, self.trainer.estimated_stepping_batches, cfg.warmup_ratio, cfg.scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
