"""What ``train(cfg)`` checks before it trains: every output folder is writable (run directory, PEFT
``save_dir``, ``FeatureCache`` cache), failing at setup with the component named rather than after
training; and ``logger=none`` runs with the default callbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import open_dict

import lightning_peft.cli.train as train_module
from conftest import tiny_overrides
from lightning_peft.cli.train import train
from lightning_peft.utils.atomic_files import ensure_writable_dir


@pytest.fixture
def blocked(tmp_path) -> Path:
    """A folder path that cannot be created, even by root: its parent is a regular file."""
    (tmp_path / "afile").write_text("in the way")
    return tmp_path / "afile" / "sub"


def test_ensure_writable_dir_creates_and_probes(tmp_path, blocked):
    folder = ensure_writable_dir(tmp_path / "new" / "deeper", "run directory")
    assert folder.is_dir() and list(folder.iterdir()) == []  # the probe file is gone
    with pytest.raises(PermissionError, match=rf"^PEFT save_dir: cannot write to '{blocked}' \(Not a directory"):
        ensure_writable_dir(blocked, "PEFT save_dir")


def test_unwritable_run_directory_fails_before_anything_is_built(compose, blocked, tiny_bert_dir, monkeypatch):
    cfg = compose(*tiny_overrides(tiny_bert_dir))
    with open_dict(cfg):
        cfg.paths.output_dir = str(blocked)

    def built(*args, **kwargs):
        raise AssertionError("data or model built before the run directory was checked")

    monkeypatch.setattr(train_module, "instantiate", built)
    with pytest.raises(PermissionError, match=r"run directory \(paths.output_dir\): cannot write to '.*afile/sub'"):
        train(cfg)


@pytest.mark.parametrize(("overrides", "component"), [
    (["peft=lora", "peft.save_dir={blocked}"], "PEFT save_dir"),
    (["finetune=linear_probe_cached", "finetune.cache_dir={blocked}"], "FeatureCache cache_dir"),
])
def test_unwritable_component_folder_fails_at_setup(compose, tmp_path, blocked, tiny_bert_dir, overrides, component):
    cfg = compose(*(o.format(blocked=blocked) for o in overrides), *tiny_overrides(tiny_bert_dir))
    with pytest.raises(PermissionError, match=rf"^{component}: cannot write to '{blocked}'"):
        train(cfg)
    assert not (tmp_path / "metrics.json").exists()  # failed before the first validation, not after training


def test_logger_none_runs_with_the_default_callbacks(compose, tmp_path, tiny_bert_dir):
    cfg = compose("logger=none", *tiny_overrides(tiny_bert_dir))
    assert cfg.callbacks.lr_monitor is not None  # the default LearningRateMonitor needs a logger
    metrics = train(cfg)
    assert metrics["train/loss"] > 0 and (tmp_path / "metrics.json").exists()
