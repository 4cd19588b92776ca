"""Find the pretrained backbone inside a user's module, and the task head that is not part of it.

Recognised backbones: Hugging Face ``transformers`` models (the ``base_model`` of a ``*For*`` model,
the whole model otherwise), ``timm`` models (everything but ``get_classifier()``) and torchvision
classification models (everything but ``fc`` / ``classifier`` / ``heads``). Libraries are only looked
up if already imported, so this never pays their import cost.

What the head is has one definition, here, and every feature asks it (layer groups, PEFT's
``modules_to_save="auto"`` and ``"all-linear"``, feature caching and probing, L2-SP):
:func:`head_parameters` are the parameters outside the backbone, where a recognised model's own
classifier (timm / torchvision) counts as head and a language model's output embeddings (``lm_head``,
tied or not) count as backbone, since they are pretrained; :func:`find_head` names the outermost
modules holding only such parameters.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

from ..utils.names import join
from .matching import format_names, match_module_names

__all__ = ["BackboneSplit", "find_backbone", "find_head", "head_parameters", "hf_models", "output_embeddings"]

_TORCHVISION_HEADS = ("fc", "classifier", "heads", "head")


@dataclass(frozen=True)
class BackboneSplit:
    """Qualified module names: ``backbone`` to freeze, and the classifiers inside them (timm / torchvision) to keep trainable.

    ``head`` lists only the heads *inside* recognised backbones; the whole task head is :func:`find_head`.
    """

    backbone: tuple[str, ...]
    head: tuple[str, ...]


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
            stack.extend((join(name, n), m) for n, m in reversed(list(module.named_children())))
            continue
        inner, heads = recognised
        found_backbones.append(join(name, inner))
        found_heads.extend(join(join(name, inner), h) for h in heads)
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
        stack.extend((join(name, n), c) for n, c in reversed(list(module.named_children())))
    return found


def output_embeddings(root: nn.Module) -> list[str]:
    """Names of the output embeddings (``lm_head``) of the ``transformers`` models in ``root``: pretrained, never a new head."""
    out: list[str] = []
    for prefix, model in hf_models(root):
        get = getattr(model, "get_output_embeddings", None)
        module = get() if callable(get) else None
        if isinstance(module, nn.Module):
            out.extend(join(prefix, n) for n, m in model.named_modules() if m is module)
    return out


def _backbone_ids(root: nn.Module, split: BackboneSplit) -> set[int]:
    """Identities of the pretrained parameters: the backbones' minus their classifiers', plus output embeddings'."""
    heads = {id(p) for h in split.head for p in root.get_submodule(h).parameters()}
    ids = {id(p) for b in split.backbone for p in root.get_submodule(b).parameters()} - heads
    return ids | {id(p) for name in output_embeddings(root) for p in root.get_submodule(name).parameters()}


def head_parameters(root: nn.Module, backbone: str | list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Qualified names of the task head's parameters (model order): every parameter that is not pretrained.

    Pretrained = inside a backbone (:func:`find_backbone`) but not its own classifier, or an output
    embedding of a language model. Includes parameters no head module holds alone (a root's own
    ``nn.Parameter``, adapters of a wrapper around a whole model).

    Raises:
        ValueError: as :func:`find_backbone` when no backbone is recognised.
    """
    pretrained = _backbone_ids(root, find_backbone(root, backbone))
    return [n for n, p in root.named_parameters() if id(p) not in pretrained]


def find_head(root: nn.Module, backbone: str | list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The task head: the outermost modules whose parameters are all head parameters (see :func:`head_parameters`).

    ``["classifier"]`` for a ``BertForSequenceClassification``, ``["fc"]`` for a ResNet, ``["head"]``
    for ``TextClassifier``; ``[]`` for a language model (its ``lm_head`` is pretrained). Adapter
    wrappers are not looked into: a wrapper's own adapters never make a head.

    Raises:
        ValueError: as :func:`find_backbone` when no backbone is recognised.
    """
    from ..peft.layer import AdapterLayer  # lazy: peft imports this module

    pretrained = _backbone_ids(root, find_backbone(root, backbone))
    out: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        params = list(module.parameters())
        if not params:
            return
        if prefix and all(id(p) not in pretrained for p in params):
            out.append(prefix)
            return
        if isinstance(module, AdapterLayer):
            return
        for name, child in module.named_children():
            visit(join(prefix, name), child)

    visit("", root)
    return out
