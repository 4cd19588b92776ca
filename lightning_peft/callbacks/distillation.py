"""Knowledge distillation as a callback: a frozen teacher guides an unchanged student module."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..distributed.gradients import all_reduce_grads_mean_
from ..features.pooling import layer_hidden
from ..groups.freezing import set_requires_grad
from ..groups.matching import match_module_names
from ..losses.distillation import (
    hidden_state_loss,
    load_teacher,
    output_logits,
    output_width,
    soft_target_loss,
    token_distillation_loss,
)
from ..models.causal_lm import CausalLM
from ..optim.param_groups import add_param_group
from ..utils.calls import bind_forward, forward_signature
from ..utils.patching import Patch, patch_method

__all__ = ["Distillation"]


def _hidden(output: Any) -> Tensor:
    return layer_hidden(output, "Distillation: ")


def _vocab(model: nn.Module) -> int | None:
    """Rows of a causal LM's output embedding (its vocabulary size), if it has one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return int(head.weight.shape[0]) if head is not None else None


def _one(root: nn.Module, pattern: str, what: str) -> str:
    names = match_module_names(root, pattern, what=what)
    if len(names) != 1:
        raise ValueError(f"Distillation: {what} pattern {pattern!r} matched {len(names)} modules ({names[:6]}); name exactly one.")
    return names[0]


class Distillation(pl.Callback):
    """Train the student with ``α · task + (1 − α) · T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` (+ hidden-state MSE).

    The contract with your unchanged LightningModule: ``training_step`` returns the supervised loss
    (a tensor or a dict with ``"loss"``) and calls the student's forward exactly once; that forward
    (the module's own, or the submodule named by ``student``) returns logits ``(B, C)`` (a tensor or
    an object with ``.logits``). The teacher is called with the same arguments and must return logits
    of the same shape. The task term is your loss: for ``TextClassifier`` (and any module whose loss
    is ``cross_entropy(logits, labels)``) the total is exactly :func:`~lightning_peft.distillation_loss`.

    The teacher is frozen, in eval mode, run under ``torch.no_grad``, moved to the student's device and
    converted to its precision in ``setup`` (mixed precision autocasts it like the student); it is held
    by the callback, never registered in the student, so it is neither trained nor saved in the
    student's checkpoint (``on_save_checkpoint`` also drops any tensor of the teacher's, should one end
    up there). Only the student's trainable parameters get gradients, so it works with any PEFT
    method injected in the student.

    Causal LMs (:class:`~lightning_peft.CausalLM`): distillation is per token. Student and teacher
    logits ``(B, T, V)`` are compared where the next-token loss is (``logits[:, :-1]`` where
    ``labels[:, 1:] != -100``, so prompt and padding positions never count) by
    :func:`~lightning_peft.token_distillation_loss`, and the sum is normalised like the module's own loss
    (per completion token of the accumulation window and of all DDP ranks, see
    :meth:`~lightning_peft.CausalLM.token_divisor`), so the total is
    ``Σ_tokens (α · CE + (1 − α) · T² · KL) / tokens``. The teacher (a causal LM by folder / hub id, a
    ``transformers`` module or another ``CausalLM``) must share the student's tokenizer: a different
    vocabulary size is an error. ``beta`` between 0 and 1 replaces the forward KL by GKD's generalised JSD
    (1: reverse KL). ``distill/soft`` logs the per-token mean.

    Hidden-state matching: ``hidden=[(student_layer, teacher_layer), ...]`` adds
    ``hidden_weight · MSE`` between the layers' outputs (over real tokens when the forward gets an
    ``attention_mask``); when widths differ a learned linear projection maps the student's to the
    teacher's width. The projections belong to the callback: their parameters join your first
    optimizer at ``on_fit_start`` (with the hyperparameters of its first group; schedulers are
    extended), their gradients are averaged across DDP ranks by the callback, and they are saved in,
    and restored from, the callback's checkpoint state.

    Args:
        teacher: an ``nn.Module``, or a ``transformers`` folder / hub id / ``TextClassifier`` ``.ckpt`` (see :func:`~lightning_peft.load_teacher`);
            for a ``CausalLM`` student, a causal LM's folder / hub id.
        alpha: weight of your task loss, in ``[0, 1]``.
        temperature: softmax temperature ``T > 0``.
        student: name of the submodule whose forward returns the logits (default: the LightningModule).
        hidden: (student layer, teacher layer) pattern pairs whose outputs to match.
        hidden_weight: weight of the hidden-state term.
        projection: learn projections where widths differ (otherwise that is an error).
        num_labels: classes of a teacher loaded by name (default: the module's ``hparams.num_classes``).
        beta: divergence: ``0`` forward KL (Hinton), ``1`` reverse KL, between: generalised JSD (GKD).

    Example:
        >>> trainer = pl.Trainer(callbacks=[Distillation(teacher, alpha=0.5, temperature=2.0)])  # doctest: +SKIP
    """

    def __init__(
        self,
        teacher: nn.Module | str | os.PathLike,
        alpha: float = 0.5,
        temperature: float = 2.0,
        student: str | None = None,
        hidden: Sequence[Sequence[str]] | None = None,
        hidden_weight: float = 1.0,
        projection: bool = True,
        num_labels: int | None = None,
        beta: float = 0.0,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Distillation: alpha must be in [0, 1] (weight of your task loss), got {alpha}")
        if temperature <= 0:
            raise ValueError(f"Distillation: temperature must be > 0, got {temperature}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"Distillation: beta must be in [0, 1] (0: forward KL, 1: reverse KL, between: generalised JSD), got {beta}")
        pairs = [tuple(p) for p in (hidden or [])]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"Distillation: hidden must be a list of (student_layer, teacher_layer) pairs, got {hidden}")
        if not isinstance(teacher, (nn.Module, str, os.PathLike)):
            raise TypeError(f"Distillation: teacher must be an nn.Module or a model path/hub id, got {type(teacher).__name__}")
        self.teacher_spec = teacher
        self.teacher: nn.Module | None = teacher if isinstance(teacher, nn.Module) else None
        self.alpha = alpha
        self.temperature = temperature
        self.student = student
        self.hidden = pairs
        self.hidden_weight = hidden_weight
        self.projection = projection
        self.num_labels = num_labels
        self.beta = beta
        self._per_token = False  # a CausalLM student: distil per completion token
        self.projections = nn.ModuleDict()
        self._pairs: list[tuple[str, str, str]] = []  # (student module, teacher module, projection key or "")
        self._step_patch: Patch | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, temperature=self.temperature, hidden=self.hidden)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError("Distillation works with automatic optimization; with manual optimization add distillation_loss to your own step.")
        self._per_token = isinstance(pl_module, CausalLM)
        if self.teacher is None:
            num_labels = self.num_labels or (pl_module.hparams.get("num_classes") if hasattr(pl_module, "hparams") else None)
            self.teacher = load_teacher(self.teacher_spec, num_labels, causal_lm=self._per_token)
        if isinstance(self.teacher, CausalLM):  # call its transformers model, which takes use_cache
            self.teacher = self.teacher.model
        teacher = self.teacher
        if self._per_token:
            student_vocab, teacher_vocab = _vocab(pl_module.model), _vocab(teacher)
            if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
                raise ValueError(
                    f"Distillation: the teacher's vocabulary has {teacher_vocab} tokens and the student's {student_vocab}; "
                    "token-level distillation compares next-token distributions token by token, so both must use the same "
                    "tokenizer. HINT: pick a teacher of the student's model family (same tokenizer and vocabulary size)."
                )
        if any(m is teacher for m in pl_module.modules()):
            raise ValueError(
                "Distillation: the teacher is a submodule of the student, so it would be trained, moved and saved with it. "
                "Keep it out of your LightningModule and pass it only to Distillation."
            )
        set_requires_grad(teacher, False)
        teacher = trainer.precision_plugin.convert_module(teacher)
        self.teacher = teacher.to(trainer.strategy.root_device).eval()
        if self.student is not None:
            pl_module.get_submodule(self.student)  # clear error on a wrong name
        self._pairs = []
        for student_pattern, teacher_pattern in self.hidden:
            s_name = _one(pl_module, student_pattern, "student hidden layer")
            t_name = _one(self.teacher, teacher_pattern, "teacher hidden layer")
            s_width, t_width = output_width(pl_module.get_submodule(s_name)), output_width(self.teacher.get_submodule(t_name))
            key = ""
            if s_width != t_width:
                if not self.projection or s_width is None or t_width is None:
                    raise ValueError(
                        f"Distillation: student layer {s_name!r} (width {s_width}) and teacher layer {t_name!r} (width {t_width}) "
                        "differ; " + ("set projection=True." if not self.projection else "their widths cannot be read; match layers of equal width.")
                    )
                key = f"p{len(self._pairs)}"
                if key not in self.projections:
                    self.projections[key] = nn.Linear(s_width, t_width)
            self._pairs.append((s_name, t_name, key))
        self.projections.to(trainer.strategy.root_device)
        self._install(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = list(self.projections.parameters())
        if params:
            if not trainer.optimizers:
                raise ValueError("Distillation: hidden-state projections need an optimizer to train in; configure_optimizers returned none.")
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            add_param_group(trainer.optimizers[0], params, schedulers, name="distillation_projection")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The projections live outside the DDP-wrapped module, so DDP does not average their gradients.
        if trainer.world_size > 1 and len(self.projections):
            all_reduce_grads_mean_(list(self.projections.parameters()))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.teacher is None:
            return
        teacher_storage = {t.untyped_storage().data_ptr() for t in self.teacher.state_dict().values() if t.numel()}
        state = checkpoint.get("state_dict", {})
        leaked = [k for k, v in state.items() if isinstance(v, Tensor) and v.numel() and v.untyped_storage().data_ptr() in teacher_storage]
        for key in leaked:
            del state[key]
        if leaked:
            rank_zero_warn(f"Distillation: dropped {len(leaked)} teacher tensors from the student's checkpoint ({leaked[:4]}).")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()

    def state_dict(self) -> dict[str, Any]:
        return {"projections": {k: v.detach().clone() for k, v in self.projections.state_dict().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("projections") or {}
        if set(saved) != set(self.projections.state_dict()):
            raise ValueError(
                f"Distillation: the checkpoint holds projections {sorted(saved)} but this run has {sorted(self.projections.state_dict())}; "
                "resume with the same hidden=[...] pairs."
            )
        self.projections.load_state_dict(saved)

    # --- the wrapped training step ---------------------------------------------------------------

    def _install(self, pl_module: pl.LightningModule) -> None:
        self._uninstall()

        def wrap(original: Any) -> Any:
            def training_step(*args: Any, **kwargs: Any) -> Any:
                return self._step(pl_module, original, args, kwargs)

            return training_step

        self._step_patch = patch_method(pl_module, "training_step", wrap)

    def _uninstall(self) -> None:
        if self._step_patch is not None:
            self._step_patch.restore()
            self._step_patch = None

    def _step(self, pl_module: pl.LightningModule, original: Any, args: tuple, kwargs: dict) -> Any:
        student = pl_module.get_submodule(self.student) if self.student else pl_module
        calls: list[tuple[tuple, dict, Any]] = []
        s_hidden: dict[str, Tensor] = {}
        handles = [student.register_forward_hook(lambda m, a, k, o: calls.append((a, k, o)), with_kwargs=True)]
        for s_name, _, _ in self._pairs:
            handles.append(pl_module.get_submodule(s_name).register_forward_hook(lambda m, a, o, n=s_name: s_hidden.__setitem__(n, _hidden(o))))
        try:
            out = original(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        if out is None:  # the user skipped this batch
            return out
        task = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(task, Tensor):
            raise TypeError(f"Distillation: training_step must return the loss (a tensor or a dict with 'loss'), got {type(out).__name__}.")
        where = f"self.{self.student}" if self.student else "self"
        if len(calls) != 1:
            raise RuntimeError(
                f"Distillation: {where}(...) ran {len(calls)} times in training_step; it must run exactly once so its output "
                "can be compared with the teacher's. If your training_step calls a submodule (e.g. self.net(x)) instead of "
                "self(...), pass student='net'."
            )
        s_args, s_kwargs, s_out = calls[0]
        student_logits = output_logits(s_out, "Distillation: the student's forward")
        t_hidden: dict[str, Tensor] = {}
        t_handles = [
            self.teacher.get_submodule(t_name).register_forward_hook(lambda m, a, o, n=t_name: t_hidden.__setitem__(n, _hidden(o)))
            for _, t_name, _ in self._pairs
        ]
        if self.teacher.training:  # someone called .train() on it
            self.teacher.eval()
        if self._per_token:  # CausalLM.forward's inputs, by name, to its transformers teacher (no KV cache to build)
            s_args, s_kwargs = (), bind_forward(student, s_args, s_kwargs).arguments
            if "use_cache" in forward_signature(self.teacher).parameters:
                s_kwargs["use_cache"] = False
        try:
            with torch.no_grad():
                teacher_logits = output_logits(self.teacher(*s_args, **s_kwargs), "Distillation: the teacher's forward")
        finally:
            for h in t_handles:
                h.remove()
        if self._per_token:
            batch = args[0] if args else kwargs["batch"]
            total, tokens = token_distillation_loss(student_logits, teacher_logits, batch["labels"], self.temperature, self.beta, "sum")
            soft, soft_logged = total / pl_module.token_divisor(batch, tokens), total.detach() / tokens
        else:
            soft = soft_target_loss(student_logits, teacher_logits, self.temperature, self.beta)
            soft_logged = soft.detach()
        loss = self.alpha * task + (1.0 - self.alpha) * soft
        batch_size = student_logits.shape[0]
        if self._pairs:
            mask = s_kwargs.get("attention_mask")
            matched = []
            for s_name, t_name, key in self._pairs:
                s = s_hidden[s_name]
                if key:
                    projection = self.projections[key]
                    if s.shape[-1] != projection.in_features:
                        raise RuntimeError(
                            f"Distillation: student layer {s_name!r} outputs width {s.shape[-1]} on its last dimension, "
                            f"not {projection.in_features}; choose layers with (..., width) outputs."
                        )
                    s = projection(s)
                matched.append(hidden_state_loss(s, t_hidden[t_name], mask))
            hidden = torch.stack(matched).mean()
            loss = loss + self.hidden_weight * hidden
            pl_module.log("distill/hidden", hidden.detach(), batch_size=batch_size)
        pl_module.log("distill/soft", soft_logged, batch_size=batch_size)
        pl_module.log("distill/loss", loss.detach(), batch_size=batch_size)
        if isinstance(out, Mapping):
            return {**out, "loss": loss}
        return loss
