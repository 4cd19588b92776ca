"""Tiny, randomly initialised models of real architectures (transformers, timm, torchvision) for PEFT tests."""

from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 61


def bert(seed: int = 0, labels: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        num_labels=labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def minilm_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 Llama causal LM (random weights, initializer_range 0.3) over the MiniLM tokenizer's
    vocabulary: [PAD]=0, [CLS]=101 as BOS, [SEP]=102 as EOS. ``overrides`` go to ``LlamaConfig`` (vocab_size, attn_implementation...)."""
    torch.manual_seed(seed)
    options = dict(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, pad_token_id=0, bos_token_id=101, eos_token_id=102, initializer_range=0.3)
    return LlamaForCausalLM(LlamaConfig(**{**options, **overrides}))


def vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=2, img_size=32, patch_size=8).eval()


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=3).eval()


def token_batch(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def image_batch(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


MODELS = {"bert": (bert, token_batch), "gpt2": (gpt2, token_batch), "llama": (llama, token_batch), "vit": (vit, image_batch), "resnet": (resnet, image_batch)}


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def randomize(model: nn.Module, std: float = 0.1, seed: int = 2) -> None:
    """Give every trainable (adapter) parameter a random value so the adapter visibly changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
