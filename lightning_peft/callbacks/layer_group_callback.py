"""What every layer-group callback shares: resolving the groups at setup, and shaping the optimizer once.

``FreezeBackbone``, ``GradualUnfreezing`` and ``DiscriminativeLR`` each see the model as
:func:`~lightning_peft.groups.layer_groups`. Those that shape the optimizer contribute to one combined
placement per parameter (LR multipliers multiply, the first weight-decay override wins), applied
by whichever reaches ``on_fit_start`` first, so they compose in any order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..groups.layer_groups import LayerGroup, format_layer_groups, layer_groups
from ..groups.matching import format_names
from ..optim.param_groups import Placement, regroup_optimizer
from . import coordination

__all__ = ["LayerGroupCallback", "apply_optimizer_policies", "describe_param_groups"]

_REGROUPED = "_lightning_peft_regrouped"


class LayerGroupCallback(pl.Callback):
    """Base of the layer-group callbacks (not used directly).

    Args:
        groups: explicit layer groups, input to output (see :func:`~lightning_peft.groups.layer_groups`);
            default: found automatically.
        backbone: module patterns naming the pretrained backbone when it is not found automatically.
        verbose: print the layer-group table at setup.
    """

    freezes = False  # owns requires_grad (at most one such callback per Trainer)
    trains_backbone = False  # some backbone parameters train at some point (FeatureCache refuses to cache then)
    shapes_optimizer = False  # contributes placements to the optimizer groups
    adopts_frozen = False  # frozen parameters missing from the optimizer must be added

    def __init__(self, groups: Sequence[str | Sequence[str]] | None = None, backbone: str | Sequence[str] | None = None, verbose: bool = True) -> None:
        self.group_patterns = list(groups) if groups else None
        self.backbone = backbone
        self.verbose = verbose
        self.groups: list[LayerGroup] = []
        self.group_of: dict[str, str] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.freezes:
            owners = [type(c).__name__ for c in coordination.declaring(trainer, "freezes")]
            if len(owners) > 1:
                raise ValueError(
                    f"Only one freezing callback per Trainer: got {', '.join(owners)}. GradualUnfreezing(initial=k) "
                    "already starts like FreezeBackbone(train_top=k)."
                )
        coordination.prepare_model(trainer, pl_module)  # adapters first: the groups then hold them, and only they train
        self.groups = layer_groups(pl_module, self.group_patterns, self.backbone)
        self.group_of = {n: g.name for g in self.groups for n in g.params}
        self.on_groups(trainer, pl_module)
        first = next(c for c in trainer.callbacks if isinstance(c, LayerGroupCallback))
        if self.verbose and first is self:  # one table even when several layer-group callbacks are used
            rank_zero_info(f"{type(self).__name__}: layer groups of {type(pl_module).__name__}\n{format_layer_groups(pl_module, self.groups)}")

    def on_groups(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called once the groups are known (still in ``setup``, before optimizers exist)."""

    def placement(self, name: str, param: nn.Parameter) -> tuple[float, float | None]:
        """(LR multiplier, weight decay or ``None``) this callback wants for one parameter."""
        return 1.0, None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.shapes_optimizer:
            apply_optimizer_policies(trainer, pl_module)


def apply_optimizer_policies(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Split every optimizer's groups by the combined placement of all layer-group callbacks (once per fit).

    Runs at ``on_fit_start``: after ``configure_optimizers`` and before Lightning loads optimizer and
    scheduler state on resume, so restored states meet the same group structure they were saved with.
    """
    policies = [c for c in coordination.declaring(trainer, "shapes_optimizer") if isinstance(c, LayerGroupCallback)]
    optimizers = [o for o in trainer.optimizers if not getattr(o, _REGROUPED, False)]
    if not policies or not optimizers:
        return

    def plan(name: str, param: nn.Parameter) -> Placement:
        wanted = [c.placement(name, param) for c in policies]
        group = "/".join(dict.fromkeys(c.group_of.get(name, "?") for c in policies))
        decay = next((wd for _, wd in wanted if wd is not None), None)
        return Placement(group, math.prod(scale for scale, _ in wanted), decay)

    adopt: list[nn.Parameter] = []
    if any(c.adopts_frozen for c in policies):
        present = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
        # Only what a freezer may unfreeze: never the parameters frozen before it (a base under adapters).
        may_train: set[str] = set()
        for c in coordination.declaring(trainer, "freezes"):
            if getattr(c, "freezer", None) is not None:
                may_train |= c.freezer.user_trainable
        names = [n for n, p in pl_module.named_parameters() if id(p) not in present and n in may_train]
        params = dict(pl_module.named_parameters())
        adopt = [params[n] for n in names]
        if adopt and len(trainer.optimizers) > 1:
            raise ValueError(
                f"{len(trainer.optimizers)} optimizers and {len(names)} parameters in none of them "
                f"({format_names(names, 8)}): cannot tell which optimizer should train them once unfrozen. "
                "Put every parameter the callbacks may unfreeze in one of your optimizers."
            )
    schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    for optimizer in optimizers:
        regroup_optimizer(optimizer, pl_module, plan, schedulers, adopt if optimizer is trainer.optimizers[0] else ())
        setattr(optimizer, _REGROUPED, True)


def describe_param_groups(optimizer: Any) -> str:
    """One line per param group: name, tensors, learning rate, weight decay."""
    lines = []
    for g in optimizer.param_groups:
        lines.append(
            f"  {g.get('name', '?'):<40} {len(g['params']):>5} tensors  lr={g['lr']:.3g}  weight_decay={g.get('weight_decay', 0):.3g}"
        )
    return "\n".join(lines)
