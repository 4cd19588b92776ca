"""A LightningModule that fine-tunes a pretrained ``transformers`` encoder for text classification."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ..hub import load_backbone
from .pooling import POOLINGS, pool

__all__ = ["TextClassifier"]

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


class TextClassifier(pl.LightningModule):
    """Pretrained encoder (``self.backbone``) + pooling + dropout + linear head (``self.head``).

    ``forward(input_ids, attention_mask, ...)`` returns logits ``(batch, num_classes)``. Logs
    ``train/loss``, ``val/loss``, ``val/acc`` and ``val/f1`` (macro). Only parameters with
    ``requires_grad`` reach the optimizer, so freezing callbacks decide what trains.

    Args:
        name_or_path: hub id or local folder of the encoder (packaged offline copies are found first).
        num_classes: number of labels.
        pooling: ``mean``, ``cls`` or ``last`` (see :func:`lightning_peft.models.pooling.pool`).
        dropout: dropout before the head.
        optimizer: factory taking the parameters (Hydra ``_partial_``); default AdamW(lr=2e-5).
        scheduler: factory ``(optimizer, total_steps=...)``, stepped every optimizer step; optional.
        label_names: class names, stored in the checkpoint's hyperparameters.
    """

    def __init__(
        self,
        name_or_path: str,
        num_classes: int,
        pooling: str = "mean",
        dropout: float = 0.1,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        label_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.backbone = load_backbone(name_or_path)
        # The encoder's own pooler (BERT's tanh layer over [CLS]) is never used here: removed, so that it
        # neither waits for a gradient under DDP nor receives adapters that could never train.
        if isinstance(getattr(self.backbone, "pooler", None), nn.Module):
            self.backbone.pooler = None
        hidden = self.backbone.config.hidden_size
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.train()  # from_pretrained leaves the backbone in eval mode (dropout off)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        return self.head(pool(hidden, attention_mask, self.hparams.pooling))

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
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("No trainable parameters: every parameter of the model is frozen.")
        factory = self.optimizer_factory or (lambda ps: torch.optim.AdamW(ps, lr=2e-5))
        optimizer = factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
