"""Do cached features still match a fresh pass? The one tolerance rule of ``FeatureCache`` and ``extract_features``."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["default_tolerance", "features_agree"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for features of ``dtype``: 1e-3, or 5e-2 for fp16/bf16 (their own rounding error)."""
    return 5e-2 if dtype in _LOW_PRECISION else 1e-3


def features_agree(stored: Tensor, fresh: Tensor, tolerance: float | None = None) -> tuple[bool, float]:
    """(whether ``fresh`` matches ``stored``, their max abs error).

    They agree when shapes are equal and ``max |fresh - stored| <= tolerance * max(1, max |stored|)``:
    an error relative to the features' scale, so large activations do not fail on rounding.
    ``tolerance`` defaults to :func:`default_tolerance` of ``fresh``'s dtype.

    >>> features_agree(torch.ones(2, 3), torch.ones(2, 3) + 1e-4)[0], features_agree(torch.ones(2, 3), torch.zeros(2, 3))
    (True, (False, 1.0))
    """
    if stored.shape != fresh.shape:
        return False, float("inf")
    tolerance = default_tolerance(fresh.dtype) if tolerance is None else tolerance
    error = (fresh.float() - stored.float()).abs().max().item() if fresh.numel() else 0.0
    scale = max(1.0, stored.abs().max().item()) if stored.numel() else 1.0
    return error <= tolerance * scale, error
