"""A LightningModule that fine-tunes a pretrained ``transformers`` encoder for text classification."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..features.pooling import POOLINGS, pool
from ..knowledge.config import KnowledgeConfig, as_knowledge_config
from ..knowledge.fusion import fuse_from_forward
from .base import ClassificationModule, OptimizerFactory, SchedulerFactory
from .pretrained import load_backbone

__all__ = ["TextClassifier"]


class TextClassifier(ClassificationModule):
    """Pretrained encoder (``self.backbone``) + pooling + dropout + linear head (``self.head``).

    ``forward(input_ids, attention_mask, ...)`` returns logits ``(batch, num_classes)``. Logs
    ``train/loss``, ``val/loss``, ``val/acc`` and ``val/f1`` (macro). Only parameters with
    ``requires_grad`` reach the optimizer, so freezing callbacks decide what trains.

    Args:
        name_or_path: hub id or local folder of the encoder (packaged offline copies are found first).
        num_classes: number of labels.
        pooling: ``mean``, ``cls`` or ``last`` (see :func:`lightning_peft.features.pooling.pool`).
        dropout: dropout before the head.
        optimizer: factory taking the parameters (Hydra ``_partial_``); default AdamW(lr=2e-5).
        scheduler: factory ``(optimizer, total_steps=...)``, stepped every optimizer step; optional.
        label_names: class names, stored in the checkpoint's hyperparameters.
        knowledge: fuse an external vector per example (``KnowledgeConfig(mode="late" | "early", dim=F)`` or a
            dict of its fields); ``forward`` then takes ``features=(B, F)``, which batches carry under ``features``
            (see :class:`~lightning_peft.KnowledgeInjection` for what each mode does).
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
        knowledge: KnowledgeConfig | dict[str, Any] | None = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}")
        super().__init__(num_classes, optimizer, scheduler)
        knowledge = as_knowledge_config(knowledge)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "knowledge"])
        self.hparams["knowledge"] = vars(knowledge).copy() if knowledge else None  # plain dict: checkpoints load weights_only
        self.backbone = load_backbone(name_or_path)
        # The encoder's own pooler (BERT's tanh layer over [CLS]) is never used here: removed, so that it
        # neither waits for a gradient under DDP nor receives adapters that could never train.
        if isinstance(getattr(self.backbone, "pooler", None), nn.Module):
            self.backbone.pooler = None
        hidden = self.backbone.config.hidden_size
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        if knowledge is not None:
            fuse_from_forward(self, knowledge)
        self.train()  # from_pretrained leaves the backbone in eval mode (dropout off)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, features: torch.Tensor | None = None, **inputs: Any
    ) -> torch.Tensor:
        """Logits ``(B, num_classes)``; ``features`` ``(B, F)`` feed ``knowledge`` fusion (read by a forward pre-hook)."""
        if features is not None and self.hparams.get("knowledge") is None:
            raise ValueError("TextClassifier got features=... but was built without knowledge=KnowledgeConfig(mode=..., dim=...)")
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        return self.head(pool(hidden, attention_mask, self.hparams.pooling))
