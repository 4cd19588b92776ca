"""Replay: old examples mixed into every training batch of an unchanged module, at the configured share and rate.

The data carry each example's id in feature 0 (new examples 0.., old ones 1000..), so every test reads
from the batches the module actually trained on which examples were there.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from two_ranks import worker_env

from lightning_peft import Replay, ReplaySampler
from lightning_peft.data.replay import replay_count
from lightning_peft.losses.distillation import soft_target_loss

OLD_ID = 1000


class Ids(Dataset):
    """``(x, y)`` with ``x[0]`` the example's id and ``x[1:]`` fixed random features."""

    def __init__(self, n: int, first_id: int = 0, classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.cat([torch.arange(first_id, first_id + n, dtype=torch.float32)[:, None], torch.randn(n, 4, generator=g)], 1)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class DictIds(Ids):
    def __getitem__(self, i: int):
        return {"x": self.x[i], "labels": self.y[i]}


class UserModule(pl.LightningModule):
    """A user's classifier that knows nothing of Replay; it records the ids and losses of each batch."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)
        self.lr = lr
        self.seen: list[list[int]] = []
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x[:, 1:])

    def training_step(self, batch, batch_idx):
        x, y = (batch["x"], batch["labels"]) if isinstance(batch, dict) else batch
        self.seen.append(x[:, 0].long().tolist())
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fit(module, loader, callbacks, epochs=2, **kwargs):
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)
    trainer.fit(module, loader)
    return trainer


def _split(batch: list[int]) -> tuple[list[int], list[int]]:
    return [i for i in batch if i < OLD_ID], [i - OLD_ID for i in batch if i >= OLD_ID]


def test_replay_count():
    assert [replay_count(n, 0.25) for n in (12, 6, 3)] == [4, 2, 1]
    assert replay_count(16, 0.0) == 0
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
            replay_count(16, bad)


def test_batches_hold_the_ratio_and_new_data_is_unchanged():
    module = UserModule()
    loader = DataLoader(Ids(30), batch_size=12, shuffle=True)
    _fit(module, loader, [Replay(Ids(25, OLD_ID), ratio=0.25)], epochs=2)
    assert len(module.seen) == 2 * 3  # the new loader's length: batches of 12, 12, 6
    for batch in module.seen:
        new, old = _split(batch)
        assert len(old) == replay_count(len(new), 0.25)
        assert batch[len(new):] == [OLD_ID + j for j in old]  # old examples come last
        assert len(old) / len(batch) == pytest.approx(0.25, abs=0.01)
    for epoch in range(2):  # each epoch still sees every new example exactly once
        new = sorted(i for b in module.seen[3 * epoch : 3 * epoch + 3] for i in _split(b)[0])
        assert new == list(range(30))


def test_every_old_example_seen_at_the_same_rate():
    module = UserModule()
    loader = DataLoader(Ids(40), batch_size=10, shuffle=True)
    _fit(module, loader, [Replay(Ids(7, OLD_ID), count=3)], epochs=3)  # 12 batches x 3 = 36 draws of 7 examples
    drawn = [j for b in module.seen for j in _split(b)[1]]
    assert len(drawn) == 36
    counts = collections.Counter(drawn)
    assert set(counts) == set(range(7)) and min(counts.values()) == 5 and max(counts.values()) == 6
    for p in range(5):  # pass by pass: a permutation of all old examples, then a fresh one
        assert sorted(drawn[7 * p : 7 * p + 7]) == list(range(7))
    assert drawn[:7] != drawn[7:14]


def test_several_old_data_sets_are_one_replay_set():
    module = UserModule()
    _fit(module, DataLoader(Ids(20), batch_size=5), [Replay([Ids(3, OLD_ID), Ids(3, OLD_ID + 3, seed=1)], count=3)], epochs=1)
    drawn = [j for b in module.seen for j in _split(b)[1]]
    assert sorted(drawn[:6]) == list(range(6)) and sorted(drawn[6:]) == list(range(6))


def test_sampler_shards_are_disjoint_and_cover_every_example():
    for size, world in ((10, 2), (11, 2), (9, 4)):
        samplers = [ReplaySampler(size, seed=3, num_replicas=world, rank=r) for r in range(world)]
        for _ in range(3):  # three passes
            shards = [s.draw(samplers[0].shard_size) for s in samplers]
            flat = [i for shard in shards for i in shard]
            assert set(flat) == set(range(size))
            if size % world == 0:
                assert len(flat) == len(set(flat))  # disjoint
            else:
                assert len(flat) - len(set(flat)) == world * samplers[0].shard_size - size  # only the wrap-padding repeats


def test_sampler_state_resumes_the_stream():
    a = ReplaySampler(13, seed=5)
    a.draw(20)
    b = ReplaySampler(13, seed=5)
    b.load_state_dict(a.state_dict())
    assert a.draw(17) == b.draw(17)
    with pytest.raises(ValueError, match="size=13 but this run has size=12"):
        ReplaySampler(12, seed=5).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.0}, r"ratio must be in \[0, 1\)"),
        ({"ratio": -0.2}, r"ratio must be in \[0, 1\)"),
        ({}, "exactly one of ratio"),
        ({"ratio": 0.2, "count": 2}, "exactly one of ratio"),
        ({"count": -1}, "count must be an integer >= 0"),
        ({"ratio": 0.2, "soft_weight": -1.0}, "soft_weight must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Replay(Ids(3, OLD_ID), **kwargs)


def test_empty_replay_set_is_an_error():
    with pytest.raises(ValueError, match="no replay data set"):
        Replay([], ratio=0.2)
    with pytest.raises(ValueError, match="replay data sets are empty"):
        _fit(UserModule(), DataLoader(Ids(8), batch_size=4), [Replay(Ids(0, OLD_ID), ratio=0.2)], epochs=1)


def test_mismatched_batch_structure_is_an_error():
    with pytest.raises(ValueError, match=r"replay data set 0 yields a dict with keys \['labels', 'x'\] but the training data yields a tuple of 2"):
        _fit(UserModule(), DataLoader(Ids(8), batch_size=4), [Replay(DictIds(4, OLD_ID), ratio=0.2)], epochs=1)


def test_module_is_unchanged_after_fit():
    module = UserModule()
    trainer = _fit(module, DataLoader(Ids(8), batch_size=4), [Replay(Ids(4, OLD_ID), count=1, soft_weight=1.0)], epochs=1)
    assert "training_step" not in vars(module)
    assert "dataloader" not in vars(trainer.fit_loop._data_source)


def test_soft_targets_are_the_model_before_fit_on_the_old_examples():
    module = UserModule(lr=0.5)
    old = DictIds(6, OLD_ID)
    with torch.no_grad():
        before = module(old.x).clone()
    soft_logged: list[float] = []

    class Log(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            soft_logged.append(trainer.callback_metrics["replay/soft"].item())

    replay = Replay(old, count=2, soft_weight=2.0, temperature=1.5)
    _fit(module, DataLoader(DictIds(12), batch_size=4), [replay, Log()], epochs=1)
    assert torch.equal(replay.targets, before)
    assert soft_logged[0] == pytest.approx(0.0, abs=1e-7)  # step 0: the model is still the one that made the targets
    assert soft_logged[-1] > 1e-4  # later steps: the model moved away from them


def test_soft_loss_value():
    """The loss trained on is the module's loss + weight · soft_target_loss(the batch's old rows, their targets)."""
    module = UserModule(lr=0.0)
    replay = Replay(Ids(4, OLD_ID), count=2, soft_weight=3.0, temperature=2.0)
    replay.targets = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))  # as if restored from a checkpoint
    got: list[tuple[float, float, float]] = []

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            x, _ = batch
            with torch.no_grad():
                soft = soft_target_loss(pl_module(x)[-2:], replay.targets[replay.batch_replay], 2.0).item()
            got.append((outputs["loss"].item(), pl_module.losses[-1], soft))

    _fit(module, DataLoader(Ids(8), batch_size=4), [replay, Check()], epochs=1)
    assert len(got) == 2
    for loss, task, soft in got:
        assert soft > 0.01
        assert loss == pytest.approx(task + 3.0 * soft, rel=1e-5)


@pytest.mark.parametrize(("limit", "workers"), [(None, 0), (2, 1)])
def test_resume_draws_the_same_old_examples(tmp_path, limit, workers):
    """Fit 3 epochs; fit 2, then resume from the epoch-2 checkpoint for the third: equal losses and batches.

    With ``limit_train_batches=2`` of 3 and a worker, the loader reads a batch ahead that is never
    trained on: its old examples must be drawn again next epoch, in both runs.
    """

    def run(epochs, ckpt=None):
        module = UserModule()
        callbacks = [Replay(Ids(7, OLD_ID), count=3, seed=4), pl.callbacks.ModelCheckpoint(dirpath=tmp_path / str(epochs), save_last=True)]
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks, limit_train_batches=limit)
        trainer.fit(module, DataLoader(Ids(10), batch_size=4, num_workers=workers), ckpt_path=ckpt)
        return module

    full = run(3)
    run(2)
    resumed = run(3, tmp_path / "2" / "last.ckpt")
    per_epoch = limit or 3
    assert resumed.seen == full.seen[-per_epoch:]
    assert resumed.losses == pytest.approx(full.losses[-per_epoch:], rel=1e-6)
    drawn = [j for b in full.seen for j in _split(b)[1]]
    assert sorted(drawn[:7]) == list(range(7))  # no old example skipped by the read-ahead


def test_ddp_two_processes_draw_disjoint_shards(tmp_path):
    """A real 2-process CPU DDP fit (tests/ddp_replay_worker.py): each rank's old examples are its own shard of each pass."""
    worker = Path(__file__).with_name("ddp_replay_worker.py")
    env = worker_env()
    proc = subprocess.run([sys.executable, str(worker), str(tmp_path)], env=env, cwd=worker.parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"DDP worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 2 * 3  # 24 new examples / 2 ranks / batch 4 = 3 batches per epoch, 2 epochs
    old_per_rank = []
    for batches in seen:
        for batch in batches:
            new, old = _split(batch)
            assert len(new) == 4 and len(old) == 2  # ratio 1/3
        old_per_rank.append([j for b in batches for j in _split(b)[1]])
    for epoch in range(2):  # the new data: each rank its half, together all of it, every epoch
        halves = [{i for b in batches[3 * epoch : 3 * epoch + 3] for i in _split(b)[0]} for batches in seen]
        assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(24))
    drawn = old_per_rank
    assert len(drawn[0]) == 12  # 6 batches x 2: two passes over each 6-example shard of the 12 old examples
    for p in range(2):
        shards = [set(d[6 * p : 6 * p + 6]) for d in drawn]
        assert len(shards[0]) == len(shards[1]) == 6
        assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(12))


class BatchSizes(pl.Callback):
    """Records the size of each training batch (used by the Hydra job test through ``+callbacks.sizes``)."""

    sizes: list[int] = []  # noqa: RUF012  (one list shared with the test that reads it)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        BatchSizes.sizes.append(len(batch["labels"]))


def test_hydra_job_replays_through_the_config(compose, tiny_bert_dir):
    from conftest import tiny_overrides
    from lightning_peft.cli.train import train

    BatchSizes.sizes = []
    cfg = compose("finetune=replay", "finetune.ratio=0.25", *tiny_overrides(tiny_bert_dir), "data.batch_size=6", "trainer.max_steps=3",
                  "+callbacks.sizes._target_=test_replay.BatchSizes")
    metrics = train(cfg)
    assert metrics["train/loss"] > 0
    assert BatchSizes.sizes == [8, 8, 8]  # 6 new + round(6 · 0.25 / 0.75) = 2 old
