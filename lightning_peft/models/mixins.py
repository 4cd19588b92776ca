"""Mixins for new LightningModules: ``FinetuningMixin`` (layer-wise learning rates) and ``PEFTMixin`` (adapters)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..callbacks.peft import PEFT
from ..groups.layer_groups import layer_groups
from ..groups.layer_rates import discriminative_plan
from ..optim.param_groups import split_param_group
from ..optim.schedules import warmup_schedule
from ..peft.adapter_files import save_adapter
from ..peft.config import MethodConfig

__all__ = ["OPTIMIZERS", "FinetuningConfig", "FinetuningMixin", "PEFTMixin"]

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class FinetuningConfig:
    """Optimizer and schedule of :class:`FinetuningMixin` (every field has a usable default).

    ``layer_decay`` < 1 gives each layer group ``lr * layer_decay ** depth`` (depth 0 = head);
    ``scheduler`` is ``linear``, ``cosine`` or ``constant`` after ``warmup_ratio`` of linear warm-up,
    stepped every optimizer step. ``optimizer_kwargs`` go to the optimizer (e.g. ``momentum`` for SGD).
    """

    lr: float = 2e-5
    layer_decay: float = 1.0
    head_lr_mult: float = 1.0
    weight_decay: float = 0.01
    no_weight_decay: bool | list[str] = True
    optimizer: str = "adamw"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    scheduler: str = "linear"
    warmup_ratio: float = 0.1
    groups: list[Any] | None = None
    backbone: str | list[str] | None = None

    @classmethod
    def coerce(cls, value: FinetuningConfig | Mapping[str, Any] | None) -> FinetuningConfig:
        """Accept a config, a mapping (e.g. from Hydra or ``hparams``) or ``None`` (defaults); reject unknown keys."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"Unknown finetuning option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**dict(value))

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")


class FinetuningMixin:
    """Add to a new ``LightningModule`` to get ``configure_optimizers`` from ``self.finetuning``.

    ``self.finetuning`` is a :class:`FinetuningConfig` or a mapping of its fields (default: all
    defaults). Builds one param group per layer group (and weight-decay class) of the trainable
    parameters, with real learning rates, the chosen optimizer and a per-step warm-up schedule.
    The same placement rules as the :class:`~lightning_peft.DiscriminativeLR` callback.

    Example:
        >>> class MyModel(FinetuningMixin, pl.LightningModule):  # doctest: +SKIP
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.finetuning = FinetuningConfig(lr=1e-4, layer_decay=0.8)
    """

    finetuning: FinetuningConfig | Mapping[str, Any] | None = None

    def finetuning_param_groups(self) -> list[dict[str, Any]]:
        """The param groups ``configure_optimizers`` uses: trainable parameters only, split by placement."""
        cfg = FinetuningConfig.coerce(self.finetuning)
        groups = layer_groups(self, cfg.groups, cfg.backbone)
        plan = discriminative_plan(groups, cfg.layer_decay, cfg.head_lr_mult, cfg.no_weight_decay)
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("No trainable parameters: every parameter of the model is frozen.")
        return split_param_group({"lr": cfg.lr, "weight_decay": cfg.weight_decay}, named, plan)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = FinetuningConfig.coerce(self.finetuning)
        optimizer = OPTIMIZERS[cfg.optimizer](self.finetuning_param_groups(), lr=cfg.lr, **cfg.optimizer_kwargs)
        scheduler = warmup_schedule(optimizer, self.trainer.estimated_stepping_batches, cfg.warmup_ratio, cfg.scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PEFTMixin:
    """Add to a new ``LightningModule`` to train an adapter: set ``self.peft_config`` in ``__init__``.

    The adapter is injected in ``configure_model`` (after your ``__init__`` built the model, before
    optimizers and DDP). If you override ``configure_model`` to build the model there, call
    ``super().configure_model()`` at its end. ``peft_config`` is a method config or its dict (with
    ``method``, e.g. from Hydra). With ``peft_adapter_only_checkpoint = True`` checkpoints hold only
    the adapter (see :class:`~lightning_peft.PEFT`).

    Training behaves exactly as with the :class:`~lightning_peft.PEFT` callback, whose code it runs:
    BatchNorm layers of the frozen base stay in eval mode (``peft_train_bn = True`` lets them train),
    adapters are replicated under FSDP with their gradients averaged, and the first step checks that
    the adapters get gradients (``peft_check_gradients``); LoRA+ rates are set at fit start. If you override ``on_fit_start``, ``on_train_epoch_start``,
    ``on_train_batch_start``, ``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``,
    or ``on_save_checkpoint``, call ``super()`` in them.

    Example:
        >>> class MyModel(PEFTMixin, pl.LightningModule):  # doctest: +SKIP
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.backbone, self.head = AutoModel.from_pretrained(...), nn.Linear(384, 5)
        ...         self.peft_config = LoRAConfig(r=8)
    """

    peft_config: MethodConfig | Mapping[str, Any] | None = None
    peft_adapter_name: str = "default"
    peft_adapter_only_checkpoint: bool = False
    peft_train_bn: bool = False
    peft_check_gradients: bool = True

    def _peft(self) -> PEFT | None:
        """The callback object doing the work for this module (created in ``configure_model``)."""
        return self.__dict__.get("_peft_runtime")

    def configure_model(self) -> None:
        super().configure_model()  # type: ignore[misc]
        if self.peft_config is None:
            raise ValueError(f"{type(self).__name__} uses PEFTMixin but sets no self.peft_config (e.g. LoRAConfig(r=8))")
        runtime = self._peft()
        if runtime is None:
            runtime = PEFT(
                self.peft_config, self.peft_adapter_name, adapter_only_checkpoint=self.peft_adapter_only_checkpoint,
                check_gradients=self.peft_check_gradients, verbose=False, train_bn=self.peft_train_bn,
            )
            self.__dict__["_peft_runtime"] = runtime  # a plain attribute: not a submodule, not in the state dict
        trainer = self._trainer  # type: ignore[attr-defined]
        runtime.check_strategy(trainer)
        runtime.inject_now(trainer, self)  # type: ignore[arg-type]

    def on_fit_start(self) -> None:
        super().on_fit_start()  # type: ignore[misc]
        if (runtime := self._peft()) is not None:
            runtime.on_fit_start(self.trainer, self)  # type: ignore[attr-defined, arg-type]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()  # type: ignore[misc]
        if (runtime := self._peft()) is not None:
            runtime.on_train_epoch_start(self.trainer, self)  # type: ignore[attr-defined, arg-type]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        result = super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]
        if (runtime := self._peft()) is not None:
            runtime.on_train_batch_start(self.trainer, self, batch, batch_idx)  # type: ignore[attr-defined, arg-type]
        return result

    def on_before_backward(self, loss: torch.Tensor) -> None:
        super().on_before_backward(loss)  # type: ignore[misc]
        if (runtime := self._peft()) is not None:
            runtime.on_before_backward(self.trainer, self, loss)  # type: ignore[attr-defined, arg-type]

    def on_after_backward(self) -> None:
        super().on_after_backward()  # type: ignore[misc]
        if (runtime := self._peft()) is not None:
            runtime.on_after_backward(self.trainer, self)  # type: ignore[attr-defined, arg-type]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)  # type: ignore[misc]
        if (runtime := self._peft()) is not None:
            runtime.on_before_optimizer_step(self.trainer, self, optimizer)  # type: ignore[attr-defined, arg-type]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if (runtime := self._peft()) is not None:
            runtime.on_save_checkpoint(self._trainer, self, checkpoint)  # type: ignore[attr-defined, arg-type]

    def save_adapter(self, path: str) -> None:
        """Write the adapter alone (``adapter.safetensors`` + ``adapter.json``) to folder ``path``."""
        save_adapter(self, path, self.peft_adapter_name)
