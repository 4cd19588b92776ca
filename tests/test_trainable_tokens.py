"""Trainable tokens (LoRAConfig(trainable_token_indices=...)): only the chosen embedding rows train, a tied LM head
follows them, files hold only those rows, and PEFT's layout is read and written (PEFT as the oracle, both ways)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, llama, output
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import (
    LoRAConfig,
    disable_adapters,
    export_peft,
    import_peft,
    inject,
    load_adapter,
    merge,
    peft_callback,
    save_adapter,
    unmerge,
)

peft = pytest.importorskip("peft")
X = torch.tensor([[1, 3, 5, 7, 9, 3], [9, 8, 5, 2, 1, 0]])
IDS = [3, 5, 9]


def tied_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def randomize(model, seed: int = 3, names: str = "") -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and names in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def test_rows_replace_the_embedding_rows_and_the_tied_head_follows():
    """Outputs equal the base model with those rows edited in its (tied) weight; merge writes them, unmerge restores."""
    model = inject(tied_llama(), LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=IDS))
    rows = model.model.embed_tokens.adapters["default"].rows
    assert model.lm_head.adapters["default"].rows is None  # the tied head owns nothing
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "model.embed_tokens.adapters.default.rows",
        *(f"model.layers.{i}.self_attn.q_proj.adapters.default.lora_{ab}" for i in (0, 1) for ab in "AB"),
    }
    randomize(model, names="rows")
    reference = tied_llama()
    with torch.no_grad():
        reference.model.embed_tokens.weight[IDS] = rows
        expected = output(reference, X)
        torch.testing.assert_close(output(model, X), expected)
        weight = model.model.embed_tokens.weight.clone()
        merge(model)
        torch.testing.assert_close(output(model, X), expected)
        torch.testing.assert_close(model.model.embed_tokens.weight[IDS], rows)
        unmerge(model)
        assert torch.equal(model.model.embed_tokens.weight, weight)
        with disable_adapters(model):
            torch.testing.assert_close(output(model, X), output(tied_llama(), X))
    loss = output(model, X).logsumexp(-1).sum()
    loss.backward()
    grad = rows.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad is None


def test_our_export_loads_in_peft_and_back(tmp_path):
    model = inject(tied_llama(), LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=IDS))
    randomize(model)
    with torch.no_grad():
        expected = output(model, X)
    export_peft(model, tmp_path / "peft")
    keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert keys == {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
                    *(f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB")}
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"model.embed_tokens": IDS}
    peft_model = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "peft").eval()
    fresh = tied_llama()
    import_peft(fresh, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(output(peft_model, X), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(output(fresh, X), expected, rtol=1e-5, atol=1e-5)
    save_adapter(model, tmp_path / "ours")  # our own format: the rows, not the embedding
    assert set(load_file(tmp_path / "ours" / "adapter.safetensors")) == {
        "model.embed_tokens.rows", *(f"model.layers.{i}.self_attn.q_proj.lora_{ab}" for i in (0, 1) for ab in "AB")}
    again = tied_llama()
    load_adapter(again, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(output(again, X), expected)


@pytest.mark.parametrize("form", ["list_tied", "dict_untied"])
def test_we_import_peft_trainable_tokens(form, tmp_path):
    """PEFT's list form on a tied model (embedding + tied head) and its dict form with an untied LM head of its own."""
    factory, indices = (tied_llama, IDS) if form == "list_tied" else (llama, {"embed_tokens": IDS, "lm_head": [5, 7]})
    peft_model = peft.get_peft_model(factory(), peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=indices))
    randomize(peft_model)
    peft_model.eval()
    with torch.no_grad():
        expected = output(peft_model, X)
    peft_model.save_pretrained(tmp_path)
    ours = factory()
    import_peft(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(output(ours, X), expected, rtol=1e-5, atol=1e-5)
    export_peft(ours, tmp_path / "again")  # and back: PEFT reads ours
    back = peft.PeftModel.from_pretrained(factory(), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(output(back, X), expected, rtol=1e-5, atol=1e-5)


def test_bad_token_indices_are_clear_errors():
    with pytest.raises(ValueError, match=r"trainable_token_indices holds -1; token ids are integers >= 0"):
        LoRAConfig(trainable_token_indices=[3, -1])
    with pytest.raises(ValueError, match=r"lists token ids more than once: \[3\]"):
        LoRAConfig(trainable_token_indices=[3, 4, 3])
    with pytest.raises(ValueError, match=r"must be a non-empty list of token ids"):
        LoRAConfig(trainable_token_indices={"embed_tokens": []})
    with pytest.raises(ValueError, match=r"\[61, 70\] are out of range for a Embedding of 61 tokens; resize the token embeddings"):
        inject(llama(), LoRAConfig(target_modules=["q_proj"], trainable_token_indices=[3, 61, 70]))
    with pytest.raises(ValueError, match=r"trainable_token_indices pattern 'embeddings' matched no module"):
        inject(llama(), LoRAConfig(target_modules=["q_proj"], trainable_token_indices={"embeddings": [3]}))
    with pytest.raises(ValueError, match=r"'model.embed_tokens' also is a LoRA target or a module saved in full"):
        inject(llama(), LoRAConfig(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[3]))


def test_hydra_callback_trains_only_those_rows():
    """Through peft_callback (what configs/peft/lora.yaml builds): the rows train, the embedding matrix does not."""
    from test_peft_callback import UserModule, loader, trainer

    model = UserModule()
    embeddings = model.bert.embeddings.word_embeddings.weight.detach().clone()
    callback = peft_callback("lora", r=2, target_modules=["query"], trainable_token_indices=[7, 9], modules_to_save=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer([callback], max_steps=3).fit(model, loader())
    layer = model.bert.embeddings.word_embeddings
    assert torch.equal(layer.base_layer.weight, embeddings)
    assert not torch.equal(layer.adapters["default"].rows.detach(), embeddings[[7, 9]])
