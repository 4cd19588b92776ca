"""lightning_peft: Lightning callbacks, mixins and Hydra configs for fine-tuning pretrained models.

Add the callbacks to an existing ``Trainer`` without touching your LightningModule::

    trainer = Trainer(callbacks=[FreezeBackbone(), ParameterSummary()])
"""

from .groups.backbone import BackboneSplit, find_backbone
from .callbacks import (
    L2SP,
    PEFT,
    DiscriminativeLR,
    Distillation,
    FeatureCache,
    FeatureCacheStats,
    FreezeBackbone,
    GradualUnfreezing,
    MetricsJSON,
    ParameterSummary,
)
from .data import (
    ImageClassificationDataModule,
    TextClassificationDataModule,
    load_image_dataset,
    load_text_dataset,
)
from .groups.layer_rates import layer_lr_scales
from .losses.distillation import (
    distillation_loss,
    hidden_state_loss,
    load_teacher,
    soft_target_loss,
)
from .features.store import FeatureStore
from .features.feature_point import FeaturePoint, find_feature_point
from .groups.freezing import LayerFreezer, freeze, unfreeze
from .models.pretrained import load_backbone, load_timm_model, load_tokenizer, resolve_pretrained
from .groups.layer_groups import LayerGroup, format_layer_groups, layer_groups
from .groups.matching import match_module_names
from .models.mixins import FinetuningConfig, FinetuningMixin, PEFTMixin
from .models import (
    ImageClassifier,
    TextClassifier,
    linear_warmup_decay,
    warmup_schedule,
)
from .optim.param_groups import Placement, regroup_optimizer
from .utils.param_count import ParamCount, count_parameters
from .peft import (
    ALL_LINEAR,
    AdapterConfig,
    AdapterLayer,
    BitFitConfig,
    IA3Config,
    LoRAConfig,
    MergeReport,
    MethodConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    QLoRAConfig,
    QuantMemory,
    QuantSpec,
    active_adapters,
    adapter_batch,
    adapter_config,
    adapter_state_dict,
    base_weight_memory,
    delete_adapter,
    dequantize_model,
    disable_adapters,
    export_peft,
    import_peft,
    inject,
    list_adapters,
    load_adapter,
    merge,
    merge_and_dequantize,
    merge_and_unload,
    save_adapter,
    set_adapter,
    unmerge,
)
from .features.probe import FeatureSet, extract_features, fit_classifier
from .losses.l2sp import l2sp_penalty
from .distributed.fsdp import (
    FSDPBlockPolicy,
    gathered_parameters,
    replicated_modules,
    sync_replicated_gradients,
)

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR",
    "L2SP",
    "PEFT",
    "AdapterConfig",
    "AdapterLayer",
    "BackboneSplit",
    "BitFitConfig",
    "DiscriminativeLR",
    "Distillation",
    "FSDPBlockPolicy",
    "FeatureCache",
    "FeatureCacheStats",
    "FeaturePoint",
    "FeatureSet",
    "FeatureStore",
    "FinetuningConfig",
    "FinetuningMixin",
    "FreezeBackbone",
    "GradualUnfreezing",
    "IA3Config",
    "ImageClassificationDataModule",
    "ImageClassifier",
    "LayerFreezer",
    "LayerGroup",
    "LoRAConfig",
    "MergeReport",
    "MethodConfig",
    "MetricsJSON",
    "PEFTMixin",
    "PTuningConfig",
    "PTuningV2Config",
    "ParamCount",
    "ParameterSummary",
    "Placement",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QLoRAConfig",
    "QuantMemory",
    "QuantSpec",
    "TextClassificationDataModule",
    "TextClassifier",
    "active_adapters",
    "adapter_batch",
    "adapter_config",
    "adapter_state_dict",
    "base_weight_memory",
    "count_parameters",
    "delete_adapter",
    "dequantize_model",
    "disable_adapters",
    "distillation_loss",
    "export_peft",
    "extract_features",
    "find_backbone",
    "find_feature_point",
    "fit_classifier",
    "format_layer_groups",
    "freeze",
    "gathered_parameters",
    "hidden_state_loss",
    "import_peft",
    "inject",
    "l2sp_penalty",
    "layer_groups",
    "layer_lr_scales",
    "linear_warmup_decay",
    "list_adapters",
    "load_adapter",
    "load_backbone",
    "load_image_dataset",
    "load_teacher",
    "load_text_dataset",
    "load_timm_model",
    "load_tokenizer",
    "match_module_names",
    "merge",
    "merge_and_dequantize",
    "merge_and_unload",
    "regroup_optimizer",
    "replicated_modules",
    "resolve_pretrained",
    "save_adapter",
    "set_adapter",
    "soft_target_loss",
    "sync_replicated_gradients",
    "unfreeze",
    "unmerge",
    "warmup_schedule",
]
