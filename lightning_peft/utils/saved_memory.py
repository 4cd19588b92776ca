"""Bytes that autograd keeps for backward: what a formulation costs in activation memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

__all__ = ["SavedBytes", "count_saved_bytes"]


class SavedBytes:
    """Running total of the distinct storages saved for backward: a tensor saved twice, or with its views,
    counts once; the storages of ``exclude`` (parameters: they exist anyway) do not count."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.bytes = 0
        self._seen = {(t.device, t.untyped_storage().data_ptr()) for t in exclude}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return t


@contextlib.contextmanager
def count_saved_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[SavedBytes]:
    """Count what the forward passes run inside save for backward, leaving out the storages of ``exclude``.

    Example:
        >>> x, w = torch.randn(4, 8), torch.randn(3, 8, requires_grad=True)
        >>> with count_saved_bytes(exclude=[w]) as saved:
        ...     y = (x @ w.t()).sum()
        >>> saved.bytes  # x: 4·8 fp32
        128
    """
    counter = SavedBytes(exclude)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        yield counter
