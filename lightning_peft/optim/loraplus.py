"""LoRA+ (Hayou et al. 2024): B trains at ``loraplus_lr_ratio`` times the learning rate of A, as PEFT's ``create_loraplus_optimizer``.

PEFT's grouping, applied to the parameters of one adapter: ``lora_B`` and every 1-D parameter (bias
deltas, DoRA magnitudes, 1-D weights of modules saved in full) get ``ratio × lr``; LoRA weights on
embeddings get the fixed rate ``loraplus_lr_embedding``; the rest keeps ``lr``. Parameters are found
structurally (the adapter's own modules), never by name. The rates are written by
:func:`~lightning_peft.optim.param_groups.regroup_optimizer`, the one mechanism that edits param
groups, so LoRA+ composes with ``DiscriminativeLR`` (multipliers multiply) and with any optimizer and
scheduler: schedulers keep each group's multiplier relative to what they schedule (a warmup scales
A and B alike, the ratio holds). Unlike PEFT, the optimizer's own weight decay is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .param_groups import Placement, regroup_optimizer

__all__ = ["apply_loraplus", "create_loraplus_optimizer", "loraplus_roles"]

LORAPLUS_FLAG = "_lightning_peft_loraplus"  # set on an optimizer once per adapter, so a second call is a no-op


def loraplus_roles(model: nn.Module, adapter_name: str = "default") -> dict[int, str]:
    """``id(param) -> "A" | "B" | "embedding"`` for the parameters of adapter ``adapter_name`` (PEFT's LoRA+ groups)."""
    from ..peft.layer import adapter_layers

    roles: dict[int, str] = {}
    for _, layer in adapter_layers(model):
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if adapter is None:
            continue
        kind = getattr(adapter, "kind", None)
        b = getattr(adapter, "lora_B", None)
        for param in adapter.parameters():
            if kind == "embedding" and layer.method in ("lora", "qlora"):
                roles[id(param)] = "embedding"
            elif param is b or param.dim() == 1:
                roles[id(param)] = "B"
            else:
                roles[id(param)] = "A"
    return roles


def apply_loraplus(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    schedulers: Sequence[Any] = (),
    adapter_name: str = "default",
) -> None:
    """Split ``optimizer``'s groups in place so adapter ``adapter_name``'s B weights train at ``loraplus_lr_ratio`` × lr.

    Embedding LoRA weights get ``loraplus_lr_embedding`` (times any multiplier another callback gives
    their group); parameters outside the adapter keep their rates. Call after building the schedulers
    and pass them, so their per-group lists follow (the ``PEFT`` callback does this at ``on_fit_start``).

    Example:
        >>> from lightning_peft import LoRAConfig, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
        >>> opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        >>> apply_loraplus(opt, model, loraplus_lr_ratio=16)
        >>> [(g["name"], g["lr"]) for g in opt.param_groups]
        [('loraplus_A', 0.001), ('loraplus_B', 0.016)]
    """
    if getattr(optimizer, f"{LORAPLUS_FLAG}_{adapter_name}", False):
        return
    if not loraplus_lr_ratio > 0 or not loraplus_lr_embedding >= 0:
        raise ValueError(f"apply_loraplus: loraplus_lr_ratio must be > 0 and loraplus_lr_embedding >= 0, got "
                         f"{loraplus_lr_ratio!r} and {loraplus_lr_embedding!r}")
    roles = loraplus_roles(model, adapter_name)
    group_lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}

    def plan(name: str, param: nn.Parameter) -> Placement:
        role = roles.get(id(param))
        if role is None:
            return Placement("other")
        if role == "embedding":
            lr = group_lr[id(param)]
            if lr <= 0:
                raise ValueError(f"apply_loraplus: {name} sits in a param group with lr={lr}; its embedding rate cannot be set relative to it")
            return Placement("loraplus_embedding", loraplus_lr_embedding / lr)
        return Placement(f"loraplus_{role}", loraplus_lr_ratio if role == "B" else 1.0)

    regroup_optimizer(optimizer, model, plan, schedulers)
    setattr(optimizer, f"{LORAPLUS_FLAG}_{adapter_name}", True)


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    adapter_name: str = "default",
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over the trainable parameters with LoRA+ rates (PEFT's function of the same name; ``kwargs`` go to the optimizer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("create_loraplus_optimizer: no trainable parameters (inject an adapter first)")
    optimizer = optimizer_cls(params, lr=lr, **kwargs)
    apply_loraplus(optimizer, model, loraplus_lr_ratio, loraplus_lr_embedding, adapter_name=adapter_name)
    return optimizer
