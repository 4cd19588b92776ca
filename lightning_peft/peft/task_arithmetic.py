"""Merging task vectors (stacked tensors of several adapters) into one: task arithmetic, TIES, DARE, magnitude pruning.

Each function takes ``tensors`` -- a list of k tensors of one shape (the same weight of k adapters) -- and
``weights`` (k,), and returns one tensor of that shape. They follow Hugging Face PEFT's ``merge_utils`` step
for step (same pruning, same sign election, same order of random draws), so a combination built here equals
PEFT's on the same tensors; DARE draws its masks with ``torch.bernoulli`` from the global RNG, once per
tensor in list order.

>>> a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, 2.0, -1.0])
>>> task_arithmetic([a, b], torch.tensor([1.0, 0.5]))
tensor([ 1.5000, -1.0000,  2.5000])
>>> ties([a, b], torch.tensor([1.0, 1.0]), density=1.0)  # elected signs +, +, +: the mean of the entries that agree
tensor([1., 2., 3.])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = [
    "COMBINATIONS",
    "combine",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "majority_sign_mask",
    "prune",
    "task_arithmetic",
    "ties",
]

SignMethod = Literal["total", "frequency"]


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``stacked`` (k, ...) times ``weights`` (k,) broadcast over the trailing dimensions."""
    return stacked * weights.to(stacked).view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False) -> torch.Tensor:
    """Keep a fraction ``density`` of ``tensor``'s entries: the largest in magnitude, or a random (Bernoulli) draw,
    rescaled by 1/density with ``rescale`` (DARE) so the expectation is kept. ``density >= 1`` keeps everything."""
    if density >= 1:
        return tensor
    if density < 0:
        raise ValueError(f"density={density!r} is invalid: it must be in [0, 1] (the fraction of entries kept)")
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    pruned = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return pruned / density if rescale else pruned


def majority_sign_mask(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """Which entries of ``stacked`` (k, ...) carry the elected sign: that of their sum (``"total"``) or of
    the majority count (``"frequency"``); ties go to +."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def _disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i·t_i (Ilharco et al. 2023); a negative weight subtracts a task."""
    return _weighted(torch.stack(list(tensors)), weights).sum(dim=0)


def magnitude_prune(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Task arithmetic on each tensor's top-``density`` entries by magnitude."""
    return task_arithmetic([prune(t, density, "magnitude") for t in tensors], weights)


def ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float, majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """TIES (Yadav et al. 2023): trim to the top-``density`` entries, elect a sign per entry, average the weighted
    entries that agree with it."""
    stacked = torch.stack([prune(t, density, "magnitude") for t in tensors])
    return _disjoint_mean(_weighted(stacked, weights), majority_sign_mask(stacked, majority_sign_method))


def dare_linear(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE (Yu et al. 2023): drop entries at random (keep probability ``density``), rescale by 1/density, then add."""
    return task_arithmetic([prune(t, density, "random", rescale=True) for t in tensors], weights)


def dare_ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float, majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    stacked = torch.stack([prune(t, density, "random", rescale=True) for t in tensors])
    return _disjoint_mean(_weighted(stacked, weights), majority_sign_mask(stacked, majority_sign_method))


def combine(kind: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float | None, majority_sign_method: SignMethod) -> torch.Tensor:
    """One of :data:`COMBINATIONS` (without the ``_svd`` suffix) applied to ``tensors``."""
    if kind in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    if kind == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if kind == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if kind == "dare_linear":
        return dare_linear(tensors, weights, density)
    if kind == "dare_ties":
        return dare_ties(tensors, weights, density, majority_sign_method)
    raise ValueError(f"unknown combination {kind!r}; choose one of {list(COMBINATIONS)}")


# combination_type -> (how LoRA factors combine, whether ``density`` is needed)
COMBINATIONS: dict[str, tuple[str, bool]] = {
    "svd": ("svd", False), "linear": ("factors", False), "cat": ("cat", False),
    "ties": ("factors", True), "ties_svd": ("svd", True),
    "dare_linear": ("factors", True), "dare_linear_svd": ("svd", True),
    "dare_ties": ("factors", True), "dare_ties_svd": ("svd", True),
    "magnitude_prune": ("factors", True), "magnitude_prune_svd": ("svd", True),
}
