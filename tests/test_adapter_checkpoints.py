"""Adapter-only checkpoints: the fingerprint covers exactly the frozen pretrained weights, and a checkpoint that does
not fit says what differs (method, rank, targets, base); load_adapter checks it too."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from lightning_peft import IA3Config, LoRAConfig, inject, load_adapter
from lightning_peft.peft.adapter_files import adapter_metadata
from lightning_peft.peft.checkpoint import (
    FINGERPRINT_KEY,
    AdapterOnlyCheckpoints,
    base_fingerprint,
)
from lightning_peft.utils.fingerprint import tensors_fingerprint

BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class Classifier(nn.Module):
    """A pretrained encoder (fixed by ``base_seed``) and a freshly initialised head (``head_seed``, as a run's seed)."""

    def __init__(self, base_seed: int = 0, head_seed: int | None = 0) -> None:
        super().__init__()
        torch.manual_seed(base_seed)
        self.bert = BertModel(BertConfig(**BERT), add_pooling_layer=False)
        if head_seed is not None:
            torch.manual_seed(head_seed)
        else:
            torch.seed()  # seed: null -- a different head every run
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.bert(x).last_hidden_state.mean(1))


X = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(1))


def adapted(config, **kwargs) -> nn.Module:
    model = Classifier(**kwargs).eval()
    inject(model, config)  # modules_to_save="auto": the head trains as the adapter's copy
    AdapterOnlyCheckpoints().attach(model)
    return model


def trained(config=None, **kwargs) -> nn.Module:
    model = adapted(config or LoRAConfig(r=4), **kwargs)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def adapter_only_state(model: nn.Module) -> dict:
    checkpoint = {"state_dict": model.state_dict()}
    AdapterOnlyCheckpoints().shrink(model, checkpoint)
    return checkpoint["state_dict"]


@pytest.mark.parametrize("head_seed", [1, None], ids=["other-seed", "seed-null"])
def test_resume_with_another_seed_is_accepted_and_exact(head_seed):
    """The replaced, randomly initialised original head is not part of the fingerprint."""
    model = trained(head_seed=0)
    state = adapter_only_state(model)
    fresh = adapted(LoRAConfig(r=4), head_seed=head_seed).eval()
    fresh.load_state_dict(state)  # strict
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


@pytest.mark.parametrize(("config", "expected"), [
    (IA3Config(), "adapter 'default' is lora in the checkpoint but ia3 in the model"),
    (LoRAConfig(r=8), "adapter 'default' (lora) has r=4 in the checkpoint vs 8"),
    (LoRAConfig(r=4, target_modules=["query"]), "wraps 'bert.encoder.layer.0.attention.self.value', 'bert.encoder.layer.1.attention.self.value' only in the checkpoint"),
], ids=["method", "rank", "targets"])
def test_a_checkpoint_of_another_adapter_says_what_differs(config, expected):
    state = adapter_only_state(trained())
    other = adapted(config)
    with pytest.raises(ValueError, match="does not fit the model") as error:
        other.load_state_dict(state)
    assert expected in str(error.value)
    assert "other base weights" not in str(error.value)  # the base is the same


def test_a_checkpoint_of_another_base_is_refused_as_such():
    state = adapter_only_state(trained())
    with pytest.raises(ValueError, match="trained on other base weights") as error:
        adapted(LoRAConfig(r=4), base_seed=1).load_state_dict(state)
    assert "lora in the checkpoint" not in str(error.value)


def test_fingerprint_is_a_hash_of_the_pretrained_weights_only():
    a, b = trained(head_seed=0), adapted(IA3Config(), head_seed=3)
    assert base_fingerprint(a) == base_fingerprint(b) == tensors_fingerprint(dict(Classifier().bert.named_parameters(prefix="bert")))
    swapped = Classifier()
    with torch.no_grad():  # same sums, other weights: sums collide, a hash does not
        w = swapped.bert.encoder.layer[0].attention.self.query.weight
        w.copy_(w.flip(0))
    inject(swapped, LoRAConfig(r=4))
    assert base_fingerprint(swapped) != base_fingerprint(a)


def _nudge_one_weight(model: nn.Module) -> None:
    model.bert.encoder.layer[1].output.dense.weight[0, 0] += 1e-3


def _swap_layers(model: nn.Module) -> None:
    """Encoder layers 0 and 1 exchanged: every sum and sum of squares over the base stays the same."""
    for a, b in zip(model.bert.encoder.layer[0].parameters(), model.bert.encoder.layer[1].parameters()):
        a_value = a.clone()
        a.copy_(b)
        b.copy_(a_value)


def _swap_queries(model: nn.Module) -> None:
    """Only the wrapped query weights of layers 0 and 1 exchanged."""
    a, b = (model.bert.encoder.layer[i].attention.self.query.weight for i in (0, 1))
    a_value = a.clone()
    a.copy_(b)
    b.copy_(a_value)


@pytest.mark.parametrize("change", [_nudge_one_weight, _swap_layers, _swap_queries], ids=["one-weight-1e-3", "layers-swapped", "queries-swapped"])
def test_a_checkpoint_of_a_near_miss_base_is_refused(change):
    state = adapter_only_state(trained())
    near = Classifier().eval()
    before = [p.detach().clone() for p in near.bert.parameters()]
    with torch.no_grad():
        change(near)
    after = [p.detach() for p in near.bert.parameters()]
    if change is not _nudge_one_weight:  # what sums of values and of squares would not see
        assert sum(p.sum() for p in after).item() == pytest.approx(sum(p.sum() for p in before).item(), abs=1e-6)
        assert sum(p.pow(2).sum() for p in after).item() == pytest.approx(sum(p.pow(2).sum() for p in before).item(), rel=1e-6)
    assert sum(not torch.equal(a, b) for a, b in zip(after, before)) >= 1
    inject(near, LoRAConfig(r=4))
    AdapterOnlyCheckpoints().attach(near)
    with pytest.raises(ValueError, match="trained on other base weights"):
        near.load_state_dict(state)


def test_a_checkpoint_without_adapters_into_an_adapter_run_is_explained():
    full = Classifier().state_dict()  # a full fine-tuning (or pretrained) checkpoint
    with pytest.raises(ValueError, match="holds no adapter tensors .* full fine-tuning or pretrained checkpoint") as error:
        adapted(LoRAConfig(r=4)).load_state_dict(full)
    assert "'bert.encoder.layer.0.attention.self.query.base_layer.weight'" in str(error.value)


def _checkpoint_file(model: nn.Module, path, adapter_only: bool):
    state = adapter_only_state(model) if adapter_only else model.state_dict()
    torch.save({"state_dict": state, "callbacks": {"PEFT{'adapter_name': 'default'}": adapter_metadata(model, "default")}}, path)
    return path


@pytest.mark.parametrize("adapter_only", [True, False], ids=["adapter-only", "full"])
def test_load_adapter_checks_the_base_of_a_checkpoint(tmp_path, adapter_only):
    model = trained()
    path = _checkpoint_file(model, tmp_path / "x.ckpt", adapter_only)
    fresh = Classifier(head_seed=7).eval()
    load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))
    other = Classifier(base_seed=1)
    before = {n: (p.clone(), p.requires_grad) for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="x.ckpt was trained on other base weights than Classifier holds"):
        load_adapter(other, path)
    after = {n: (p, p.requires_grad) for n, p in other.named_parameters()}  # left as it was
    assert after.keys() == before.keys() and all(torch.equal(p, before[n][0]) and g == before[n][1] for n, (p, g) in after.items())


def test_adapter_only_state_keeps_only_tensors_with_a_byte_fingerprint():
    state = adapter_only_state(trained())
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state[FINGERPRINT_KEY].dtype == torch.uint8 and state[FINGERPRINT_KEY].numel() == 20


def test_an_adapter_only_checkpoint_without_the_peft_callback_is_explained():
    from lightning_peft.models.base import ClassificationModule

    class Module(ClassificationModule):
        def __init__(self):
            super().__init__(num_classes=2)
            self.net = Classifier()

    checkpoint = {"state_dict": adapter_only_state(trained())}
    with pytest.raises(ValueError, match=r"adapter-only checkpoint .* of lora adapter 'default' \(r=4, target_modules=None\).* Module has "
                                         r"no adapter. Add the PEFT callback"):
        Module().on_load_checkpoint(checkpoint)
    Module().on_load_checkpoint({"state_dict": Classifier().state_dict()})  # any other checkpoint: nothing to say
