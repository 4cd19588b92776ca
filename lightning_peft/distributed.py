"""Gradient averaging for parameters that DistributedDataParallel does not reduce.

DDP registers only the parameters that require gradients when it wraps the model; a parameter
unfrozen later gets local gradients that DDP never averages, so ranks drift apart silently
(lightning #20340). Callbacks that unfreeze average those gradients themselves before each step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["distributed_world_size", "all_reduce_mean_"]


def distributed_world_size() -> int:
    """The process-group size, 1 when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` across ranks in place, one collective per dtype (every rank must pass the same shapes)."""
    world = distributed_world_size()
    if world == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
