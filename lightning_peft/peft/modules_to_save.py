"""Modules trained in full beside an adapter (a new classification head): one trainable copy per adapter.

The original stays frozen as ``base_layer``; each adapter owns a deep copy made when it was added,
so switching adapters switches heads too, disabling adapters gives back the original, and a mixed
batch sends each sample through its own adapter's copy.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .layer import AdapterLayer
from .registry import register_layer, register_peft_exporter

__all__ = ["ModulesToSaveLayer"]


@register_layer
class ModulesToSaveLayer(AdapterLayer):
    """The active adapter's copy of the module runs instead of the original (at most one active)."""

    method = "modules_to_save"

    @classmethod
    def make_adapter(cls, base: nn.Module, spec: dict[str, Any]) -> nn.Module:
        module = copy.deepcopy(base)
        module.requires_grad_(True)
        return module

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.routing is None:
            if len(self.active) > 1:
                raise RuntimeError(f"modules_to_save copies cannot be combined: activate one adapter, not {list(self.active)}")
            module = self.adapters[self.active[0]] if self.active else self.base_layer
            return module(x, *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        for (name,), index in self.routes(x.shape[0]):
            index = index.to(x.device)
            y = y.index_copy(0, index, self.adapters[name](x.index_select(0, index), *args, **kwargs).to(y.dtype))
        return y

    def merge(self, names: Any = None) -> None:
        """Nothing to fold: the active copy already is the module (``merge_and_unload`` keeps it)."""

    def unmerge(self) -> None:
        """Nothing was folded."""


def export_saved_module_peft(layer: AdapterLayer, adapter: nn.Module, key: str) -> dict[str, torch.Tensor]:
    """PEFT's ``modules_to_save``: the adapter's copy of the module, under the module's own keys."""
    return {f"{key}.{k}": v for k, v in adapter.state_dict().items()}


register_peft_exporter("modules_to_save", export_saved_module_peft)
