"""Ready-made LightningModules used by the Hydra entry point (your own modules work too)."""

from ..features.pooling import POOLINGS, pool
from ..optim.schedules import linear_warmup_decay, warmup_schedule
from .base import ClassificationModule
from .image_classifier import ImageClassifier
from .text_classifier import TextClassifier

__all__ = ["POOLINGS", "ClassificationModule", "ImageClassifier", "TextClassifier", "linear_warmup_decay", "pool", "warmup_schedule"]
