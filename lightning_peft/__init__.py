"""lightning_peft: Lightning callbacks, mixins and Hydra configs for fine-tuning pretrained models.

Add the callbacks to an existing ``Trainer`` without touching your LightningModule::

    trainer = Trainer(callbacks=[FreezeBackbone(), ParameterSummary()])
"""

from .backbone import BackboneSplit, find_backbone
from .callbacks import DiscriminativeLR, FreezeBackbone, GradualUnfreezing, MetricsJSON, ParameterSummary
from .callbacks import L2SP, Distillation, FeatureCache, FeatureCacheStats
from .data import TextClassificationDataModule, load_text_dataset
from .discriminative import layer_lr_scales
from .distillation import distillation_loss, hidden_state_loss, load_teacher, soft_target_loss
from .feature_cache import FeatureStore
from .feature_point import FeaturePoint, find_feature_point
from .freezing import LayerFreezer, freeze, unfreeze
from .hub import load_backbone, load_tokenizer, resolve_pretrained
from .layer_groups import LayerGroup, format_layer_groups, layer_groups
from .matching import match_module_names
from .mixins import FinetuningConfig, FinetuningMixin
from .models import TextClassifier, linear_warmup_decay, warmup_schedule
from .param_groups import Placement, regroup_optimizer
from .params import ParamCount, count_parameters
from .probing import FeatureSet, extract_features, fit_classifier
from .regularization import l2sp_penalty

__version__ = "0.1.0"

__all__ = [
    "BackboneSplit",
    "DiscriminativeLR",
    "Distillation",
    "FeatureCache",
    "FeatureCacheStats",
    "FeaturePoint",
    "FeatureSet",
    "FeatureStore",
    "FinetuningConfig",
    "FinetuningMixin",
    "FreezeBackbone",
    "GradualUnfreezing",
    "L2SP",
    "LayerFreezer",
    "LayerGroup",
    "MetricsJSON",
    "ParamCount",
    "ParameterSummary",
    "Placement",
    "TextClassificationDataModule",
    "TextClassifier",
    "count_parameters",
    "distillation_loss",
    "extract_features",
    "find_backbone",
    "find_feature_point",
    "fit_classifier",
    "format_layer_groups",
    "freeze",
    "hidden_state_loss",
    "l2sp_penalty",
    "layer_groups",
    "layer_lr_scales",
    "linear_warmup_decay",
    "load_backbone",
    "load_teacher",
    "load_text_dataset",
    "load_tokenizer",
    "match_module_names",
    "regroup_optimizer",
    "resolve_pretrained",
    "soft_target_loss",
    "unfreeze",
    "warmup_schedule",
]
