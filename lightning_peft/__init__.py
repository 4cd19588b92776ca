"""lightning_peft: Lightning callbacks, mixins and Hydra configs for fine-tuning pretrained models.

Add the callbacks to an existing ``Trainer`` without touching your LightningModule::

    trainer = Trainer(callbacks=[FreezeBackbone(), ParameterSummary()])
"""

from .alignment.dpo import DPO
from .alignment.dpo_loss import dpo_loss
from .alignment.grpo import GRPO
from .alignment.grpo_loss import group_advantages, grpo_loss
from .alignment.preference_datamodule import PreferenceDataModule
from .alignment.rewards import topic_reward
from .callbacks import (
    L2SP,
    PEFT,
    DiscriminativeLR,
    Distillation,
    FeatureCache,
    FeatureCacheStats,
    FreezeBackbone,
    GradualUnfreezing,
    KnowledgeInjection,
    MetricsJSON,
    NonFiniteError,
    NonFiniteGuard,
    ParameterSummary,
    Replay,
    RNGState,
    SigtermCheckpoint,
)
from .cli.peft_callback import peft_callback
from .data import (
    ImageClassificationDataModule,
    ReplaySampler,
    TextClassificationDataModule,
    load_image_dataset,
    load_text_dataset,
)
from .data.instruction_datamodule import InstructionDataModule
from .distributed.fsdp import (
    FSDPBlockPolicy,
    gathered_parameters,
    replicated_modules,
    sync_replicated_gradients,
)
from .features.feature_point import FeaturePoint, find_feature_point
from .features.probe import FeatureSet, extract_features, fit_classifier
from .features.store import FeatureStore
from .groups.backbone import BackboneSplit, find_backbone, find_head, head_parameters
from .groups.freezing import LayerFreezer, freeze, unfreeze
from .groups.layer_groups import LayerGroup, format_layer_groups, layer_groups
from .groups.layer_rates import layer_lr_scales
from .groups.matching import match_module_names
from .knowledge.config import KnowledgeConfig
from .losses.distillation import (
    distillation_loss,
    hidden_state_loss,
    load_teacher,
    soft_target_loss,
    token_distillation_loss,
)
from .losses.l2sp import l2sp_penalty
from .models import (
    ImageClassifier,
    TextClassifier,
    linear_warmup_decay,
    warmup_schedule,
)
from .models.causal_lm import CausalLM
from .models.mixins import FinetuningConfig, FinetuningMixin, PEFTMixin
from .models.pretrained import load_backbone, load_timm_model, load_tokenizer, resolve_pretrained
from .optim.loraplus import apply_loraplus, create_loraplus_optimizer
from .optim.param_groups import Placement, regroup_optimizer
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
    add_weighted_adapter,
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
    save_merged_model,
    set_adapter,
    unmerge,
)
from .peft.checkpoint import check_adapter_only_checkpoint
from .utils.param_count import ParamCount, count_parameters
from .utils.saved_memory import count_saved_bytes
from .utils.tensor_memory import track_tensor_memory

__version__ = "0.1.0"

__all__ = [
    # callbacks: add to Trainer(callbacks=[...]) on an unchanged LightningModule
    "DiscriminativeLR",
    "Distillation",
    "FeatureCache",
    "FreezeBackbone",
    "GradualUnfreezing",
    "KnowledgeInjection",
    "L2SP",
    "MetricsJSON",
    "NonFiniteGuard",
    "PEFT",
    "ParameterSummary",
    "RNGState",
    "Replay",
    "SigtermCheckpoint",
    # method configs
    "ALL_LINEAR",
    "AdapterConfig",
    "BitFitConfig",
    "IA3Config",
    "LoRAConfig",
    "MethodConfig",
    "PTuningConfig",
    "PTuningV2Config",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QLoRAConfig",
    "QuantSpec",
    "peft_callback",
    # functional PEFT API on any nn.Module
    "AdapterLayer",
    "active_adapters",
    "adapter_batch",
    "adapter_config",
    "add_weighted_adapter",
    "adapter_state_dict",
    "apply_loraplus",
    "base_weight_memory",
    "check_adapter_only_checkpoint",
    "create_loraplus_optimizer",
    "delete_adapter",
    "dequantize_model",
    "disable_adapters",
    "export_peft",
    "import_peft",
    "inject",
    "list_adapters",
    "load_adapter",
    "merge",
    "merge_and_dequantize",
    "merge_and_unload",
    "save_adapter",
    "save_merged_model",
    "set_adapter",
    "unmerge",
    # ready modules, mixins and data
    "CausalLM",
    "FinetuningConfig",
    "FinetuningMixin",
    "ImageClassificationDataModule",
    "ImageClassifier",
    "InstructionDataModule",
    "KnowledgeConfig",
    "PEFTMixin",
    "ReplaySampler",
    "TextClassificationDataModule",
    "TextClassifier",
    "load_image_dataset",
    "load_text_dataset",
    # alignment after SFT: preference tuning (DPO) and GRPO on the adapter, its rewards and losses
    "DPO",
    "PreferenceDataModule",
    "dpo_loss",
    "GRPO",
    "group_advantages",
    "grpo_loss",
    "topic_reward",
    # building blocks: how a model is seen, features, losses, schedules, distributed, loading
    "FSDPBlockPolicy",
    "FeaturePoint",
    "FeatureSet",
    "LayerGroup",
    "NonFiniteError",
    "count_parameters",
    "count_saved_bytes",
    "distillation_loss",
    "extract_features",
    "find_backbone",
    "find_feature_point",
    "find_head",
    "fit_classifier",
    "format_layer_groups",
    "freeze",
    "gathered_parameters",
    "head_parameters",
    "hidden_state_loss",
    "l2sp_penalty",
    "layer_groups",
    "layer_lr_scales",
    "linear_warmup_decay",
    "load_backbone",
    "load_teacher",
    "load_timm_model",
    "load_tokenizer",
    "replicated_modules",
    "resolve_pretrained",
    "soft_target_loss",
    "token_distillation_loss",
    "sync_replicated_gradients",
    "track_tensor_memory",
    "unfreeze",
    "warmup_schedule",
]
# Also importable from here for existing code, documented in their modules: BackboneSplit, FeatureCacheStats, FeatureStore, LayerFreezer, MergeReport, ParamCount, Placement, QuantMemory, match_module_names, regroup_optimizer.
