"""Gradient averaging for parameters that DistributedDataParallel does not reduce.

DDP registers only the parameters that require gradients when it wraps the model; a parameter
unfrozen later gets local gradients that DDP never averages, so ranks drift apart silently
(lightning #20340). Callbacks that unfreeze average those gradients themselves before each step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["all_reduce_grads_mean_", "all_reduce_mean_", "distributed_world_size"]


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


def all_reduce_grads_mean_(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` across ranks (every rank must pass the same parameters, in order).

    A parameter that got no gradient on some rank (unused in its batch) counts as a zero gradient
    there, as under DDP; one with no gradient on any rank keeps ``grad=None`` so the optimizer skips it.
    """
    world = distributed_world_size()
    if world == 1 or not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has_grad)
    grads = []
    for p, flag in zip(params, has_grad.tolist()):
        if flag > 0:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    all_reduce_mean_(grads)
