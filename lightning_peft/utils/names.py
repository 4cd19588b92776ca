"""Qualified module / parameter names (``"backbone.encoder.layer.0"``): the few string rules every feature shares.

``""`` is the root module: it contains every name, and joining onto it adds no dot.

>>> join("backbone", "encoder"), join("", "head"), join("head", "")
('backbone.encoder', 'head', 'head')
>>> is_inside("backbone", "backbone.encoder.weight"), is_inside("backbone", "backbone2.weight"), is_inside("", "head")
(True, False, True)
>>> parent("backbone.encoder"), parent("head")
('backbone', '')
>>> outermost(["a", "a.b", "c", "ab"])
['a', 'c', 'ab']
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["is_inside", "is_inside_any", "join", "outermost", "parent", "relative"]


def join(prefix: str, name: str) -> str:
    """``prefix.name``, or whichever of the two is not empty."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def is_inside(ancestor: str, name: str) -> bool:
    """Whether ``name`` is ``ancestor`` itself or lies below it (``""`` contains everything); never a mere string prefix."""
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def is_inside_any(ancestors: Iterable[str], name: str) -> bool:
    """Whether ``name`` lies inside (or is) one of ``ancestors``."""
    return any(is_inside(a, name) for a in ancestors)


def parent(name: str) -> str:
    """The enclosing module's name (``""`` for a top-level name)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def relative(ancestor: str, name: str) -> str:
    """``name`` as seen from inside ``ancestor`` (which must contain it)."""
    return name[len(ancestor) + 1 :] if ancestor else name


def outermost(names: Iterable[str]) -> list[str]:
    """``names`` (order kept) without those lying inside another of them."""
    names = list(names)
    return [n for n in names if not any(o != n and o != "" and is_inside(o, n) for o in names)]
