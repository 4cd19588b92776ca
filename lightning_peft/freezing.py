"""Freezing: the one mechanism that turns ``requires_grad`` off and keeps frozen BatchNorm in eval mode."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["freeze", "unfreeze", "frozen_batchnorms", "set_batchnorm_eval"]


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


def frozen_batchnorms(modules: Iterable[nn.Module]) -> list[_BatchNorm]:
    """BatchNorm layers inside ``modules`` whose affine parameters (if any) are all frozen."""
    found: list[_BatchNorm] = []
    seen: set[int] = set()
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, _BatchNorm) and id(sub) not in seen:
                if not any(p.requires_grad for p in sub.parameters(recurse=False)):
                    found.append(sub)
                    seen.add(id(sub))
    return found


def set_batchnorm_eval(batchnorms: Iterable[_BatchNorm]) -> None:
    """Put BatchNorm layers in eval mode so their running statistics stay as pretrained.

    Lightning calls ``model.train()`` at every epoch start, which would otherwise let the batch
    statistics of a frozen backbone drift.
    """
    for bn in batchnorms:
        if bn.training:
            bn.eval()
