"""Parameter-efficient fine-tuning as a callback: inject an adapter into an unchanged LightningModule.

Injection happens in ``setup`` (or right after the module's own ``configure_model``, when it builds
its model there), before Lightning builds optimizers or wraps the model for DDP, so
``configure_optimizers`` over trainable parameters (or all of them) sees the adapter. With
``adapter_only_checkpoint=True`` Lightning checkpoints keep only what the base model cannot
rebuild (adapter tensors, parameters that train, buffers) plus a fingerprint of the frozen base;
loading one -- to resume, validate or test -- takes the frozen weights from the live model after
checking the fingerprint, so strict loading stays on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..distributed.fsdp import (
    gathered_parameters,
    replicated_modules,
    sync_replicated_gradients,
)
from ..groups.freezing import frozen_batchnorms, set_eval
from ..groups.matching import format_names
from ..optim.loraplus import apply_loraplus
from ..peft.adapter_files import adapter_metadata, export_peft, save_adapter
from ..peft.checkpoint import AdapterOnlyCheckpoints
from ..peft.config import MethodConfig
from ..peft.config_input import as_method_config
from ..peft.functional import inject, list_adapters, set_adapter
from ..peft.layer import AdapterDict, adapter_layers
from ..peft.quantization import base_weight_memory
from ..utils.atomic_files import ensure_writable_dir
from ..utils.param_count import count_parameters
from ..utils.patching import Patch, patch_method
from . import coordination
from .layer_group_callback import describe_param_groups

__all__ = ["PEFT"]

_TRAP_HINT = (
    "Usual cause: re-entrant activation checkpointing (use_reentrant=True) whose block inputs do not require grad, "
    "so the adapters inside the blocks get no gradient. Use use_reentrant=False, or make the input embeddings' "
    "output require grad (transformers: model.enable_input_require_grads())."
)


class _FirstStepProbe:
    """Records, during the first training batch, whether each layer of an adapter ran and with which grad mode."""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        self.modes: dict[str, set[bool]] = {}
        self.handles = [
            layer.register_forward_pre_hook(lambda m, args, name=name: self.modes.setdefault(name, set()).add(torch.is_grad_enabled()))
            for name, layer in adapter_layers(module) if adapter_name in layer.adapters
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def base_batchnorms(module: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers of the frozen base: no trainable parameter, outside every adapter container."""
    return frozen_batchnorms(module, exclude=[m for m in module.modules() if isinstance(m, AdapterDict)])


class PEFT(pl.Callback):
    """Fine-tune any LightningModule with a parameter-efficient method, leaving the module's code as it is.

    Args:
        config: the method, e.g. ``LoRAConfig(r=8)``, ``IA3Config()``, ``BitFitConfig()``; or its dict with ``method``,
            or LightningCLI's ``{class_path: lightning_peft.LoRAConfig, init_args: {...}}``.
        adapter_name: name of the adapter (several PEFT callbacks can add several adapters).
        adapter_only_checkpoint: Lightning checkpoints hold only the adapter, trainable parameters and
            buffers (small files); resuming and ``trainer.validate(ckpt_path=...)`` work as usual.
        save_dir: when set, write the adapter there at the end of fit (``adapter.safetensors`` + ``adapter.json``).
        export_peft: with ``save_dir``, also write Hugging Face PEFT's layout to ``<save_dir>/peft`` (LoRA).
        check_gradients: in the first training step, fail loudly when adapter layers ran but got no
            gradient (re-entrant gradient checkpointing with inputs that do not require grad: the layers
            would silently stay untrained) and warn about adapter layers your forward never uses.
        train_bn: let the BatchNorm layers of the frozen base update their running statistics in
            training. Default ``False`` keeps them in eval mode (statistics as pretrained), as
            ``FreezeBackbone`` does: the base then stays bit-identical, buffers included, so the adapter
            file alone reproduces the fine-tuned model (statistics are not part of adapter files).

    Example:
        >>> trainer = pl.Trainer(callbacks=[PEFT(LoRAConfig(r=8), adapter_only_checkpoint=True)])  # doctest: +SKIP
    """

    def __init__(
        self,
        config: MethodConfig | Mapping[str, Any],
        adapter_name: str = "default",
        adapter_only_checkpoint: bool = False,
        save_dir: str | Path | None = None,
        export_peft: bool = False,
        check_gradients: bool = True,
        verbose: bool = True,
        train_bn: bool = False,
    ) -> None:
        self.config = as_method_config(config)
        self.adapter_name = adapter_name
        self.adapter_only_checkpoint = adapter_only_checkpoint
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.export_peft = export_peft
        if export_peft and getattr(self.config, "init", None) == "loftq":  # fail now, not after training
            raise ValueError("PEFT(export_peft=True) cannot export a LoftQ adapter (PEFT would not rebuild its quantized base); "
                             "use export_peft=False: save_dir still gets the adapter, which load_adapter reloads exactly")
        self.check_gradients = check_gradients
        self.verbose = verbose
        self.train_bn = train_bn
        self._frozen_batchnorms: list[_BatchNorm] = []
        self._checked = False
        self._probe: _FirstStepProbe | None = None
        self._checkpoints = AdapterOnlyCheckpoints(adapter_only=adapter_only_checkpoint)  # also explains checkpoints that do not fit
        self._module: nn.Module | None = None
        self._configure_patch: Patch | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(adapter_name=self.adapter_name, method=self.config.method)

    # --- injection ------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check_strategy(trainer)
        if stage == "fit" and self.save_dir is not None and trainer.is_global_zero:
            ensure_writable_dir(self.save_dir, "PEFT save_dir")  # fail now, not after training
        coordination.prepare_model(trainer, pl_module)  # every PEFT callback, in list order, whoever asks first

    def check_strategy(self, trainer: pl.Trainer | None) -> None:
        """Refuse what the strategy cannot do (adapter-only checkpoints under FSDP)."""
        if self.adapter_only_checkpoint and isinstance(getattr(trainer, "strategy", None), FSDPStrategy):
            raise ValueError(
                "PEFT(adapter_only_checkpoint=True) is not supported with FSDP yet: FSDP re-keys the state it loads, so "
                "the frozen base cannot be filled in safely. Use full checkpoints (adapter_only_checkpoint=False; the "
                "adapter itself is still written to save_dir, gathered from all shards) or strategy='ddp'."
            )

    def prepare_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Inject now, or right after the module's ``configure_model`` when it builds its model there (idempotent).

        Called through :func:`~lightning_peft.callbacks.coordination.prepare_model` by every callback that
        needs the final model, so they see the adapter whatever the callback order.
        """
        if is_overridden("configure_model", pl_module):
            if self._configure_patch is None or not self._configure_patch.active:
                self._configure_patch = patch_method(pl_module, "configure_model", lambda original: self._after(original, trainer, pl_module))
            return
        self.inject_now(trainer, pl_module)

    ensure_injected = prepare_model  # the name layer-group callbacks used before coordination.prepare_model

    def _after(self, original: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """``configure_model`` that injects right after the module's own (which builds the model, after ``setup``)."""

        def configure_model() -> None:
            original()
            self.inject_now(trainer, pl_module)

        return configure_model

    def _restore_module(self) -> None:
        if self._configure_patch is not None:
            self._configure_patch.restore()
            self._configure_patch = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_module()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_module()

    def inject_now(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        """Inject the adapter if it is not there yet (idempotent: fit, then validate, inject once)."""
        self._module = pl_module
        if self.adapter_name in list_adapters(pl_module):
            if self._checkpoints is not None:
                self._checkpoints.attach(pl_module)
            self._frozen_batchnorms = [] if self.train_bn else base_batchnorms(pl_module)
            self._replicate_under_fsdp(trainer, pl_module)
            return
        inject(pl_module, self.config, self.adapter_name)
        self._frozen_batchnorms = [] if self.train_bn else base_batchnorms(pl_module)
        self._replicate_under_fsdp(trainer, pl_module)
        others = [c for c in coordination.peers(trainer, self) if c.adapter_name in list_adapters(pl_module)]
        if others:  # several PEFT callbacks: every injected adapter stays active and trains
            set_adapter(pl_module, list(dict.fromkeys([*(c.adapter_name for c in others), self.adapter_name])))
        if self._checkpoints is not None:
            self._checkpoints.attach(pl_module)
        if self.verbose:
            memory = base_weight_memory(pl_module)
            if memory.layers:
                rank_zero_info(f"PEFT: {memory}")
            counts = count_parameters(pl_module)
            wrapped = sum(1 for _, layer in adapter_layers(pl_module) if self.adapter_name in layer.adapters)
            rank_zero_info(
                f"PEFT: {self.config.method} adapter {self.adapter_name!r} on {wrapped} modules; "
                f"{counts.trainable:,} of {counts.total:,} parameters train ({counts.percent:.2f}%)"
            )
            if self._frozen_batchnorms:
                rank_zero_info(f"PEFT: {len(self._frozen_batchnorms)} BatchNorm layers of the frozen base stay in eval mode (train_bn=False)")

    # --- LoRA+: the optimizer's groups ----------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """LoRA+ (``loraplus_lr_ratio``): split the user's optimizer groups so B trains faster (before state is restored on resume)."""
        ratio = getattr(self.config, "loraplus_lr_ratio", None)
        if ratio is None:
            return
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for optimizer in trainer.optimizers:
            apply_loraplus(optimizer, pl_module, ratio, self.config.loraplus_lr_embedding, schedulers, self.adapter_name)
        if self.verbose:
            for i, optimizer in enumerate(trainer.optimizers):
                rank_zero_info(f"PEFT: LoRA+ param groups of optimizer {i} (B at {ratio:g} x lr)\n{describe_param_groups(optimizer)}")

    # --- FSDP: the base is sharded, the adapters are replicated --------------------------------

    @staticmethod
    def _replicate_under_fsdp(trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        """Under ``FSDPStrategy`` (before it wraps the model): the adapters become FSDP ``ignored_states`` on the root device.

        FSDP then shards only the frozen base (uniform ``requires_grad`` in every flat parameter), and the
        adapters stay whole on every rank; their gradients are averaged in ``on_before_optimizer_step``.
        """
        strategy = getattr(trainer, "strategy", None)
        if not isinstance(strategy, FSDPStrategy) or (strategy.model is not None and strategy.model is not pl_module):
            return  # not FSDP, or already wrapped
        key = "ignored_modules" if strategy.kwargs.get("ignored_modules") is not None else "ignored_states"
        ignored = list(strategy.kwargs.get(key) or [])
        ignored += [m for m in replicated_modules(pl_module) if not any(m is i for i in ignored)]
        strategy.kwargs[key] = ignored
        for module in ignored:
            if isinstance(module, nn.Module):
                module.to(strategy.root_device)  # FSDP moves only what it manages

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if isinstance(trainer.strategy, FSDPStrategy) and coordination.first_of_kind(trainer, self):
            sync_replicated_gradients(pl_module)  # once for all adapters, before gradient clipping

    # --- BatchNorm of the frozen base -----------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_eval(self._frozen_batchnorms)  # Lightning calls model.train() at every epoch start

    # --- the gradient-checkpointing trap --------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        set_eval(self._frozen_batchnorms)  # also after a mid-epoch validation put the model back in train mode
        if self.check_gradients and not self._checked and self._probe is None:
            self._probe = _FirstStepProbe(pl_module, self.adapter_name)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self._probe is not None and isinstance(loss, torch.Tensor) and not loss.requires_grad:
            self._finish_probe()
            raise RuntimeError(
                f"The training loss does not depend on any trainable parameter of adapter {self.adapter_name!r} (it does "
                f"not require grad). {_TRAP_HINT}"
            )

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._probe is None:
            return
        modes = self._probe.modes
        self._finish_probe()
        untrained: dict[str, list[str]] = {}
        for name, layer in adapter_layers(pl_module):
            if self.adapter_name in layer.adapters:
                missing = [f"{name}.{k}" for k, p in layer.adapters[self.adapter_name].named_parameters() if p.requires_grad and p.grad is None]
                if missing:
                    ran = modes.get(name, set())
                    untrained.setdefault("trap" if ran == {False} else "detached" if ran else "unused", []).extend(missing)
        if "trap" in untrained:
            raise RuntimeError(
                f"{len(untrained['trap'])} parameters of adapter {self.adapter_name!r} ran in the forward pass only without "
                f"gradient tracking and received no gradient: {format_names(untrained['trap'], 6)}. {_TRAP_HINT}"
            )
        if untrained:
            names = untrained.get("unused", []) + untrained.get("detached", [])
            rank_zero_warn(
                f"PEFT: {len(names)} parameters of adapter {self.adapter_name!r} got no gradient in the first backward pass "
                f"and will not train: {format_names(names, 6)}. HINT: their modules are not used by your forward (e.g. an "
                "unused pooler) or their output is detached; leave them out with exclude_modules=[...] (DDP needs that too)."
            )

    def _finish_probe(self) -> None:
        if self._probe is not None:
            self._probe.remove()
        self._probe = None
        self._checked = True

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The adapter's config and sites: what :func:`~lightning_peft.load_adapter` needs to rebuild it from the checkpoint."""
        if self._module is None or self.adapter_name not in list_adapters(self._module):
            return {}
        return adapter_metadata(self._module, self.adapter_name)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._checkpoints is not None:
            self._checkpoints.shrink(pl_module, checkpoint)

    # --- saving the adapter at the end of fit ------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_dir is None:
            return
        with gathered_parameters(trainer.model):  # sharded runs: full adapter weights on rank 0 (peft #453)
            if trainer.is_global_zero:
                save_adapter(pl_module, self.save_dir, self.adapter_name)
                message = f"PEFT: adapter {self.adapter_name!r} saved to {self.save_dir}"
                if self.export_peft:
                    export_peft(pl_module, self.save_dir / "peft", self.adapter_name)
                    message += f" (PEFT layout in {self.save_dir / 'peft'})"
                rank_zero_info(message)
        trainer.strategy.barrier("lightning_peft.save_adapter")

