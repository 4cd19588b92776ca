"""Knowledge distillation losses (pure functions) and teacher loading.

``distillation_loss`` is Hinton et al.'s objective::

    α · CE(student, labels) + (1 − α) · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

with the KL divergence summed over classes and averaged over examples; the T² keeps the soft term's
gradient on the scale of the hard one as T changes.
"""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..models.pretrained import _load

__all__ = ["distillation_loss", "hidden_state_loss", "load_teacher", "soft_target_loss"]


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape: the teacher must predict the same classes as the student (check its num_labels)."
        )


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, summed over classes, averaged over examples.

    Args:
        student_logits: ``(B, C)`` (or ``(..., C)``, every leading position counting as an example).
        teacher_logits: same shape as ``student_logits``; no gradient flows into it.
        temperature: ``T > 0``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_logits(student_logits, teacher_logits)
    classes = student_logits.shape[-1]
    log_student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach().float().reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float = 0.5, temperature: float = 2.0) -> Tensor:
    """``α · CE(student, labels) + (1 − α) · T² · KL(softmax(teacher/T) ‖ softmax(student/T))``.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``, detached.
        labels: ``(B,)`` class indices.
        alpha: weight of the hard-label term, in ``[0, 1]``.
        temperature: softmax temperature ``T > 0``.

    Example:
        >>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
        >>> round(distillation_loss(s, t, torch.tensor([0]), alpha=1.0).item(), 4)  # plain cross-entropy
        0.1269
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (weight of the cross-entropy term), got {alpha}")
    hard = F.cross_entropy(student_logits.float(), labels)
    return alpha * hard + (1.0 - alpha) * soft_target_loss(student_logits, teacher_logits, temperature)


def hidden_state_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between hidden states ``(B, L, D)`` (or ``(B, D)``), over real tokens when ``mask`` ``(B, L)`` is given."""
    if student.shape != teacher.shape:
        raise ValueError(f"Hidden states to match differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}.")
    error = (student.float() - teacher.detach().float()).pow(2)
    if mask is None or error.dim() != 3 or mask.shape != error.shape[:2]:
        return error.mean()
    weights = mask.to(error.dtype).unsqueeze(-1)
    return (error * weights).sum() / (weights.sum() * error.shape[-1]).clamp_min(1.0)


def load_teacher(name_or_path: str | os.PathLike, num_labels: int | None = None) -> nn.Module:
    """A teacher from a ``TextClassifier`` checkpoint (``*.ckpt``) or a ``transformers`` sequence classifier.

    A folder or hub id is loaded with ``AutoModelForSequenceClassification`` (``num_labels`` passed
    when given); a warning says so when its classification head was not in the weights, since a
    randomly initialised teacher teaches noise.
    """
    path = str(name_or_path)
    if path.endswith(".ckpt"):
        from ..models import TextClassifier

        return TextClassifier.load_from_checkpoint(path, map_location="cpu")
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": num_labels} if num_labels else {}
    loader = partial(AutoModelForSequenceClassification.from_pretrained, output_loading_info=True)
    model, info = _load("teacher", loader, name_or_path, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        rank_zero_warn(
            f"Distillation: the teacher {path!r} lacks trained weights for {', '.join(missing[:6])}; they are randomly "
            "initialised, so the teacher's predictions are noise. HINT: point the teacher at a fine-tuned classifier "
            "(a transformers folder saved with save_pretrained, or a TextClassifier .ckpt)."
        )
    return model


@torch.no_grad()
def output_width(module: nn.Module) -> int | None:
    """Feature width of ``module``'s output, read from its last Linear / norm / conv / embedding layer."""
    for sub in reversed(list(module.modules())):
        if isinstance(sub, nn.Linear):
            return sub.out_features
        if isinstance(sub, nn.LayerNorm):
            return int(sub.normalized_shape[-1])
        if isinstance(sub, nn.modules.conv._ConvNd):
            return sub.out_channels
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            return sub.num_features
        if isinstance(sub, nn.Embedding):
            return sub.embedding_dim
    return None
