"""Adapter files: save -> load into a fresh base gives identical outputs; mismatches are errors; PEFT layout both ways."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import MODELS, bert, gpt2, llama, output, randomize
from torch import nn

from lightning_peft import (
    BitFitConfig,
    IA3Config,
    LoRAConfig,
    export_peft,
    import_peft,
    inject,
    list_adapters,
    load_adapter,
    save_adapter,
)
from lightning_peft.peft import AdapterLayer, adapter_state_dict

peft = pytest.importorskip("peft")

CASES = {
    "lora-bert-embeddings-bias": ("bert", lambda: LoRAConfig(r=4, target_modules=["query", "value", "word_embeddings"], bias="all")),
    "lora-gpt2-conv1d": ("gpt2", lambda: LoRAConfig(r=4, rank_pattern={"transformer.h.1.attn.c_attn": 2})),
    "lora-llama-all-linear": ("llama", lambda: LoRAConfig(r=4, target_modules="all-linear", use_rslora=True)),
    "lora-resnet-conv": ("resnet", lambda: LoRAConfig(r=2, target_modules=[r"re:layer4\.\d\.conv[12]"])),
    "lora-vit": ("vit", lambda: LoRAConfig(r=2)),
    "ia3-llama": ("llama", lambda: IA3Config()),
    "bitfit-bert": ("bert", lambda: BitFitConfig()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_save_then_load_into_a_fresh_base_gives_identical_outputs(case, tmp_path):
    name, make_config = CASES[case]
    factory, batch = MODELS[name]
    x = batch()
    model = factory()
    inject(model, make_config())
    randomize(model)
    with torch.no_grad():
        expected = output(model, x)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]
    fresh = factory()
    assert load_adapter(fresh, tmp_path) == "default"
    with torch.no_grad():
        assert torch.equal(output(fresh, x), expected)
    assert {k: v.shape for k, v in adapter_state_dict(fresh).items()} == {k: v.shape for k, v in load_file(tmp_path / "adapter.safetensors").items()}


class _Wrapper(nn.Module):
    """What a LightningModule is to its transformers model: module names gain a leading ``model.``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


@pytest.mark.parametrize("direction", ["wrapper-to-inner", "inner-to-wrapper"])
def test_adapter_saved_one_wrapper_further_out_or_in_loads_re_rooted(direction, tmp_path):
    factory, batch = MODELS["llama"]
    x = batch()
    source = factory()
    inject(_Wrapper(source) if direction == "wrapper-to-inner" else source, LoRAConfig(r=2, target_modules="all-linear"))
    randomize(source)
    with torch.no_grad():
        expected = output(source, x)
    save_adapter(_Wrapper(source) if direction == "wrapper-to-inner" else source, tmp_path)
    saved = json.loads((tmp_path / "adapter.json").read_text())["sites"][0]["module"]
    assert saved.startswith("model.model.") == (direction == "wrapper-to-inner")
    fresh = factory()
    load_adapter(fresh if direction == "wrapper-to-inner" else _Wrapper(fresh), tmp_path)
    with torch.no_grad():
        assert torch.equal(output(fresh, x), expected)


def test_adapter_of_another_model_is_not_re_rooted_onto_a_look_alike(tmp_path):
    model = _Wrapper(MODELS["llama"][0]())
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="No module 'model.model.layers.0.self_attn.q_proj'"):
        load_adapter(MODELS["bert"][0](), tmp_path)


def test_adapter_named_like_a_module_saves_every_tensor(tmp_path):
    """peft #3584: an adapter called ``mlp`` on a model with ``mlp`` modules lost tensors on save."""
    model = llama()
    inject(model, LoRAConfig(r=2, target_modules=["gate_proj", "q_proj"], modules_to_save=None), adapter_name="mlp")
    randomize(model)
    save_adapter(model, tmp_path, "mlp")
    saved = load_file(tmp_path / "adapter.safetensors")
    assert len(saved) == 2 * 2 * 2 and all(".mlp." in k or ".self_attn." in k for k in saved)
    fresh = llama()
    load_adapter(fresh, tmp_path)
    x = MODELS["llama"][1]()
    with torch.no_grad():
        assert torch.equal(output(fresh, x), output(model, x))


def test_adapter_file_that_does_not_fit_is_an_error_and_changes_nothing(tmp_path):
    model = bert()
    inject(model, LoRAConfig(r=4))
    save_adapter(model, tmp_path)
    from transformers import BertConfig, BertForSequenceClassification

    wider = BertForSequenceClassification(BertConfig(vocab_size=61, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, num_labels=3))
    before = list(wider.state_dict())
    with pytest.raises(ValueError, match="does not fit .*shape mismatch"):
        load_adapter(wider, tmp_path)
    assert list(wider.state_dict()) == before and not list_adapters(wider)
    with pytest.raises(ValueError, match="No module 'bert.encoder.layer.0.attention.self.query'"):
        load_adapter(nn.Sequential(OrderedDict(fc=nn.Linear(2, 2))), tmp_path)


def test_half_written_or_damaged_adapter_is_detected(tmp_path):
    model = bert()
    inject(model, LoRAConfig(r=4))
    save_adapter(model, tmp_path)
    weights = tmp_path / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="checksum differs"):
        load_adapter(bert(), tmp_path)
    (tmp_path / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors is missing"):
        load_adapter(bert(), tmp_path)
    with pytest.raises(FileNotFoundError, match="No adapter at"):
        load_adapter(bert(), tmp_path / "nowhere")


def test_loading_an_adapter_freezes_the_base_like_inject(tmp_path):
    model = bert()
    inject(model, LoRAConfig(r=4))
    save_adapter(model, tmp_path)
    fresh = bert()
    load_adapter(fresh, tmp_path)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}


def test_loading_twice_under_one_name_is_refused(tmp_path):
    model = bert()
    inject(model, LoRAConfig(r=4))
    save_adapter(model, tmp_path)
    fresh = bert()
    load_adapter(fresh, tmp_path)
    with pytest.raises(ValueError, match="already exists"):
        load_adapter(fresh, tmp_path)
    assert load_adapter(fresh, tmp_path, adapter_name="second") == "second"


# --- Hugging Face PEFT layout ----------------------------------------------------------------------

PEFT_CASES = {
    "bert-query-value-embeddings-bias": (bert, lambda: LoRAConfig(r=4, alpha=8, target_modules=["query", "value", "word_embeddings"], bias="all")),
    "gpt2-conv1d-rank-pattern": (gpt2, lambda: LoRAConfig(r=4, alpha=8, rank_pattern={"transformer.h.1.attn.c_attn": 2}, alpha_pattern={"transformer.h.0.attn.c_attn": 3.0})),
    "llama-all-linear-rslora": (llama, lambda: LoRAConfig(r=4, alpha=8, target_modules="all-linear", use_rslora=True, bias="none")),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_hf_peft_loads_our_export_and_gives_the_same_outputs(case, tmp_path):
    factory, make_config = PEFT_CASES[case]
    x = MODELS["bert"][1]()
    model = factory()
    inject(model, make_config())
    randomize(model)
    with torch.no_grad():
        expected = output(model, x)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    peft_model = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(peft_model, x), expected, rtol=1e-5, atol=1e-5)
    # and back: our import of the same files
    fresh = factory()
    import_peft(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(output(fresh, x), expected, rtol=1e-5, atol=1e-5)


def test_we_import_an_adapter_saved_by_hf_peft(tmp_path):
    x = MODELS["bert"][1]()
    base = bert()
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "key", "dense"], task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.eval()
    with torch.no_grad():
        expected = output(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    ours = bert()
    assert load_adapter(ours, tmp_path) == "default"  # the PEFT layout is recognised
    with torch.no_grad():
        torch.testing.assert_close(output(ours, x), expected, rtol=1e-5, atol=1e-5)
    saved = [n for n, m in ours.named_modules() if isinstance(m, AdapterLayer) and m.method == "modules_to_save"]
    assert saved == ["classifier"]


def test_import_refuses_what_it_cannot_represent(tmp_path):
    peft_model = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=["query"], lora_bias=True))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lora_bias=True is not supported"):
        import_peft(bert(), tmp_path)


def test_export_keeps_tensors_outside_the_transformers_model_in_a_side_file(tmp_path, caplog):
    class UserModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = bert().bert
            self.head = nn.Linear(32, 2)

        def forward(self, x):
            return self.head(self.backbone(x).last_hidden_state[:, 0])

    x = MODELS["bert"][1]()
    model = UserModule().eval()
    inject(model, LoRAConfig(r=4))
    randomize(model)
    with torch.no_grad():
        expected = model(x)
    with caplog.at_level(logging.WARNING):
        export_peft(model, tmp_path)
    assert "PEFT will not load them" in caplog.text and "head" in caplog.text
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.encoder.") for k in keys)  # relative to the BertModel
    fresh = UserModule().eval()
    import_peft(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-6, atol=1e-6)


def test_export_of_a_non_lora_adapter_is_refused(tmp_path):
    model = bert()
    inject(model, IA3Config())
    with pytest.raises(ValueError, match="PEFT export covers LoRA adapters"):
        export_peft(model, tmp_path)
