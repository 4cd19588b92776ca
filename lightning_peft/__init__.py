"""lightning_peft: Lightning callbacks, mixins and Hydra configs for fine-tuning pretrained models.

Add the callbacks to an existing ``Trainer`` without touching your LightningModule::

    trainer = Trainer(callbacks=[FreezeBackbone(), ParameterSummary()])
"""

from .backbone import BackboneSplit, find_backbone
from .callbacks import FreezeBackbone, MetricsJSON, ParameterSummary
from .data import TextClassificationDataModule, load_text_dataset
from .freezing import freeze, unfreeze
from .hub import load_backbone, load_tokenizer, resolve_pretrained
from .matching import match_module_names
from .models import TextClassifier, linear_warmup_decay
from .params import ParamCount, count_parameters

__version__ = "0.1.0"

__all__ = [
    "BackboneSplit",
    "FreezeBackbone",
    "MetricsJSON",
    "ParamCount",
    "ParameterSummary",
    "TextClassificationDataModule",
    "TextClassifier",
    "count_parameters",
    "find_backbone",
    "freeze",
    "linear_warmup_decay",
    "load_backbone",
    "load_text_dataset",
    "load_tokenizer",
    "match_module_names",
    "resolve_pretrained",
    "unfreeze",
]
