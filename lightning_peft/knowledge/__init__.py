"""Knowledge injection: fuse an external vector per example into a pretrained classifier (late or early).

:class:`KnowledgeConfig` says how; :func:`attach_knowledge` changes a model accordingly; the
``KnowledgeInjection`` callback and ``TextClassifier`` / ``ImageClassifier(knowledge=...)`` both use it.
"""

from .config import MODES, KnowledgeConfig, as_knowledge_config
from .fusion import EarlyFusion, FeatureSlot, FusedLinear, attach_knowledge, input_embeddings, knowledge_slot

__all__ = [
    "MODES",
    "EarlyFusion",
    "FeatureSlot",
    "FusedLinear",
    "KnowledgeConfig",
    "as_knowledge_config",
    "attach_knowledge",
    "input_embeddings",
    "knowledge_slot",
]
