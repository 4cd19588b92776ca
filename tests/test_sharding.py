"""FSDP support checked in one process: the wrap policy's units, replicated adapters, clean names, the callback's wiring.

The real 2-process FSDP fits (PyTorch's FSDP through Lightning's strategy, on CPU) are in test_fsdp_peft.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from tiny_models import bert, gpt2, llama, vit
from torch import nn

from lightning_peft import (
    PEFT,
    FSDPBlockPolicy,
    LoRAConfig,
    gathered_parameters,
    inject,
    replicated_modules,
    sync_replicated_gradients,
)
from lightning_peft.groups.matching import clean_name
from lightning_peft.peft.layer import AdapterDict


def fsdp_units(root: nn.Module, policy: FSDPBlockPolicy, ignored: list[nn.Module] = ()) -> dict[str, list[nn.Parameter]]:
    """What FSDP's auto-wrapping does with ``policy``: each parameter not ignored belongs to its nearest wrapped ancestor."""
    units: dict[str, list[nn.Parameter]] = {}

    def visit(name: str, module: nn.Module, owner: str) -> None:
        if any(module is m for m in ignored):
            return
        if name and policy(module, recurse=False):
            owner = name
        units.setdefault(owner, []).extend(module.parameters(recurse=False))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, owner)

    visit("", root, "")
    return {k: v for k, v in units.items() if v}


@pytest.mark.parametrize("factory,blocks", [(bert, 2), (gpt2, 2), (llama, 2), (vit, 2)], ids=["bert", "gpt2", "llama", "timm-vit"])
def test_sharded_units_hold_only_frozen_weights_and_the_adapters_are_replicated(factory, blocks):
    model = factory()
    inject(model, LoRAConfig(r=4, target_modules="all-linear"))
    policy = FSDPBlockPolicy()
    assert sum(policy.wraps(m) for m in model.modules()) == blocks
    replicated = replicated_modules(model)
    assert replicated and all(isinstance(m, AdapterDict) for m in replicated)
    units = fsdp_units(model, policy, ignored=replicated)
    assert all(not p.requires_grad for params in units.values() for p in params)
    kept = {id(p) for m in replicated for p in m.parameters()}
    assert kept == {id(p) for p in model.parameters() if p.requires_grad}
    # control: without ignoring the adapters, the blocks' flat parameters mix them in (pytorch #100945, litgpt #1417)
    assert any(len({p.requires_grad for p in params}) > 1 for params in fsdp_units(model, policy).values())


def test_policy_recurses_and_matches_block_names():
    policy = FSDPBlockPolicy(blocks=["LlamaDecoderLayer"])
    model = llama()
    assert policy(model, recurse=True, nonwrapped_numel=0) is True
    assert policy(model.model.layers[0], recurse=False) and not policy(model.model.layers[0].mlp, recurse=False)


def test_clean_names_drop_wrapper_segments():
    assert clean_name("_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.mlp._checkpoint_wrapped_module.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert clean_name("_orig_mod.backbone.encoder") == "backbone.encoder"
    assert clean_name("plain.name") == "plain.name"


def test_gathering_an_unsharded_model_changes_nothing():
    model = bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with gathered_parameters(model):
        inside = model.state_dict()
    assert all(torch.equal(before[k], inside[k]) for k in before)


def test_adapter_only_checkpoints_are_refused_under_fsdp_with_the_alternative():
    callback = PEFT(LoRAConfig(r=2), adapter_only_checkpoint=True)
    trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[callback])
    with pytest.raises(ValueError, match="not supported with FSDP yet.*adapter_only_checkpoint=False"):
        callback.setup(trainer, bert(), "fit")


def test_the_callback_makes_the_adapters_fsdp_ignored_states_before_wrapping():
    callback = PEFT(LoRAConfig(r=2, target_modules=["query", "value"]), adapter_only_checkpoint=False, verbose=False)
    strategy = FSDPStrategy(auto_wrap_policy=FSDPBlockPolicy(), parallel_devices=[torch.device("cpu")])
    model = pl.LightningModule()
    model.model = bert()
    trainer = SimpleNamespace(strategy=strategy, callbacks=[callback])
    callback.setup(trainer, model, "fit")
    ignored = strategy.kwargs["ignored_states"]
    assert [id(m) for m in ignored] == [id(m) for m in replicated_modules(model)] and len(ignored) >= 4
    callback.setup(trainer, model, "fit")  # validate after fit: nothing added twice
    assert len(strategy.kwargs["ignored_states"]) == len(ignored)


def test_replicated_gradients_are_left_alone_without_a_process_group():
    model = bert()
    inject(model, LoRAConfig(r=2, target_modules=["query"]))
    model(torch.randint(0, 50, (2, 5))).logits.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert sync_replicated_gradients(model) == 0
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
