"""Optimizer param-group edits: the one place that splits, scales and extends optimizer groups.

Callbacks cannot rebuild a user's optimizer, so they edit it in place (at ``on_fit_start``, before
Lightning restores optimizer and scheduler state on resume): every parameter group is split by
:class:`Placement` (layer group, learning-rate multiplier, weight decay), learning rates are written
as real per-group values (``lr``, ``initial_lr``, OneCycle's ``max_lr``/``min_lr``), and every
scheduler's per-group lists (``base_lrs``, ``lr_lambdas``, ...) are extended to match, so any torch,
Lightning or timm scheduler keeps each group's multiplier relative to what it schedules. The group
structure is fixed for the whole run: parameters that unfreeze later sit in the optimizer from the
start, receive no gradient while frozen and so get no optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LAYER_GROUP_KEY", "Placement", "add_param_group", "regroup_optimizer", "split_param_group"]

LAYER_GROUP_KEY = "layer_group"  # written into each edited param group
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# Per-parameter-group lists that torch / timm schedulers keep: scaled with the group, or copied.
SCHEDULER_LR_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs", "base_values")
SCHEDULER_COPY_LISTS = ("lr_lambdas", "base_momentums", "max_momentums")


@dataclass(frozen=True)
class Placement:
    """Where one parameter goes: its layer group, a learning-rate multiplier, and weight decay (``None`` keeps the group's)."""

    group: str
    lr_scale: float = 1.0
    weight_decay: float | None = None


Plan = Callable[[str, nn.Parameter], Placement]


def split_param_group(group: dict[str, Any], named: Sequence[tuple[str, nn.Parameter]], plan: Plan) -> list[dict[str, Any]]:
    """Split one param group into one group per distinct placement of its parameters, in parameter order.

    ``group`` gives the hyperparameters (its ``params`` are ignored); each returned group copies them,
    multiplies every learning-rate key by the placement's ``lr_scale`` and sets its ``weight_decay``.
    """
    buckets: dict[Placement, list[nn.Parameter]] = {}
    for name, param in named:
        buckets.setdefault(plan(name, param), []).append(param)
    out = []
    for placement, params in buckets.items():
        new = {k: v for k, v in group.items() if k != "params"}
        for key in LR_KEYS:
            if key in new:
                new[key] = new[key] * placement.lr_scale
        if placement.weight_decay is not None:
            new["weight_decay"] = placement.weight_decay
        label = placement.group + ("/no_decay" if placement.weight_decay == 0.0 and group.get("weight_decay") else "")
        new["name"] = f"{group['name']}/{label}" if group.get("name") else label
        new[LAYER_GROUP_KEY] = placement.group
        new["params"] = params
        out.append(new)
    return out


def _schedulers_of(scheduler: Any) -> Iterable[Any]:
    yield scheduler
    for inner in getattr(scheduler, "_schedulers", None) or ():  # SequentialLR, ChainedScheduler
        yield from _schedulers_of(inner)


def _extend_scheduler(scheduler: Any, parents: list[int], scales: list[float], old_count: int) -> None:
    for attr in SCHEDULER_LR_LISTS + SCHEDULER_COPY_LISTS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, (list, tuple)) and len(values) == old_count:
            if attr in SCHEDULER_LR_LISTS:
                extended = [values[p] * s for p, s in zip(parents, scales)]
            else:
                extended = [values[p] for p in parents]
            setattr(scheduler, attr, type(values)(extended))


def regroup_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    plan: Plan,
    schedulers: Sequence[Any] = (),
    adopt: Iterable[nn.Parameter] = (),
) -> None:
    """Split ``optimizer``'s groups by ``plan`` in place and extend ``schedulers`` (those driving it) to match.

    Args:
        optimizer: the user's optimizer, after its schedulers were built.
        model: names the parameters (``plan`` receives qualified names); parameters of the optimizer
            that ``model`` does not hold stay in their group unchanged.
        plan: the placement of each parameter.
        schedulers: learning-rate schedulers; those whose ``optimizer`` is another one are skipped.
        adopt: parameters to add when the optimizer lacks them (compared by identity, never by
            value), with the hyperparameters of its first group: how parameters frozen when the user
            built the optimizer over trainable parameters only can be unfrozen later.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    old_groups = optimizer.param_groups
    old_count = len(old_groups)
    present = {id(p) for g in old_groups for p in g["params"]}
    missing = [p for p in adopt if id(p) not in present]
    order = {id(p): i for i, p in enumerate(model.parameters())}

    new_groups: list[dict[str, Any]] = []
    parents: list[int] = []
    scales: list[float] = []
    for index, group in enumerate(old_groups):
        params = list(group["params"]) + (missing if index == 0 else [])
        known = sorted((p for p in params if id(p) in names), key=lambda p: order[id(p)])
        unknown = [p for p in params if id(p) not in names]
        split = split_param_group(group, [(names[id(p)], p) for p in known], plan)
        for new in split:
            first = new["params"][0]
            scales.append(plan(names[id(first)], first).lr_scale)
        if unknown:
            split.append({**group, "params": unknown})
            scales.append(1.0)
        new_groups.extend(split)
        parents.extend([index] * len(split))

    seen: dict[str, int] = {}
    for new in new_groups:  # LearningRateMonitor needs distinct names
        if "name" in new:
            count = seen.get(new["name"], 0)
            seen[new["name"]] = count + 1
            if count:
                new["name"] = f"{new['name']}#{count}"

    optimizer.param_groups = []
    for new in new_groups:
        optimizer.add_param_group(new)
    for scheduler in schedulers:
        for inner in _schedulers_of(scheduler):
            if getattr(inner, "optimizer", optimizer) is optimizer:
                _extend_scheduler(inner, parents, scales, old_count)


def add_param_group(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    schedulers: Sequence[Any] = (),
    like: int = 0,
    name: str | None = None,
) -> None:
    """Append a param group of ``params`` with the hyperparameters of group ``like``, and extend ``schedulers``.

    For parameters a callback owns (e.g. a distillation projection): call it at ``on_fit_start``, so
    that on resume the restored optimizer state meets the same group structure it was saved with.
    """
    old_count = len(optimizer.param_groups)
    group = {k: v for k, v in optimizer.param_groups[like].items() if k != "params"}
    if name is not None:
        group["name"] = name
    group["params"] = list(params)
    optimizer.add_param_group(group)
    parents = [*list(range(old_count)), like]
    for scheduler in schedulers:
        for inner in _schedulers_of(scheduler):
            if getattr(inner, "optimizer", optimizer) is optimizer:
                _extend_scheduler(inner, parents, [1.0] * len(parents), old_count)
