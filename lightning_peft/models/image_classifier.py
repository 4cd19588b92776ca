"""A LightningModule that fine-tunes a pretrained ``timm`` image model for classification."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..knowledge.config import KnowledgeConfig, as_knowledge_config
from ..knowledge.fusion import fuse_from_forward
from .base import ClassificationModule, OptimizerFactory, SchedulerFactory
from .pretrained import load_timm_model

__all__ = ["ImageClassifier"]

_RESERVED = ("num_classes", "pretrained")


class ImageClassifier(ClassificationModule):
    """A ``timm`` model (``self.backbone``) whose classifier is replaced by a ``num_classes`` head.

    The head is made by timm's own ``reset_classifier``, so ``self.backbone.get_classifier()`` still
    names it and every callback sees an ordinary timm classifier: ``FreezeBackbone`` / layer groups
    (timm's ``group_matcher``), ``FeatureCache`` (the head's input is the pooled feature vector),
    ``PEFT`` (LoRA on ``nn.Conv2d`` with ``groups == 1`` and on linear layers, BitFit on norm biases;
    ``modules_to_save="auto"`` finds the new head). ``dropout`` sits inside the head, as
    ``Sequential(Dropout, Linear)``, so features before it stay deterministic (cacheable).

    ``forward(pixel_values)`` takes ``(batch, 3, H, W)`` normalised images and returns logits
    ``(batch, num_classes)``; batches are dicts ``{"pixel_values", "labels"}``
    (:class:`~lightning_peft.ImageClassificationDataModule`). Logs ``train/loss``, ``val/loss``,
    ``val/acc`` and ``val/f1`` (macro), like :class:`~lightning_peft.TextClassifier`.

    Args:
        backbone: timm model name, e.g. ``efficientnet_lite0`` (offline weights packaged) or ``resnet50``.
        num_classes: number of labels.
        pretrained: ``"auto"`` (packaged weights when a package ships them, else timm's download),
            ``True`` (timm's download), a state-dict path, or ``False`` (random); see
            :func:`lightning_peft.models.pretrained.load_timm_model`.
        dropout: dropout on the pooled features, inside the head.
        optimizer: factory taking the parameters (Hydra ``_partial_``); default AdamW(lr=1e-3).
        scheduler: factory ``(optimizer, total_steps=...)``, stepped every optimizer step; optional.
        label_names: class names, stored in the checkpoint's hyperparameters.
        model_kwargs: more ``timm.create_model`` arguments (e.g. ``{"drop_path_rate": 0.1}``).
        knowledge: fuse an external vector per example into the head (``KnowledgeConfig(mode="late", dim=F)``);
            ``forward`` then takes ``features=(B, F)``. ``early`` needs token embeddings, which CNNs lack.

    Example:
        >>> model = ImageClassifier("efficientnet_lite0", num_classes=10, pretrained=False)
        >>> model(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    default_lr = 1e-3

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        pretrained: bool | str | os.PathLike | None = "auto",
        dropout: float = 0.2,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        label_names: list[str] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        knowledge: KnowledgeConfig | dict[str, Any] | None = None,
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        reserved = sorted(set(model_kwargs or {}) & set(_RESERVED))
        if reserved:
            raise ValueError(f"model_kwargs cannot set {reserved}: use ImageClassifier's own num_classes / pretrained arguments")
        super().__init__(num_classes, optimizer, scheduler)
        knowledge = as_knowledge_config(knowledge)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "knowledge"])
        self.hparams["knowledge"] = vars(knowledge).copy() if knowledge else None  # plain dict: checkpoints load weights_only
        self.backbone = load_timm_model(backbone, pretrained=pretrained, **dict(model_kwargs or {}))
        self.backbone.reset_classifier(num_classes)
        if dropout > 0:
            _dropout_into_head(self.backbone, dropout)
        if knowledge is not None:
            fuse_from_forward(self, knowledge)
        self.train()

    def forward(self, pixel_values: torch.Tensor, *, features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, num_classes)``; ``features`` ``(B, F)`` feed ``knowledge`` fusion (read by a forward pre-hook)."""
        if features is not None and self.hparams.get("knowledge") is None:
            raise ValueError("ImageClassifier got features=... but was built without knowledge=KnowledgeConfig(mode='late', dim=...)")
        return self.backbone(pixel_values)


def _dropout_into_head(model: nn.Module, p: float) -> None:
    """Replace timm's classifier ``fc`` by ``Sequential(Dropout(p), fc)`` where it sits (``get_classifier()`` then returns it)."""
    classifier = model.get_classifier()
    names = [n for n, m in model.named_modules() if m is classifier and n] if isinstance(classifier, nn.Module) else []
    if not names:
        raise ValueError(
            f"Cannot place dropout before the classifier of {type(model).__name__}: get_classifier() returned "
            f"{type(classifier).__name__}, not one submodule. Use dropout=0 (or model_kwargs={{'drop_rate': ...}})."
        )
    model.set_submodule(names[0], nn.Sequential(nn.Dropout(p), classifier))
