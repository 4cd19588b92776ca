"""Pool a layer's output into one vector per example: token states ``(batch, seq, hidden)`` -> ``(batch, hidden)``.

:func:`pool` is what :class:`~lightning_peft.TextClassifier` uses; :func:`pool_output` adds the
poolings probing offers on any layer (a model's ``pooler_output``, a CNN's spatial average,
flattening); :func:`layer_hidden` takes the hidden-state tensor out of a layer's output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["EXTRACT_POOLINGS", "POOLINGS", "layer_hidden", "pool", "pool_output"]

POOLINGS = ("cls", "mean", "last")
EXTRACT_POOLINGS = ("head_input", "cls", "mean", "last", "pooler", "avg", "flatten")


def layer_hidden(output: Any, who: str = "") -> Tensor:
    """The hidden states in a layer's output: the tensor itself, ``last_hidden_state``, or the first of a tuple."""
    if isinstance(output, Tensor):
        return output
    if getattr(output, "last_hidden_state", None) is not None:
        return output.last_hidden_state
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"{who}cannot take hidden states from a layer output of type {type(output).__name__}; choose another layer.")


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


def pool_output(output: Any, pooling: str, attention_mask: Tensor | None = None) -> Tensor:
    """One vector per example ``(B, D)`` from a layer's output.

    ``cls``: first token of ``(B, L, D)``; ``mean`` / ``last``: mean over / last of the real tokens
    (``attention_mask`` ``(B, L)``); ``pooler``: a ``transformers`` model's ``pooler_output``;
    ``avg``: mean over the spatial dimensions of ``(B, C, H, W)`` (a CNN's global average pool);
    ``flatten``: ``(B, -1)``.
    """
    if pooling == "pooler":
        pooled = getattr(output, "pooler_output", None)
        if pooled is None:
            raise ValueError("pooling='pooler' needs a transformers model output with pooler_output; choose cls or mean.")
        return pooled
    hidden = layer_hidden(output, "extract_features: ")
    if pooling in POOLINGS:
        if hidden.dim() != 3:
            raise ValueError(f"pooling={pooling!r} needs (batch, tokens, dim) outputs, got {tuple(hidden.shape)}; use avg or flatten.")
        return pool(hidden, attention_mask, pooling)
    if pooling == "avg":
        return hidden.mean(dim=tuple(range(2, hidden.dim()))) if hidden.dim() > 2 else hidden
    if pooling == "flatten":
        return hidden.reshape(hidden.shape[0], -1)
    raise ValueError(f"Unknown pooling {pooling!r}; choose one of {EXTRACT_POOLINGS}")
