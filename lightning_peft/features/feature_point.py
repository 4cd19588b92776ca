"""Where a model's features enter its task head: the module shape feature caching and probing rely on.

Supported shape: ``owner.forward(inputs) -> head(features)``, i.e. one module (the *owner*, the
lowest module holding both the pretrained backbone and the head) whose forward runs the backbone,
turns its output into one feature vector per example (pooling, a frozen projection, ...) and returns
exactly what ``head(features)`` returns. ``TextClassifier`` (owner: the module itself, head:
``head``), a torchvision/timm classifier (owner: the network, head: ``fc`` / ``classifier`` /
``head``) and most user modules written as "backbone → pool → head" have it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..groups.backbone import find_backbone
from ..groups.matching import format_names, match_module_names

__all__ = ["FeaturePoint", "find_feature_point"]


@dataclass(frozen=True)
class FeaturePoint:
    """Qualified names: ``owner`` runs ``backbone`` and returns ``head(features)``; ``""`` is the root."""

    owner: str
    head: str
    backbone: tuple[str, ...]

    def modules(self, root: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(owner, head) modules of ``root``."""
        return root.get_submodule(self.owner), root.get_submodule(self.head)

    def feature_modules(self, root: nn.Module) -> list[nn.Module]:
        """The owner's submodules that compute the head's input: everything but the head and its ancestors."""
        owner = root.get_submodule(self.owner)
        head_path = _relative(self.owner, self.head)
        out: list[nn.Module] = []
        node, prefix = owner, ""
        for part in head_path.split("."):
            for name, child in node.named_children():
                if name != part:
                    out.append(child)
            prefix = _join(prefix, part)
            node = owner.get_submodule(prefix)
        return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _contains(ancestor: str, name: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _relative(owner: str, name: str) -> str:
    return name[len(owner) + 1 :] if owner else name


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") if n else [] for n in names]
    common: list[str] = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def _auto_head(root: nn.Module, backbones: tuple[str, ...]) -> str:
    """The topmost module holding every parameter outside the backbone, and no backbone."""
    outside = [n for n, _ in root.named_parameters() if not any(_contains(b, n) for b in backbones)]
    if not outside:
        raise ValueError(
            f"{type(root).__name__} has no parameters outside its backbone ({format_names(backbones)}): there is no "
            "head to train on cached features. Pass head='<module name>' naming the module that receives the features."
        )
    candidate = _common_prefix([_parent(n) for n in outside])
    if any(_contains(candidate, b) for b in backbones):
        modules = sorted({_parent(n) for n in outside})
        raise ValueError(
            f"The parameters outside the backbone of {type(root).__name__} sit in several modules "
            f"({format_names(modules, 8)}), not in one head. Pass head='<module name>' naming the module whose input "
            "is the feature vector."
        )
    while candidate and not any(_contains(_parent(candidate), b) for b in backbones):
        candidate = _parent(candidate)
    return candidate


def find_feature_point(
    root: nn.Module,
    head: str | None = None,
    backbone: str | list[str] | tuple[str, ...] | None = None,
) -> FeaturePoint:
    """Find the head that receives the pooled features, and the module (owner) whose forward feeds it.

    Args:
        root: the user's module.
        head: pattern (see :mod:`lightning_peft.groups.matching`) naming the head; default: the module
            ``find_backbone`` calls head (torchvision/timm classifiers), else the topmost module that
            holds every parameter outside the backbone (``TextClassifier.head``, including its dropout).
        backbone: patterns naming the backbone when it is not recognised automatically.

    Raises:
        ValueError: naming the candidates when no single head (or owner) can be found.
    """
    split = find_backbone(root, backbone)
    if head is not None:
        names = match_module_names(root, head, what="head")
        if len(names) != 1:
            raise ValueError(f"head pattern {head!r} matched {len(names)} modules ({format_names(names, 8)}); name exactly one.")
        head_name = names[0]
    elif len(split.head) == 1:
        head_name = split.head[0]
    elif len(split.head) > 1:
        raise ValueError(f"Several heads found ({format_names(split.head)}); pass head='<module name>' to choose one.")
    else:
        head_name = _auto_head(root, split.backbone)
    if any(_contains(head_name, b) for b in split.backbone):
        raise ValueError(f"head {head_name!r} contains the backbone ({format_names(split.backbone)}); name the module after the pooling.")
    owner = _common_prefix([head_name, *split.backbone])
    return FeaturePoint(owner=owner, head=head_name, backbone=split.backbone)
