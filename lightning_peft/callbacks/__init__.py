"""Lightning callbacks: add them to any ``Trainer(callbacks=[...])`` without changing your module."""

from .freeze_backbone import FreezeBackbone
from .metrics_json import MetricsJSON
from .parameter_summary import ParameterSummary

__all__ = ["FreezeBackbone", "MetricsJSON", "ParameterSummary"]
