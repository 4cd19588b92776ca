"""BitFit (Ben Zaken et al. 2022): train only the bias terms.

Each bias gets a zero-initialised trainable delta per adapter (y = base(x) + delta), which trains
exactly like the bias itself (same gradient) while the pretrained bias stays untouched -- so BitFit
adapters can be saved alone, switched, disabled, mixed in one batch and merged like LoRA ones.
Layers that apply more after their bias inside their own forward (timm's ``BatchNormAct2d``:
normalise, add the bias, then dropout and activation) get the delta added to the bias itself for
the call, so BitFit stays "train the bias" there too and merging stays exact.
Neither HF PEFT nor AdapterHub offers BitFit as a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..groups.matching import format_names
from .config import MethodConfig
from .layer import AdapterLayer
from .registry import Site, register_layer, register_method, register_peft_exporter
from .targeting import has_bias, resolve_targets

__all__ = ["BiasDelta", "BitFitConfig", "BitFitLayer"]

# Layers whose output keeps channels in dimension 1 (N, C, ...); all others keep them last.
_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit options: ``target_modules=None`` trains every bias of the pretrained model (not the head's,
    which ``modules_to_save="auto"`` trains in full); patterns restrict it to some modules."""

    method = "bitfit"


class BiasDelta(nn.Module):
    """One BitFit adapter on one layer: ``bias_delta`` shaped like the layer's bias (fp32 on half-precision bases)."""

    def __init__(self, base: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = dict(spec)
        bias = base.bias
        dtype = torch.float32 if bias.dtype in (torch.float16, torch.bfloat16) else bias.dtype
        self.bias_delta = nn.Parameter(torch.zeros(bias.shape, device=bias.device, dtype=dtype))
        self.channel_first = isinstance(base, _CHANNEL_FIRST)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` with the delta added along the channel dimension."""
        delta = self.bias_delta.to(y.dtype)
        if self.channel_first and y.dim() > 2:
            delta = delta.view(-1, *([1] * (y.dim() - 2)))
        return y + delta


@register_layer
class BitFitLayer(AdapterLayer):
    """A layer whose bias trains through per-adapter deltas: ``base_layer(x) + Σ_active delta``."""

    method = "bitfit"

    @classmethod
    def make_adapter(cls, base: nn.Module, spec: dict[str, Any]) -> BiasDelta:
        if not isinstance(getattr(base, "bias", None), nn.Parameter):
            raise ValueError(f"BitFit needs a layer with a bias; {type(base).__name__} has none")
        return BiasDelta(base, spec)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _applies_more_after_bias(self.base_layer):
            return self._forward_bias_inside(x, *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        for names, index in self.routes(x.shape[0]):
            if index is None:
                for n in names:
                    y = self.adapters[n](y)
            else:
                index = index.to(y.device)
                part = y.index_select(0, index)
                for n in names:
                    part = self.adapters[n](part)
                y = y.index_copy(0, index, part)
        return y

    def _forward_bias_inside(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_layer`` run with ``bias + Σ_active delta`` as its bias (each routed part of a mixed batch separately)."""
        routes = self.routes(x.shape[0])
        if not routes:
            return self.base_layer(x, *args, **kwargs)
        if routes[0][1] is None:
            return self._with_deltas(routes[0][0], x, *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)  # samples routed to the base model keep this
        for names, index in routes:
            index = index.to(x.device)
            y = y.index_copy(0, index, self._with_deltas(names, x.index_select(0, index), *args, **kwargs))
        return y

    def _with_deltas(self, names: tuple[str, ...], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        bias = self.base_layer.bias
        for n in names:
            bias = bias + self.adapters[n].bias_delta.to(bias.dtype)
        return torch.func.functional_call(self.base_layer, {"bias": bias}, (x, *args), kwargs)

    def _merge(self, name: str) -> None:
        self.base_layer.bias.add_(self.adapters[name].bias_delta.to(self.base_layer.bias.dtype))

    def _unmerge(self, name: str) -> None:
        self.base_layer.bias.sub_(self.adapters[name].bias_delta.to(self.base_layer.bias.dtype))


def _applies_more_after_bias(module: nn.Module) -> bool:
    """Whether ``module``'s forward runs child modules after its bias (timm's norm + activation layers), so that
    adding a delta to its output would not equal changing its bias."""
    return any(not isinstance(child, nn.Identity) for child in module.children())


def plan_bitfit(model: nn.Module, config: BitFitConfig, modules_to_save: list[str]) -> list[Site]:
    """BitFit sites: every bias-owning module outside the head (or those ``target_modules`` selects)."""

    def every_bias(candidates: list[tuple[str, nn.Module]]) -> list[str]:
        names = [n for n, m in candidates if has_bias(m)]
        if not names:
            raise ValueError(
                f"BitFit found no bias parameters to train in {type(model).__name__} outside modules_to_save "
                f"{format_names(modules_to_save)} (Llama-style models have none); use LoRA or IA3 instead"
            )
        return names

    names = resolve_targets(model, config, has_bias, every_bias, "BitFit target_modules", skip=modules_to_save)
    return [Site(n, "bitfit", {}) for n in names]


register_method("bitfit", BitFitConfig, plan_bitfit)


def export_bitfit_peft(layer: AdapterLayer, adapter: nn.Module, key: str) -> dict[str, torch.Tensor]:
    """PEFT's ``bias="all"``: the trained bias in full, under the module's own key."""
    bias = layer.base_layer.bias
    return {f"{key}.bias": bias + adapter.bias_delta.to(bias.dtype)}


register_peft_exporter("bitfit", export_bitfit_peft)
