"""Pool token states ``(batch, seq, hidden)`` into one vector per example ``(batch, hidden)``."""

from __future__ import annotations

import torch

__all__ = ["POOLINGS", "pool"]

POOLINGS = ("cls", "mean", "last")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Pool ``hidden`` (batch, seq, hidden) with ``attention_mask`` (batch, seq) of 1 = real token.

    ``cls``: first token (BERT-style encoders). ``mean``: average over real tokens (what
    sentence-transformers models such as all-MiniLM-L6-v2 were trained with). ``last``: last real
    token (decoder-only models; works with left or right padding).
    """
    if mode == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if mode == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand_as(attention_mask)
        last = (positions * attention_mask.long()).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"Unknown pooling {mode!r}; choose one of {POOLINGS}")
