"""GRPO's math on plain tensors: group-relative advantages and the clipped token-level objective with a k3 KL term.

Definitions follow DeepSeekMath (Shao et al., 2024) as implemented by TRL's ``GRPOTrainer`` (defaults
``scale_rewards="group"``, ``loss_type="dapo"``, ``epsilon=0.2``), so numbers compare with TRL runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SCALE_REWARDS", "GRPOLossStats", "group_advantages", "grpo_loss", "kl_k3"]

SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Advantages ``(N,)`` of rewards ``(N,)`` laid out as consecutive groups of ``num_generations`` per prompt.

    ``A = (r - mean of r's group) / (std + eps)`` with the unbiased (Bessel) std of the group (``"group"``),
    of the whole batch (``"batch"``), or no division (``"none"``, Dr. GRPO). A group whose rewards are all
    equal gets zero advantages: it carries no learning signal.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), num_generations=2)
    tensor([ 0.7070, -0.7070,  0.0000,  0.0000])
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 (the group's mean is the baseline), got {num_generations}")
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards must be 1-D with a multiple of num_generations={num_generations} entries, got shape {tuple(rewards.shape)}"
        )
    groups = rewards.float().view(-1, num_generations)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).flatten()
    if scale_rewards == "group":
        advantages = advantages / (groups.std(dim=1).repeat_interleave(num_generations) + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.float().std() + eps)
    return advantages


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3: unbiased, >= 0).

    >>> kl_k3(torch.tensor([-1.0]), torch.tensor([-1.0]))
    tensor([0.])
    """
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass(frozen=True)
class GRPOLossStats:
    """Detached token means over the completion mask: ``kl`` (0 when ``beta == 0``) and ``clip_fraction``
    (tokens whose ratio left ``[1 - epsilon, 1 + epsilon]`` on the side where clipping binds)."""

    kl: torch.Tensor
    clip_fraction: torch.Tensor


def grpo_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, GRPOLossStats]:
    """The clipped surrogate plus ``beta`` × k3 KL, summed over completion tokens and divided by ``normalizer``.

    Per token ``t`` of completion ``i`` (all ``(N, C)``; ``advantages`` ``(N,)``, ``mask`` true on completion tokens):
    ``ratio = exp(logps - old_logps)``,
    ``loss_it = -min(ratio · A_i, clip(ratio, 1 - ε, 1 + ε) · A_i) + beta · kl_k3(logps, ref_logps)``,
    ``loss = Σ mask · loss_it / normalizer`` with ``normalizer`` the number of completion tokens by default:
    TRL's default ``"dapo"`` aggregation (one token mean over the batch, no per-sequence mean, so long and
    short completions weigh by their tokens). ``old_logps=None`` means ``logps.detach()`` (one optimisation
    pass per sampled batch: the ratio is 1 and only its gradient counts, as in TRL).
    """
    if old_logps is None:
        old_logps = logps.detach()
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logps)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps (the reference model's per-token log-probs)")
        kl = kl_k3(logps, ref_logps)
        per_token = per_token + beta * kl
    tokens = mask.sum().clamp_min(1.0)
    loss = (per_token * mask).sum() / (tokens if normalizer is None else normalizer)
    with torch.no_grad():
        clip = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
        stats = GRPOLossStats(kl=(kl * mask).sum() / tokens, clip_fraction=(clip.to(mask.dtype) * mask).sum() / tokens)
    return loss, stats
