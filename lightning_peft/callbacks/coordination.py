"""How callbacks cooperate: declared capabilities instead of ``isinstance`` scans of ``trainer.callbacks``.

A callback that changes the model's structure (the ``PEFT`` callback injecting an adapter) defines
``prepare_model(trainer, pl_module)`` (idempotent). Any callback that needs the final structure calls
:func:`prepare_model` first: it runs every such hook in the order of ``trainer.callbacks``, so the
result is the same whichever callback's ``setup`` Lightning happens to run first. Other facts a
callback offers its peers are plain attributes (``freezes``, ``shapes_optimizer``, ``trains_backbone``)
read with :func:`declaring` (``provides_key_inputs``: per-example inputs FeatureCache keys by); no callback imports another concrete callback to find it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl

__all__ = ["ModelPreparer", "declaring", "first_of_kind", "peers", "prepare_model"]


@runtime_checkable
class ModelPreparer(Protocol):
    """A callback that changes the model's structure before optimizers exist (idempotent)."""

    def prepare_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None: ...


def _callbacks(trainer: Any) -> list[Any]:
    return list(getattr(trainer, "callbacks", None) or [])


def prepare_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Run every callback's ``prepare_model`` (adapter injection), in the order of ``trainer.callbacks``.

    Each hook is idempotent, so every callback that needs the final model calls this first. Callbacks
    declaring ``prepares_before_adapters`` (knowledge injection widening the head) run first, so adapters
    (and PEFT's copies of the head) see the final structure.
    """
    preparers = [c for c in _callbacks(trainer) if isinstance(c, ModelPreparer)]
    for callback in sorted(preparers, key=lambda c: not getattr(c, "prepares_before_adapters", False)):
        callback.prepare_model(trainer, pl_module)


def declaring(trainer: pl.Trainer, attribute: str) -> list[Any]:
    """The Trainer's callbacks whose ``attribute`` is truthy, in the Trainer's order."""
    return [c for c in _callbacks(trainer) if getattr(c, attribute, False)]


def peers(trainer: pl.Trainer, callback: Any) -> list[Any]:
    """The other callbacks of ``callback``'s own type in the Trainer (several ``PEFT`` adapters), in order."""
    return [c for c in _callbacks(trainer) if _same_kind(c, callback) and c is not callback]


def first_of_kind(trainer: pl.Trainer, callback: Any) -> bool:
    """Whether ``callback`` is the first of its type in the Trainer (or not in it: it then acts alone).

    For work done once per Trainer on behalf of all instances (averaging every adapter's gradients).
    """
    same = [c for c in _callbacks(trainer) if _same_kind(c, callback)]
    return not any(c is callback for c in same) or same[0] is callback


def _same_kind(a: Any, b: Any) -> bool:
    return isinstance(a, type(b)) or isinstance(b, type(a))
