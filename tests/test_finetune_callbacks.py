"""Partial fine-tuning, gradual unfreezing and discriminative LRs on unchanged user modules."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import VisionClassifier, fit, image_loader, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel

from lightning_peft import (
    DiscriminativeLR,
    FinetuningConfig,
    FinetuningMixin,
    FreezeBackbone,
    GradualUnfreezing,
    layer_lr_scales,
)

BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)


class TextModule(pl.LightningModule):
    """A user's module: BERT + head; the optimizer takes trainable parameters only, with a warm-up scheduler."""

    def __init__(self, trainable_only: bool = True, optimizer: str = "adamw", interval: str = "step") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bert = BertModel(BertConfig(**BERT))
        self.bert.pooler.requires_grad_(False)  # unused: the user froze it deliberately
        self.head = nn.Linear(16, 3)
        self.trainable_only, self.optimizer_name, self.interval = trainable_only, optimizer, interval

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.bert(x).last_hidden_state[:, 0]), y)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad] if self.trainable_only else self.parameters()
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
        else:
            opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


def text_loader(n: int = 8, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 50, (n, 6), generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=batch_size)


class EpochProbe(pl.Callback):
    """Snapshots of the weights at the end of every training epoch, and the trainable mask at its start."""

    def __init__(self):
        self.weights, self.masks = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.masks.append({n for n, p in pl_module.named_parameters() if p.requires_grad})

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append(snapshot(pl_module))


def _changed(before, after, prefix):
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


def _trainer(callbacks, **kwargs):
    return pl.Trainer(accelerator="cpu", callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


# --- partial fine-tuning -----------------------------------------------------------------------

def test_partial_finetuning_trains_top_groups_and_keeps_the_rest_bit_identical():
    torch.manual_seed(0)
    model = VisionClassifier(torchvision.models.resnet18(num_classes=3))
    before = snapshot(model)
    fit(model, image_loader(), [FreezeBackbone(train_top=1)])
    after = snapshot(model)
    assert _changed(before, after, "net.layer4.") and _changed(before, after, "net.fc.")
    for prefix in ("net.conv1.", "net.bn1.", "net.layer1.", "net.layer2.", "net.layer3."):
        assert not _changed(before, after, prefix), prefix  # includes BatchNorm running statistics
    assert model.net.layer4[0].bn1.training and not model.net.layer3[0].bn1.training


def test_train_top_larger_than_depth_trains_everything():
    model = TextModule()
    before = snapshot(model)
    _trainer([FreezeBackbone(train_top=99)], max_steps=2).fit(model, text_loader())
    assert _changed(before, snapshot(model), "bert.embeddings.")


def test_two_freezing_callbacks_are_rejected():
    with pytest.raises(ValueError, match="Only one freezing callback"):
        _trainer([FreezeBackbone(), GradualUnfreezing()], max_steps=1).fit(TextModule(), text_loader())


# --- gradual unfreezing ------------------------------------------------------------------------

@pytest.mark.parametrize("trainable_only", [True, False])
def test_gradual_unfreezing_unfreezes_one_group_per_epoch_from_the_top(trainable_only):
    model = TextModule(trainable_only=trainable_only)
    probe = EpochProbe()
    start = snapshot(model)
    _trainer([GradualUnfreezing(every_n_epochs=1), probe], max_epochs=5).fit(model, text_loader())
    order = ["head.", "bert.encoder.layer.2.", "bert.encoder.layer.1.", "bert.encoder.layer.0.", "bert.embeddings."]
    weights = [start, *probe.weights]
    for epoch in range(5):
        for depth, prefix in enumerate(order):
            assert _changed(weights[epoch], weights[epoch + 1], prefix) == (depth <= epoch), (epoch, prefix)
    # the pooler the user froze is in the top group but never made trainable
    assert not any(n.startswith("bert.pooler.") for mask in probe.masks for n in mask)


def test_unfrozen_parameters_join_at_the_scheduled_rate_and_frozen_ones_have_no_state():
    model = TextModule(trainable_only=True)
    trainer = _trainer([GradualUnfreezing(epochs=[2])], max_epochs=3)
    trainer.fit(model, text_loader())
    opt = trainer.optimizers[0]
    groups = {g["layer_group"]: g for g in opt.param_groups}
    assert set(groups) == {"bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2", "head"}
    assert len({g["lr"] for g in opt.param_groups}) == 1  # all follow the user's LinearLR, no multiplier
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    never_trains = {n for n, p in model.named_parameters() if n.startswith("bert.pooler.")}  # frozen by the user
    assert {n for n, p in model.named_parameters() if id(p) in in_optimizer} == {n for n, _ in model.named_parameters()} - never_trains
    assert sum(len(g["params"]) for g in opt.param_groups) == len(in_optimizer)  # no parameter twice
    in_state = {id(p) for p in opt.state}
    assert all(id(p) in in_state for n, p in model.named_parameters() if n.startswith("bert.encoder.layer.2.attention"))
    assert not any(id(p) in in_state for n, p in model.named_parameters() if n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")))


def test_step_milestones():
    model = TextModule()
    probe = EpochProbe()
    masks = []

    class StepProbe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            masks.append(sum(p.requires_grad for p in pl_module.bert.encoder.parameters()))

    _trainer([GradualUnfreezing(steps=[1, 3]), StepProbe(), probe], max_steps=4).fit(model, text_loader())
    per_layer = 16
    assert masks == [0, per_layer, per_layer, 2 * per_layer]


def test_gradual_unfreezing_keeps_frozen_batchnorm_statistics_until_unfrozen():
    torch.manual_seed(0)
    model = VisionClassifier(torchvision.models.resnet18(num_classes=3))
    probe = EpochProbe()
    start = snapshot(model)
    _trainer([GradualUnfreezing(epochs=[1]), probe], max_epochs=2).fit(model, image_loader())
    assert not _changed(start, probe.weights[0], "net.layer4.")  # running_mean included
    assert _changed(probe.weights[0], probe.weights[1], "net.layer4.")
    assert not _changed(start, probe.weights[1], "net.layer3.")


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="either epochs"):
        GradualUnfreezing(epochs=[1], steps=[2])
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        GradualUnfreezing(every_n_epochs=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epochs=[-1, 2]), r"epochs milestone must be >= 0 .* in epochs=\[-1, 2\] \(a negative one would count as already passed\), got -1"),
        (dict(steps=[3, -2]), r"steps milestone must be >= 0 .*got -2"),
        (dict(epochs=[1.5]), r"epochs milestone must be >= 0 \(an integer\)"),
        (dict(initial=-1), r"initial must be >= 0"),
        (dict(groups_per_stage="2"), r"groups_per_stage must be >= 1 \(an integer\).*'2'"),
    ],
)
def test_gradual_unfreezing_refuses_meaningless_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradualUnfreezing(**kwargs)


def test_gradual_unfreezing_refuses_initial_covering_every_group():
    # TextModule has 4 backbone groups (embeddings, 3 encoder layers): initial=4 would train everything from step 0
    with pytest.raises(ValueError, match=r"initial=4 but the model has 4 backbone layer group\(s\) \(bert.embeddings, .*Use initial < 4"):
        _trainer([GradualUnfreezing(initial=4)], max_steps=1).fit(TextModule(), text_loader())
    model = TextModule()
    before = snapshot(model)
    _trainer([GradualUnfreezing(initial=3)], max_steps=1).fit(model, text_loader())  # the largest meaningful value
    assert _changed(before, snapshot(model), "bert.encoder.layer.0.") and not _changed(before, snapshot(model), "bert.embeddings.")


# --- discriminative learning rates ----------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_discriminative_lr_writes_real_rates_that_follow_the_scheduler(optimizer):
    model = TextModule(trainable_only=False, optimizer=optimizer)
    callback = DiscriminativeLR(decay=0.5, head_lr_mult=2.0)
    trainer = _trainer([callback], max_steps=3)
    trainer.fit(model, text_loader())
    opt = trainer.optimizers[0]
    scheduled = trainer.lr_scheduler_configs[0].scheduler
    base = 0.01 if optimizer == "adamw" else 0.05
    factor = 0.5 + 0.5 * 3 / 4  # LinearLR(start_factor=0.5, total_iters=4) after 3 steps
    expected = {"head": 2.0, "bert.encoder.layer.2": 0.5, "bert.encoder.layer.1": 0.25, "bert.encoder.layer.0": 0.125, "bert.embeddings": 0.0625}
    assert callback.scales == pytest.approx(expected)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(base * factor * expected[g["layer_group"]])
        no_decay = all(p.ndim <= 1 for p in g["params"])
        assert g["weight_decay"] == (0.0 if no_decay else (0.1 if optimizer == "adamw" else 0.01))
    assert len(scheduled.base_lrs) == len(opt.param_groups)


@pytest.mark.parametrize("kwargs", [dict(decay=float("nan")), dict(decay=float("inf")), dict(decay=0.0), dict(decay="0.8"), dict(head_lr_mult=float("nan"))])
def test_discriminative_lr_refuses_non_finite_or_non_positive_factors(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"DiscriminativeLR: {name} must be a finite number > 0, got"):
        DiscriminativeLR(**kwargs)


def test_ulmfit_factor_and_timm_style_depth():
    from lightning_peft import layer_groups

    model = TextModule()
    scales = layer_lr_scales(layer_groups(model), decay=1 / 2.6)
    assert list(scales.values()) == pytest.approx([2.6**-4, 2.6**-3, 2.6**-2, 2.6**-1, 1.0])


def test_gradual_unfreezing_with_discriminative_lr_in_either_order():
    results = []
    for callbacks in ([GradualUnfreezing(), DiscriminativeLR(decay=0.5)], [DiscriminativeLR(decay=0.5), GradualUnfreezing()]):
        model = TextModule(trainable_only=True)
        trainer = _trainer(callbacks, max_epochs=2)
        trainer.fit(model, text_loader())
        results.append(([(g["name"], g["lr"], len(g["params"])) for g in trainer.optimizers[0].param_groups], snapshot(model)))
    (groups_a, weights_a), (groups_b, weights_b) = results
    assert groups_a == groups_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    lrs = {name: lr for name, lr, _ in groups_a}
    assert lrs["head"] == pytest.approx(2 * lrs["bert.encoder.layer.2"])


# --- module mixin ----------------------------------------------------------------------------

class MixinModule(FinetuningMixin, TextModule):
    def __init__(self, **finetuning):
        super().__init__()
        self.finetuning = finetuning


def test_mixin_builds_discriminative_groups_and_schedule():
    model = MixinModule(lr=1e-3, layer_decay=0.5, weight_decay=0.05, scheduler="cosine", warmup_ratio=0.0)
    trainer = _trainer([], max_steps=4)
    before = snapshot(model)
    trainer.fit(model, text_loader())
    opt = trainer.optimizers[0]
    factor = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 4))).item()  # cosine at the end: 0
    head = next(g for g in opt.param_groups if g["layer_group"] == "head" and g["weight_decay"])
    assert head["lr"] == pytest.approx(1e-3 * factor, abs=1e-12)
    depth = {"head": 0, "bert.encoder.layer.2": 1, "bert.encoder.layer.1": 2, "bert.encoder.layer.0": 3, "bert.embeddings": 4}
    assert {g["layer_group"] for g in opt.param_groups} == depth.keys()
    for g in opt.param_groups:  # the schedule's base rate of every group: lr · layer_decay ** depth
        assert g["initial_lr"] == pytest.approx(1e-3 * 0.5 ** depth[g["layer_group"]], rel=1e-12), g["layer_group"]
    assert _changed(before, snapshot(model), "bert.embeddings.")


def test_mixin_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"Unknown finetuning option\(s\) \['layer_decy'\]; valid options: .*layer_decay"):
        FinetuningConfig.coerce({"layer_decy": 0.5})
    with pytest.raises(ValueError, match="Unknown optimizer 'lamb'"):
        FinetuningConfig(optimizer="lamb")
