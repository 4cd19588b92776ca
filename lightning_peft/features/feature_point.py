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

from ..groups.backbone import find_backbone, find_head
from ..groups.matching import format_names, match_module_names
from ..utils.names import is_inside, join, relative

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
        head_path = relative(self.owner, self.head)
        out: list[nn.Module] = []
        node, prefix = owner, ""
        for part in head_path.split("."):
            for name, child in node.named_children():
                if name != part:
                    out.append(child)
            prefix = join(prefix, part)
            node = owner.get_submodule(prefix)
        return out


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") if n else [] for n in names]
    common: list[str] = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def _auto_head(root: nn.Module, backbone: str | list[str] | tuple[str, ...] | None) -> str:
    """The one module :func:`~lightning_peft.groups.backbone.find_head` calls the head."""
    heads = find_head(root, backbone)
    if not heads:
        raise ValueError(
            f"{type(root).__name__} has no parameters outside its backbone: there is no head to train on cached "
            "features. Pass head='<module name>' naming the module that receives the features."
        )
    if len(heads) > 1:
        raise ValueError(
            f"The parameters outside the backbone of {type(root).__name__} sit in several modules "
            f"({format_names(heads, 8)}), not in one head. Pass head='<module name>' naming the module whose input "
            "is the feature vector."
        )
    return heads[0]


def find_feature_point(
    root: nn.Module,
    head: str | None = None,
    backbone: str | list[str] | tuple[str, ...] | None = None,
) -> FeaturePoint:
    """Find the head that receives the pooled features, and the module (owner) whose forward feeds it.

    Args:
        root: the user's module.
        head: pattern (see :mod:`lightning_peft.groups.matching`) naming the head; default: the one
            module :func:`~lightning_peft.groups.backbone.find_head` finds (torchvision/timm classifiers,
            ``TextClassifier.head`` including its dropout).
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
    else:
        head_name = _auto_head(root, backbone)
    if any(is_inside(head_name, b) for b in split.backbone):
        raise ValueError(f"head {head_name!r} contains the backbone ({format_names(split.backbone)}); name the module after the pooling.")
    owner = _common_prefix([head_name, *split.backbone])
    return FeaturePoint(owner=owner, head=head_name, backbone=split.backbone)
