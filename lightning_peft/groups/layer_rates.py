"""Discriminative (layer-wise) learning rates: the placement of each parameter by layer-group depth.

Shared by the :class:`~lightning_peft.DiscriminativeLR` callback and :class:`~lightning_peft.FinetuningMixin`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..optim.param_groups import Placement, Plan
from .layer_groups import LayerGroup
from .matching import name_matches

__all__ = ["discriminative_plan", "is_no_decay", "layer_lr_scales"]


def layer_lr_scales(groups: Sequence[LayerGroup], decay: float, head_lr_mult: float = 1.0) -> dict[str, float]:
    """Learning-rate multiplier per group: ``decay ** depth`` counted from the top group (depth 0).

    With a head, the head has depth 0 (times ``head_lr_mult``) and the top backbone block depth 1,
    as in ULMFiT (``decay=1/2.6``) and BERT/ViT layer-wise decay (``decay`` 0.65-0.95).
    """
    if decay <= 0:
        raise ValueError(f"decay must be > 0 (e.g. 0.8, or 1/2.6 for ULMFiT), got {decay}")
    last = len(groups) - 1
    return {g.name: decay ** (last - i) * (head_lr_mult if g.is_head else 1.0) for i, g in enumerate(groups)}


def is_no_decay(name: str, param: nn.Parameter, rule: bool | Sequence[str]) -> bool:
    """Whether weight decay is skipped: ``True`` for biases and norm weights (1-D tensors), or name patterns."""
    if rule is True:
        return param.ndim <= 1
    if not rule:
        return False
    return any(name_matches(pattern, name) for pattern in rule)


def discriminative_plan(
    groups: Sequence[LayerGroup],
    decay: float,
    head_lr_mult: float = 1.0,
    no_weight_decay: bool | Sequence[str] = True,
) -> Plan:
    """A placement function: parameter name -> (its group, the group's LR multiplier, weight decay 0 or kept)."""
    scales = layer_lr_scales(groups, decay, head_lr_mult)
    group_of = {n: g.name for g in groups for n in g.params}

    def plan(name: str, param: nn.Parameter) -> Placement:
        group = group_of[name]
        return Placement(group, scales[group], 0.0 if is_no_decay(name, param, no_weight_decay) else None)

    return plan
