"""``as_method_config``: a method config from what a user or a config system hands over.

Accepted: a :class:`MethodConfig` (``LoRAConfig(r=8)``); a saved dict with ``method``
(``{"method": "lora", "r": 8}``, Hydra); or the ``class_path``/``init_args`` form of Lightning's
``LightningCLI`` (``{"class_path": "lightning_peft.LoRAConfig", "init_args": {"r": 8}}``). jsonargparse
builds the last itself when it can; when it cannot (a misspelled option or class), the dict reaches us
and is rebuilt here, so the error names the option or class and the valid ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .config import MethodConfig
from .registry import METHODS, config_from_dict

__all__ = ["as_method_config"]


def as_method_config(value: MethodConfig | Mapping[str, Any]) -> MethodConfig:
    """``value`` as a method config; a mapping with ``class_path`` names the class, one with ``method`` the method.

    Example:
        >>> as_method_config({"class_path": "lightning_peft.LoRAConfig", "init_args": {"r": 4}}).r
        4
    """
    if isinstance(value, MethodConfig):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(
            f"config must be a method config (e.g. LoRAConfig(r=8)) or a mapping, got {type(value).__name__}: {value!r}"
        )
    if "class_path" not in value:
        return config_from_dict(value)
    unknown = sorted(set(value) - {"class_path", "init_args"})
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown} beside class_path; valid keys: ['class_path', 'init_args']")
    cls = _config_class(value["class_path"])
    init_args = value.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ValueError(f"config.init_args must be a mapping of {cls.__name__} options, got {init_args!r}")
    return cls.from_dict(init_args)


def _config_class(class_path: Any) -> type[MethodConfig]:
    """The class named by a dotted path, or by the bare name of a registered method's config class."""
    known = {m.config.__name__: m.config for m in METHODS.values()}
    choices = ", ".join(f"lightning_peft.{name}" for name in sorted(known))
    cls: Any = None
    if isinstance(class_path, str) and "." in class_path:
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
    elif isinstance(class_path, str):
        cls = known.get(class_path)
    if not (isinstance(cls, type) and issubclass(cls, MethodConfig)):
        raise ValueError(f"config.class_path={class_path!r} is not a method config class; choose one of {choices}")
    return cls
