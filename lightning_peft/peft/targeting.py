"""Which modules a method wraps and which are saved in full: pure resolution of names, with clear errors.

Patterns use :mod:`lightning_peft.groups.matching` (exact name, dotted suffix, ``re:<regex>``). Each pattern
must select at least one module the method can wrap, so a typo is an error listing the candidates,
never a silently smaller adapter. ``target_modules=None`` takes the method's defaults for the
``transformers`` model type (or timm model class) inside the module; ``"all-linear"`` takes every
linear layer of the pretrained backbone except the output head.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

from torch import nn

from ..groups.backbone import find_backbone, find_head, hf_models, output_embeddings
from ..groups.matching import format_names, name_matches, select_names
from ..utils.names import is_inside, is_inside_any, join, outermost
from .config import ALL_LINEAR, AUTO, MethodConfig
from .layer import AdapterLayer

__all__ = [
    "all_linear_modules",
    "base_module",
    "candidate_modules",
    "has_bias",
    "head_modules",
    "hf_models",
    "is_conv1d",
    "is_linear",
    "iter_bias_modules",
    "pattern_value",
    "resolve_modules_to_save",
    "resolve_targets",
    "select_modules",
]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``: a linear layer storing its weight as (in, out)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_module(module: nn.Module) -> nn.Module:
    """The wrapped layer of a wrapper, else the module itself."""
    return module.base_layer if isinstance(module, AdapterLayer) else module


def candidate_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named submodules of ``root`` in model order; a wrapper stands for its base layer (its insides are skipped,
    except the base layer's submodules of a ``transparent`` wrapper around a whole model)."""
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = join(prefix, name)
            out.append((full, child))
            if not isinstance(child, AdapterLayer):
                visit(full, child)
            elif child.transparent:  # a wrapper around a whole model (prompt methods): its insides stay targetable
                visit(f"{full}.base_layer", child.base_layer)

    visit("", root)
    return out


def _model_key(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "model_type", None):
        return config.model_type
    if hasattr(module, "pretrained_cfg"):  # timm
        return f"timm:{type(module).__name__}"
    return None


def _within(candidates: list[tuple[str, nn.Module]], prefix: str) -> list[tuple[str, nn.Module]]:
    if not prefix:
        return candidates
    return [(n, m) for n, m in candidates if n != prefix and is_inside(prefix, n)]


def select_modules(candidates: list[tuple[str, nn.Module]], patterns: Sequence[str], supported: Callable[[nn.Module], bool], what: str, root: nn.Module) -> list[str]:
    """Names among ``candidates`` selected by ``patterns`` that ``supported`` accepts; each pattern must select one."""
    wrappable = {n for n, m in candidates if supported(base_module(m))}
    kind = {n: type(base_module(m)).__name__ for n, m in candidates}
    return select_names(
        [n for n, _ in candidates], patterns, what=what, owner=type(root).__name__, usable=wrappable,
        describe=lambda hits: ", ".join(sorted({kind[n] for n in hits})),
    )


def _default_targets(root: nn.Module, candidates: list[tuple[str, nn.Module]], defaults: Mapping[str, Sequence[str]], supported: Callable[[nn.Module], bool], what: str) -> list[str]:
    models = hf_models(root) or []
    if not models:
        models = [(n, m) for n, m in [("", root), *candidates] if _model_key(m)][:1]
    selected: list[str] = []
    for prefix, model in models:
        key = _model_key(model)
        if key not in defaults:
            raise ValueError(
                f"{what}: no default target modules for model type {key!r} ({type(model).__name__}); pass "
                f"target_modules=[...] (module patterns) or 'all-linear'. Defaults exist for: {', '.join(sorted(defaults))}"
            )
        selected.extend(select_modules(_within(candidates, prefix), defaults[key], supported, what, root))
    if not models:
        raise ValueError(
            f"{what}: {type(root).__name__} holds no transformers or timm model with known default targets; pass "
            f"target_modules=[...] (module patterns) or 'all-linear'"
        )
    return selected


def all_linear_modules(root: nn.Module, candidates: list[tuple[str, nn.Module]] | None = None) -> list[str]:
    """Every linear layer (``nn.Linear``, GPT-2 ``Conv1D``) inside the pretrained backbone, not the output head."""
    candidates = candidate_modules(root) if candidates is None else candidates
    try:
        split, heads = find_backbone(root), find_head(root)
    except ValueError as err:
        raise ValueError(f"'all-linear' needs a recognised pretrained backbone: {err}") from None
    outputs = set(output_embeddings(root))
    return [
        n for n, m in candidates
        if is_linear(base_module(m)) and is_inside_any(split.backbone, n) and not is_inside_any(heads, n) and n not in outputs
    ]


def resolve_targets(
    root: nn.Module,
    config: MethodConfig,
    supported: Callable[[nn.Module], bool],
    defaults: Mapping[str, Sequence[str]] | Callable[[list[tuple[str, nn.Module]]], list[str]],
    what: str,
    skip: Sequence[str] = (),
) -> list[str]:
    """Names of the modules ``config.target_modules`` selects (defaults / ``all-linear`` / patterns) minus exclusions.

    ``defaults``: per-model-type patterns, or a function of the candidate modules.
    ``skip``: module names whose subtrees are never targeted (the modules saved in full).
    """
    candidates = [(n, m) for n, m in candidate_modules(root) if not is_inside_any(skip, n)]
    if config.target_modules is None and callable(defaults):
        names = defaults(candidates)
    elif config.target_modules is None:
        names = _default_targets(root, candidates, defaults, supported, what)
    elif config.target_modules == ALL_LINEAR:
        names = [n for n in all_linear_modules(root, candidates) if supported(base_module(root.get_submodule(n)))]
    else:
        names = select_modules(candidates, config.target_modules, supported, what, root)
    for pattern in config.exclude_modules or ():
        if not any(name_matches(pattern, n) for n, _ in candidates):
            raise ValueError(f"{what} exclude_modules pattern {pattern!r} matched no module; modules: {format_names([n for n, _ in candidates])}")
        names = [n for n in names if not name_matches(pattern, n)]
    if not names:
        raise ValueError(f"{what}: no module left to wrap in {type(root).__name__} after exclude_modules={config.exclude_modules}")
    return names


def head_modules(root: nn.Module) -> list[str]:
    """The task head (:func:`~lightning_peft.groups.backbone.find_head`); empty when no backbone is recognised."""
    try:
        return find_head(root)
    except ValueError:
        return []


def resolve_modules_to_save(root: nn.Module, config: MethodConfig) -> list[str]:
    """Names of the modules trained in full with the adapter (``"auto"``: the task head)."""
    spec = config.modules_to_save
    if spec is None:
        return []
    if spec == AUTO:
        return head_modules(root)
    candidates = candidate_modules(root)
    names = select_modules(candidates, spec, lambda m: any(True for _ in m.parameters()), "modules_to_save", root)
    return outermost(names)


def pattern_value(name: str, patterns: Mapping[str, float], default: float) -> float:
    """The value of the first pattern (in order) that selects ``name``, else ``default`` (rank/alpha overrides)."""
    for pattern, value in patterns.items():
        if name_matches(pattern, name):
            return value
    return default


def has_bias(module: nn.Module) -> bool:
    """Whether ``module`` (or the layer it wraps) owns a ``bias`` parameter directly (Linear, Conv, LayerNorm, Conv1D)."""
    return isinstance(base_module(module)._parameters.get("bias"), nn.Parameter)


def iter_bias_modules(root: nn.Module, skip: Sequence[str] = ()) -> Iterator[str]:
    """Names of the modules that own a bias, outside the subtrees in ``skip``."""
    for name, module in candidate_modules(root):
        if has_bias(module) and not is_inside_any(skip, name):
            yield name

