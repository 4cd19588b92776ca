"""Check a composed Hydra config before anything is built: misspelt keys and wrong types fail up front.

Every node with a ``_target_`` is compared with the signature of what it instantiates: each key must
be a parameter (``**kwargs`` are accepted only where the target takes them; a target may name what
its ``**kwargs`` go to with a ``kwargs_target(node)`` attribute, as ``peft_callback`` does for the
method config), and each value must fit the parameter's annotation where that is a simple type
(``int``, ``float``, ``bool``, ``str``, ``None``, lists, dicts, ``Literal``). Knobs of the
``finetune`` group (and of ``peft=none``) that nothing reads are errors too. All problems are
reported together, each with its dotted key, its value and the valid keys.
"""

from __future__ import annotations

import collections.abc as cabc
import difflib
import enum
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import PurePath
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError

__all__ = ["ConfigError", "check_config"]

_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
_READ_BY_CODE = {"finetune": {"callbacks"}, "peft": {"callbacks"}}  # group keys train() reads itself
_REF = re.compile(r"\$\{(?:[\w.]+:)?\s*([A-Za-z_][\w.]*)")
_MISSING = object()


class ConfigError(ValueError):
    """The composed config has keys or values its targets cannot take (all problems in one message)."""


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every unknown key and every mistyped value in ``cfg``.

    Checks what the config says, not whether it makes sense (module patterns are matched at inject
    time). Called by ``train(cfg)`` before data and model setup.
    """
    problems: list[str] = []
    for path, node in _target_nodes(cfg, ""):
        problems += _check_target(path, node, cfg)
    problems += _check_unread_knobs(cfg)
    problems = _first_per_key(problems)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"Invalid config ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n{lines}")


def _first_per_key(problems: list[str]) -> list[str]:
    """One problem per user key (``peft.lr`` is checked where it is written and where it is used)."""
    seen: set[str] = set()
    out = []
    for problem in problems:
        key = problem.split(" ", 1)[0].rstrip(":")
        if key not in seen:
            seen.add(key)
            out.append(problem)
    return out


def _target_nodes(node: Any, path: str) -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
                continue  # an interpolated node is checked where it is written
            yield from _target_nodes(node._get_node(key), _join(path, key))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            if not OmegaConf.is_interpolation(node, i):
                yield from _target_nodes(node._get_node(i), f"{path}[{i}]")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _check_target(path: str, node: DictConfig, root: DictConfig) -> list[str]:
    target_name = node._get_node("_target_")._value()
    try:
        from hydra.utils import get_object

        target = get_object(str(target_name))
    except Exception as err:
        return [f"{_join(path, '_target_')} = {target_name!r}: cannot be imported ({type(err).__name__}: {err})"]
    problems: list[str] = []
    params, accepts_kwargs = _parameters(target)
    kwargs_target = getattr(target, "kwargs_target", None)
    extra: dict[str, inspect.Parameter] = {}
    if accepts_kwargs and callable(kwargs_target):
        forwarded = kwargs_target(node)
        if forwarded is not None:
            extra, accepts_kwargs = _parameters(forwarded)
            params = {**params, **extra}
    hints = _hints(target)
    if extra:
        hints = {**_hints(kwargs_target(node)), **hints}
    for key in node:
        if key in _HYDRA_KEYS:
            continue
        where = _join(path, key)
        if key not in params:
            if not accepts_kwargs:
                problems.append(f"{where}: unknown key for {target_name}{_suggest(str(key), params)}")
            continue
        if OmegaConf.is_missing(node, key):
            problems.append(f"{where}: required value missing (???); set it with {where}=...")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and "_target_" in child:
            continue  # instantiated itself: checked as its own node
        try:
            value = node[key]
        except InterpolationToMissingValueError:
            continue  # the missing value itself is reported where it is
        except Exception as err:
            problems.append(f"{where}: cannot be resolved ({type(err).__name__}: {err})")
            continue
        problems += _missing_inside(where, value)
        hint = hints.get(key, _MISSING)
        if hint is not _MISSING and not _fits(_plain(value), hint):
            problems.append(f"{_source(node, key, where, root)} = {_plain(value)!r}: expected {_type_name(hint)}")
    return problems


def _parameters(target: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return {}, True  # no signature to check against (a builtin): accept
    params = {
        name: p for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"
    }
    return params, any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


def _hints(target: Any) -> dict[str, Any]:
    function = target.__init__ if inspect.isclass(target) and not _is_dataclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:
        return {}


def _is_dataclass(target: Any) -> bool:
    import dataclasses

    return dataclasses.is_dataclass(target)


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _missing_inside(where: str, value: Any) -> list[str]:
    if isinstance(value, DictConfig):
        return [p for k in value for p in (
            [f"{where}.{k}: required value missing (???); set it with {where}.{k}=..."] if OmegaConf.is_missing(value, k)
            else _missing_inside(f"{where}.{k}", value._get_node(k)) if not OmegaConf.is_interpolation(value, k) else []
        )]
    return []


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits a simple annotation; annotations this does not understand accept anything."""
    if hint is Any or hint is object or value is None:
        return True  # None: not set here (filled in by the caller, or the target's own default)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if inspect.isclass(hint) and issubclass(hint, PurePath):
        return isinstance(value, (str, PurePath))
    if origin in (list, tuple, set, frozenset, cabc.Sequence, cabc.Iterable) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return all(_fits(v, item) for v in value)
    if origin in (dict, cabc.Mapping, cabc.MutableMapping) or hint in (dict,):
        if not isinstance(value, dict):
            return False
        return not args or all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if inspect.isclass(hint) and isinstance(value, str):
        return issubclass(hint, (str, enum.Enum))  # a word where an object (Tensor, Module, ...) is expected
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if inspect.isclass(hint) else str(hint).replace("typing.", "")


def _suggest(key: str, params: dict[str, Any]) -> str:
    valid = sorted(params)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} Valid keys: {', '.join(valid)}"


def _source(node: DictConfig, key: Any, where: str, root: DictConfig) -> str:
    """``where``, or the key the value was interpolated from (what the user set), e.g. ``finetune.lr (-> model.optimizer.lr)``."""
    if not OmegaConf.is_interpolation(node, key):
        return where
    raw = node._get_node(key)._value()
    value = node[key]
    for ref in _REF.findall(str(raw)):
        if OmegaConf.select(root, ref, default=_MISSING, throw_on_missing=False) is not _MISSING:
            found = OmegaConf.select(root, ref)
            if _plain(found) == _plain(value):
                return f"{ref} (used as {where})"
    return where


def _check_unread_knobs(cfg: DictConfig) -> list[str]:
    """Keys of the ``finetune`` group (and of a ``peft`` node without a target) that no interpolation reads."""
    referenced = set(_references(cfg))
    problems = []
    for group, read in _READ_BY_CODE.items():
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" in node:
            continue
        for key in node:
            if key in read or f"{group}.{key}" in referenced:
                continue
            used = {k: None for k in node if k in read or f"{group}.{k}" in referenced}
            if used:
                problems.append(f"{group}.{key}: not used by {_choice(group)}{_suggest(str(key), used)}")
            else:
                problems.append(f"{group}.{key}: {_choice(group)} takes no options")
    return problems


def _choice(group: str) -> str:
    """``<group>=<choice>`` when Hydra knows the choice, else ``the chosen <group> config``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"{group}={HydraConfig.get().runtime.choices[group]}"
    except Exception:
        return f"the chosen {group} config"


def _references(node: Any) -> Iterator[str]:
    """Every absolute key that an interpolation in ``node`` names (``${a.b}``, ``${oc.select:a.b,...}``)."""
    if isinstance(node, DictConfig):
        items: list[Any] = [node._get_node(k) for k in node]
    elif isinstance(node, ListConfig):
        items = [node._get_node(i) for i in range(len(node))]
    else:
        return
    for child in items:
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation():
            yield from _references(child)
        else:
            raw = child._value()
            if isinstance(raw, str) and "${" in raw:
                yield from _REF.findall(raw)
