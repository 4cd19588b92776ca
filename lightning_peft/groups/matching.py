"""Match module names against user patterns: the one place every feature resolves names.

A pattern is an exact qualified name (``"model.bert.encoder"``), a dotted suffix (``"encoder"``
matches ``"model.bert.encoder"``) or, with a ``re:`` prefix, a regular expression that must match
the whole name (``"re:.*layer\\.[0-9]+"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = ["clean_name", "format_names", "match_module_names", "name_matches"]

_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

REGEX_PREFIX = "re:"


def name_matches(pattern: str, name: str) -> bool:
    """True if ``name`` (a qualified module name) is selected by ``pattern``."""
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX) :], name) is not None
    return name == pattern or name.endswith("." + pattern)


def format_names(names: Iterable[str], limit: int = 40) -> str:
    """A compact, readable listing of names for error messages."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown or "(none)"


def match_module_names(root: nn.Module, patterns: str | Sequence[str], *, what: str = "module") -> list[str]:
    """Qualified names of the submodules of ``root`` selected by ``patterns``, in model order.

    Every pattern must select at least one module; otherwise a ``ValueError`` lists the names that
    exist, so a typo never turns into a silently partial selection.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in root.named_modules() if n]
    selected: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if name_matches(pattern, n)]
        if not hits:
            raise ValueError(
                f"{what} pattern {pattern!r} matched no module of {type(root).__name__}. "
                f"Use an exact name, a dotted suffix or 're:<regex>'. Module names that exist: "
                f"{format_names(names)}"
            )
        selected.extend(h for h in hits if h not in selected)
    order = {n: i for i, n in enumerate(names)}
    return sorted(selected, key=order.__getitem__)


def clean_name(name: str) -> str:
    """A parameter or module name without the segments FSDP, activation checkpointing and ``torch.compile`` insert."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)
