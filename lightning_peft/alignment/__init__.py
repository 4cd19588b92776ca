"""Alignment after supervised fine-tuning: GRPO (and its rewards) on the adapter."""

from .grpo import GRPO, Rollout
from .grpo_loss import group_advantages, grpo_loss, kl_k3
from .rewards import resolve_reward, score_completions, topic_reward

__all__ = ["GRPO", "Rollout", "group_advantages", "grpo_loss", "kl_k3", "resolve_reward", "score_completions", "topic_reward"]
