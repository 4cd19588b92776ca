"""One registration call per method: its config class, its wrapper layer, and how it plans its sites.

A *site* is one module to wrap and what its adapter needs (``spec``: rank, kind, shapes). Planning
is separate from applying, so :func:`~lightning_peft.inject` and :func:`~lightning_peft.load_adapter`
(which replays the sites saved in an adapter file) share one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import MethodConfig
from .layer import AdapterLayer

__all__ = [
    "LAYERS",
    "METHODS",
    "PEFT_EXPORTERS",
    "Method",
    "Site",
    "config_from_dict",
    "method_for",
    "peft_exporter",
    "register_layer",
    "register_method",
    "register_peft_exporter",
]


@dataclass(frozen=True)
class Site:
    """Wrap ``module`` (qualified name) with the layer of ``layer`` (a method name); ``spec`` builds its adapter."""

    module: str
    layer: str
    spec: dict[str, Any] = field(default_factory=dict)


Planner = Callable[[nn.Module, Any, list[str]], list[Site]]
Preparer = Callable[[nn.Module, Any, list[str]], None]


@dataclass(frozen=True)
class Method:
    """A parameter-efficient method: ``plan(model, config, modules_to_save)`` lists the sites to wrap;
    the optional ``prepare`` changes the base first (QLoRA quantizes it), also when an adapter is loaded."""

    name: str
    config: type[MethodConfig]
    plan: Planner
    prepare: Preparer | None = None


PeftExporter = Callable[[AdapterLayer, nn.Module, str], dict[str, torch.Tensor]]

METHODS: dict[str, Method] = {}
LAYERS: dict[str, type[AdapterLayer]] = {}
PEFT_EXPORTERS: dict[str, PeftExporter] = {}


def register_layer(cls: type[AdapterLayer]) -> type[AdapterLayer]:
    """Class decorator: make a wrapper layer rebuildable from the ``layer`` name saved in adapter files."""
    LAYERS[cls.method] = cls
    return cls


def register_method(name: str, config: type[MethodConfig], plan: Planner, prepare: Preparer | None = None) -> Method:
    if config.method != name:
        raise ValueError(f"{config.__name__}.method is {config.method!r}, registered as {name!r}")
    METHODS[name] = Method(name, config, plan, prepare)
    return METHODS[name]


def method_for(config: MethodConfig) -> Method:
    method = METHODS.get(getattr(config, "method", ""))
    if method is None or not isinstance(config, method.config):
        raise TypeError(
            f"{type(config).__name__} is not a parameter-efficient method config; use one of "
            f"{', '.join(m.config.__name__ for m in METHODS.values())}"
        )
    return method


def config_from_dict(data: Mapping[str, Any]) -> MethodConfig:
    """Rebuild a config saved with ``to_dict`` (its ``method`` key picks the class)."""
    name = data.get("method")
    if name not in METHODS:
        raise ValueError(f"Unknown parameter-efficient method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name].config.from_dict(data)


def register_peft_exporter(layer: str, exporter: PeftExporter) -> PeftExporter:
    """How layers of method ``layer`` are written in Hugging Face PEFT's layout: ``exporter(layer, adapter, key)``
    returns the tensors by PEFT key (``key`` is ``base_model.model.<module>``). Methods without one cannot be exported."""
    PEFT_EXPORTERS[layer] = exporter
    return exporter


def peft_exporter(layer: str) -> PeftExporter | None:
    """The PEFT-layout writer registered for layers of method ``layer`` (``None``: PEFT has no such layer)."""
    return PEFT_EXPORTERS.get(layer)
