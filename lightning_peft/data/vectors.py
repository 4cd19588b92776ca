"""External feature vectors that come with each example (knowledge injection): parsed from a table, checked."""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable

__all__ = ["check_vectors", "parse_vector"]


def check_vectors(vectors: list, where: Callable[[int], str], count: int) -> None:
    """Every example has a vector of numbers, all of the first one's length (else an error naming the example)."""
    if len(vectors) != count:
        raise ValueError(f"{len(vectors)} feature vectors but {count} examples")
    width = None
    for i, vector in enumerate(vectors):
        if not isinstance(vector, (list, tuple)) or not vector or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in vector):
            raise ValueError(f"{where(i)}: the feature vector {str(vector)[:60]!r} is not a non-empty list of numbers")
        width = len(vector) if width is None else width
        if len(vector) != width:
            raise ValueError(f"{where(i)}: feature vector of length {len(vector)}, but the first example's has {width} (feature dimension mismatch)")


def parse_vector(value: object, at: str, column: str) -> list[float]:
    """A vector field: a JSON list (``.jsonl``, or ``"[0.1, 0.2]"`` in a CSV cell) or numbers separated by spaces."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip().startswith("[") else [float(v) for v in value.split()]
        except ValueError:
            raise ValueError(f"{at}: the {column!r} field {value[:60]!r} is not a vector (a JSON list or space-separated numbers)") from None
    if not isinstance(value, list):
        raise ValueError(f"{at}: the {column!r} field is {value!r}, not a vector of numbers")
    return value

