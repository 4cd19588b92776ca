"""Find the pretrained backbone inside a user's module, and the task head that is not part of it.

Recognised backbones: Hugging Face ``transformers`` models (the ``base_model`` of a ``*For*`` model,
the whole model otherwise), ``timm`` models (everything but ``get_classifier()``) and torchvision
classification models (everything but ``fc`` / ``classifier`` / ``heads``). Anything in the user's
module outside a backbone counts as head. Libraries are only looked up if already imported, so this
never pays their import cost.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

from .matching import format_names, match_module_names

__all__ = ["BackboneSplit", "find_backbone"]

_TORCHVISION_HEADS = ("fc", "classifier", "heads", "head")


@dataclass(frozen=True)
class BackboneSplit:
    """Qualified module names: ``backbone`` to freeze, and ``head`` modules inside them to keep trainable."""

    backbone: tuple[str, ...]
    head: tuple[str, ...]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _hf_split(module: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(module, transformers.PreTrainedModel):
        return None
    prefix = getattr(module, "base_model_prefix", "")
    base = getattr(module, prefix, None) if prefix else None
    if isinstance(base, nn.Module) and base is not module:
        return prefix, ()
    return "", ()


def _timm_split(module: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    if "timm" not in sys.modules or not hasattr(module, "pretrained_cfg") or not hasattr(module, "get_classifier"):
        return None
    classifier = module.get_classifier()
    heads = tuple(n for n, m in module.named_modules() if m is classifier and n)
    return "", heads


def _torchvision_split(module: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    if "torchvision" not in sys.modules or not type(module).__module__.startswith("torchvision.models"):
        return None
    heads = tuple(n for n in _TORCHVISION_HEADS if isinstance(getattr(module, n, None), nn.Module))
    return ("", heads) if heads else None


def _recognise(module: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    for split in (_hf_split, _timm_split, _torchvision_split):
        found = split(module)
        if found is not None:
            return found
    return None


def find_backbone(root: nn.Module, backbone: str | list[str] | tuple[str, ...] | None = None) -> BackboneSplit:
    """Locate the pretrained backbone(s) of ``root``.

    Args:
        root: the user's module (e.g. a ``LightningModule`` holding a ``transformers`` model).
        backbone: optional patterns (see :mod:`lightning_peft.groups.matching`) naming the modules to treat
            as backbone; when given, no automatic detection happens.

    Raises:
        ValueError: if nothing is recognised, naming the top-level modules to choose from.
    """
    if backbone is not None:
        return BackboneSplit(tuple(match_module_names(root, backbone, what="backbone")), ())
    found_backbones: list[str] = []
    found_heads: list[str] = []
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        name, module = stack.pop()
        recognised = _recognise(module)
        if recognised is None:
            stack.extend((_join(name, n), m) for n, m in reversed(list(module.named_children())))
            continue
        inner, heads = recognised
        found_backbones.append(_join(name, inner))
        found_heads.extend(_join(_join(name, inner), h) for h in heads)
    if not found_backbones:
        children = [n for n, _ in root.named_children()]
        raise ValueError(
            f"No pretrained backbone found in {type(root).__name__} (looked for transformers, timm and "
            f"torchvision models). Name the modules to freeze with backbone=[...]; top-level modules: "
            f"{format_names(children)}"
        )
    if found_backbones == [""] and not found_heads:
        raise ValueError(
            f"{type(root).__name__} is itself a pretrained model with no separate head; freezing it would "
            "leave nothing to train. Add a task head, or pass backbone=[...] naming the part to freeze."
        )
    return BackboneSplit(tuple(found_backbones), tuple(found_heads))
