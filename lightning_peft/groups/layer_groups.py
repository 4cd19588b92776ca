"""Layer groups: a model seen as an ordered list of parameter groups from input to output.

``[stem/embeddings, block 0, ..., block N-1, head]``: the one shared view that partial fine-tuning,
gradual unfreezing and discriminative learning rates all use. Found automatically for

- ``transformers`` models: the largest ``nn.ModuleList`` of identical blocks (BERT ``encoder.layer``,
  GPT-2 ``h``, Llama ``layers``, ViT ``encoder.layer``); parameters registered before it form the
  embeddings group, those after it (final norm, pooler) join the last block;
- ``timm`` models: timm's own ``group_matcher(coarse=True)`` (stem, stages or blocks);
- other backbones (torchvision ResNet and friends): their children with parameters, a run of leading
  leaf layers (``conv1``, ``bn1``) merged into one stem group;

and the task head (:func:`~lightning_peft.groups.backbone.head_parameters`) is the last group, ``head``;
other parameters outside the backbone (a language model's untied ``lm_head``: pretrained, not a new
head) join the top block. Or given
explicitly: ``layer_groups(model, patterns=["embeddings", "re:.*layer\\.[0-2]", ...])``, one group per
pattern (input to output); parameters no pattern selects form the ``head`` group.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..utils.names import is_inside, is_inside_any, join
from .backbone import find_backbone, head_parameters
from .matching import format_names, match_module_names

__all__ = ["LayerGroup", "format_layer_groups", "layer_groups", "named_parameters"]

HEAD = "head"


@dataclass(frozen=True)
class LayerGroup:
    """One group: its name, the qualified names of its parameters (model order) and their element count."""

    name: str
    params: tuple[str, ...]
    numel: int
    is_head: bool = False


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Qualified name -> parameter in model order, each tensor once (tied weights under their first name)."""
    return dict(model.named_parameters())


def _group_name(names: Sequence[str]) -> str:
    """The longest common dotted prefix of the parameter-owning modules, else their leading names joined by '+'."""
    parts = [n.split(".")[:-1] or n.split(".") for n in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    if common:
        return ".".join(common)
    leads: list[str] = []
    for p in parts:
        lead = ".".join(p[:2]) if len(p) > 1 and p[1].isdigit() else p[0]  # keep the block index: blocks.11
        if lead not in leads:
            leads.append(lead)
    return "+".join(leads[:3]) + ("+..." if len(leads) > 3 else "")


def _block_list(module: nn.Module) -> str | None:
    """Name of the ModuleList of same-type blocks holding the most parameters, if any."""
    best, best_size = None, 0
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.ModuleList) or len(sub) < 2:
            continue
        if len({type(m) for m in sub}) != 1:
            continue
        size = sum(p.numel() for p in sub.parameters())
        if size > best_size:
            best, best_size = name, size
    return best


Groups = list[tuple[str, list[str]]]


def _blocks_groups(module: nn.Module, params: list[str]) -> Groups | None:
    blocks = _block_list(module)
    if blocks is None:
        return None
    before: list[str] = []
    per_block: dict[str, list[str]] = {}
    for name in params:
        if is_inside(blocks, name):
            index = name[len(blocks) + 1 :].split(".", 1)[0]
            per_block.setdefault(index, []).append(name)
        elif not per_block:
            before.append(name)
        else:
            per_block[next(reversed(per_block))].append(name)  # final norm, pooler: join the last block
    named = [(f"{blocks}.{index}", names) for index, names in per_block.items()]
    return ([(_group_name(before), before)] if before else []) + named


def _timm_groups(module: nn.Module, params: list[str]) -> Groups | None:
    if "timm" not in sys.modules or not hasattr(module, "group_matcher") or not hasattr(module, "pretrained_cfg"):
        return None
    from timm.models import group_parameters

    wanted = set(params)
    grouped = group_parameters(module, module.group_matcher(coarse=True))
    kept = [[n for n in names if n in wanted] for names in grouped.values()]
    return [(_group_name(names), names) for names in kept if names]


def _children_groups(module: nn.Module, params: list[str]) -> Groups:
    """One group per child holding parameters; leading leaf layers (``conv1``, ``bn1``) form one stem group."""
    wanted = set(params)

    def children_of(prefix: str, parent: nn.Module) -> list[tuple[str, nn.Module]]:
        return [
            (join(prefix, n), c) for n, c in parent.named_children()
            if any(join(join(prefix, n), p) in wanted for p, _ in c.named_parameters())
        ]

    children = children_of("", module)
    while len(children) == 1 and any(True for _ in children[0][1].children()):  # e.g. torchvision's `features`
        children = children_of(*children[0])
    leaves = [not any(True for _ in c.children()) for _, c in children]
    stem = 0 if all(leaves) else next((i for i, leaf in enumerate(leaves) if not leaf), 0)
    owners = [(name, max(0, i - stem + 1) if stem else i) for i, (name, _) in enumerate(children)]
    count = max((g for _, g in owners), default=0) + 1
    labels = ["+".join(name for name, g in owners if g == i) or "params" for i in range(count)]
    groups: list[list[str]] = [[] for _ in range(count)]
    for p in params:
        index = next((g for name, g in owners if is_inside(name, p)), 0)  # direct parameters: first group
        groups[index].append(p)
    return list(zip(labels, groups))


def _auto_groups(model: nn.Module, backbone: str | Sequence[str] | None) -> list[tuple[str, list[str]]]:
    split = find_backbone(model, backbone)
    head = set(head_parameters(model, backbone))
    all_names = list(named_parameters(model))
    taken: set[str] = set()
    groups: list[tuple[str, list[str]]] = []
    for root in split.backbone:
        module = model.get_submodule(root)
        local = [n[len(root) + 1 :] if root else n for n in all_names if is_inside(root, n) and n not in taken and n not in head]
        found = _timm_groups(module, local) or _blocks_groups(module, local) or _children_groups(module, local)
        for label, names in found:
            if names:
                groups.append((join(root, label), [join(root, n) for n in names]))
                taken.update(join(root, n) for n in names)
    pretrained = [n for n in all_names if n not in taken and n not in head]  # output embeddings: with the top block
    if pretrained and groups:
        groups[-1][1].extend(pretrained)
    rest = [n for n in all_names if n in head or (n not in taken and not groups)]
    if rest:
        groups.append((HEAD, rest))
    return groups


def _explicit_groups(model: nn.Module, patterns: Sequence[str | Sequence[str]]) -> list[tuple[str, list[str]]]:
    all_names = list(named_parameters(model))
    owner: dict[str, int] = {}
    groups: list[tuple[str, list[str]]] = []
    for index, pattern in enumerate(patterns):
        try:
            modules = match_module_names(model, pattern, what="layer group")
        except ValueError as err:
            raise ValueError(f"{err}{_groups_hint(model)}") from None
        names = [n for n in all_names if is_inside_any(modules, n)]
        for n in names:
            if n in owner:
                raise ValueError(
                    f"Parameter {n!r} is selected by layer group pattern {patterns[owner[n]]!r} and by {pattern!r}; "
                    "each parameter must belong to one group. Make the patterns disjoint."
                )
            owner[n] = index
        label = pattern if isinstance(pattern, str) else "+".join(pattern)
        groups.append((label, names))
    rest = [n for n in all_names if n not in owner]
    if rest:
        groups.append((HEAD, rest))
    return groups


def _groups_hint(model: nn.Module) -> str:
    try:
        found = _auto_groups(model, None)
    except ValueError:
        return ""
    return f". Layer groups found automatically: {format_names(name for name, _ in found)}"


def layer_groups(
    model: nn.Module,
    patterns: Sequence[str | Sequence[str]] | None = None,
    backbone: str | Sequence[str] | None = None,
) -> list[LayerGroup]:
    """The ordered layer groups of ``model`` (input to output; the last one is the head when it has parameters).

    Args:
        model: the whole user module (e.g. a LightningModule holding a pretrained model).
        patterns: optional explicit groups, input to output, each a module pattern (exact name, dotted
            suffix or ``re:<regex>``) or a list of them; parameters no pattern selects form ``head``.
        backbone: optional module patterns naming the pretrained backbone(s) when automatic detection
            cannot find them; groups are then found inside those modules.

    Raises:
        ValueError: a pattern selects no module (the message lists module names and the groups found
            automatically), patterns overlap, or no backbone is recognised.
    """
    params = named_parameters(model)
    found = _explicit_groups(model, patterns) if patterns else _auto_groups(model, backbone)
    return [
        LayerGroup(name, tuple(names), sum(params[n].numel() for n in names), is_head=(name == HEAD and i == len(found) - 1))
        for i, (name, names) in enumerate(found)
    ]


def format_layer_groups(model: nn.Module, groups: Sequence[LayerGroup]) -> str:
    """A table of the groups: index, name, parameter tensors, parameters, and how many of them train."""
    params = named_parameters(model)
    rows = [("#", "layer group", "tensors", "parameters", "trainable")]
    for i, g in enumerate(groups):
        trainable = sum(params[n].numel() for n in g.params if params[n].requires_grad)
        rows.append((str(i), g.name, str(len(g.params)), f"{g.numel:,}", f"{trainable:,}"))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if c == 1 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
