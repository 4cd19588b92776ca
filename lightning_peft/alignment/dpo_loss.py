"""The DPO family of preference losses on sequence log-probabilities, as TRL's ``DPOTrainer`` computes them.

With ``h = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))`` (chosen minus rejected log-ratio):

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log σ(β h)``; with ``label_smoothing = ε`` the conservative DPO
  (cDPO) of TRL up to its 2025 refactor: ``-(1 - ε) log σ(β h) - ε log σ(-β h)``.
- ``ipo`` (Azar et al. 2023, Eq. 17): ``(h̄ - 1 / (2β))²`` where ``h̄`` uses each completion's log-ratio divided
  by its number of tokens (TRL's length-averaged form, confirmed by the IPO authors).

Rewards are ``β · log-ratio`` of each completion (detached), as TRL logs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LOSS_TYPES", "DPOLoss", "check_dpo_settings", "dpo_loss", "kl_estimate"]

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass(frozen=True)
class DPOLoss:
    """Per-pair results, each ``(B,)``: ``losses`` (to average), ``chosen_rewards``/``rejected_rewards`` (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> torch.Tensor:
        """1.0 where the implicit reward prefers the chosen completion (strictly), else 0.0."""
        return (self.chosen_rewards > self.rejected_rewards).float()


def check_dpo_settings(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Refuse settings the losses are not defined for, naming the valid ones."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) (the probability that a preference is flipped), got {label_smoothing!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is defined for loss_type='sigmoid' (conservative DPO) only, not {loss_type!r}")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> DPOLoss:
    """Per-pair DPO/IPO losses from summed completion log-probabilities, all ``(B,)``.

    ``chosen_tokens``/``rejected_tokens`` ``(B,)`` count each completion's tokens; IPO needs them.

    >>> z = torch.zeros(2)
    >>> out = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), z, z, beta=1.0)
    >>> [round(v, 4) for v in out.losses.tolist()], out.accuracies.tolist()
    ([0.1269, 1.3133], [1.0, 0.0])
    """
    check_dpo_settings(beta, loss_type, label_smoothing)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        delta = chosen_logratios - rejected_logratios
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type='ipo' averages log-ratios per token: pass chosen_tokens and rejected_tokens")
        delta = chosen_logratios / chosen_tokens.clamp_min(1) - rejected_logratios / rejected_tokens.clamp_min(1)
        losses = (delta - 1 / (2 * beta)) ** 2
    return DPOLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(π ‖ π_ref) estimate on the masked tokens: ``k3 = exp(q) - q - 1``, ``q = log π_ref - log π``.

    ``logps``, ``ref_logps`` and ``mask`` are ``(N, T)``. Schulman's k3 estimator is non-negative and 0 exactly where
    the two models agree; on preference data (not sampled from π) it measures drift on those tokens, not the true KL.

    >>> float(kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)))
    0.0
    """
    q = (ref_logps - logps.detach()).float()
    k3 = torch.expm1(q) - q
    return (k3 * mask).sum() / mask.sum().clamp_min(1)
