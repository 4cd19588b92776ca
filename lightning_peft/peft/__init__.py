"""Parameter-efficient methods: inject adapters into any ``nn.Module``, switch, merge, save and export them.

>>> model = inject(model, LoRAConfig(r=8))          # doctest: +SKIP
>>> save_adapter(model, "adapter/")                 # doctest: +SKIP
"""

from . import bitfit, bottleneck, ia3, lora, modules_to_save, prefix, prompt, qlora  # noqa: F401  (each registers its method)
from .adapter_files import adapter_config, load_adapter, save_adapter
from .bitfit import BitFitConfig
from .bottleneck import AdapterConfig
from .combine import add_weighted_adapter
from .config import ALL_LINEAR, MethodConfig
from .functional import (
    active_adapters,
    adapter_batch,
    adapter_parameters,
    adapter_state_dict,
    delete_adapter,
    disable_adapters,
    inject,
    list_adapters,
    merge,
    merge_and_unload,
    set_adapter,
    unmerge,
)
from .ia3 import IA3Config
from .layer import AdapterLayer, adapter_layers
from .lora import LoRAConfig
from .merged_export import save_merged_model
from .peft_format import export_peft, import_peft
from .prefix import PrefixTuningConfig, PTuningV2Config
from .prompt import PromptTuningConfig, PTuningConfig
from .qlora import QLoRAConfig
from .quantization import (
    MergeReport,
    QuantMemory,
    QuantSpec,
    base_weight_memory,
    dequantize_model,
    merge_and_dequantize,
)
from .registry import METHODS, config_from_dict

__all__ = [
    "ALL_LINEAR",
    "METHODS",
    "AdapterConfig",
    "AdapterLayer",
    "BitFitConfig",
    "IA3Config",
    "LoRAConfig",
    "MergeReport",
    "MethodConfig",
    "PTuningConfig",
    "PTuningV2Config",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QLoRAConfig",
    "QuantMemory",
    "QuantSpec",
    "active_adapters",
    "adapter_batch",
    "adapter_config",
    "adapter_layers",
    "adapter_parameters",
    "adapter_state_dict",
    "add_weighted_adapter",
    "base_weight_memory",
    "config_from_dict",
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
]
