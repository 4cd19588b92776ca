"""L2SP on unchanged modules: zero at the start, grows as weights move, its gradient is exactly the autograd
gradient of loss + penalty (with accumulation and clipping), θ₀ survives resume, and late-unfrozen
parameters are pulled toward their pretrained values."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import L2SP, GradualUnfreezing

ALPHA, BETA = 0.05, 0.01


class Net(pl.LightningModule):
    """A user's module: a 'pretrained' backbone and a new head. With ``in_loss=True`` the penalty is in its loss."""

    def __init__(self, in_loss: bool = False, freeze_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        if freeze_first:
            self.backbone[0].requires_grad_(False)
        self.in_loss = in_loss
        self.pretrained = {n: p.detach().clone() for n, p in self.backbone.named_parameters()}
        self.grads: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.head(self.backbone(x)), y)
        if self.in_loss:
            sp = sum((p - self.pretrained[n]).pow(2).sum() for n, p in self.backbone.named_parameters() if p.requires_grad)
            loss = loss + ALPHA * sp + BETA * sum(p.pow(2).sum() for p in self.head.parameters())
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)


def _loader(batches: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * batches, 6, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (4 * batches,), generator=g)), batch_size=4)


class Penalties(pl.Callback):
    def __init__(self, l2sp: L2SP) -> None:
        self.l2sp, self.values = l2sp, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.values.append(self.l2sp.last_penalty["sp"].item())


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_penalty_is_zero_at_start_and_grows_as_weights_move():
    l2sp = L2SP(alpha=ALPHA, backbone="backbone")
    penalties = Penalties(l2sp)
    model = Net()
    trainer = _trainer([l2sp, penalties], max_steps=6)
    trainer.fit(model, _loader())
    assert penalties.values[0] == 0.0
    assert 0.0 < penalties.values[1] < penalties.values[3] < penalties.values[5]
    expected = ALPHA * sum((p - model.pretrained[n]).pow(2).sum() for n, p in model.backbone.named_parameters())
    assert expected.item() > penalties.values[5]  # it kept growing with the last step
    assert trainer.callback_metrics["l2sp/penalty"].item() == pytest.approx(penalties.values[-1])


def test_gradient_equals_autograd_of_loss_plus_penalty_with_accumulation_and_clipping():
    callback = _trainer([L2SP(alpha=ALPHA, beta=BETA, backbone="backbone")], max_steps=3, accumulate_grad_batches=2, gradient_clip_val=0.5)
    autograd = _trainer([], max_steps=3, accumulate_grad_batches=2, gradient_clip_val=0.5)
    a, b = Net(freeze_first=True), Net(in_loss=True, freeze_first=True)
    callback.fit(a, _loader(6))
    autograd.fit(b, _loader(6))
    assert len(a.grads) == len(b.grads) == 3
    for ga, gb in zip(a.grads, b.grads):
        assert ga.keys() == gb.keys() and "backbone.0.weight" not in ga  # frozen: no gradient, no θ₀
        for name in ga:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-7)
    assert any(g["backbone.2.weight"].abs().sum() > 0 for g in a.grads)
    for (_name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    l2sp = callback.callbacks[0]
    assert set(l2sp.reference) == {"backbone.2.weight", "backbone.2.bias"}  # only what trains, not the head


def test_resume_keeps_pulling_toward_the_pretrained_values(tmp_path):
    # Uninterrupted: 2 epochs of 2 steps.
    full = L2SP(alpha=ALPHA, beta=BETA, backbone="backbone")
    full_penalties = Penalties(full)
    uninterrupted = Net()
    _trainer([full, full_penalties], max_epochs=2).fit(uninterrupted, _loader(2))
    # Interrupted after epoch 0, resumed in a fresh process-like setting: new module, new callback.
    first = L2SP(alpha=ALPHA, beta=BETA, backbone="backbone")
    trainer = _trainer([first], max_epochs=1)
    trainer.fit(Net(), _loader(2))
    trainer.save_checkpoint(tmp_path / "epoch0.ckpt")

    resumed = L2SP(alpha=ALPHA, beta=BETA, backbone="backbone")
    resumed_penalties = Penalties(resumed)
    module = Net()
    _trainer([resumed, resumed_penalties], max_epochs=2).fit(module, _loader(2), ckpt_path=tmp_path / "epoch0.ckpt")
    assert resumed_penalties.values[0] > 0  # θ₀ is the pretrained value, not the value at resume
    assert resumed_penalties.values == pytest.approx(full_penalties.values[2:], rel=1e-6)
    for name, ref in resumed.reference.items():
        torch.testing.assert_close(ref, module.pretrained[name.removeprefix("backbone.")])
    for pa, pb in zip(module.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_late_unfrozen_parameters_get_their_pretrained_values_as_reference():
    l2sp = L2SP(alpha=ALPHA, backbone="backbone")
    model = Net()
    unfreezing = GradualUnfreezing(epochs=[1], groups=["backbone.0", "backbone.2"], backbone="backbone", verbose=False)
    _trainer([unfreezing, l2sp], max_epochs=2).fit(model, _loader(2))
    assert set(l2sp.reference) == {"backbone.2.weight", "backbone.2.bias"}  # the lower group never trained
    for name, ref in l2sp.reference.items():
        torch.testing.assert_close(ref, model.pretrained[name.removeprefix("backbone.")])
    assert not torch.equal(model.backbone[2].weight, model.pretrained["2.weight"])  # it did move


def test_negative_weights_are_rejected():
    with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
        L2SP(alpha=-1.0)


def test_hydra_l2sp_choice_trains(compose, tiny_bert_dir):
    from conftest import tiny_overrides
    from lightning_peft.cli.train import train

    metrics = train(compose("finetune=l2sp", *tiny_overrides(tiny_bert_dir), "finetune.alpha=0.5", "finetune.beta=0.01"))
    assert metrics["l2sp/penalty"] > metrics["l2sp/sp"] > 0.0  # the head's L2 adds to the backbone's pull
