"""Linear probing and partial fine-tuning as a callback: freeze the backbone but its top ``k`` layer groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from ..groups.freezing import LayerFreezer
from ..utils.param_count import count_parameters
from .layer_group_callback import LayerGroupCallback

__all__ = ["FreezeBackbone"]


class FreezeBackbone(LayerGroupCallback):
    """Freeze the pretrained backbone of any LightningModule except its top ``train_top`` layer groups.

    ``train_top=0`` (default) is a linear probe / feature extraction: only the task head trains.
    ``train_top=k`` is partial fine-tuning: the head and the last ``k`` blocks train. Works on an
    unchanged user module: freezing happens in ``setup`` (before ``configure_optimizers``), so an
    optimizer over ``self.parameters()`` or over trainable parameters only both leave the frozen
    part bit-identical, and a resumed run freezes the same way. BatchNorm layers in frozen groups
    stay in eval mode (running statistics as pretrained) unless ``train_bn=True``.

    Args:
        train_top: backbone layer groups (from the top) that keep training besides the head.
        train_bn: let BatchNorm layers of the frozen part train (parameters and statistics).
        groups: explicit layer groups, input to output (module patterns); default: automatic.
        backbone: module patterns naming the backbone when it is not recognised automatically.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FreezeBackbone(train_top=2)])  # doctest: +SKIP
    """

    freezes = True

    def __init__(
        self,
        train_top: int = 0,
        train_bn: bool = False,
        groups: Sequence[str | Sequence[str]] | None = None,
        backbone: str | Sequence[str] | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(groups=groups, backbone=backbone, verbose=verbose)
        if train_top < 0:
            raise ValueError(f"train_top must be >= 0 (0 trains only the head), got {train_top}")
        self.train_top = train_top
        self.train_bn = train_bn
        self.freezer: LayerFreezer | None = None

    @property
    def trains_backbone(self) -> bool:  # type: ignore[override]
        return self.train_top > 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(train_top=self.train_top, groups=self.group_patterns, backbone=self.backbone)

    def on_groups(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.freezer = LayerFreezer(pl_module, self.groups, train_bn=self.train_bn)
        self.freezer.train_top(self.train_top)
        counts = count_parameters(pl_module)
        trainable = [g.name for g in self.freezer.trainable_groups(self.train_top)]
        if counts.trainable == 0:
            raise ValueError(
                f"FreezeBackbone(train_top={self.train_top}) left nothing to train in {type(pl_module).__name__}: "
                f"the groups kept trainable ({', '.join(trainable) or 'none'}) have no trainable parameters. "
                f"Layer groups: {', '.join(g.name for g in self.groups)}. Add a task head, raise train_top, "
                "or pass groups=[...] / backbone=[...]."
            )
        rank_zero_info(
            f"FreezeBackbone: training {', '.join(trainable)}; {counts.trainable:,} of {counts.total:,} parameters train."
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.freezer.enforce_bn_eval()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # Cheap, and robust to user code that calls .train() inside the epoch.
        self.freezer.enforce_bn_eval()
