"""A fine-tuned model as a plain ``transformers`` folder: the adapters folded into the weights.

What serving tools load (``AutoModelForCausalLM.from_pretrained``, vLLM, llama.cpp's converter): no
adapter files, no ``lightning_peft`` or PEFT needed. The folder is written all or nothing (see
:mod:`lightning_peft.utils.atomic_folder`), and nothing is changed when the adapters cannot be merged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..groups.matching import format_names
from ..utils.atomic_folder import atomic_folder
from .functional import active_adapters, list_adapters, merge_and_unload, merge_refusal
from .quantization import is_quantized, merge_and_dequantize

__all__ = ["save_merged_model"]

log = logging.getLogger(__name__)


def _pretrained_model(model: Any) -> tuple[nn.Module, Any]:
    """The ``transformers`` model to save and the tokenizer that comes with it (a ``CausalLM``'s own)."""
    if hasattr(model, "save_pretrained") and isinstance(model, nn.Module):
        return model, None
    inner = getattr(model, "model", None)
    if isinstance(model, nn.Module) and hasattr(inner, "save_pretrained"):
        return inner, getattr(model, "tokenizer", None)
    raise TypeError(
        f"save_merged_model needs a transformers model (with save_pretrained) or a module holding one as .model "
        f"(CausalLM, DPO, GRPO); got {type(model).__name__}"
    )


def save_merged_model(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Fold the active adapters into the weights and write a plain ``transformers`` folder at ``path``.

    ``model`` is a ``transformers`` model with adapters, or a module holding one as ``.model`` (a
    :class:`~lightning_peft.CausalLM`, whose tokenizer is then saved too unless ``tokenizer`` is given). It is
    changed in place into the merged plain model, as PEFT's ``merge_and_unload`` does; inactive adapters are
    dropped (logged). A quantized base (QLoRA) is dequantized first, to ``dtype`` (default bfloat16), so the
    update is not re-rounded to 4 bits, and the whole model is saved in that dtype; ``dtype`` otherwise casts the
    saved weights (default: as they are).

    Raises:
        RuntimeError: adapters that cannot be merged (bottleneck adapters, prompts, a tied weight), with the
            layers and why; the model is left as it was and nothing is written.
        FileExistsError: ``path`` holds files and ``overwrite`` is false.

    Example:
        >>> import tempfile
        >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        >>> from lightning_peft import LoRAConfig, inject
        >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2)
        >>> model = inject(LlamaForCausalLM(config), LoRAConfig(r=2, target_modules="all-linear"))
        >>> out = save_merged_model(model, tempfile.mkdtemp() + "/merged")
        >>> type(AutoModelForCausalLM.from_pretrained(out)).__name__
        'LlamaForCausalLM'
    """
    target, own_tokenizer = _pretrained_model(model)
    tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    path = Path(path)
    existing = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"{path} already holds files ({format_names(existing, 5)}); pass overwrite=True to replace the folder")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; a merged model is saved into a folder")
    if not list_adapters(target):
        log.warning("save_merged_model: %s has no adapters; saving the model as it is", type(target).__name__)
    quantized = any(is_quantized(m) for m in target.modules())
    if (refusal := merge_refusal(target, dequantized=quantized)) is not None:
        raise RuntimeError(f"{refusal}. Save the adapter instead (save_adapter / export_peft) and load it on the base model.")
    merged = active_adapters(target)
    dropped = [n for n in list_adapters(target) if n not in merged]
    if dropped:
        log.warning("save_merged_model: merging %s; inactive adapters %s are dropped", format_names(merged), format_names(dropped))
    if quantized:
        dtype = dtype or torch.bfloat16
        merge_and_dequantize(target, dtype)
    else:
        merge_and_unload(target)
    if dtype is not None:
        target.to(dtype)  # the whole model, so the folder holds one dtype (a dequantized base: its norms and embeddings too)
    with atomic_folder(path, owned=existing) as tmp:
        target.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info("save_merged_model: %s (adapters %s merged) written to %s", type(target).__name__, format_names(merged), path)
    return path
