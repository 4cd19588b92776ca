"""One owner per mechanism: freezing and frozen-BatchNorm eval (PEFT callback == PEFTMixin on a CNN), runtime
patching of the user's module (restored exactly), and callbacks that cooperate whatever their order."""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel

from lightning_peft import (
    PEFT,
    DiscriminativeLR,
    Distillation,
    FeatureCache,
    FreezeBackbone,
    GradualUnfreezing,
    ImageClassifier,
    LoRAConfig,
    PEFTMixin,
    freeze,
    unfreeze,
)
from lightning_peft.callbacks import coordination
from lightning_peft.groups.freezing import frozen_batchnorms, set_eval, set_requires_grad
from lightning_peft.utils.patching import Patch, patch_method

CONV_TARGETS = ["conv_pw", "conv_pwl", "conv_head"]


# --- freezing ----------------------------------------------------------------------------------


def test_set_requires_grad_counts_changes_once_per_tensor_and_accepts_modules_or_parameters():
    shared = nn.Linear(2, 2)
    net = nn.Sequential(shared, shared, nn.BatchNorm1d(2))
    assert set_requires_grad(net, False) == 4  # the shared layer's two tensors count once
    assert set_requires_grad(net, False) == 0
    assert set_requires_grad([shared.weight, net[2]], True) == 3
    assert freeze([net]) == 3 and unfreeze([net[2]]) == 2
    assert [bn for bn in frozen_batchnorms(net)] == [] and frozen_batchnorms(net, exclude=[net[2]]) == []
    freeze([net[2]])
    assert frozen_batchnorms(net) == [net[2]] and frozen_batchnorms(net, exclude=[net]) == []
    net.train()
    set_eval(frozen_batchnorms(net))
    assert not net[2].training and net[0].training


# --- PEFT callback == PEFTMixin on a CNN ---------------------------------------------------------


class MixinImageClassifier(PEFTMixin, ImageClassifier):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.peft_config = LoRAConfig(r=4, target_modules=CONV_TARGETS)


def _image_batches(n: int = 12, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader([{"pixel_values": x[i], "labels": y[i]} for i in range(n)], batch_size=batch_size)


def _run_cnn(mixin: bool) -> tuple[nn.Module, list[dict[str, bool]], set[str]]:
    torch.manual_seed(0)
    cls = MixinImageClassifier if mixin else ImageClassifier
    kwargs = dict(backbone="test_efficientnet", num_classes=3, pretrained=False, dropout=0.0,
                  optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    model = cls(**kwargs)
    modes: list[dict[str, bool]] = []
    model.backbone.register_forward_pre_hook(
        lambda m, a: modes.append({n: b.training for n, b in m.named_modules() if isinstance(b, _BatchNorm)}) if model.training else None
    )
    callbacks = [] if mixin else [PEFT(LoRAConfig(r=4, target_modules=CONV_TARGETS), verbose=False)]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, _image_batches(), _image_batches(4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return model, modes, trainable


def test_mixin_and_callback_train_a_cnn_identically_batchnorm_included():
    by_callback, callback_modes, callback_trainable = _run_cnn(mixin=False)
    by_mixin, mixin_modes, mixin_trainable = _run_cnn(mixin=True)
    assert callback_trainable == mixin_trainable and all(".adapters.default." in n for n in mixin_trainable)
    assert len(callback_modes) == len(mixin_modes) == 6
    assert callback_modes == mixin_modes
    assert not any(any(m.values()) for m in mixin_modes)  # every BatchNorm of the frozen base in eval mode, every step
    a, b = by_callback.state_dict(), by_mixin.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # running statistics included
    assert any(p.abs().sum() > 0 for n, p in by_mixin.named_parameters() if n.endswith("lora_B"))


# --- patching ------------------------------------------------------------------------------------


class Counter:
    def step(self, x: int) -> int:
        return x + 1


def test_patch_restores_exactly_instance_or_class_attributes_in_any_order():
    obj = Counter()
    first = patch_method(obj, "step", lambda original: lambda x: 10 * original(x))
    second = patch_method(obj, "step", lambda original: lambda x: original(x) + 5)
    assert obj.step(1) == 25
    first.restore()  # out of order: the outer patch now forwards past it
    assert obj.step(1) == 7
    second.restore()
    assert "step" not in vars(obj) and obj.step(1) == 2

    own = lambda x: -x
    obj.step = own
    with patch_method(obj, "step", lambda original: lambda x: original(x) * 3):
        assert obj.step(2) == -6
    assert vars(obj)["step"] is own

    with Patch(Counter, "step", lambda self, x: 0):
        assert Counter().step(4) == 0
    assert Counter().step(4) == 5 and "step" in vars(Counter)


# --- callbacks in every order --------------------------------------------------------------------

BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class TextModule(pl.LightningModule):
    """A user's module: optimizer over trainable parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bert = BertModel(BertConfig(**BERT), add_pooling_layer=False)
        self.head = nn.Linear(16, 2)
        self.losses: list[float] = []

    def forward(self, x):
        return self.head(self.bert(x).last_hidden_state.mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.02)


def _tokens(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(8, 40, (n, 6), generator=g)
    return DataLoader(TensorDataset(x, torch.arange(n) % 2), batch_size=4)


class Record(pl.Callback):
    def __init__(self) -> None:
        self.masks: list[frozenset[str]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.masks.append(frozenset(n for n, p in pl_module.named_parameters() if p.requires_grad))


def _fit(module: pl.LightningModule, callbacks: list, epochs: int = 2) -> tuple[Record, pl.Trainer]:
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[*callbacks, record], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _tokens())
    return record, trainer


def _groups(trainer: pl.Trainer, module: nn.Module) -> list[tuple]:
    names = {id(p): n for n, p in module.named_parameters()}
    return sorted((g.get("layer_group", ""), g["lr"], g.get("weight_decay"), tuple(sorted(names[id(p)] for p in g["params"])))
                  for g in trainer.optimizers[0].param_groups)


PATCHED = ("forward", "training_step", "configure_model", "_lightning_peft_original_forward", "_lightning_peft_configured")


def _leftovers(module: nn.Module) -> set[str]:
    """Methods the callbacks patch at runtime (and the markers they used to leave), found as instance attributes."""
    return {k for m in module.modules() for k in vars(m) if k in PATCHED}


def test_peft_and_layer_group_callbacks_agree_in_every_order():
    results = []
    for order in itertools.permutations(range(3)):
        made = [PEFT(LoRAConfig(r=4), verbose=False), GradualUnfreezing(every_n_epochs=1, verbose=False), DiscriminativeLR(decay=0.5, verbose=False)]
        module = TextModule()
        record, trainer = _fit(module, [made[i] for i in order])
        results.append((record.masks, _groups(trainer, module), module.losses))
        assert not _leftovers(module)
    first = results[0]
    assert first[0][0] and all(".adapters." in n for mask in first[0] for n in mask)
    for masks, groups, losses in results[1:]:
        assert masks == first[0] and groups == first[1]
        assert losses == pytest.approx(first[2], rel=1e-6, abs=1e-7)


class BuildsInConfigureModel(TextModule):
    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.bert, self.losses = None, []

    def configure_model(self):
        if self.bert is None:
            torch.manual_seed(0)
            self.bert = BertModel(BertConfig(**BERT), add_pooling_layer=False)
            self.head = nn.Linear(16, 2)


def test_two_adapters_on_a_lazily_built_model_in_either_order_leave_no_patch_behind():
    masks = []
    for names in (["a", "b"], ["b", "a"]):
        module = BuildsInConfigureModel()
        record, _ = _fit(module, [PEFT(LoRAConfig(r=2, modules_to_save=None), adapter_name=n, verbose=False) for n in names], epochs=1)
        masks.append(record.masks)
        assert "configure_model" not in vars(module) and not _leftovers(module)
        assert {n.split(".adapters.")[1].split(".")[0] for n in record.masks[0]} == {"a", "b"}  # both active and training
    assert masks[0] == masks[1]


def test_feature_cache_and_distillation_compose_in_either_order_and_restore_the_module():
    teacher = TextModule().eval()
    results = []
    for order in ((0, 1, 2), (2, 1, 0)):
        made = [FreezeBackbone(verbose=False), FeatureCache(), Distillation(teacher, alpha=0.5)]
        module = TextModule()
        record, trainer = _fit(module, [made[i] for i in order])
        results.append((record.masks, module.losses, trainer.callback_metrics["distill/loss"].item()))
        assert made[1].stats.cached_calls > 0
        assert not _leftovers(module)
    assert results[0][0] == results[1][0] and results[0][0][0] == {"head.weight", "head.bias"}
    assert results[0][1] == pytest.approx(results[1][1]) and results[0][2] == pytest.approx(results[1][2])


def test_feature_cache_refuses_any_callback_declaring_it_trains_the_backbone():
    assert coordination.declaring(type("T", (), {"callbacks": [FreezeBackbone(train_top=1), FreezeBackbone()]})(), "trains_backbone")
    with pytest.raises(ValueError, match="GradualUnfreezing trains part of it"):
        _fit(TextModule(), [FeatureCache(), GradualUnfreezing(verbose=False)])
