"""The fields every parameter-efficient method shares, and strict conversion to and from plain dicts.

Each method's config (``LoRAConfig``, ``IA3Config``, ``BitFitConfig``, ...) is a small dataclass that
adds its own knobs to these. ``to_dict``/``from_dict`` are what adapter files, checkpoints and Hydra
use; an unknown key is an error naming the valid ones, never silently dropped.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

__all__ = ["ALL_LINEAR", "AUTO", "MethodConfig", "check_choice", "check_field", "check_probability", "check_scalar"]

ALL_LINEAR = "all-linear"  # every linear layer of the pretrained backbone, not the output head
AUTO = "auto"  # modules_to_save: the task head found automatically

C = TypeVar("C", bound="MethodConfig")


# A base of subclasses, not a pure dataclass: jsonargparse (LightningCLI) then accepts
# ``class_path: lightning_peft.LoRAConfig`` where a MethodConfig is expected.
@dataclass
class MethodConfig(abc.ABC):
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
        check_field_types(self)
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


# --- validation shared by every method's config -------------------------------------------------

_SCALARS = {"bool", "int", "float", "str"}


def check_scalar(owner: str, name: str, value: Any, kind: str) -> Any:
    """``value`` as a ``kind`` (``"bool"``, ``"int"``, ``"float"``, ``"str"``), or a ValueError naming it.

    Integers must be integers (``8`` or ``8.0``, not ``"8"`` or ``True``); floats real and finite.
    """
    ok = {
        "bool": isinstance(value, bool),
        "int": (isinstance(value, numbers.Integral) and not isinstance(value, bool))
        or (isinstance(value, float) and value.is_integer()),
        "float": isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        what = {"bool": "True or False", "int": "an integer", "float": "a finite number", "str": "a string"}[kind]
        raise ValueError(f"{owner}: {name} must be {what}, got {value!r} ({type(value).__name__})")
    return int(value) if kind == "int" else value


def check_field_types(config: Any) -> None:
    """Check every field annotated ``bool``/``int``/``float``/``str`` (optionally ``| None``); ints are made ints."""
    owner = type(config).__name__
    for f in dataclasses.fields(config):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        parts = {p.strip() for p in str(annotation).split("|")}
        kinds = parts - {"None"}
        if len(kinds) != 1 or not kinds <= _SCALARS:
            continue
        value = getattr(config, f.name)
        if value is None and "None" in parts:
            continue
        setattr(config, f.name, check_scalar(owner, f.name, value, kinds.pop()))


def check_field(config: Any, name: str, ok: Callable[[Any], bool], requirement: str) -> None:
    """Raise a ValueError naming ``config``'s field ``name`` unless ``ok(value)``; ``requirement`` says what is valid."""
    value = getattr(config, name)
    if not ok(value):
        raise ValueError(f"{type(config).__name__}: {name}={value!r} is invalid: {requirement}")


def check_probability(config: Any, name: str = "dropout") -> None:
    """A dropout probability: a number in [0, 1)."""
    check_scalar(type(config).__name__, name, getattr(config, name), "float")
    check_field(config, name, lambda p: 0.0 <= p < 1.0, "it must be in [0, 1)")


def check_choice(config: Any, name: str, choices: Iterable[str]) -> None:
    """One of ``choices``."""
    choices = list(choices)
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{type(config).__name__}: unknown {name}={value!r}; choose one of {choices}")
