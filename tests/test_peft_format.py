"""PEFT's layout against real Hugging Face PEFT: embedding LoRA with saved embedding weights, and the task_type line
that AutoPeftModel needs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import MODELS, bert, llama, output, randomize
from transformers import LlamaForCausalLM

from lightning_peft import LoRAConfig, export_peft, import_peft, inject
from lightning_peft.peft.peft_format import peft_task_type

peft = pytest.importorskip("peft")
X = MODELS["llama"][1]()


def trained_peft_model(base, **config):
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **config))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model.eval()


def test_import_of_a_peft_lora_on_embed_tokens(tmp_path):
    """PEFT writes ``...embed_tokens.base_layer.weight`` beside an embedding LoRA (save_embedding_layers="auto")."""
    peft_model = trained_peft_model(llama(), target_modules=["embed_tokens", "q_proj"])
    with torch.no_grad():
        expected = output(peft_model, X)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        peft_model.save_pretrained(tmp_path)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    ours = llama()
    import_peft(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(output(ours, X), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"holds full weights of 'model.embed_tokens' \(PEFT's save_embedding_layers.*differ from the model's"):
        import_peft(llama(seed=1), tmp_path)


def test_export_writes_peft_task_type_and_auto_peft_model_loads_it(tmp_path):
    llama().save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    inject(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize(model)
    with torch.no_grad():
        expected = output(model, X)
    export_peft(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tmp_path / "base")
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(output(auto, X), expected, rtol=1e-5, atol=1e-6)


def test_task_type_follows_the_transformers_class():
    assert [peft_task_type(m) for m in (llama(), bert(), bert().bert, torch.nn.Linear(2, 2))] == [
        "CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION", None]
