"""Knowledge injection as a callback: fuse each example's external vector into an unchanged LightningModule."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from ..knowledge.config import KnowledgeConfig
from ..knowledge.fusion import FeatureSlot, attach_knowledge
from . import coordination

__all__ = ["KnowledgeInjection"]


class KnowledgeInjection(pl.Callback):
    """Fuse an external vector per example (knowledge-graph embedding, TF-IDF/SVD, metadata) into a classifier.

    ``late``: the vector ``(B, F)`` is concatenated with the pooled features ``(B, H)`` that enter the head
    (found like ``FeatureCache`` finds it, see :func:`~lightning_peft.find_feature_point`), whose first
    ``nn.Linear`` is widened to ``H + F`` inputs: the trained columns are kept, the new ones start at zero.
    ``early``: a zero-initialised ``Linear(F, hidden)`` of the vector is added to the input token
    embeddings of the ``transformers`` backbone (broadcast over tokens; ``(B, T, F)`` is added per token).
    Zero initialisation makes the first step compute exactly what the unfused model computes.

    The vectors travel in the batch dict under ``key``: at the start of every training, validation,
    test and predict batch the callback takes them out of the batch (so ``training_step`` and the
    module's ``forward`` see the batch they always saw) and hands them to the fusion layers for that
    batch. The model changes in ``setup`` (before PEFT injects adapters, whatever the callback order,
    and before optimizers exist), so the new weights train under every freezing strategy and PEFT
    method: they sit in the head (late) or beside it (``knowledge_projection``, early). With
    ``FeatureCache`` (late fusion), the vectors become part of each example's cache key.

    Args:
        mode: ``late`` or ``early``.
        dim: ``F``, the size of each example's vector.
        key: batch dict key of the vectors.
        head: pattern naming the head when it is not found automatically (late).
        backbone: patterns naming the backbone when it is not recognised automatically.

    Example:
        >>> trainer = pl.Trainer(callbacks=[KnowledgeInjection("late", dim=64), FreezeBackbone()])  # doctest: +SKIP
    """

    prepares_before_adapters = True  # the widened head is what PEFT's modules_to_save must copy
    provides_key_inputs = True  # FeatureCache keys each example by its vector too

    def __init__(
        self,
        mode: str = "late",
        dim: int = 0,
        key: str = "features",
        head: str | None = None,
        backbone: str | list[str] | None = None,
    ) -> None:
        self.config = KnowledgeConfig(mode=mode, dim=dim, key=key)
        self.head = head
        self.backbone = backbone
        self.slot: FeatureSlot | None = None

    @property
    def trains_backbone(self) -> bool:
        """Early fusion changes what the backbone computes while it trains (FeatureCache must refuse)."""
        return self.config.mode == "early"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.config.mode, dim=self.config.dim, key=self.config.key)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        coordination.prepare_model(trainer, pl_module)

    def prepare_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the fusion layers (idempotent: a second fit or a validate reuses them)."""
        self.slot = attach_knowledge(pl_module, self.config, self.head, self.backbone)

    def key_inputs(self) -> dict[str, Tensor]:
        """The current batch's vectors, for ``FeatureCache``'s per-example keys."""
        features = self.slot.features if self.slot is not None else None
        return {"knowledge": features} if features is not None else {}

    # --- the batch's vectors ----------------------------------------------------------------------

    def _take(self, batch: Any) -> None:
        key = self.config.key
        if not isinstance(batch, MutableMapping):
            raise TypeError(f"KnowledgeInjection reads each batch's vectors from batch[{key!r}], but the batch is a {type(batch).__name__}, not a dict")
        if key not in batch:
            raise KeyError(
                f"KnowledgeInjection: the batch has no {key!r} entry (keys: {sorted(map(str, batch))}). Each batch needs the "
                f"examples' {self.config.dim}-dim external vectors there: TextClassificationDataModule(features='<column>' or a "
                "callable) supplies them, or set KnowledgeInjection(key=...) to the key your data uses."
            )
        self.slot.set(batch.pop(key))

    def _clear(self) -> None:
        if self.slot is not None:
            self.slot.set(None)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._take(batch)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._take(batch)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._take(batch)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._take(batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._clear()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._clear()

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._clear()

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._clear()
