"""Regularisation toward the pretrained weights (L2-SP, Li et al. 2018) and plain L2, as values and exact gradients.

    penalty = α · Σ ‖θ − θ₀‖²  (fine-tuned pretrained parameters, θ₀ their pretrained values)
            + β · Σ ‖w‖²       (the new head's parameters)

The gradient is ``2α(θ − θ₀)`` and ``2βw``; :func:`add_penalty_grad_` adds it to ``.grad`` in place,
which is what adding the penalty to the loss would give, without building a graph for it.
(The paper writes α/2 and β/2: pass half of its values.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["add_penalty_grad_", "l2sp_penalty"]


@torch.no_grad()
def l2sp_penalty(pairs: Iterable[tuple[Tensor, Tensor | None]], weight: float, device: torch.device | str = "cpu") -> Tensor:
    """``weight · Σ ‖θ − θ₀‖²`` over ``(θ, θ₀)`` pairs (``θ₀=None`` means plain L2, ``‖θ‖²``); a float32 scalar on ``device``."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for param, reference in pairs:
        diff = param if reference is None else param - reference
        total += diff.float().pow(2).sum().to(total.device)
    return total * weight


@torch.no_grad()
def add_penalty_grad_(pairs: Iterable[tuple[Tensor, Tensor | None]], weight: float, scale: float = 1.0) -> None:
    """Add ``scale · 2 · weight · (θ − θ₀)`` (or ``… · θ`` when ``θ₀`` is ``None``) to each ``θ.grad``."""
    for param, reference in pairs:
        diff = param if reference is None else param - reference
        step = diff.to(param.dtype) * (2.0 * weight * scale)  # a new tensor, never a view of θ
        if param.grad is None:
            param.grad = step
        else:
            param.grad.add_(step)
