"""Peak bytes of the tensors a block of code allocates on a CPU: what ``torch.cuda.max_memory_allocated`` tells on a GPU.

A CPU has no allocator statistics and a process's resident set mixes in the interpreter, libraries and freed
pages, so benchmarks on a CPU count tensor storages instead: every storage an op creates inside the block
counts from its creation until it is freed. Views and in-place results share their input's storage and do not
count; storages that existed before the block (weights, inputs, optimizer state) do not count either, nor do
tensors without a plain storage (sparse, MKLDNN). A storage that grows (``resize_``, ``out=``) counts its new
size. Backward passes count (autograd runs them with the mode); threads the code starts itself (DataLoader
workers) are not seen. On a GPU, ``torch.cuda.max_memory_allocated`` is the allocator's own answer.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["TensorMemory", "track_tensor_memory"]


class TensorMemory(TorchDispatchMode):
    """Bytes of the storages created by ops while active: ``current`` (still alive) and ``peak`` (the most at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, list] = {}  # id(storage) -> [weakref, bytes counted]

    def _freed(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _storages((args, kwargs))  # the same Python objects after the op (torch keeps one per live storage)
        before = {id(s) for s in inputs}
        out = func(*args, **kwargs)
        for storage in _storages(out) + inputs:  # new outputs; inputs resized in place (out=, resize_)
            key = id(storage)  # torch keeps one Python object per live storage, so the id is stable while it lives
            nbytes = storage.nbytes()
            if key in self._live:
                self.current += nbytes - self._live[key][1]
                self._live[key][1] = nbytes
            elif key not in before:
                self._live[key] = [weakref.ref(storage, lambda _, k=key: self._freed(k)), nbytes]
                self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def _storages(tree) -> list[torch.UntypedStorage]:
    """The storages in ``tree`` (of tensors with a plain storage off the meta device, and storages themselves)."""
    found = []
    for leaf in tree_leaves(tree):
        if isinstance(leaf, torch.UntypedStorage):
            found.append(leaf)
        elif isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided and not leaf.is_mkldnn and leaf.device.type != "meta":
            found.append(leaf.untyped_storage())
    return found


@contextlib.contextmanager
def track_tensor_memory() -> Iterator[TensorMemory]:
    """Count the tensor memory the block allocates (module docstring); read ``.peak`` and ``.current`` after it.

    Example:
        >>> x = torch.randn(256, 256)  # 256 KiB that existed before: not counted
        >>> with track_tensor_memory() as mem:
        ...     y = x @ x               # + 256 KiB
        ...     z = (y + 1).relu_()     # + 256 KiB (relu_ is in place)
        ...     del y                   # - 256 KiB
        >>> mem.peak // 1024, mem.current // 1024
        (512, 256)
    """
    mode = TensorMemory()
    with mode:
        yield mode
