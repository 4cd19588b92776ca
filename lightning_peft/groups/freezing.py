"""Freezing: the one mechanism that turns ``requires_grad`` off and keeps frozen BatchNorm in eval mode."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layer_groups import LayerGroup, named_parameters

__all__ = ["LayerFreezer", "freeze", "set_batchnorm_eval", "unfreeze"]


def freeze(modules: Iterable[nn.Module]) -> int:
    """Turn off gradients for every parameter of ``modules``; return how many tensors were frozen."""
    count = 0
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                param.requires_grad_(False)
                count += 1
    return count


def unfreeze(modules: Iterable[nn.Module]) -> int:
    """Turn gradients back on for every parameter of ``modules``; return how many tensors changed."""
    count = 0
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad:
                param.requires_grad_(True)
                count += 1
    return count


def set_batchnorm_eval(batchnorms: Iterable[_BatchNorm]) -> None:
    """Put BatchNorm layers in eval mode so their running statistics stay as pretrained.

    Lightning calls ``model.train()`` at every epoch start, which would otherwise let the batch
    statistics of a frozen backbone drift.
    """
    for bn in batchnorms:
        if bn.training:
            bn.eval()


class LayerFreezer:
    """Owns ``requires_grad`` for a model's layer groups: the head and the top ``k`` backbone groups train.

    Parameters that were frozen before the freezer saw them (an unused pooler, a user's own choice)
    stay frozen whatever ``k`` is. BatchNorm layers in frozen groups are kept in eval mode (call
    :meth:`enforce_bn_eval` after anything that calls ``model.train()``) unless ``train_bn=True``, in
    which case their affine parameters and statistics keep training, as in Lightning's ``BaseFinetuning``.

    Args:
        model: the module the groups were computed on.
        groups: ``layer_groups(model)``; the head is the group flagged ``is_head``.
        train_bn: let BatchNorm layers of frozen groups train.
    """

    def __init__(self, model: nn.Module, groups: Sequence[LayerGroup], train_bn: bool = False) -> None:
        self.model = model
        self.groups = list(groups)
        self.train_bn = train_bn
        self.params = named_parameters(model)
        self.user_trainable = {n for n, p in self.params.items() if p.requires_grad}
        self.backbone = [g for g in self.groups if not g.is_head]
        self.head = [g for g in self.groups if g.is_head]
        group_of = {n: i for i, g in enumerate(self.groups) for n in g.params}
        self._batchnorms: list[tuple[_BatchNorm, int]] = []
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm):
                owned = [group_of[f"{name}.{p}"] for p, _ in module.named_parameters() if f"{name}.{p}" in group_of]
                index = owned[0] if owned else _nearest_group(name, group_of)
                if index is not None:
                    self._batchnorms.append((module, index))
        self.bn_params = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, _BatchNorm) for p, _ in m.named_parameters()}
        self.top: int | None = None
        self.frozen_batchnorms: list[_BatchNorm] = []

    def trainable_groups(self, top: int) -> list[LayerGroup]:
        """The groups that train when the top ``top`` backbone groups do (the head always does)."""
        top = max(0, min(top, len(self.backbone)))
        return self.backbone[len(self.backbone) - top :] + self.head

    def train_top(self, top: int) -> None:
        """Make exactly the head and the top ``top`` backbone groups trainable (``top`` is clamped)."""
        top = max(0, min(top, len(self.backbone)))
        chosen = self.trainable_groups(top)
        trainable = {n for g in chosen for n in g.params}
        indices = {i for i, g in enumerate(self.groups) if any(g is c for c in chosen)}
        for name, param in self.params.items():
            keep = name in trainable or (self.train_bn and name in self.bn_params)
            param.requires_grad_(keep and name in self.user_trainable)
        frozen = [] if self.train_bn else [bn for bn, i in self._batchnorms if i not in indices]
        # BatchNorm of a group that just unfroze must train again; Lightning only calls model.train() per epoch.
        thawed = [bn for bn in self.frozen_batchnorms if all(bn is not f for f in frozen)]
        self.frozen_batchnorms = frozen
        for bn in thawed:
            bn.train(self.model.training)
        self.top = top
        self.enforce_bn_eval()

    def enforce_bn_eval(self) -> None:
        """Put the BatchNorm layers of frozen groups back in eval mode (after anything calls ``model.train()``)."""
        set_batchnorm_eval(self.frozen_batchnorms)


def _nearest_group(module_name: str, group_of: dict[str, int]) -> int | None:
    """Group of the parameter sharing the longest dotted prefix with ``module_name`` (for BatchNorm without affine)."""
    best, best_len = None, -1
    parts = module_name.split(".")
    for param, index in group_of.items():
        common = 0
        for a, b in zip(parts, param.split(".")):
            if a != b:
                break
            common += 1
        if common > best_len:
            best, best_len = index, common
    return best
