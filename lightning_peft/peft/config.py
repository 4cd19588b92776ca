"""The fields every parameter-efficient method shares, and strict conversion to and from plain dicts.

Each method's config (``LoRAConfig``, ``IA3Config``, ``BitFitConfig``, ...) is a small dataclass that
adds its own knobs to these. ``to_dict``/``from_dict`` are what adapter files, checkpoints and Hydra
use; an unknown key is an error naming the valid ones, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

__all__ = ["ALL_LINEAR", "AUTO", "MethodConfig"]

ALL_LINEAR = "all-linear"  # every linear layer of the pretrained backbone, not the output head
AUTO = "auto"  # modules_to_save: the task head found automatically

C = TypeVar("C", bound="MethodConfig")


@dataclass
class MethodConfig:
    """Where a method goes and what else trains.

    Args:
        target_modules: module patterns (exact name, dotted suffix, ``re:<regex>``), ``"all-linear"``,
            or ``None`` for the method's defaults for the model type (BERT, GPT-2, Llama, ViT, ...).
        exclude_modules: patterns of modules never targeted, even when ``target_modules`` selects them.
        modules_to_save: modules trained in full beside the adapter (a copy per adapter, saved with it):
            ``"auto"`` = the task head outside the pretrained backbone (e.g. a new classifier), a list
            of patterns, or ``None``/``[]`` for none.
    """

    method: ClassVar[str] = ""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | None = None
    modules_to_save: list[str] | str | None = AUTO

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            self.target_modules = [self.target_modules]
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError(f"{type(self).__name__}: target_modules is empty; give patterns, 'all-linear' or None for the defaults")
        if isinstance(self.exclude_modules, str):
            self.exclude_modules = [self.exclude_modules]
        if isinstance(self.modules_to_save, str) and self.modules_to_save != AUTO:
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, str):
            self.modules_to_save = list(self.modules_to_save)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, with the method name under ``"method"``."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, Mapping) else list(value) if isinstance(value, (list, tuple)) else value
        return out

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a mapping (a saved config, Hydra node); unknown keys raise, naming the valid ones."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{cls.__name__} cannot read a config of method {method!r} (expected {cls.method!r})")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} option(s) {unknown}; valid options: {sorted(valid)}")
        return cls(**data)
