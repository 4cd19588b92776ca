"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): trainable keys and values at every attention layer.

Both put ``k`` virtual key/value pairs in front of every layer's keys and values through the
installed ``transformers`` ``Cache`` API (see :mod:`lightning_peft.peft.prompt` for the wrapper, the
mask and position rules, and generation). They differ in defaults, as in the papers:

- prefix tuning trains the prefixes through an MLP reparameterisation (``embedding (k, d)`` ->
  ``Linear -> tanh -> Linear`` -> all layers' keys and values), which stabilises training; the MLP
  is dropped afterwards -- :func:`~lightning_peft.save_adapter` writes the final prefixes -- while
  Lightning checkpoints keep it, so training resumes (peft #2256).
- P-tuning v2 ("deep prompt tuning") trains the per-layer prefixes directly (no reparameterisation
  by default), for classification and generation alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import check_field, check_probability
from .prompt import PromptMethodConfig, prompt_target
from .registry import Site, register_method

__all__ = ["PTuningV2Config", "PrefixTuningConfig", "prefix_spec"]


@dataclass
class _LayerPromptConfig(PromptMethodConfig):
    """Options shared by the methods that put learned keys and values into every attention layer."""

    projection: bool = True
    projection_hidden: int = 512
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self, "projection_hidden", lambda h: h >= 1, "it must be an integer >= 1")
        check_probability(self, "dropout")


@dataclass
class PrefixTuningConfig(_LayerPromptConfig):
    """Prefix tuning options.

    Args:
        num_virtual_tokens: ``k``, the prefix length in every layer.
        projection: train through the MLP reparameterisation (dropped in saved adapters).
        projection_hidden: hidden width of that MLP.
        dropout: dropout on the prefixes in training.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lightning_peft import PrefixTuningConfig, inject
        >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        ...                                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0))
        >>> llama = inject(llama, PrefixTuningConfig(num_virtual_tokens=3, projection_hidden=16, modules_to_save=None))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> llama(ids, use_cache=True).past_key_values.get_seq_length()  # 3 prefix + 3 real keys per layer
        6
        >>> llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False).shape
        torch.Size([1, 7])
    """

    method = "prefix_tuning"


@dataclass
class PTuningV2Config(_LayerPromptConfig):
    """P-tuning v2 options: deep prompts (keys and values) at every layer.

    Args:
        num_virtual_tokens: ``k``, the prompt length in every layer.
        projection: reparameterise through an MLP as prefix tuning does (off by default, as the paper's
            default for most tasks).
        projection_hidden: hidden width of that MLP.
        dropout: dropout on the prompts in training.
    """

    method = "p_tuning_v2"

    projection: bool = False


def prefix_spec(base: nn.Module, config: PrefixTuningConfig | PTuningV2Config) -> dict[str, Any]:
    """The adapter spec: one row per virtual token holding every layer's key and value (``layers·2·heads·head_dim``)."""
    cfg = base.config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    layers = int(cfg.num_hidden_layers)
    spec: dict[str, Any] = {
        "kind": "kv", "tokens": config.num_virtual_tokens, "out_dim": layers * 2 * kv_heads * head_dim,
        "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dropout": config.dropout, "init": "normal", "std": 1.0,
    }
    if config.projection:
        spec.update(encoder="prefix_mlp", embed_dim=int(cfg.hidden_size), hidden=int(config.projection_hidden))
    else:
        spec["encoder"] = "none"
    return spec


def plan_prefix(model: nn.Module, config: PrefixTuningConfig | PTuningV2Config, modules_to_save: list[str]) -> list[Site]:
    name, base = prompt_target(model, config, modules_to_save, "past_key_values")
    return [Site(name, "prompt", prefix_spec(base, config))]


register_method("prefix_tuning", PrefixTuningConfig, plan_prefix)
register_method("p_tuning_v2", PTuningV2Config, plan_prefix)
