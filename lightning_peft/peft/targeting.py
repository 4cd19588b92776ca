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

from ..groups.backbone import find_backbone
from ..groups.matching import format_names, name_matches
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
            full = f"{prefix}.{name}" if prefix else name
            out.append((full, child))
            if not isinstance(child, AdapterLayer):
                visit(full, child)
            elif child.transparent:  # a wrapper around a whole model (prompt methods): its insides stay targetable
                visit(f"{full}.base_layer", child.base_layer)

    visit("", root)
    return out


def hf_models(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost ``transformers.PreTrainedModel`` instances in ``root`` (``""`` when it is one)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return []
    found: list[tuple[str, nn.Module]] = []
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        name, module = stack.pop()
        if isinstance(module, transformers.PreTrainedModel):
            found.append((name, module))
            continue
        stack.extend((f"{name}.{n}" if name else n, c) for n, c in reversed(list(module.named_children())))
    return found


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
    return [(n, m) for n, m in candidates if n.startswith(prefix + ".")]


def select_modules(candidates: list[tuple[str, nn.Module]], patterns: Sequence[str], supported: Callable[[nn.Module], bool], what: str, root: nn.Module) -> list[str]:
    """Names among ``candidates`` selected by ``patterns`` that ``supported`` accepts; each pattern must select one."""
    wrappable = [n for n, m in candidates if supported(base_module(m))]
    selected: list[str] = []
    for pattern in patterns:
        hits = [n for n, _ in candidates if name_matches(pattern, n)]
        usable = [n for n in hits if n in wrappable]
        if not hits:
            raise ValueError(
                f"{what} pattern {pattern!r} matched no module of {type(root).__name__}. Use an exact name, a dotted "
                f"suffix or 're:<regex>'. Modules it can wrap: {format_names(wrappable)}"
            )
        if not usable:
            kinds = sorted({type(base_module(m)).__name__ for n, m in candidates if n in hits})
            raise ValueError(
                f"{what} pattern {pattern!r} matched only modules it cannot wrap ({', '.join(kinds)}: "
                f"{format_names(hits, 8)}). Modules it can wrap: {format_names(wrappable)}"
            )
        selected.extend(n for n in usable if n not in selected)
    order = {n: i for i, (n, _) in enumerate(candidates)}
    return sorted(selected, key=order.__getitem__)


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
        split = find_backbone(root)
    except ValueError as err:
        raise ValueError(f"'all-linear' needs a recognised pretrained backbone: {err}") from None
    outputs = set()
    for prefix, model in hf_models(root):
        get = getattr(model, "get_output_embeddings", None)
        out = get() if callable(get) else None
        outputs.update(f"{prefix}.{n}" if prefix and n else prefix or n for n, m in model.named_modules() if out is not None and m is out)

    def inside(name: str, roots: Sequence[str]) -> bool:
        return any(r == "" or name == r or name.startswith(r + ".") for r in roots)

    return [
        n for n, m in candidates
        if is_linear(base_module(m)) and inside(n, split.backbone) and not inside(n, split.head) and n not in outputs
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
    candidates = [(n, m) for n, m in candidate_modules(root) if not any(n == s or n.startswith(s + ".") for s in skip)]
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
    """The task head: the outermost modules whose parameters all lie outside the pretrained backbone.

    A language model's output embeddings (``lm_head``, tied to the input embeddings or not) are
    pretrained, not a new head, so they never count. Empty when no backbone is recognised or the
    module is a bare pretrained model.
    """
    try:
        split = find_backbone(root)
    except ValueError:
        return []
    heads = [root.get_submodule(h) for h in split.head]
    head_params = {id(p) for h in heads for p in h.parameters()}
    backbone = {id(p) for b in split.backbone for p in (root.get_submodule(b) if b else root).parameters()} - head_params
    for _, model in hf_models(root):
        get = getattr(model, "get_output_embeddings", None)
        output = get() if callable(get) else None
        if isinstance(output, nn.Module):
            backbone |= {id(p) for p in output.parameters()}
    out: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        params = list(module.parameters())
        if not params:
            return
        if prefix and all(id(p) not in backbone for p in params):
            out.append(prefix)
            return
        if isinstance(module, AdapterLayer):
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", root)
    return out


def resolve_modules_to_save(root: nn.Module, config: MethodConfig) -> list[str]:
    """Names of the modules trained in full with the adapter (``"auto"``: the task head)."""
    spec = config.modules_to_save
    if spec is None:
        return []
    if spec == AUTO:
        return head_modules(root)
    candidates = candidate_modules(root)
    names = select_modules(candidates, spec, lambda m: any(True for _ in m.parameters()), "modules_to_save", root)
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


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
        if has_bias(module) and not any(name == s or name.startswith(s + ".") for s in skip):
            yield name

