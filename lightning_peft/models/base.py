"""What every ready-made classifier shares: cross-entropy on ``batch["labels"]``, logged metrics, optimizer factories."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ..optim.build import OptimizerFactory, SchedulerFactory, configure_optimizers
from ..peft.checkpoint import check_adapter_only_checkpoint

__all__ = ["ClassificationModule", "OptimizerFactory", "SchedulerFactory"]



class ClassificationModule(pl.LightningModule):
    """Base of :class:`~lightning_peft.TextClassifier` and :class:`~lightning_peft.ImageClassifier`.

    Subclasses build their network and define ``forward(**inputs) -> logits (batch, num_classes)``;
    a batch is a dict of the forward's inputs plus ``labels`` ``(batch,)``. Logs ``train/loss``,
    ``val/loss``, ``val/acc`` and ``val/f1`` (macro). Only parameters with ``requires_grad`` reach the
    optimizer, so freezing callbacks decide what trains.

    Args:
        num_classes: number of labels (>= 2).
        optimizer: factory taking the parameters (Hydra ``_partial_``); default AdamW(lr=``default_lr``).
        scheduler: factory ``(optimizer, total_steps=...)``, stepped every optimizer step; optional.
    """

    default_lr: ClassVar[float] = 2e-5

    def __init__(self, num_classes: int, optimizer: OptimizerFactory | None = None, scheduler: SchedulerFactory | None = None) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_adapter_only_checkpoint(self, checkpoint)  # an adapter-only checkpoint without the PEFT callback: say so

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = self(**inputs)
        return logits, F.cross_entropy(logits, batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, loss = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits, loss = self._step(batch)
        self.val_metrics.update(logits, batch["labels"])
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        self.log_dict(self.val_metrics, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self, self.optimizer_factory, self.scheduler_factory, self.default_lr)
