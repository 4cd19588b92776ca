"""Adapter-only Lightning checkpoints: drop the frozen base weights on save, take them from the live model on load.

The saved state keeps adapter tensors, parameters that train and buffers, plus a fingerprint of
the frozen base (names, shapes, float64 sums). A ``load_state_dict`` pre-hook on the module checks
the fingerprint and fills the frozen weights in from the model itself, so Lightning's strict
loading stays on for resume, ``validate`` and ``test`` alike -- and a checkpoint trained on other
base weights is refused instead of silently combined.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..groups.matching import clean_name
from .functional import adapter_parameters

__all__ = ["FINGERPRINT_KEY", "AdapterOnlyCheckpoints", "adapter_only_state_dict", "base_fingerprint"]

FINGERPRINT_KEY = "__lightning_peft__.base_fingerprint"


def frozen_base_names(module: nn.Module) -> set[str]:
    """State-dict names of the frozen parameters that belong to no adapter (tied aliases included)."""
    adapters = {id(p) for p in adapter_parameters(module).values()}
    return {clean_name(n) for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad and id(p) not in adapters}


def base_fingerprint(module: nn.Module) -> torch.Tensor:
    """A float64 vector summarising the frozen base weights (names, shapes, sums), to recognise the same base model."""
    names = sorted(frozen_base_names(module))
    params = {clean_name(n): p for n, p in module.named_parameters(remove_duplicate=False)}
    digest = hashlib.sha256("\n".join(f"{n}:{tuple(params[n].shape)}" for n in names).encode()).digest()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for name in names:
            values = params[name].detach().double()
            total += torch.stack([values.sum(), values.square().sum()]).cpu()
    head = torch.tensor([int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)], dtype=torch.float64)
    return torch.cat([head, total])


def _is_frozen_entry(key: str, frozen: set[str]) -> bool:
    """``key`` is a frozen parameter, or an entry stored under one (bitsandbytes' ``weight.absmax``, ``weight.quant_map``...)."""
    if key in frozen:
        return True
    parts = key.split(".")
    return any(".".join(parts[:i]) in frozen for i in range(1, len(parts)))


def adapter_only_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the frozen base parameters and what hangs off them (adapters, trainable parameters and
    buffers stay)."""
    frozen = frozen_base_names(module)
    return {k: v for k, v in state_dict.items() if not _is_frozen_entry(k, frozen)}


class AdapterOnlyCheckpoints:
    """Attach to a module once its adapters are injected; then ``shrink`` each checkpoint being saved."""

    def __init__(self) -> None:
        self.fingerprint: torch.Tensor | None = None
        self._hooked: set[int] = set()

    def attach(self, module: nn.Module) -> None:
        """Register the loading hook (once per module) and remember the base model's fingerprint."""
        if id(module) not in self._hooked:
            module.register_load_state_dict_pre_hook(self._fill_frozen_base)
            self._hooked.add(id(module))
        self.fingerprint = base_fingerprint(module)

    def shrink(self, module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Replace ``checkpoint["state_dict"]`` by its adapter-only part plus the base fingerprint."""
        state = adapter_only_state_dict(module, checkpoint["state_dict"])
        state[FINGERPRINT_KEY] = self.fingerprint if self.fingerprint is not None else base_fingerprint(module)
        checkpoint["state_dict"] = state

    def _fill_frozen_base(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + FINGERPRINT_KEY
        if key not in state_dict:
            return
        saved = state_dict.pop(key)
        current = self.fingerprint if self.fingerprint is not None else base_fingerprint(module)
        if saved.shape != current.shape or not torch.allclose(saved.double().cpu(), current.double().cpu(), rtol=1e-9, atol=1e-9):
            raise ValueError(
                "This adapter-only checkpoint was trained on other base weights than the model now holds (their "
                "fingerprints differ): load the same pretrained model, with the same adapters, before loading it."
            )
        frozen = frozen_base_names(module)
        for name, value in module.state_dict().items():
            if _is_frozen_entry(name, frozen):
                state_dict.setdefault(prefix + name, value)
