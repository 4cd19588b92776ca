"""Bind a module call's arguments to its ``forward`` signature (cached per class: this runs on every forward)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

__all__ = ["bind_forward", "forward_signature"]

_SIGNATURES: dict[type, inspect.Signature] = {}


def forward_signature(module: nn.Module) -> inspect.Signature:
    """``inspect.signature(module.forward)``, computed once per module class."""
    cls = type(module)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(module.forward)
    return _SIGNATURES[cls]


def bind_forward(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> inspect.BoundArguments:
    """The call ``module(*args, **kwargs)`` bound to ``forward``'s parameters (inputs by name, whether passed by position or keyword).

    >>> bind_forward(nn.Linear(2, 2), (), {"input": 1}).arguments
    {'input': 1}
    """
    return forward_signature(module).bind(*args, **kwargs)
