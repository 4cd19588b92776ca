"""Lightning callbacks: add them to any ``Trainer(callbacks=[...])`` without changing your module."""

from .discriminative_lr import DiscriminativeLR
from .distillation import Distillation
from .feature_cache import FeatureCache, FeatureCacheStats
from .freeze_backbone import FreezeBackbone
from .gradual_unfreezing import GradualUnfreezing
from .knowledge_injection import KnowledgeInjection
from .l2sp import L2SP
from .metrics_json import MetricsJSON
from .non_finite import NonFiniteError, NonFiniteGuard
from .parameter_summary import ParameterSummary
from .peft import PEFT
from .replay import Replay
from .rng_state import RNGState
from .sigterm_checkpoint import SigtermCheckpoint

__all__ = [
    "L2SP",
    "PEFT",
    "DiscriminativeLR",
    "Distillation",
    "FeatureCache",
    "FeatureCacheStats",
    "FreezeBackbone",
    "GradualUnfreezing",
    "KnowledgeInjection",
    "MetricsJSON",
    "NonFiniteError",
    "NonFiniteGuard",
    "ParameterSummary",
    "RNGState",
    "Replay",
    "SigtermCheckpoint",
]
