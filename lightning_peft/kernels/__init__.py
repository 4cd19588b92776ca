"""PLACEHOLDER until the kernels branch (issue 6) is merged: ``adapter_bottleneck`` as its pure-PyTorch reference.

The kernels branch replaces this file with the real package (fused Triton kernels, dispatch, and
``adapter_bottleneck_reference`` with exactly this signature); the bottleneck adapters call
``adapter_bottleneck`` only, so they pick the kernels up without a change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "adapter_bottleneck", "adapter_bottleneck_reference"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def adapter_bottleneck_reference(
    x: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor, b_up: Tensor | None,
    activation: str = "gelu", scale: float = 1.0, residual: Tensor | None = None,
) -> Tensor:
    """Bottleneck adapter ``y = residual + s·(act(x·W_downᵀ + b_down)·W_upᵀ + b_up)``; ``residual`` defaults to ``x``.

    >>> x = torch.randn(3, 8)
    >>> torch.equal(adapter_bottleneck_reference(x, torch.randn(4, 8), None, torch.zeros(8, 4), None), x)
    True
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid activations are {sorted(ACTIVATIONS)}")
    out = F.linear(ACTIVATIONS[activation](F.linear(x, w_down, b_down)), w_up, b_up)
    return torch.add(x if residual is None else residual, out, alpha=scale)


adapter_bottleneck = adapter_bottleneck_reference
