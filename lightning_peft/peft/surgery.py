"""Module surgery: swap one submodule for another by qualified name (``get_submodule`` + ``setattr``), nothing else."""

from __future__ import annotations

from torch import nn

__all__ = ["parent_of", "replace_module"]


def parent_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding ``name`` and the attribute it is held under (``"a.b.c"`` -> ``(root.a.b, "c")``)."""
    if not name:
        raise ValueError("cannot replace the root module itself; wrap a submodule")
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``name`` is (a ModuleList/ModuleDict/Sequential slot too) and return the old module."""
    parent, child = parent_of(root, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
