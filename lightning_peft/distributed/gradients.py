"""Gradient averaging for parameters that DDP or FSDP does not reduce: the one algorithm.

DDP registers only the parameters that require gradients when it wraps the model; a parameter
unfrozen later gets local gradients that DDP never averages, so ranks drift apart silently
(lightning #20340). FSDP reduces only what it shards, not the adapters it keeps replicated
(:func:`~lightning_peft.distributed.fsdp.sync_replicated_gradients`), and parameters living outside the
wrapped module (distillation projections) are reduced by nobody. All of them go through
:func:`all_reduce_grads_mean_`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["all_reduce_grads_mean_", "all_reduce_mean_", "distributed_world_size"]


def distributed_world_size(group: dist.ProcessGroup | None = None) -> int:
    """The process-group size, 1 when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def all_reduce_mean_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Average ``tensors`` across ranks in place, one collective per dtype (every rank must pass the same shapes)."""
    world = distributed_world_size(group)
    if world == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for t in same:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_grads_mean_(params: Sequence[torch.nn.Parameter], group: dist.ProcessGroup | None = None) -> int:
    """Average the gradients of ``params`` across ranks, as DDP would; return how many parameters took part.

    Every rank must pass the same parameters, in the same order. One all-reduce over a flat buffer
    (gradients in at least float32, plus one presence flag per parameter): a parameter that got no
    gradient on some rank (unused in its batch) counts as a zero gradient there, as under DDP; one
    with no gradient on any rank keeps ``grad=None`` so the optimizer skips it. A no-op returning 0
    outside an initialised process group of more than one rank.
    """
    world = distributed_world_size(group)
    if world == 1 or not params:
        return 0
    device = params[0].device
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, dtype) for p in params])
    present = torch.tensor([p.grad is not None for p in params], device=device, dtype=dtype)
    buffer = torch.cat([flat, present])
    dist.all_reduce(buffer, group=group)
    flat, present = buffer[: flat.numel()] / world, buffer[flat.numel() :]
    offset = 0
    for p, had in zip(params, present.tolist()):
        n = p.numel()
        if had:
            value = flat[offset : offset + n].view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)
        offset += n
    return len(params)
