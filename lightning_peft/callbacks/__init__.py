"""Lightning callbacks: add them to any ``Trainer(callbacks=[...])`` without changing your module."""

from .discriminative_lr import DiscriminativeLR
from .freeze_backbone import FreezeBackbone
from .gradual_unfreezing import GradualUnfreezing
from .metrics_json import MetricsJSON
from .parameter_summary import ParameterSummary
from .peft import PEFT

__all__ = ["DiscriminativeLR", "FreezeBackbone", "GradualUnfreezing", "MetricsJSON", "PEFT", "ParameterSummary"]
