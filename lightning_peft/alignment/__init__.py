"""Alignment after SFT: preference tuning (DPO, IPO) on the adapter or the full model."""

from .dpo import DPO
from .dpo_loss import dpo_loss, kl_estimate
from .preference_datamodule import PreferenceDataModule

__all__ = ["DPO", "PreferenceDataModule", "dpo_loss", "kl_estimate"]
