"""Per-token log-probabilities of target tokens: the quantity preference and reward losses are built on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.instructions import IGNORE_INDEX

__all__ = ["token_logprobs"]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token: logits ``(B, T, V)``, labels ``(B, T)`` with ``-100`` masked.

    Returns ``(logps, mask)``, both ``(B, T - 1)``: ``logps[b, t] = log p(labels[b, t + 1] | tokens ≤ t)`` in
    float32 (0 where masked) and ``mask`` true where the label is a real token. Summing ``logps`` over a row
    gives the sequence log-likelihood of its completion (DPO); keeping them per token gives ratios (GRPO).

    >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
    >>> logps, mask = token_logprobs(logits, torch.tensor([[-100, 2, 1]]))
    >>> [round(v, 4) for v in logps[0].tolist()], mask[0].tolist()
    ([-1.3863, -1.3863], [True, True])
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(~mask, 0.0), mask
