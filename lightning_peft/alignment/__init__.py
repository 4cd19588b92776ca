"""Alignment after supervised fine-tuning, on the adapter or the full model: preference tuning (DPO, IPO) and
group-relative policy optimisation (GRPO) against a reward function."""

from .dpo import DPO
from .dpo_loss import dpo_loss, kl_estimate
from .grpo import GRPO, Rollout
from .grpo_loss import group_advantages, grpo_loss, kl_k3
from .preference_datamodule import PreferenceDataModule
from .rewards import resolve_reward, score_completions, topic_reward

__all__ = [
    "DPO",
    "GRPO",
    "PreferenceDataModule",
    "Rollout",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "kl_estimate",
    "kl_k3",
    "resolve_reward",
    "score_completions",
    "topic_reward",
]
