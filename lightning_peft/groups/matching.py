"""Match module names against user patterns: the one place every feature resolves names.

A pattern is an exact qualified name (``"model.bert.encoder"``), a dotted suffix (``"encoder"``
matches ``"model.bert.encoder"``) or, with a ``re:`` prefix, a regular expression that must match
the whole name (``"re:.*layer\\.[0-9]+"``). Names are matched without the segments FSDP, activation
checkpointing and ``torch.compile`` insert (``_fsdp_wrapped_module``, ``_orig_mod``, ...), so a
pattern means the same module before and after wrapping. PEFT-format target rules (PEFT's own
``target_modules`` semantics) live with the PEFT file format, not here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Iterable, Sequence

from torch import nn

__all__ = ["clean_name", "format_names", "match_module_names", "name_matches", "select_names"]

_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

REGEX_PREFIX = "re:"


def name_matches(pattern: str, name: str) -> bool:
    """True if ``name`` (a qualified module name, wrapper segments ignored) is selected by ``pattern``."""
    name = clean_name(name)
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


def select_names(
    names: Sequence[str],
    patterns: str | Sequence[str],
    *,
    what: str,
    owner: str,
    usable: Container[str] | None = None,
    describe: Callable[[list[str]], str] | None = None,
) -> list[str]:
    """The ``names`` selected by ``patterns``, in the order of ``names``, each once: the one selection loop.

    Every pattern must select at least one name (and, with ``usable``, one usable name); otherwise a
    ``ValueError`` lists the names to choose from, so a typo never turns into a silently partial
    selection. ``describe(hits)`` says what the unusable hits are (e.g. their module types).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    choices = list(names) if usable is None else [n for n in names if n in usable]
    listing = "Module names that exist" if usable is None else "Modules it can wrap"
    selected: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if name_matches(pattern, n)]
        if not hits:
            raise ValueError(
                f"{what} pattern {pattern!r} matched no module of {owner}. Use an exact name, a dotted suffix or "
                f"'re:<regex>'. {listing}: {format_names(choices)}"
            )
        good = hits if usable is None else [n for n in hits if n in usable]
        if not good:
            kinds = f"{describe(hits)}: " if describe is not None else ""
            raise ValueError(
                f"{what} pattern {pattern!r} matched only modules it cannot wrap ({kinds}{format_names(hits, 8)}). "
                f"{listing}: {format_names(choices)}"
            )
        selected.extend(h for h in good if h not in selected)
    order = {n: i for i, n in enumerate(names)}
    return sorted(selected, key=order.__getitem__)


def match_module_names(root: nn.Module, patterns: str | Sequence[str], *, what: str = "module") -> list[str]:
    """Qualified names of the submodules of ``root`` selected by ``patterns``, in model order (see :func:`select_names`)."""
    names = [n for n, _ in root.named_modules() if n]
    return select_names(names, patterns, what=what, owner=type(root).__name__)


def clean_name(name: str) -> str:
    """A parameter or module name without the segments FSDP, activation checkpointing and ``torch.compile`` insert."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)
