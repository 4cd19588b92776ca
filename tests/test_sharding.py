"""FSDP support that can be checked without a GPU: the wrap policy's units, clean names, the adapter-only guard.

FSDP itself (Lightning's and PyTorch's) needs a CUDA device; its end-to-end runs are for a GPU machine.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lightning_peft import PEFT, FSDPBlockPolicy, LoRAConfig, gathered_parameters, inject
from lightning_peft.matching import clean_name
from lightning_peft.peft.layer import AdapterDict
from tiny_models import bert, gpt2, llama, vit


def fsdp_units(root: nn.Module, policy: FSDPBlockPolicy) -> dict[str, list[nn.Parameter]]:
    """What FSDP's auto-wrapping does with ``policy``: each parameter belongs to its nearest wrapped ancestor."""
    units: dict[str, list[nn.Parameter]] = {}

    def visit(name: str, module: nn.Module, owner: str) -> None:
        if name and policy(module, recurse=False):
            owner = name
        units.setdefault(owner, []).extend(module.parameters(recurse=False))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, owner)

    visit("", root, "")
    return {k: v for k, v in units.items() if v}


@pytest.mark.parametrize("factory,blocks", [(bert, 2), (gpt2, 2), (llama, 2), (vit, 2)], ids=["bert", "gpt2", "llama", "timm-vit"])
def test_policy_keeps_trainable_and_frozen_parameters_in_separate_units(factory, blocks):
    model = factory()
    inject(model, LoRAConfig(r=4, target_modules="all-linear"))
    policy = FSDPBlockPolicy()
    wrapped = [m for m in model.modules() if policy.wraps(m)]
    assert sum(not isinstance(m, AdapterDict) for m in wrapped) == blocks
    assert sum(isinstance(m, AdapterDict) for m in wrapped) == sum(isinstance(m, AdapterDict) for m in model.modules()) > 0
    units = fsdp_units(model, policy)
    mixed = [name for name, params in units.items() if len({p.requires_grad for p in params}) > 1]
    assert not mixed, f"units mixing frozen and trainable parameters: {mixed}"
    assert any(all(p.requires_grad for p in params) for params in units.values())
    # control: blocks alone put the adapters into the blocks' flat parameters (pytorch #100945, litgpt #1417)
    blocks_only = fsdp_units(model, FSDPBlockPolicy(wrap_adapters=False))
    assert any(len({p.requires_grad for p in params}) > 1 for params in blocks_only.values())


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
