"""The wrapper every injected method shares: a frozen ``base_layer`` plus named adapters.

An :class:`AdapterLayer` takes the place of the module it wraps and keeps the bookkeeping that is
the same for every method: which adapters exist, which are active, which are merged into the base
weights, whether all are disabled, and per-sample routing for mixed batches (sample ``i`` of the
batch goes through adapter ``routing[i]``, ``None`` = the base model). Subclasses (LoRA, IA3,
BitFit, modules-to-save copies) only say what one adapter does to the output and how it merges.
Adapters are found structurally through ``layer.adapters[name]`` -- never by parameter-name
substrings -- so an adapter name can never be confused with a module name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["AdapterDict", "AdapterLayer", "Route", "adapter_layers", "validate_adapter_name"]

Route = tuple[tuple[str, ...], "torch.Tensor | None"]  # (adapter names, sample indices or None = whole batch)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def validate_adapter_name(name: str) -> str:
    """Adapter names are identifiers (letters, digits, ``_``, ``-``) usable as ``ModuleDict`` keys."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or hasattr(nn.ModuleDict(), name):
        raise ValueError(
            f"Invalid adapter name {name!r}: use letters, digits, '_' or '-', starting with a letter or '_' "
            "(and not a ModuleDict attribute such as 'keys' or 'training')."
        )
    return name


class AdapterDict(nn.ModuleDict):
    """The named adapters of one wrapper: its own type, so sharding policies can give adapters (trainable)
    their own FSDP units instead of flat parameters shared with frozen base weights."""


class AdapterLayer(nn.Module):
    """Base of the wrappers: ``base_layer`` (frozen) + ``adapters`` (``ModuleDict`` name -> adapter module).

    Attributes other than its own are looked up on ``base_layer``, so code reading ``layer.weight``
    or ``layer.in_features`` of a wrapped layer keeps working.
    """

    method: ClassVar[str] = ""
    transparent: ClassVar[bool] = False  # True: targeting looks inside base_layer (a wrapper around a whole model)
    merges_tied_weights: ClassVar[bool] = False  # True: merging is right on a weight shared with other modules

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = AdapterDict()
        self.configs: dict[str, Any] = {}  # adapter name -> its method config (shared by every layer of the adapter)
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.disabled = False
        self.routing: Sequence[str | None] | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            return getattr(self._modules["base_layer"], name)

    # --- adapters -------------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter: nn.Module, config: Any) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this {type(self.base_layer).__name__}; delete it first")
        if self.merged:
            raise RuntimeError(f"cannot add adapter {name!r} while {list(self.merged)} are merged; unmerge first")
        self.adapters[name] = adapter
        self.configs[name] = config

    def link(self, model: nn.Module, name: str, adapter_name: str) -> None:
        """Called once every site of adapter ``adapter_name`` is in place (this layer is ``model.<name>``): an
        adapter that uses another layer's adapter (tied trainable tokens) finds it here. Most layers need nothing."""

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the base weights; unmerge before deleting it")
        del self.adapters[name]
        del self.configs[name]
        self.active = tuple(a for a in self.active if a != name)

    def set_active(self, names: Sequence[str]) -> None:
        if self.merged and tuple(names) != self.merged:
            raise RuntimeError(f"adapters {list(self.merged)} are merged into the base weights; unmerge before switching")
        self.active = tuple(n for n in names if n in self.adapters)

    def routes(self, batch: int) -> list[Route]:
        """Which adapters each part of the batch goes through (merged ones are already in the base weights)."""
        if self.disabled:
            return []
        if self.routing is None:
            names = tuple(a for a in self.active if a not in self.merged)
            return [(names, None)] if names else []
        if self.merged:
            raise RuntimeError("a mixed-adapter batch needs unmerged adapters; call unmerge(model) first")
        if len(self.routing) != batch:
            raise ValueError(
                f"adapter_batch gave {len(self.routing)} adapter names but this layer sees a batch of {batch} "
                "along dimension 0; pass one name per sample"
            )
        out: list[Route] = []
        for name in dict.fromkeys(self.routing):
            if name is None or name not in self.adapters:
                continue  # the base model for these samples
            index = [i for i, n in enumerate(self.routing) if n == name]
            out.append(((name,), torch.tensor(index, dtype=torch.long)))
        return out

    # --- merging (subclasses implement _merge/_unmerge for one adapter) -------------------------

    def merge(self, names: Sequence[str] | None = None) -> None:
        """Fold the given (default: active, not yet merged) adapters into the base weights."""
        for name in names if names is not None else self.active:
            if name in self.merged or name not in self.adapters:
                continue
            with torch.no_grad():
                self._merge(name)
            self.merged = (*self.merged, name)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weights, last merged first."""
        for name in reversed(self.merged):
            with torch.no_grad():
                self._unmerge(name)
        self.merged = ()

    def merge_blocker(self) -> str | None:
        """Why this layer's adapters cannot be merged into its base weights (``None``: they can)."""
        return None

    def _merge(self, name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot merge")

    def _unmerge(self, name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot unmerge")

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's parameters, keyed relative to this layer (e.g. ``lora_A``), without the adapter name."""
        return dict(self.adapters[name].named_parameters())

    def extra_repr(self) -> str:
        return f"method={self.method}, adapters={list(self.adapters)}, active={list(self.active)}, merged={list(self.merged)}"


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every wrapper in ``model``, with its qualified name, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module
