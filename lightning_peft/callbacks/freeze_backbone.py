"""Linear probing / feature extraction as a callback: freeze the pretrained backbone, train the head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..backbone import find_backbone
from ..freezing import freeze, frozen_batchnorms, set_batchnorm_eval, unfreeze
from ..matching import format_names
from ..params import count_parameters

__all__ = ["FreezeBackbone"]


class FreezeBackbone(pl.Callback):
    """Freeze the pretrained backbone of any LightningModule so only the task head trains.

    Works on an unchanged user module: the callback freezes in ``setup`` (before optimizers are
    built), so a ``configure_optimizers`` that passes all parameters or only trainable ones both
    leave the backbone bit-identical. BatchNorm layers of the frozen backbone are kept in eval mode
    (their running statistics stay as pretrained) unless ``train_bn=True``, in which case their
    affine parameters train too, as in Lightning's ``BaseFinetuning``.

    Args:
        backbone: module name patterns to freeze (exact, dotted suffix or ``re:<regex>``); default:
            found automatically (``transformers``, ``timm`` or torchvision model inside the module).
        train_bn: let BatchNorm layers of the backbone train (parameters and statistics).

    Example:
        >>> trainer = pl.Trainer(callbacks=[FreezeBackbone()])  # doctest: +SKIP
    """

    def __init__(self, backbone: str | Sequence[str] | None = None, train_bn: bool = False) -> None:
        self.backbone = [backbone] if isinstance(backbone, str) else (list(backbone) if backbone else None)
        self.train_bn = train_bn
        self.frozen_modules: list[str] = []
        self._batchnorms: list[nn.Module] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(backbone=self.backbone, train_bn=self.train_bn)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        split = find_backbone(pl_module, self.backbone)
        backbones = [pl_module.get_submodule(n) for n in split.backbone]
        heads = [pl_module.get_submodule(n) for n in split.head]
        freeze(backbones)
        unfreeze(heads)
        if self.train_bn:
            unfreeze(m for b in backbones for m in b.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        self._batchnorms = [] if self.train_bn else frozen_batchnorms(backbones)
        self.frozen_modules = list(split.backbone)
        counts = count_parameters(pl_module)
        if counts.trainable == 0:
            raise ValueError(
                f"FreezeBackbone froze every parameter of {type(pl_module).__name__}: nothing is left to "
                f"train. Frozen modules: {format_names(split.backbone)}. Add a task head outside the "
                "backbone, or pass backbone=[...] naming only the part to freeze."
            )
        rank_zero_info(
            f"FreezeBackbone: froze {format_names(split.backbone)}"
            + (f" (head kept trainable: {format_names(split.head)})" if split.head else "")
            + f"; {counts.trainable:,} of {counts.total:,} parameters train."
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_batchnorm_eval(self._batchnorms)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # Cheap, and robust to user code that calls .train() inside the epoch.
        set_batchnorm_eval(self._batchnorms)
