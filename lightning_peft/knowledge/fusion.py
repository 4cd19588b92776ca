"""The fusion layers of knowledge injection, and how they are attached to a model.

One :class:`FeatureSlot` per model holds the current batch's external vectors; the layers read it
during the forward pass, so the model's own ``forward`` (and anything that patches it, such as
``FeatureCache``) needs no extra argument. ``late``: the head's first ``nn.Linear`` becomes a
:class:`FusedLinear` that concatenates the vectors to its input. ``early``: an :class:`EarlyFusion`
projection, called by a forward hook on the input embeddings, adds them to the token embeddings.
Both start at zero, so the fused model computes exactly what the unfused one did.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features.feature_point import find_feature_point
from ..groups.backbone import hf_models
from ..groups.matching import format_names
from .config import KnowledgeConfig

__all__ = [
    "PROJECTION", "EarlyFusion", "FeatureSlot", "FusedLinear", "attach_knowledge", "fuse_from_forward", "input_embeddings", "knowledge_slot",
]

PROJECTION = "knowledge_projection"  # where early fusion's projection lives in the model (a head parameter)
_MARK = "_lightning_peft_knowledge"  # the model's FeatureSlot, once fusion is attached


class FeatureSlot:
    """The external features of the batch being computed: ``(B, F)``, or ``(B, T, F)`` per token (early fusion).

    Shared, never copied: a deep copy of the model (e.g. PEFT's ``modules_to_save`` copy of the head)
    keeps reading the same slot.
    """

    def __init__(self, config: KnowledgeConfig) -> None:
        self.config = config
        self.features: Tensor | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> FeatureSlot:
        return self

    def set(self, features: Tensor | None) -> None:
        """Hold ``features`` for the next forward pass (``None`` empties the slot)."""
        if features is not None:
            features = check_features(features, self.config)
        self.features = features

    def get(self, who: str) -> Tensor:
        """The held features, or an error saying where they should have come from."""
        if self.features is None:
            raise RuntimeError(
                f"{who}: no external features for this forward pass. Each batch needs its {self.config.dim}-dim vectors under "
                f"the key {self.config.key!r} (TextClassificationDataModule(features=...) supplies them); a ready classifier "
                "also takes them as model(..., features=...)."
            )
        return self.features

    @contextmanager
    def holding(self, features: Tensor | None) -> Iterator[None]:
        """Hold ``features`` inside the block, and empty the slot after it."""
        self.set(features)
        try:
            yield
        finally:
            self.features = None


def check_features(features: Any, config: KnowledgeConfig) -> Tensor:
    """``features`` as a floating tensor ``(B, F)`` / ``(B, T, F)``, or an error naming the expected shape."""
    if not isinstance(features, Tensor):
        raise TypeError(f"knowledge features under {config.key!r} must be a tensor (B, {config.dim}), got {type(features).__name__}")
    allowed = (2,) if config.mode == "late" else (2, 3)
    if features.dim() not in allowed or features.shape[-1] != config.dim:
        expected = f"(B, {config.dim})" + (f" or (B, T, {config.dim})" if config.mode == "early" else "")
        raise ValueError(
            f"knowledge features under {config.key!r} have shape {tuple(features.shape)}, expected {expected}: "
            f"feature dimension mismatch with KnowledgeConfig(mode={config.mode!r}, dim={config.dim})"
        )
    return features if features.is_floating_point() else features.float()


class FusedLinear(nn.Linear):
    """``nn.Linear`` over ``cat(x, features)``: input ``(B, H)``, external features ``(B, F)`` from the slot.

    ``weight`` is ``(out, H + F)``; :meth:`widen` keeps a trained ``Linear(H, out)`` in the first ``H``
    columns and zeros the ``F`` new ones, so its output is unchanged until they train.
    """

    def __init__(self, in_features: int, out_features: int, slot: FeatureSlot, bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features + slot.config.dim, out_features, bias=bias, device=device, dtype=dtype)
        self.slot = slot

    @classmethod
    def widen(cls, linear: nn.Linear, slot: FeatureSlot) -> FusedLinear:
        """A ``FusedLinear`` equal to ``linear`` on its ``H`` inputs, with zero weights on the ``F`` new ones."""
        w = linear.weight
        fused = cls(linear.in_features, linear.out_features, slot, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            fused.weight.zero_()
            fused.weight[:, : linear.in_features].copy_(w)
            if linear.bias is not None:
                fused.bias.copy_(linear.bias)
        fused.weight.requires_grad_(w.requires_grad)
        if fused.bias is not None:
            fused.bias.requires_grad_(linear.bias.requires_grad)
        fused.train(linear.training)
        return fused

    def forward(self, x: Tensor) -> Tensor:
        features = self.slot.get("late knowledge fusion")
        width = self.in_features - self.slot.config.dim
        if x.shape[-1] != width or x.shape[0] != features.shape[0]:
            raise ValueError(
                f"late knowledge fusion: the head's first Linear expects pooled features (B, {width}) and external features "
                f"(B, {self.slot.config.dim}); got {tuple(x.shape)} and {tuple(features.shape)}"
            )
        return F.linear(torch.cat([x, features.to(device=x.device, dtype=x.dtype)], dim=-1), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, of which external={self.slot.config.dim}"


class EarlyFusion(nn.Module):
    """A zero-initialised ``Linear(F, hidden)`` whose output is added to token embeddings ``(B, T, hidden)``.

    Features ``(B, F)`` are broadcast over the tokens, ``(B, T, F)`` are added per token.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, embeds: Tensor, features: Tensor) -> Tensor:
        if features.shape[0] != embeds.shape[0] or (features.dim() == 3 and features.shape[1] != embeds.shape[1]):
            raise ValueError(
                f"early knowledge fusion: token embeddings {tuple(embeds.shape)} and external features {tuple(features.shape)} "
                "disagree; features must be (B, F) or (B, T, F) with the batch's B and T"
            )
        added = self.proj(features.to(device=embeds.device, dtype=self.proj.weight.dtype))
        if added.dim() == 2:
            added = added.unsqueeze(1)
        return embeds + added.to(embeds.dtype)


class _EarlyHook:
    """Forward hook of the input embeddings: their output plus the projected features (picklable, unlike a closure).

    The projection is looked up on the model at every call, so a wrapper put in its place later (PEFT's
    ``modules_to_save`` copy, which is the one that trains) is what runs.
    """

    def __init__(self, root: nn.Module, slot: FeatureSlot) -> None:
        self.root, self.slot = root, slot

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return getattr(self.root, PROJECTION)(output, self.slot.get("early knowledge fusion"))


def input_embeddings(root: nn.Module) -> nn.Module:
    """The token embedding module of the one ``transformers`` model in ``root`` (what early fusion adds to)."""
    models = hf_models(root)
    if len(models) != 1:
        found = format_names([n or "<root>" for n, _ in models]) if models else "none"
        raise ValueError(
            f"early knowledge fusion adds to the input token embeddings of one transformers model; {type(root).__name__} holds "
            f"{len(models)} ({found}). Use mode='late' (any backbone -> pooling -> head model, images included)."
        )
    return models[0][1].get_input_embeddings()


def knowledge_slot(root: nn.Module) -> FeatureSlot | None:
    """The slot of the fusion already attached to ``root``, if any."""
    return getattr(root, _MARK, None)


def attach_knowledge(
    root: nn.Module,
    config: KnowledgeConfig,
    head: str | None = None,
    backbone: str | list[str] | tuple[str, ...] | None = None,
) -> FeatureSlot:
    """Attach ``config``'s fusion to ``root`` and return the slot that feeds it (idempotent).

    ``late``: the head found by :func:`~lightning_peft.find_feature_point` (or named by ``head``) gets its
    first ``nn.Linear`` (in module order: the layer that receives the pooled features) widened. ``early``:
    ``root.knowledge_projection`` is added (outside the backbone, so it trains like a head under every
    freezing strategy) and hooked onto the input embeddings.

    Raises:
        ValueError: fusion of another kind is already attached; the head has no ``nn.Linear``; early fusion
            without one ``transformers`` model.
    """
    slot = knowledge_slot(root)
    if slot is not None:
        if slot.config != config:
            raise ValueError(f"{type(root).__name__} already has knowledge fusion {slot.config}; cannot attach {config} as well")
        return slot
    slot = FeatureSlot(config)
    if config.mode == "late":
        head_name = find_feature_point(root, head, backbone).head
        head_module = root.get_submodule(head_name)
        linears = [(n, m) for n, m in head_module.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"late knowledge fusion widens the first nn.Linear of the head {head_name!r}, but {type(head_module).__name__} has "
                "none. Name another head with head='<module>'."
            )
        name, linear = linears[0]
        if isinstance(linear, FusedLinear):
            raise ValueError(f"the head {head_name!r} is already fused with external features")
        full = f"{head_name}.{name}" if name else head_name
        root.set_submodule(full, FusedLinear.widen(linear, slot))
    else:
        embeddings = input_embeddings(root)
        hidden = getattr(embeddings, "embedding_dim", None) or embeddings.weight.shape[-1]
        fusion = EarlyFusion(config.dim, hidden).to(device=embeddings.weight.device)
        root.add_module(PROJECTION, fusion)
        embeddings.register_forward_hook(_EarlyHook(root, slot))
    object.__setattr__(root, _MARK, slot)  # a plain attribute, not a submodule
    return slot


class _SlotFromForward:
    """Forward pre-hook of a ready classifier: its ``features`` argument fills the slot (also when ``forward`` is patched)."""

    def __init__(self, slot: FeatureSlot) -> None:
        self.slot = slot

    def __call__(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self.slot.set(kwargs.get("features"))


def fuse_from_forward(root: nn.Module, config: KnowledgeConfig) -> FeatureSlot:
    """Attach ``config``'s fusion to a ready classifier whose ``forward`` takes ``features=(B, F)``.

    A forward pre-hook (not ``forward`` itself) fills the slot, so a patched ``forward`` (``FeatureCache``'s
    cached path) still feeds the fusion, and the features stay a forward argument, hence part of the cache key.
    """
    slot = attach_knowledge(root, config)
    root.register_forward_pre_hook(_SlotFromForward(slot), with_kwargs=True)
    return slot
