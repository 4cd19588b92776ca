"""Resume equivalence: GradualUnfreezing (alone or with DiscriminativeLR) resumed from a checkpoint goes on
exactly as the uninterrupted run, on unchanged user modules.

Run A trains without interruption and checkpoints as it goes; run B builds a fresh module (initialised
with another seed, so everything it ends with must come from the checkpoint) and fresh callbacks, and
resumes from a checkpoint taken mid-schedule (some layer groups unfrozen, some still frozen). B must
see A's ``requires_grad`` mask right after the restore (lightning#21901: resuming re-froze the backbone
and never restored it), then the same mask, BatchNorm modes, data, losses and learning rates at every
step, and end with A's param groups, optimizer state, scheduler state and weights.

Models have no dropout: Lightning does not checkpoint the global RNG, so dropout would differ by design.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel

from lightning_peft import DiscriminativeLR, GradualUnfreezing

pytestmark = [
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),  # B resumes without ModelCheckpoint
    pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode"),  # frozen BatchNorm, on purpose
]

BERT = dict(
    vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
# Layer groups as parameter-name prefixes, head first (depth 0), down to the stem/embeddings.
BERT_GROUPS = (("head.",), ("bert.encoder.layer.2.",), ("bert.encoder.layer.1.",), ("bert.encoder.layer.0.",), ("bert.embeddings.",))
RESNET_GROUPS = (("net.fc.",), ("net.layer4.",), ("net.layer3.",), ("net.layer2.",), ("net.layer1.",), ("net.conv1.", "net.bn1."))


# --- what a user writes (knows nothing of lightning_peft) ------------------------------------------

class UserModule(pl.LightningModule):
    """A model, a loss, an optimizer and a scheduler; records the loss and the samples of every step."""

    def __init__(self, optimizer: str, trainable_only: bool, scheduler: str, interval: str, total: int) -> None:
        super().__init__()
        self.optimizer_name, self.trainable_only = optimizer, trainable_only
        self.scheduler_name, self.interval, self.total = scheduler, interval, total
        self.losses: dict[int, torch.Tensor] = {}  # global step -> training loss
        self.samples: dict[int, torch.Tensor] = {}  # global step -> indices of the samples trained on

    def training_step(self, batch, batch_idx):
        index, x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses[self.global_step] = loss.detach().clone()
        self.samples[self.global_step] = index.clone()
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad] if self.trainable_only else self.parameters()
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
        else:
            opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler
        if self.scheduler_name == "linear":  # warm-up
            scheduler = sched.LinearLR(opt, start_factor=0.25, total_iters=self.total)
        elif self.scheduler_name == "cosine":
            scheduler = sched.CosineAnnealingLR(opt, T_max=self.total)
        else:
            scheduler = sched.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=self.total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


class TextModule(UserModule):
    def __init__(self, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(seed)
        self.bert = BertModel(BertConfig(**BERT))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.bert(x).last_hidden_state[:, 0])


class VisionModule(UserModule):
    def __init__(self, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(seed)
        self.net = torchvision.models.resnet18(num_classes=3)

    def forward(self, x):
        return self.net(x)


class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch: Lightning saves ``state_dict()`` in checkpoints.

    Its position is the number of batches handed out in the current epoch (Lightning does not fetch
    ahead from a loader with a length; the samples each step trained on are asserted, so an
    off-by-one here fails the test rather than hiding).
    """

    def __init__(self, dataset: TensorDataset, batch_size: int) -> None:
        super().__init__(dataset, batch_size=batch_size, shuffle=False)
        self.handed_out = 0
        self.resume_at = 0

    def __iter__(self):
        start, self.resume_at = self.resume_at, 0
        self.handed_out = start
        for i, batch in enumerate(super().__iter__()):
            if i >= start:
                self.handed_out = i + 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.handed_out}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resume_at = state_dict["position"]


def text_data(n: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.arange(n), torch.randint(0, 50, (n, 6), generator=g), torch.randint(0, 3, (n,), generator=g))


def image_data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.arange(n), torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g))


# --- observing a run -------------------------------------------------------------------------------

def trainable(module: nn.Module) -> frozenset[str]:
    return frozenset(n for n, p in module.named_parameters() if p.requires_grad)


class Probe(pl.Callback):
    """The trainable mask and BatchNorm modes as training sees them (placed after the lightning_peft callbacks)."""

    def __init__(self) -> None:
        self.restored: frozenset[str] | None = None  # at train start: after any checkpoint was restored
        self.masks: dict[int, frozenset[str]] = {}  # global step -> mask the step trains with
        self.bn_training: dict[int, frozenset[str]] = {}  # global step -> BatchNorm layers in train mode
        self.masks_after: dict[int, frozenset[str]] = {}  # global step -> mask after the step (what a checkpoint saves)

    def on_train_start(self, trainer, pl_module):
        self.restored = trainable(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.masks[trainer.global_step] = trainable(pl_module)
        self.bn_training[trainer.global_step] = frozenset(
            n for n, m in pl_module.named_modules() if isinstance(m, _BatchNorm) and m.training
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.masks_after[trainer.global_step] = trainable(pl_module)


@dataclass(frozen=True)
class Case:
    id: str
    module: Callable[..., UserModule]
    data: Callable[[], TensorDataset]
    batch_size: int
    module_kwargs: dict[str, Any]
    callbacks: Callable[[], list[pl.Callback]]
    checkpoint: Callable[[Path], ModelCheckpoint]
    resume_from: str  # checkpoint file of run A that run B resumes from
    groups: tuple[tuple[str, ...], ...]  # layer groups as name prefixes, head first
    trained_by_checkpoint: int  # groups of depth <= this have trained when the checkpoint is saved
    trained_by_end: int  # ... and by the end; deeper ones stay bit-identical
    max_epochs: int = 4
    resumable_loader: bool = False


@dataclass
class Run:
    module: UserModule
    trainer: pl.Trainer
    probe: Probe
    initial: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor] = field(default_factory=dict)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run(case: Case, seed: int, checkpoint_dir: Path | None = None, ckpt_path: Path | None = None) -> Run:
    pl.seed_everything(0, verbose=False)
    module = case.module(seed=seed, **case.module_kwargs)
    initial = snapshot(module)
    probe = Probe()
    callbacks = case.callbacks() + [probe] + ([case.checkpoint(checkpoint_dir)] if checkpoint_dir else [])
    data = case.data()
    loader = ResumableLoader(data, case.batch_size) if case.resumable_loader else DataLoader(data, batch_size=case.batch_size)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=case.max_epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=checkpoint_dir is not None, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return Run(module, trainer, probe, initial, snapshot(module))


def param_groups(result: Run) -> list[dict[str, Any]]:
    """Every hyperparameter of every group (name, lr, initial_lr, weight_decay, momentum, ...), parameters by name."""
    names = {id(p): n for n, p in result.module.named_parameters()}
    return [
        {k: (tuple(names[id(p)] for p in v) if k == "params" else v) for k, v in g.items()}
        for g in result.trainer.optimizers[0].param_groups
    ]


def optimizer_state(result: Run) -> dict[str, dict[str, Any]]:
    names = {id(p): n for n, p in result.module.named_parameters()}
    return {names[id(p)]: state for p, state in result.trainer.optimizers[0].state.items()}


def assert_equal_tensors(expected: dict[str, Any], actual: dict[str, Any], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=lambda m, key=key: f"{what} {key}: {m}")


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> bool:
    keys = [k for k in before if k.startswith(prefixes)]
    assert keys, prefixes
    return any(not torch.equal(before[k], after[k]) for k in keys)


# --- cases -----------------------------------------------------------------------------------------

def every_epoch(path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=path, filename="{epoch}-{step}", every_n_epochs=1, save_top_k=-1)


def every_3_steps(path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=path, filename="{step}", every_n_train_steps=3, save_top_k=-1)


# 2 steps per epoch, 4 epochs, resumed from the checkpoint after epoch index 1 (mid-schedule); in
# every case the deepest group never trains, so it must stay bit-identical through the restore.
CASES = [
    Case(
        "bert-unfreeze+discriminative-adamw-all-params-warmup-per-step",
        TextModule, text_data, 4,
        dict(optimizer="adamw", trainable_only=False, scheduler="linear", interval="step", total=8),
        lambda: [GradualUnfreezing(every_n_epochs=1, verbose=False), DiscriminativeLR(decay=0.5, verbose=False)],
        every_epoch, "epoch=1-step=4.ckpt", BERT_GROUPS, 1, 3,
    ),
    Case(
        "bert-unfreeze-sgd-trainable-only-onecycle-per-step",
        TextModule, text_data, 4,
        dict(optimizer="sgd", trainable_only=True, scheduler="onecycle", interval="step", total=8),
        lambda: [GradualUnfreezing(every_n_epochs=1, verbose=False)],
        every_epoch, "epoch=1-step=4.ckpt", BERT_GROUPS, 1, 3,
    ),
    Case(
        "resnet-discriminative+unfreeze-sgd-trainable-only-cosine-per-epoch",
        VisionModule, image_data, 8,
        dict(optimizer="sgd", trainable_only=True, scheduler="cosine", interval="epoch", total=4),
        lambda: [DiscriminativeLR(decay=0.5, verbose=False), GradualUnfreezing(every_n_epochs=1, verbose=False)],
        every_epoch, "epoch=1-step=4.ckpt", RESNET_GROUPS, 1, 3,
    ),
    Case(
        "resnet-unfreeze-two-groups-per-stage-adamw-all-params-onecycle-per-step",
        VisionModule, image_data, 8,
        dict(optimizer="adamw", trainable_only=False, scheduler="onecycle", interval="step", total=8),
        lambda: [GradualUnfreezing(epochs=[1, 3], groups_per_stage=2, verbose=False)],
        every_epoch, "epoch=1-step=4.ckpt", RESNET_GROUPS, 2, 4,
    ),
    # Mid-epoch: 4 steps per epoch, 2 epochs, stages at steps 2, 3 and 5; resume from step 3, in the
    # middle of epoch 0, where B's very first step unfreezes a group.
    Case(
        "bert-step-milestones-mid-epoch-unfreeze+discriminative-adamw-trainable-only-cosine",
        TextModule, text_data, 2,
        dict(optimizer="adamw", trainable_only=True, scheduler="cosine", interval="step", total=8),
        lambda: [GradualUnfreezing(steps=[2, 3, 5], verbose=False), DiscriminativeLR(decay=0.5, head_lr_mult=2.0, verbose=False)],
        every_3_steps, "step=3.ckpt", BERT_GROUPS, 1, 3, max_epochs=2, resumable_loader=True,
    ),
]
RESNET = CASES[2]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Run A of a case (cached: the checks below share it), with its checkpoint folder."""
    cache: dict[str, tuple[Run, Path]] = {}

    def get(case: Case) -> tuple[Run, Path]:
        if case.id not in cache:
            folder = tmp_path_factory.mktemp("ckpt")
            cache[case.id] = (run(case, seed=0, checkpoint_dir=folder), folder)
        return cache[case.id]

    return get


# --- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_resumed_run_continues_exactly_like_the_uninterrupted_one(case, uninterrupted):
    a, folder = uninterrupted(case)
    ckpt_path = folder / case.resume_from
    checkpoint = torch.load(ckpt_path, weights_only=False)
    at, saved = checkpoint["global_step"], checkpoint["state_dict"]
    total = case.module_kwargs["total"] if case.module_kwargs["interval"] == "step" else 2 * case.max_epochs
    assert sorted(a.module.losses) == list(range(total))

    b = run(case, seed=1, ckpt_path=ckpt_path)

    # the fresh module really was different: everything B ends with comes from the checkpoint
    assert changed(a.initial, b.initial, case.groups[-1])
    assert sorted(b.module.losses) == list(range(at, total))

    # requires_grad right after the restore is A's at the checkpoint: mid-schedule, neither all frozen nor all trainable
    expected = a.probe.masks_after[at]
    assert b.probe.restored == expected
    assert a.probe.masks[0] < expected < frozenset(n for n, _ in a.module.named_parameters())

    # then every step trains the same parameters, BatchNorm modes and samples, with the same loss
    for step in range(at, total):
        assert b.probe.masks[step] == a.probe.masks[step], step
        assert b.probe.bn_training[step] == a.probe.bn_training[step], step
        assert torch.equal(b.module.samples[step], a.module.samples[step]), step
    torch.testing.assert_close(
        torch.stack([b.module.losses[s] for s in range(at, total)]),
        torch.stack([a.module.losses[s] for s in range(at, total)]), rtol=0, atol=0,
    )
    assert len({a.module.losses[s].item() for s in range(total)}) == total  # the losses do move

    # same optimizer at the end: groups (names, lrs, weight decays, parameters), state, schedule
    assert param_groups(b) == param_groups(a)
    assert len(param_groups(a)) > 1
    assert_equal_tensors(optimizer_state(a), optimizer_state(b), "optimizer state")
    assert b.trainer.lr_scheduler_configs[0].scheduler.state_dict() == a.trainer.lr_scheduler_configs[0].scheduler.state_dict()

    # same weights and buffers at the end
    assert_equal_tensors(a.final, b.final, "final state")

    # non-trivial: unfrozen groups trained on each side of the checkpoint, the others stayed bit-identical
    for depth, prefixes in enumerate(case.groups):
        assert changed(a.initial, saved, prefixes) == (depth <= case.trained_by_checkpoint), prefixes
        assert changed(saved, b.final, prefixes) == (depth <= case.trained_by_end), prefixes
    # frozen parameters never got optimizer state, in A as in B
    deepest = case.groups[-1]
    assert not any(name.startswith(deepest) for name in optimizer_state(b))


def test_without_the_restored_state_the_mask_after_restore_would_differ(uninterrupted, tmp_path):
    """Control: drop GradualUnfreezing's state from the checkpoint and the mask right after the restore is the
    initial one (head only), not A's; the next epoch start re-derives it from the epoch."""
    case = CASES[0]
    a, folder = uninterrupted(case)
    checkpoint = torch.load(folder / case.resume_from, weights_only=False)
    dropped = [k for k in checkpoint["callbacks"] if k.startswith("GradualUnfreezing")]
    assert len(dropped) == 1
    del checkpoint["callbacks"][dropped[0]]
    torch.save(checkpoint, tmp_path / "stateless.ckpt")

    b = run(case, seed=1, ckpt_path=tmp_path / "stateless.ckpt")

    at = checkpoint["global_step"]
    assert b.probe.restored == a.probe.masks[0] != a.probe.masks_after[at]
    assert b.probe.masks[at] == a.probe.masks[at]


def test_batchnorm_of_an_unfrozen_group_trains_again(uninterrupted):
    a, folder = uninterrupted(RESNET)
    saved = torch.load(folder / RESNET.resume_from, weights_only=False)["state_dict"]
    # net.layer4 unfreezes at epoch 1 (steps 2-3): its BatchNorm layers should then be in train mode
    assert "net.layer4.0.bn1" in a.probe.bn_training[2]
    assert not torch.equal(a.initial["net.layer4.0.bn1.running_mean"], saved["net.layer4.0.bn1.running_mean"])
