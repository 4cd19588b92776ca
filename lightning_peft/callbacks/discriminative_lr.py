"""Discriminative (layer-wise) learning rates as a callback on the user's own optimizer and scheduler."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..groups.layer_rates import discriminative_plan, layer_lr_scales
from .layer_group_callback import LayerGroupCallback, describe_param_groups

__all__ = ["DiscriminativeLR"]


class DiscriminativeLR(LayerGroupCallback):
    """Give each layer group its own learning rate: the user's rate times ``decay ** depth`` from the top.

    The head has depth 0 (times ``head_lr_mult``), the top backbone block depth 1, and so on down
    to the embeddings: ``decay=1/2.6`` is ULMFiT's rule, 0.65-0.95 the layer-wise decay used for
    BERT and ViT. The user's optimizer groups are split per layer group at fit start with real
    learning rates (not a ``lr_scale`` key only some schedulers read), and the schedulers' per-group
    lists are extended, so every torch/Lightning scheduler keeps each multiplier relative to what
    it schedules. Biases and norm weights get no weight decay unless ``no_weight_decay=False``.

    Args:
        decay: multiplier per group of depth (``< 1`` lowers lower layers' rates).
        head_lr_mult: extra multiplier for the head group.
        no_weight_decay: ``True``: biases and norm weights (1-D tensors) get weight decay 0;
            a list of parameter-name patterns instead; ``False`` keeps the user's weight decay.
        groups, backbone: as for :class:`~lightning_peft.FreezeBackbone`.

    Example:
        >>> trainer = pl.Trainer(callbacks=[DiscriminativeLR(decay=0.8)])  # doctest: +SKIP
    """

    shapes_optimizer = True

    def __init__(
        self,
        decay: float = 0.8,
        head_lr_mult: float = 1.0,
        no_weight_decay: bool | Sequence[str] = True,
        groups: Sequence[str | Sequence[str]] | None = None,
        backbone: str | Sequence[str] | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(groups=groups, backbone=backbone, verbose=verbose)
        for name, value in (("decay", decay), ("head_lr_mult", head_lr_mult)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"DiscriminativeLR: {name} must be a finite number > 0, got {value!r}")
        self.decay = decay
        self.head_lr_mult = head_lr_mult
        self.no_weight_decay = list(no_weight_decay) if isinstance(no_weight_decay, (list, tuple)) else bool(no_weight_decay)
        self.scales: dict[str, float] = {}
        self._plan = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, head_lr_mult=self.head_lr_mult, groups=self.group_patterns)

    def on_groups(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.scales = layer_lr_scales(self.groups, self.decay, self.head_lr_mult)
        self._plan = discriminative_plan(self.groups, self.decay, self.head_lr_mult, self.no_weight_decay)

    def placement(self, name: str, param: nn.Parameter) -> tuple[float, float | None]:
        placed = self._plan(name, param)
        return placed.lr_scale, placed.weight_decay

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.verbose:
            for i, optimizer in enumerate(trainer.optimizers):
                rank_zero_info(f"DiscriminativeLR: param groups of optimizer {i}\n{describe_param_groups(optimizer)}")
