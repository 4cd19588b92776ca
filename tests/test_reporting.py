"""ParameterSummary table and MetricsJSON file, through a real fit."""

import json

import torch
from helpers import VisionClassifier, fit, image_loader
from lightning.pytorch import Callback
from torch import nn

from lightning_peft import (
    FreezeBackbone,
    MetricsJSON,
    ParameterSummary,
    count_parameters,
)
from lightning_peft.utils.atomic_files import atomic_write_json


def test_count_parameters_counts_tied_weights_once():
    a = nn.Linear(4, 4)
    net = nn.Sequential(a, nn.Linear(4, 4))
    net[1].weight = a.weight
    net[1].bias.requires_grad_(False)
    counts = count_parameters(net)
    assert (counts.trainable, counts.total) == (16 + 4, 16 + 4 + 4)


def test_parameter_summary_reflects_freezing(capsys):
    import torchvision

    model = VisionClassifier(torchvision.models.resnet18(num_classes=3))
    summary = ParameterSummary(depth=2)
    fit(model, image_loader(), [FreezeBackbone(), summary], steps=1)
    fc = 512 * 3 + 3
    assert summary.total.trainable == fc and summary.total.total == sum(p.numel() for p in model.parameters())
    rows = {name: c for name, _, c in summary.rows}
    assert rows["net.fc"].trainable == fc and rows["net.layer1"].trainable == 0
    out = capsys.readouterr().out
    assert "TOTAL" in out and f"{fc:,}" in out and f"{100 * fc / summary.total.total:.2f}" in out


class LoggingClassifier(VisionClassifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(x), y))


class UnfreezeLater(Callback):
    """Freezes the second linear layer at fit start and unfreezes it after the first epoch."""

    def on_fit_start(self, trainer, pl_module):
        pl_module.net[2].requires_grad_(False)

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.net[2].requires_grad_(True)


def test_metrics_json_records_each_validation_and_final(tmp_path):
    torch.manual_seed(0)
    model = LoggingClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3), nn.Linear(3, 3)))
    loader = image_loader()
    callback = MetricsJSON(dirpath=str(tmp_path))
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[UnfreezeLater(), callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, num_sanity_val_steps=1)
    trainer.fit(model, loader, loader)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in data["history"]] == [0, 1]  # sanity check not recorded
    assert data["final"]["val/loss"] == data["history"][-1]["val/loss"]
    assert data["final"]["global_step"] == 4
    run = data["run"]
    assert run["trainable_parameters"] == 3 * 32 * 32 * 3 + 3 and run["total_parameters"] == run["trainable_parameters"] + 12
    assert run["trainable_parameters_at_end"] == run["total_parameters"]  # unfrozen during the fit
    assert len(run["epoch_seconds"]) == 2 and all(t > 0 for t in run["epoch_seconds"])
    assert run["peak_memory_kind"] == "process_rss" and run["peak_memory_bytes"] > 50 * 2**20  # torch alone takes more
    assert run["world_size"] == 1


def test_atomic_write_keeps_old_file_when_the_write_fails(tmp_path, monkeypatch):
    import os

    import pytest

    path = tmp_path / "m.json"
    atomic_write_json(path, {"a": 1})

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left behind
