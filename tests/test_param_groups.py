"""regroup_optimizer: every torch scheduler keeps each group's multiplier; adoption by identity; no duplicates."""

import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.optim import lr_scheduler as sched

from lightning_peft import Placement, regroup_optimizer

SCALES = {"a": 1.0, "b": 0.5, "c": 0.125}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2))


def _plan(name, param):
    return Placement("abc"[int(name.split(".")[0])], SCALES["abc"[int(name.split(".")[0])]])


SCHEDULERS = {
    "LinearLR warm-up": lambda o: sched.LinearLR(o, start_factor=0.1, total_iters=5),
    "CosineAnnealingLR": lambda o: sched.CosineAnnealingLR(o, T_max=10),
    "OneCycleLR": lambda o: sched.OneCycleLR(o, max_lr=0.1, total_steps=12),
    "LambdaLR": lambda o: sched.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "StepLR": lambda o: sched.StepLR(o, step_size=3, gamma=0.5),
    "SequentialLR": lambda o: sched.SequentialLR(
        o, [sched.LinearLR(o, start_factor=0.2, total_iters=3), sched.CosineAnnealingLR(o, T_max=8)], milestones=[3]
    ),
    "CyclicLR": lambda o: sched.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_each_group_follows_the_schedule_times_its_multiplier(name, optimizer):
    def make(params):
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)
        return torch.optim.AdamW(params, lr=0.05)

    reference_model, model = _model(), _model()
    reference = make(reference_model.parameters())
    reference_sched = SCHEDULERS[name](reference)
    opt = make(model.parameters())
    scheduler = SCHEDULERS[name](opt)
    regroup_optimizer(opt, model, _plan, [scheduler])

    assert [g["layer_group"] for g in opt.param_groups] == ["a", "b", "c"]
    x = torch.randn(4, 3)
    for _ in range(12):
        for o, m in ((reference, reference_model), (opt, model)):
            o.zero_grad()
            m(x).sum().backward()
            o.step()
        reference_sched.step()
        scheduler.step()
        expected = reference.param_groups[0]["lr"]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected * s for s in SCALES.values()], rel=1e-6)


def test_missing_parameters_are_adopted_by_identity_not_value():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    nn.init.zeros_(model[0].bias)
    nn.init.zeros_(model[1].bias)  # equal by value to model[0].bias
    opt = torch.optim.SGD([model[0].weight, model[0].bias], lr=0.1)
    # Lightning's BaseFinetuning compares by value and wrongly finds the distinct zero bias already present.
    assert BaseFinetuning.filter_on_optimizer(opt, [model[1].bias]) == []

    regroup_optimizer(opt, model, lambda n, p: Placement(n.split(".")[0]), adopt=model.parameters())
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == 4 and {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    assert any(p is model[1].bias for p in opt.param_groups[1]["params"])


def test_frozen_parameters_get_no_optimizer_state_and_weight_decay_override():
    model = _model()
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.3)
    regroup_optimizer(opt, model, lambda n, p: Placement(n[0], 1.0, 0.0 if p.ndim == 1 else None))
    assert [(g["name"], g["weight_decay"]) for g in opt.param_groups][:2] == [("0", 0.3), ("0/no_decay", 0.0)]
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert not any(p in opt.state for p in model[0].parameters())
    assert all(p in opt.state for p in model[2].parameters())


def test_names_are_unique_for_lightning_lr_monitor():
    model = _model()
    opt = torch.optim.SGD([{"params": [model[0].weight, model[1].weight]}, {"params": [model[0].bias, model[1].bias, *model[2].parameters()]}], lr=0.1)
    regroup_optimizer(opt, model, lambda n, p: Placement("block" if n[0] != "2" else "head"))
    names = [g["name"] for g in opt.param_groups]
    assert names == ["block", "block#1", "head"]
