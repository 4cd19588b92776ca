"""Freezing: the one owner of ``requires_grad`` changes and of keeping frozen layers (BatchNorm) in eval mode.

``LayerFreezer`` (layer-group callbacks), ``inject``/``load_adapter``, the ``PEFT`` callback, ``PEFTMixin``,
``FeatureCache`` and ``Distillation`` all freeze and thaw through :func:`set_requires_grad`, and keep frozen
layers in eval mode through :func:`set_eval` / :func:`frozen_batchnorms`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layer_groups import LayerGroup, named_parameters

__all__ = ["LayerFreezer", "freeze", "frozen_batchnorms", "set_batchnorm_eval", "set_eval", "set_requires_grad", "unfreeze"]


def set_requires_grad(items: nn.Module | nn.Parameter | Iterable[nn.Module | nn.Parameter], flag: bool) -> int:
    """Set ``requires_grad`` of every parameter of ``items`` (modules, parameters, or one of either) to ``flag``.

    Returns how many tensors changed. A parameter shared by several modules is counted once.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> set_requires_grad(net[0], False), set_requires_grad(net, False), set_requires_grad([net[1].bias], True)
        (2, 2, 1)
    """
    if isinstance(items, (nn.Module, nn.Parameter)):
        items = [items]
    seen: set[int] = set()
    count = 0
    for item in items:
        params = [item] if isinstance(item, nn.Parameter) else item.parameters()
        for param in params:
            if id(param) in seen:
                continue
            seen.add(id(param))
            if param.requires_grad != flag:
                param.requires_grad_(flag)
                count += 1
    return count


def freeze(modules: Iterable[nn.Module]) -> int:
    """Turn off gradients for every parameter of ``modules``; return how many tensors were frozen."""
    return set_requires_grad(list(modules), False)


def unfreeze(modules: Iterable[nn.Module]) -> int:
    """Turn gradients back on for every parameter of ``modules``; return how many tensors changed."""
    return set_requires_grad(list(modules), True)


def set_eval(modules: Iterable[nn.Module]) -> None:
    """Put ``modules`` (and their children) in eval mode: frozen layers then neither update statistics nor drop out.

    Lightning calls ``model.train()`` at every epoch start (and after validation), so callers re-apply
    this at each training epoch and batch start.
    """
    for module in modules:
        if module.training or any(m.training for m in module.modules()):
            module.eval()


def set_batchnorm_eval(batchnorms: Iterable[_BatchNorm]) -> None:
    """Put BatchNorm layers in eval mode so their running statistics stay as pretrained (see :func:`set_eval`)."""
    set_eval(batchnorms)


def frozen_batchnorms(module: nn.Module, exclude: Iterable[nn.Module] = ()) -> list[_BatchNorm]:
    """BatchNorm layers of ``module`` with no trainable parameter, outside every module of ``exclude``.

    These are the layers of a frozen base whose running statistics should stay as pretrained
    (the ``PEFT`` callback and ``PEFTMixin`` pass the adapter containers as ``exclude``).
    """
    skipped = {id(m) for root in exclude for m in root.modules()}
    return [
        m for m in module.modules()
        if isinstance(m, _BatchNorm) and id(m) not in skipped and not any(p.requires_grad for p in m.parameters())
    ]


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
        keep = {n for n in self.params if (n in trainable or (self.train_bn and n in self.bn_params)) and n in self.user_trainable}
        set_requires_grad([p for n, p in self.params.items() if n in keep], True)
        set_requires_grad([p for n, p in self.params.items() if n not in keep], False)
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
