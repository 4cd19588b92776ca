"""Peak bytes of the tensors a block of code allocates on a CPU: what ``torch.cuda.max_memory_allocated`` tells on a GPU.

A CPU has no allocator statistics and a process's resident set mixes in the interpreter, libraries and freed
pages, so benchmarks on a CPU count tensor storages instead: every storage an op creates inside the block
counts from its creation until it is freed. Views and in-place results share their input's storage and do not
count; storages that existed before the block (weights, inputs, optimizer state) do not count either. The
count is per thread: a CPU backward runs in the calling thread and counts, a CUDA backward runs in autograd's
device threads and would not (use the CUDA allocator's statistics there).
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
        self._live: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = id(storage)  # torch keeps one Python object per live storage, so the id is stable while it lives
            if key in before or key in self._live:
                continue
            nbytes = storage.nbytes()
            self._live[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


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
