"""Gradual unfreezing (ULMFiT) as a callback: start with the head, unfreeze one more group at a time."""

from __future__ import annotations

import bisect
import numbers
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from ..distributed.gradients import all_reduce_grads_mean_
from ..groups.freezing import LayerFreezer
from .layer_group_callback import LayerGroupCallback

__all__ = ["GradualUnfreezing"]


class GradualUnfreezing(LayerGroupCallback):
    """Train the head first, then unfreeze backbone layer groups from the top, one stage at a time.

    The schedule is one of: every ``every_n_epochs`` epochs (default 1, as in ULMFiT), at the epochs
    listed in ``epochs``, or at the optimizer steps listed in ``steps``; each stage unfreezes
    ``groups_per_stage`` more groups. How many groups train is a function of the epoch or step, so
    a resumed run is in the same state as an uninterrupted one (the state is also checkpointed).

    Works on an unchanged user module and optimizer: at fit start every parameter is placed in the
    optimizer, in one param group per layer group (parameters missing because the optimizer was
    built over trainable ones only are added, compared by identity), and the schedulers' per-group
    lists are extended. Frozen parameters get no gradient and so no optimizer state; once unfrozen
    they train at the learning rate the user's scheduler sets at that moment. Under DDP, gradients
    of parameters unfrozen after the model was wrapped are averaged across ranks by this callback.

    Args:
        every_n_epochs: unfreeze a stage every this many epochs (ignored when ``epochs``/``steps`` is set).
        epochs: epochs at whose start a stage unfreezes, e.g. ``[1, 2, 4]``.
        steps: optimizer steps (``trainer.global_step``) at which a stage unfreezes.
        groups_per_stage: layer groups unfrozen per stage.
        initial: backbone groups trainable from the start besides the head.
        train_bn: let BatchNorm layers of frozen groups train.
        groups, backbone: as for :class:`~lightning_peft.FreezeBackbone`.

    Example:
        >>> trainer = pl.Trainer(max_epochs=8, callbacks=[GradualUnfreezing(every_n_epochs=1)])  # doctest: +SKIP
    """

    freezes = True
    shapes_optimizer = True
    adopts_frozen = True
    trains_backbone = True

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        epochs: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
        groups_per_stage: int = 1,
        initial: int = 0,
        train_bn: bool = False,
        groups: Sequence[str | Sequence[str]] | None = None,
        backbone: str | Sequence[str] | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(groups=groups, backbone=backbone, verbose=verbose)
        if epochs is not None and steps is not None:
            raise ValueError("GradualUnfreezing: give either epochs=[...] or steps=[...] milestones, not both.")
        if epochs is None and steps is None:
            _check_int("every_n_epochs", every_n_epochs, 1, " (or give epochs=[...] or steps=[...])")
        _check_int("groups_per_stage", groups_per_stage, 1)
        _check_int("initial", initial, 0)
        for name, milestones in (("epochs", epochs), ("steps", steps)):
            for value in milestones if milestones is not None else ():
                _check_int(f"{name} milestone", value, 0, f" in {name}={list(milestones)} (a negative one would count as already passed)")
        self.every_n_epochs = every_n_epochs
        self.epochs = sorted(epochs) if epochs is not None else None
        self.steps = sorted(steps) if steps is not None else None
        self.groups_per_stage = groups_per_stage
        self.initial = initial
        self._start = initial  # initial, or 1 for a model without a task head (set at setup)
        self.train_bn = train_bn
        self.freezer: LayerFreezer | None = None
        self._restored_top: int | None = None
        self._ddp_reduced: set[int] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_epochs=self.every_n_epochs, epochs=self.epochs, steps=self.steps,
            groups_per_stage=self.groups_per_stage, initial=self.initial,
        )

    def top_at(self, epoch: int, step: int) -> int:
        """Backbone groups that train at ``epoch`` / optimizer ``step`` (before clamping to the model's depth)."""
        if self.steps is not None:
            stages = bisect.bisect_right(self.steps, step)
        elif self.epochs is not None:
            stages = bisect.bisect_right(self.epochs, epoch)
        else:
            stages = epoch // self.every_n_epochs
        return self._start + stages * self.groups_per_stage

    def on_groups(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.freezer = LayerFreezer(pl_module, self.groups, train_bn=self.train_bn)
        depth = len(self.freezer.backbone)
        if self.initial and self.initial >= depth:
            raise ValueError(
                f"GradualUnfreezing: initial={self.initial} but the model has {depth} backbone layer group(s) "
                f"({', '.join(g.name for g in self.freezer.backbone)}), so every group would train from step 0 and nothing "
                f"is unfrozen gradually. Use initial < {depth}, or drop GradualUnfreezing for full fine-tuning."
            )
        self._start = self.initial
        if not self.freezer.head and self.initial == 0:
            # A language model has no new task head: something must train from the first step (ULMFiT starts with the top layer).
            self._start = 1
            rank_zero_info("GradualUnfreezing: the model has no task head, so its top layer group trains from the start (initial=1)")
        self._set_top(self._restored_top if self._restored_top is not None else self._start, announce=False)

    def _set_top(self, top: int, announce: bool = True) -> None:
        before = self.freezer.top
        self.freezer.train_top(top)
        if announce and self.freezer.top != before:
            names = [g.name for g in self.freezer.trainable_groups(self.freezer.top)]
            rank_zero_info(f"GradualUnfreezing: {len(names)} of {len(self.groups)} layer groups train: {', '.join(names)}")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        strategy = trainer.strategy
        if trainer.world_size > 1 and not isinstance(strategy, DDPStrategy):
            raise ValueError(
                f"GradualUnfreezing supports single-device and DDP training; got {type(strategy).__name__}. "
                "Use strategy='ddp' (sharded strategies such as FSDP are not supported yet)."
            )
        # DDP has just wrapped the model: it averages the gradients of what trains now, and only that.
        self._ddp_reduced = {id(p) for p in pl_module.parameters() if p.requires_grad} if trainer.world_size > 1 else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_top(self.top_at(trainer.current_epoch, trainer.global_step))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.steps is not None:
            self._set_top(self.top_at(trainer.current_epoch, trainer.global_step))
        self.freezer.enforce_bn_eval()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after every backward, before AMP's unscale, so an overflow on one rank is seen by all.
        if self._ddp_reduced is None:
            return
        late = [p for p in pl_module.parameters() if p.requires_grad and id(p) not in self._ddp_reduced]
        all_reduce_grads_mean_(late)

    def state_dict(self) -> dict[str, Any]:
        return {"top": self.freezer.top if self.freezer else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_top = state_dict.get("top")
        if self.freezer is not None and self._restored_top is not None:  # setup already ran: apply before DDP wraps
            self._set_top(self._restored_top, announce=False)


def _check_int(name: str, value: object, minimum: int, context: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"GradualUnfreezing: {name} must be >= {minimum} (an integer){context}, got {value!r}")
