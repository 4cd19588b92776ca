"""NonFiniteGuard: a NaN/inf loss or gradient never reaches the weights; stop or skip as configured."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import fit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import NonFiniteError, NonFiniteGuard


class Diverging(pl.LightningModule):
    """An unchanged user module whose loss (or only its gradients) turns NaN at the listed steps."""

    def __init__(self, bad_steps=(2,), grads_only: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 2)
        self.bad_steps, self.grads_only = set(bad_steps), grads_only
        self.seen: dict[int, dict[str, torch.Tensor]] = {}  # weights at the start of each step

    def training_step(self, batch, batch_idx):
        self.seen[self.global_step] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        x, y = batch
        loss = F.cross_entropy(self.layer(x), y)
        if self.global_step in self.bad_steps:
            if self.grads_only:  # finite loss, NaN gradient: d sqrt(u)/du at u = 0 times 0
                return loss + 0.0 * (self.layer.weight.sum() - self.layer.weight.sum().detach()).sqrt()
            return loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)), batch_size=4)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_guard_a_nan_loss_corrupts_the_weights():
    module = Diverging()
    fit(module, loader(), steps=4)
    assert not torch.isfinite(module.layer.weight).all()


def test_stop_raises_naming_the_step_and_keeps_the_weights():
    module = Diverging(bad_steps=(2,))
    with pytest.raises(NonFiniteError, match=r"loss \(nan\).*global_step=2.*learning rate.*bf16"):
        fit(module, loader(), callbacks=[NonFiniteGuard(policy="stop")], steps=6)
    assert max(module.seen) == 2
    current = {k: v.detach() for k, v in module.state_dict().items()}
    assert same(current, module.seen[2])  # not updated by the NaN step
    assert torch.isfinite(module.layer.weight).all()


@pytest.mark.parametrize("grads_only", [False, True])
def test_skip_leaves_weights_bit_identical_and_training_continues(grads_only):
    module = Diverging(bad_steps=(2,), grads_only=grads_only)
    guard = NonFiniteGuard(policy="skip", max_skips=3)
    with pytest.warns(UserWarning, match="skipped this optimizer step"):
        trainer = fit(module, loader(), callbacks=[guard], steps=5)
    assert trainer.global_step == 5 and guard.skipped == 1
    assert same(module.seen[3], module.seen[2])  # the skipped step changed nothing
    assert not same(module.seen[4], module.seen[3])  # the next one trains again
    assert torch.isfinite(module.layer.weight).all()


def test_stop_on_non_finite_gradients_names_the_parameter():
    module = Diverging(bad_steps=(1,), grads_only=True)
    with pytest.raises(NonFiniteError, match=r"non-finite gradients.*layer\.weight"):
        fit(module, loader(), callbacks=[NonFiniteGuard()], steps=4)
    assert same({k: v.detach() for k, v in module.state_dict().items()}, module.seen[1])


def test_skip_stops_after_max_skips():
    module = Diverging(bad_steps=(1, 2, 3))
    guard = NonFiniteGuard(policy="skip", max_skips=2)
    with pytest.warns(UserWarning), pytest.raises(NonFiniteError, match=r"after 2 skipped steps \(max_skips=2\)"):
        fit(module, loader(), callbacks=[guard], steps=6)
    assert same({k: v.detach() for k, v in module.state_dict().items()}, module.seen[1])


def test_gradient_accumulation_checks_every_micro_batch():
    module = Diverging(bad_steps=(1,))
    with pytest.raises(NonFiniteError, match="global_step=1"):
        fit(module, loader(), callbacks=[NonFiniteGuard()], steps=3, accumulate_grad_batches=2)


def test_skip_count_is_resumable_state():
    guard = NonFiniteGuard(policy="skip")
    guard.skipped = 3
    other = NonFiniteGuard(policy="skip")
    other.load_state_dict(guard.state_dict())
    assert other.skipped == 3 and guard.state_key == other.state_key != NonFiniteGuard().state_key


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy="ignore"), r"policy='ignore'.*\['stop', 'skip'\]"),
        (dict(max_skips=-1), "max_skips"),
        (dict(max_skips=1.5), "max_skips"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NonFiniteGuard(**kwargs)
