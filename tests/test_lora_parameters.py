"""LoRA on parameters (LoRAConfig(target_parameters=...)) on the 3-D expert stacks of tiny transformers MoE models:
outputs equal PEFT's for the same adapter tensors, PEFT's layout both ways, merge, save/load, training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, output
from transformers import GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM

from lightning_peft import LoRAConfig, export_peft, import_peft, inject, load_adapter, merge, save_adapter, unmerge
from lightning_peft.peft import adapter_layers

peft = pytest.importorskip("peft")
X = torch.tensor([[1, 3, 5, 7, 9, 3], [9, 8, 5, 2, 1, 4]])
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, tie_word_embeddings=False)
    return MixtralForCausalLM(config).eval()


def gpt_oss(seed: int = 0) -> GptOssForCausalLM:
    """Experts stored transposed, (experts, in, out), with biases (``is_transposed`` modules)."""
    torch.manual_seed(seed)
    config = GptOssConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, num_local_experts=3, num_experts_per_tok=2, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False)
    return GptOssForCausalLM(config).eval()


MODELS = {"mixtral": mixtral, "gpt_oss": gpt_oss}


def randomize(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("arch", list(MODELS))
def test_peft_adapter_imports_with_equal_outputs_and_exports_back(arch, tmp_path):
    factory = MODELS[arch]
    peft_model = peft.get_peft_model(factory(), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=TARGETS))
    randomize(peft_model)
    peft_model.eval()
    with torch.no_grad():
        expected = output(peft_model, X)
        assert not torch.allclose(expected, output(factory(), X))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = factory()
    import_peft(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(output(ours, X), expected, rtol=1e-5, atol=1e-5)
    export_peft(ours, tmp_path / "ours")
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]
    back = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(output(back, X), expected, rtol=1e-5, atol=1e-5)


def test_parameters_only_merge_save_load_and_training(tmp_path):
    """target_modules=None wraps no module; the experts' updates merge exactly, save alone, and train (the base stays)."""
    model = inject(mixtral(), LoRAConfig(r=2, alpha=4, dropout=0.0, target_parameters=TARGETS))
    assert [(n, layer.method) for n, layer in adapter_layers(model)] == [(f"model.layers.{i}.mlp.experts", "lora_param") for i in (0, 1)]
    experts = model.model.layers[0].mlp.experts
    factors = experts.adapters["default"].factors["gate_up_proj"]
    assert factors.lora_A.shape == (3 * 2, 16) and factors.lora_B.shape == (48, 2 * 3)
    with torch.no_grad():
        torch.testing.assert_close(output(model, X), output(mixtral(), X))  # B = 0: unchanged at init
    randomize(model)
    with torch.no_grad():
        expected = output(model, X)
        weight = experts.gate_up_proj.clone()
        merge(model)
        torch.testing.assert_close(output(model, X), expected, rtol=1e-5, atol=1e-5)
        unmerge(model)
        torch.testing.assert_close(experts.gate_up_proj, weight, rtol=0, atol=1e-6)
    save_adapter(model, tmp_path / "adapter")
    assert set(load_file(tmp_path / "adapter" / "adapter.safetensors")) == {
        f"model.layers.{i}.mlp.experts.factors.{p}.lora_{ab}" for i in (0, 1) for p in ("gate_up_proj", "down_proj") for ab in "AB"}
    fresh = mixtral()
    load_adapter(fresh, tmp_path / "adapter")
    export_peft(fresh, tmp_path / "peft")  # loaded from a file with sorted keys: PEFT's nesting still follows the module
    back = peft.PeftModel.from_pretrained(mixtral(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(output(fresh, X), expected)
        torch.testing.assert_close(output(back, X), expected, rtol=1e-5, atol=1e-5)
    model.train()
    output(model, X).logsumexp(-1).sum().backward()
    assert factors.lora_A.grad is not None and factors.lora_B.grad.abs().sum() > 0
    assert experts.base_layer.gate_up_proj.grad is None and not experts.base_layer.gate_up_proj.requires_grad


def test_bad_target_parameters_are_clear_errors():
    with pytest.raises(ValueError, match=r"target_parameters pattern 'experts.up_proj' matched no parameter of MixtralForCausalLM; 2-D/3-D parameters: "):
        inject(mixtral(), LoRAConfig(target_parameters=["experts.up_proj"]))
    with pytest.raises(ValueError, match=r"dropout=0.1 cannot apply to target_parameters"):
        inject(mixtral(), LoRAConfig(dropout=0.1, target_parameters=TARGETS))
    with pytest.raises(ValueError, match=r"target_parameters=\[\] is invalid"):
        LoRAConfig(target_parameters=[])
