"""What knowledge injection needs to know: where the external vector enters the model, and its size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["MODES", "KnowledgeConfig", "as_knowledge_config"]

MODES = ("late", "early")


@dataclass(frozen=True)
class KnowledgeConfig:
    """External per-example features fused into a classifier.

    ``late``: the vector ``(B, F)`` is concatenated with the pooled representation ``(B, H)`` before the
    head (Ostendorff et al. 2019, "Enriching BERT with Knowledge Graph Embeddings"); the head's first
    linear layer is widened to ``H + F`` inputs. ``early``: a projection ``Linear(F, hidden)`` of the vector
    is added to the input token embeddings (``(B, F)`` broadcast over tokens, or ``(B, T, F)`` per token).
    New weights start at zero, so the model computes exactly what it did without the features until
    training moves them.

    Args:
        mode: ``late`` or ``early``.
        dim: ``F``, the size of the external vector.
        key: batch dict key holding the features (read by the ``KnowledgeInjection`` callback; the ready
            classifiers take them as their ``features`` argument).
    """

    mode: str = "late"
    dim: int = 0
    key: str = "features"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"knowledge mode {self.mode!r} is not one of {MODES}: late concatenates the vector with the pooled features, early adds it to the input embeddings")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"knowledge dim must be a positive integer (the size F of each example's external vector), got {self.dim!r}")
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"knowledge key must be a non-empty batch key, got {self.key!r}")


def as_knowledge_config(value: KnowledgeConfig | dict[str, Any] | None) -> KnowledgeConfig | None:
    """A ``KnowledgeConfig`` from itself, a plain dict of its fields (Hydra), or ``None``."""
    if value is None or isinstance(value, KnowledgeConfig):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"mode", "dim", "key"})
        if unknown:
            raise ValueError(f"unknown knowledge options {unknown}; valid: ['dim', 'key', 'mode']")
        return KnowledgeConfig(**value)
    raise TypeError(f"knowledge must be a KnowledgeConfig, a dict of its fields or None, got {type(value).__name__}")
