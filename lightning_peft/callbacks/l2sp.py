"""L2-SP as a callback: pull fine-tuned pretrained weights toward their starting point instead of freezing them."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..groups.backbone import head_parameters
from ..losses.l2sp import add_penalty_grad_, l2sp_penalty

__all__ = ["L2SP"]


class L2SP(pl.Callback):
    """Add ``alpha · Σ‖θ − θ₀‖²`` over the trainable pretrained parameters and ``beta · Σ‖w‖²`` over the head's.

    θ₀ is each backbone parameter's value when it first trains: taken right after its first backward,
    before any optimizer step changes it (so parameters that ``GradualUnfreezing`` unfreezes later get
    their pretrained values too). Only parameters that train get a θ₀, kept on their device: the
    memory cost is one copy of the trainable backbone parameters (none for frozen ones or the head).
    θ₀ is saved in the callback's checkpoint state, so a resumed run keeps pulling toward the
    pretrained values, not toward the values at resume.

    The penalty's gradient, ``2α(θ − θ₀)`` and ``2βw``, is added to ``.grad`` in ``on_after_backward``,
    scaled like Lightning scales the loss (``1 / accumulate_grad_batches``, and the AMP loss scale):
    exactly the gradient of the loss plus the penalty, without a graph for it. It is therefore
    clipped with the rest. The penalty (value before the step) is logged as ``l2sp/penalty`` (with
    ``l2sp/sp`` and ``l2sp/head``); your ``train/loss`` does not include it. Under DDP every rank adds
    the same term after gradients are averaged. Decoupled weight decay (AdamW's) still applies on top:
    consider ``weight_decay=0`` for the backbone.

    Args:
        alpha: weight of ``‖θ − θ₀‖²`` (the L2-SP paper's α/2).
        beta: weight of plain L2 on the head's trainable parameters (the paper's β/2); 0 disables it.
        backbone: patterns naming the pretrained backbone when it is not recognised automatically;
            the head is :func:`~lightning_peft.groups.backbone.head_parameters` (a language model's
            ``lm_head`` is pretrained, so it is pulled toward its start like the backbone).

    Example:
        >>> trainer = pl.Trainer(callbacks=[L2SP(alpha=0.01, beta=0.001)])  # doctest: +SKIP
    """

    def __init__(self, alpha: float = 0.01, beta: float = 0.0, backbone: str | list[str] | None = None) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"L2SP: alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        self.alpha = alpha
        self.beta = beta
        self.backbone = backbone
        self.reference: dict[str, Tensor] = {}
        self.backbone_params: dict[str, nn.Parameter] = {}
        self.head_params: dict[str, nn.Parameter] = {}
        self.last_penalty: dict[str, Tensor] = {}  # "sp", "head": values at the last backward

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, beta=self.beta, backbone=self.backbone)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        head = set(head_parameters(pl_module, self.backbone))
        named = dict(pl_module.named_parameters())
        self.backbone_params = {n: p for n, p in named.items() if n not in head}
        self.head_params = {n: p for n, p in named.items() if n in head}
        rank_zero_info(
            f"L2SP: pulling the trainable ones of {len(self.backbone_params)} backbone tensors toward their pretrained values "
            f"(alpha={self.alpha}); plain L2 on {len(self.head_params)} head tensors (beta={self.beta})."
        )

    def _pairs(self) -> list[tuple[nn.Parameter, Tensor]]:
        pairs = []
        for name, param in self.backbone_params.items():
            if not param.requires_grad:
                continue
            reference = self.reference.get(name)
            if reference is None:
                reference = self.reference[name] = param.detach().clone()  # still pretrained: no step has touched it
            elif reference.device != param.device or reference.dtype != param.dtype:
                reference = self.reference[name] = reference.to(param.device, param.dtype)
            pairs.append((param, reference))
        return pairs

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pairs = self._pairs()
        head = [(p, None) for p in self.head_params.values() if p.requires_grad] if self.beta else []
        scale = 1.0 / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale *= float(scaler.get_scale())
        if self.alpha:
            add_penalty_grad_(pairs, self.alpha, scale)
        if head:
            add_penalty_grad_(head, self.beta, scale)
        sp = l2sp_penalty(pairs, self.alpha, pl_module.device)
        l2 = l2sp_penalty(head, self.beta, pl_module.device)
        self.last_penalty = {"sp": sp, "head": l2}
        pl_module.log("l2sp/penalty", sp + l2, on_step=True, on_epoch=False)
        pl_module.log("l2sp/sp", sp, on_step=True, on_epoch=False)
        if self.beta:
            pl_module.log("l2sp/head", l2, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": dict(self.reference)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = dict(state_dict.get("reference") or {})
