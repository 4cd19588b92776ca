"""Stop (or skip the step) when the training loss or the gradients stop being finite."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["NonFiniteError", "NonFiniteGuard"]

POLICIES = ("stop", "skip")

HINT = (
    "HINT: lower the learning rate, train in precision='bf16-mixed' instead of '16-mixed', "
    "clip gradients (Trainer(gradient_clip_val=1.0)), or check the data of that batch; "
    "NonFiniteGuard(policy='skip') drops such steps instead of stopping."
)


class NonFiniteError(RuntimeError):
    """Raised by :class:`NonFiniteGuard` when training produced a NaN/inf loss or gradient."""


class NonFiniteGuard(pl.Callback):
    """Never let a NaN/inf loss or gradient reach the weights: stop the run, or skip that optimizer step.

    Works on an unchanged LightningModule. The loss of every backward (all micro-batches under
    gradient accumulation) and, with ``check_grads``, the gradients of the optimizer's parameters
    are checked just before the optimizer step (before gradient clipping). Under DDP the decision is
    shared by all ranks. Under fp16 AMP with a ``GradScaler`` non-finite gradients are the scaler's
    normal signal to lower its scale (it skips those steps itself), so only the loss is checked.

    Policies:
        ``"stop"``: raise :class:`NonFiniteError` naming the step, the loss and what to try; the
        weights are not updated by that step, ``trainer.fit`` raises and the process exits non-zero
        (no checkpoint is written for it).
        ``"skip"``: drop every gradient (``grad = None``), so the optimizer leaves the weights and its
        state untouched (learning-rate schedulers still step); after more than ``max_skips`` skipped
        steps in the run, stop as above.

    Args:
        policy: ``"stop"`` or ``"skip"``.
        max_skips: with ``"skip"``, how many steps may be skipped in the whole run before stopping.
        check_grads: also check the gradients (one reduction per step over trainable parameters).

    Example:
        >>> trainer = pl.Trainer(callbacks=[NonFiniteGuard(policy="skip", max_skips=5)])  # doctest: +SKIP
    """

    def __init__(self, policy: str = "stop", max_skips: int = 10, check_grads: bool = True) -> None:
        if policy not in POLICIES:
            raise ValueError(f"NonFiniteGuard: unknown policy={policy!r}; valid choices: {list(POLICIES)}")
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
            raise ValueError(f"NonFiniteGuard: max_skips must be an integer >= 0, got {max_skips!r}")
        self.policy = policy
        self.max_skips = max_skips
        self.check_grads = bool(check_grads)
        self.skipped = 0
        self._losses: list[torch.Tensor] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(policy=self.policy, max_skips=self.max_skips, check_grads=self.check_grads)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        losses, self._losses = self._losses, []
        params = [p for group in optimizer.param_groups for p in group["params"]]
        bad_loss = _first_non_finite(losses)
        bad_grads = self._non_finite_grads(trainer, params) if self.check_grads else False
        local = bad_loss is not None or bad_grads
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        what = self._describe(trainer, pl_module, params, bad_loss, bad_grads)
        if self.policy == "skip" and self.skipped < self.max_skips:
            for p in params:
                p.grad = None
            self.skipped += 1
            rank_zero_warn(f"NonFiniteGuard: {what}; skipped this optimizer step ({self.skipped} of at most {self.max_skips} skips).")
            return
        too_many = f" after {self.skipped} skipped steps (max_skips={self.max_skips})" if self.policy == "skip" else ""
        raise NonFiniteError(f"NonFiniteGuard: {what}; stopping{too_many}. The weights were not updated with this step. {HINT}")

    def _non_finite_grads(self, trainer: pl.Trainer, params: list[torch.Tensor]) -> bool:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return False  # fp16 AMP: the GradScaler skips overflowed steps and lowers its scale
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        return not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _describe(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        params: list[torch.Tensor],
        bad_loss: float | None,
        bad_grads: bool,
    ) -> str:
        where = f"at optimizer step trainer.global_step={trainer.global_step} (epoch {trainer.current_epoch})"
        if bad_loss is not None:
            return f"non-finite training loss ({bad_loss}) {where}"
        if not bad_grads:
            return f"non-finite loss or gradients on another rank {where}"
        names = {id(p): n for n, p in pl_module.named_parameters()}
        bad = [names.get(id(p), "?") for p in params if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        return f"non-finite gradients (loss finite) {where} in {shown}"

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def _first_non_finite(losses: list[torch.Tensor]) -> float | None:
    """The first non-finite loss of the accumulation window (one value per backward), or None."""
    if not losses:
        return None
    flat = torch.stack([loss.float().sum() for loss in losses])
    finite = torch.isfinite(flat)
    return None if bool(finite.all()) else float(flat[~finite][0])
