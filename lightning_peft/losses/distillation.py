"""Knowledge distillation losses (pure functions) and teacher loading.

``distillation_loss`` is Hinton et al.'s objective::

    α · CE(student, labels) + (1 − α) · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

with the KL divergence summed over classes and averaged over examples; the T² keeps the soft term's
gradient on the scale of the hard one as T changes. ``token_distillation_loss`` is the same soft term for
causal LMs, per completion token (positions shifted like the next-token loss), optionally with the
generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024) in place of the forward KL.
"""

from __future__ import annotations

import math
import os
from functools import partial

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..data.instructions import IGNORE_INDEX
from ..models.pretrained import _load

__all__ = ["distillation_loss", "hidden_state_loss", "load_teacher", "soft_target_loss", "token_distillation_loss"]


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape: the teacher must predict the same classes as the student (check its num_labels)."
        )


def _check_divergence(temperature: float, beta: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL, between: generalised JSD), got {beta}")


def _divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float) -> Tensor:
    """Per position ``(N,)``: ``T² · D(teacher, student)`` between the softmaxes at temperature ``T`` of ``(N, C)`` logits.

    ``D`` is ``KL(P_t ‖ P_s)`` for ``beta = 0``, ``KL(P_s ‖ P_t)`` for ``beta = 1`` and otherwise GKD's
    generalised JSD ``β · KL(P_t ‖ M) + (1 − β) · KL(P_s ‖ M)`` with ``M = β · P_t + (1 − β) · P_s`` (TRL's
    ``generalized_jsd_loss``, which does not multiply by ``T²``; at ``T = 1`` both agree).
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)

    def kl(log_p: Tensor, log_q: Tensor) -> Tensor:  # KL(p ‖ q) over the last dimension
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)

    if beta == 0.0:
        d = kl(log_t, log_s)
    elif beta == 1.0:
        d = kl(log_s, log_t)
    else:
        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log(1.0 - beta))
        d = beta * kl(log_t, log_m) + (1.0 - beta) * kl(log_s, log_m)
    return d * temperature**2


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float = 0.0) -> Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, summed over classes, averaged over examples.

    Args:
        student_logits: ``(B, C)`` (or ``(..., C)``, every leading position counting as an example).
        teacher_logits: same shape as ``student_logits``; no gradient flows into it.
        temperature: ``T > 0``.
        beta: ``0`` forward KL (above), ``1`` reverse KL ``KL(student ‖ teacher)``, between: GKD's generalised JSD.
    """
    _check_divergence(temperature, beta)
    _check_logits(student_logits, teacher_logits)
    classes = student_logits.shape[-1]
    return _divergence(student_logits.reshape(-1, classes), teacher_logits.reshape(-1, classes), temperature, beta).mean()


def token_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    beta: float = 0.0,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Soft-target loss of a causal LM on its completion tokens: returns ``(loss, tokens)``.

    Position ``t``'s logits predict token ``t + 1``, so, like the next-token loss, ``logits[:, :-1]`` are
    compared where ``labels[:, 1:] != -100``: prompt and padding positions never count. ``loss`` is the
    mean (or ``sum``) over those ``tokens`` positions of ``T² · D(teacher, student)`` (see
    :func:`soft_target_loss` for ``D`` and ``beta``).

    Args:
        student_logits: ``(B, T, V)``.
        teacher_logits: ``(B, T, V)``, same vocabulary; no gradient flows into it.
        labels: ``(B, T)`` token ids with ``-100`` on prompt and padding.
        temperature: ``T > 0``.
        beta: ``0`` forward KL, ``1`` reverse KL, between: generalised JSD.
        reduction: ``mean`` or ``sum``.

    Example:
        >>> s, t = torch.zeros(1, 3, 2), torch.tensor([[[0.0, 0.0], [9.0, 0.0], [0.0, 9.0]]])
        >>> labels = torch.tensor([[-100, -100, 1]])  # only position 1 (predicting token 2) counts
        >>> loss, tokens = token_distillation_loss(s, t, labels)
        >>> round(loss.item(), 4), int(tokens)  # KL([~1, ~0] ‖ [0.5, 0.5]) = log 2 - H(teacher)
        (0.6919, 1)
    """
    _check_divergence(temperature, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape: "
            "token-level distillation compares next-token distributions position by position, so teacher and student "
            "must share the tokenizer (the same vocabulary size) and see the same inputs."
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    mask = labels[:, 1:] != IGNORE_INDEX
    tokens = mask.sum()
    if int(tokens) == 0:
        raise ValueError("every label in this batch is masked (-100): no completion token to distil on.")
    total = _divergence(student_logits[:, :-1][mask], teacher_logits[:, :-1][mask], temperature, beta).sum()
    return (total if reduction == "sum" else total / tokens), tokens


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


def load_teacher(name_or_path: str | os.PathLike, num_labels: int | None = None, causal_lm: bool = False) -> nn.Module:
    """A teacher from a ``TextClassifier`` checkpoint (``*.ckpt``) or a ``transformers`` sequence classifier.

    A folder or hub id is loaded with ``AutoModelForSequenceClassification`` (``num_labels`` passed
    when given); a warning says so when its classification head was not in the weights, since a
    randomly initialised teacher teaches noise. With ``causal_lm=True`` it is loaded with
    ``AutoModelForCausalLM`` instead (the teacher of a :class:`~lightning_peft.CausalLM`).
    """
    path = str(name_or_path)
    if causal_lm:
        if path.endswith(".ckpt"):
            raise ValueError(
                f"Distillation: a causal-LM teacher is a transformers folder or hub id, or a module; {path!r} is a Lightning "
                "checkpoint. HINT: save the teacher with save_pretrained, or load it yourself and pass the module."
            )
        from ..models.causal_lm import load_causal_lm

        return load_causal_lm(path)
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


def output_logits(output: object, who: str) -> Tensor:
    """The logits in a forward's output: the tensor itself or its ``.logits``; ``who`` names the forward in the error."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"{who} returned {type(output).__name__}; it must return logits (a tensor, or an object with .logits).")


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
